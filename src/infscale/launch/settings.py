"""Launcher settings (the `launcher:` block of a Snakemake profile's settings file), validated before anything
is submitted: a wrong value is a one-line error naming the key, never a job that pends forever."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from infscale.campaign.spec import SpecError, _format_pydantic_error
from infscale.yamlfile import YamlFileError, read_yaml

# Slurm names (partition, account, QOS, node): letters, digits and _ . - + only — nothing a shell would act on.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
# Slurm constraint expressions: features joined by & | , with counts [..] and parentheses.
CONSTRAINT = re.compile(r"^[A-Za-z0-9_.,&|\[\]*:()!-]+$")
# sbatch option names and values passed through `extra_sbatch`
OPTION = re.compile(r"^[a-z][a-z0-9-]*$")
VALUE = re.compile(r"^[A-Za-z0-9_.,:=@%/+\[\]-]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _name(value: str | None, what: str) -> str | None:
    if value is not None and not NAME.match(value):
        raise ValueError(f"{what} {value!r} may hold only letters, digits and _ . - +")
    return value


class Container(_Strict):
    """Run each job inside a container: Apptainer (`apptainer exec`) or pyxis (`srun --container-image`)."""

    runtime: Literal["apptainer", "pyxis"]
    image: str = Field(pattern=r"^[A-Za-z0-9_./:@+-]+$", description="image file (.sif) or registry reference")
    binds: list[str] = Field(default_factory=list, description="host:container paths to mount")

    @field_validator("binds")
    @classmethod
    def _safe_binds(cls, binds: list[str]) -> list[str]:
        for bind in binds:
            if not re.match(r"^[A-Za-z0-9_./:+-]+$", bind):
                raise ValueError(f"bind {bind!r} may hold only letters, digits and _ . / : + -")
        return binds


class SlurmSettings(_Strict):
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    time_limit_max_min: int = Field(default=1440, gt=0, description="cap on any job's time limit (minutes)")
    time_limit_min_min: int = Field(default=5, gt=0, description="floor on any job's time limit (minutes)")
    time_factor: float = Field(default=1.5, gt=0, description="time limit = estimate × this, within the cap")
    cpus_per_gpu: int = Field(default=8, gt=0)
    mem_per_gpu_gb: int = Field(default=64, gt=0)
    cpus_per_cpu_job: int = Field(default=1, gt=0, description="CPUs of a job that needs no GPU (sim backend)")
    mem_per_cpu_job_gb: int = Field(default=4, gt=0)
    extra_sbatch: dict[str, str | int] = Field(default_factory=dict, description="more sbatch options")
    setup: list[list[str]] = Field(default_factory=list, description="commands run before the job, as argv lists")
    container: Container | None = None
    signal_delay_s: int = Field(default=120, ge=5, description="USR2 this long before the time limit")
    max_requeues: int = Field(default=3, ge=0, description="timeouts/preemptions resumed per job")
    max_retries: int = Field(default=2, ge=0, description="node failures and NCCL/Xid errors retried per job")

    @model_validator(mode="after")
    def _time_bounds(self) -> "SlurmSettings":
        if self.time_limit_min_min > self.time_limit_max_min:
            raise ValueError(f"time_limit_min_min={self.time_limit_min_min} exceeds "
                             f"time_limit_max_min={self.time_limit_max_min}")
        return self

    @field_validator("partition", "account", "qos")
    @classmethod
    def _names(cls, value: str | None, info: Any) -> str | None:
        return _name(value, info.field_name)

    @field_validator("constraint")
    @classmethod
    def _constraint(cls, value: str | None) -> str | None:
        if value is not None and not CONSTRAINT.match(value):
            raise ValueError(f"constraint {value!r} may hold only feature names and & | , [ ] * : ( ) !")
        return value

    @field_validator("extra_sbatch")
    @classmethod
    def _options(cls, options: dict[str, str | int]) -> dict[str, str | int]:
        for key, value in options.items():
            if not OPTION.match(key):
                raise ValueError(f"sbatch option name {key!r} must look like 'mail-type'")
            if not VALUE.match(str(value)):
                raise ValueError(f"value {value!r} of sbatch option {key} holds characters a shell would act on")
        return options

    @field_validator("setup")
    @classmethod
    def _argv(cls, commands: list[list[str]]) -> list[list[str]]:
        for command in commands:
            if not command or not command[0]:
                raise ValueError("each setup command is a non-empty list: [program, arg, ...]")
        return commands


class LauncherSettings(_Strict):
    executor: Literal["debug", "local", "slurm"] = "debug"
    poll_interval_s: float = Field(default=10.0, gt=0, description="seconds between batched status queries")
    max_poll_interval_s: float = Field(default=120.0, gt=0, description="backoff ceiling")
    slurm: SlurmSettings = Field(default_factory=SlurmSettings)
    # the trtllm backend's site settings (container version, local model dirs, engine cache): docs/trtllm.md
    trtllm: dict[str, Any] | None = None

    @field_validator("trtllm")
    @classmethod
    def _trtllm(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            from infscale.backends.trtllm.commands import TrtllmSettings

            TrtllmSettings.model_validate(value)  # checked here, before anything is submitted
        return value


def load_launcher_settings(raw: Any, source: str) -> LauncherSettings:
    if raw is None:
        return LauncherSettings()
    if isinstance(raw, (str, Path)):
        source = str(raw)
        try:
            raw = read_yaml(raw, "launcher settings file")
        except YamlFileError as err:
            raise SpecError([str(err)]) from None
    try:
        return LauncherSettings.model_validate(raw)
    except ValidationError as err:
        lines = [_format_pydantic_error(source, e, raw, LauncherSettings)
                 .replace(f"{source}: ", f"{source}: launcher.", 1) for e in err.errors()]
        raise SpecError(lines) from None


def check_against_cluster(settings: LauncherSettings, source: str) -> None:
    """Ask the cluster (sinfo, sacctmgr) whether the partition, account and QOS exist; raise SpecError if not."""
    if settings.executor != "slurm":
        return
    if shutil.which("sbatch") is None:
        raise SpecError([f"{source}: launcher.executor: 'slurm' but sbatch is not on PATH"])
    slurm = settings.slurm
    problems = []
    if slurm.partition:
        partitions = _lines(["sinfo", "-h", "-o", "%R"])
        if slurm.partition not in partitions:
            problems.append(f"{source}: launcher.slurm.partition: unknown partition {slurm.partition!r}; "
                            f"this cluster has: {', '.join(sorted(set(partitions))) or 'none'}")
    if slurm.account:
        accounts = _lines(["sacctmgr", "-nP", "show", "associations", "where", f"user={_user()}",
                           "format=account"])
        if slurm.account not in accounts:
            problems.append(f"{source}: launcher.slurm.account: {slurm.account!r} is not an account of user "
                            f"{_user()}; yours: {', '.join(sorted(set(accounts))) or 'none'}")
    if slurm.qos:
        qos = _lines(["sacctmgr", "-nP", "show", "qos", "format=name"])
        if slurm.qos not in qos:
            problems.append(f"{source}: launcher.slurm.qos: unknown QOS {slurm.qos!r}; known: "
                            f"{', '.join(sorted(set(qos))) or 'none'}")
    if problems:
        raise SpecError(problems)


def _lines(command: list[str]) -> list[str]:
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise SpecError([f"cannot ask the cluster ({' '.join(command)}): {err}"]) from None
    return [line.strip() for line in out.splitlines() if line.strip()]


def _user() -> str:
    import getpass

    return getpass.getuser()
