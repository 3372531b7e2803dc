"""The calibration microbenchmarks (infscale.microbench) as a job: `infscale microbench`, the `microbench` rule.

A campaign is measured once per hardware target, into `results/<campaign>/calibration/<hardware>/microbench.json`:
the collectives on every GPU count its replicas use within one node (2 … the largest TP × PP, capped at the node's
GPUs: the powers of two and the counts that occur), and the GEMM shapes of its dense models. The measurement runs
through the same executors as the bench jobs: `debug` in this process, `local` in a submitit subprocess, `slurm`
as one sbatch job of one node and one task (the collectives start their own rank processes), with the profile's
partition, account, QOS, constraint, setup and container; a rerun re-attaches to that job while it is queued or
running (found by its name). A measurement on disk is never replaced.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path

from submitit.helpers import Checkpointable

from infscale.campaign import Campaign
from infscale.launch.settings import LauncherSettings
from infscale.pipeline import CampaignRun

DEFAULT_MODEL = "llama-3.1-8b"  # GEMM and attention shapes when a campaign has no dense catalog model
RESULT = "microbench.json"


def collective_worlds(gpus_per_replica: Iterable[int], gpus_per_node: int) -> list[int]:
    """Rank counts of the collectives: 2 … the largest GPUs per replica (capped at one node), as the powers of two
    and the counts that occur. Empty when every replica has one GPU (no collectives)."""
    counts = set(gpus_per_replica)
    top = min(max(counts, default=1), gpus_per_node)
    powers = {2**i for i in range(1, top.bit_length()) if 2**i <= top}
    return sorted(powers | {g for g in counts if 2 <= g <= top})


def dense_models(campaign: Campaign) -> list[str]:
    """The campaign's dense catalog models, in campaign order (the first gives the attention shape); MoE models and
    models known only by a config.json are left out, and DEFAULT_MODEL stands in when none is left."""
    from infscale.catalog import CatalogError, get_model

    names: list[str] = []
    for arch in campaign.models.values():
        if arch.is_moe or arch.name in names:
            continue
        try:
            get_model(arch.name)
        except CatalogError:
            continue
        names.append(arch.name)
    return names or [DEFAULT_MODEL]


def campaign_targets(run: CampaignRun) -> tuple[list[int], list[str]]:
    """(collective rank counts, models) to measure for the campaign's hardware."""
    per_replica = [item.cell.layout.gpus_per_replica for item in run.planned]
    return collective_worlds(per_replica, run.campaign.hardware.gpus_per_node), dense_models(run.campaign)


def calibration_dir(run: CampaignRun) -> Path:
    """`results/<campaign>/calibration/<hardware>/`: the measurement and the profile made from it."""
    return run.results_dir / "calibration" / run.campaign.hardware.name


def job_gpus(worlds: list[int], device: str, needs_gpu: bool = True) -> int:
    """GPUs the job asks for: the largest rank count measured (1 without collectives); 0 for a CPU measurement or,
    unless CUDA is asked for, a campaign that needs no GPU (the sim backend)."""
    if device == "cpu" or (device == "auto" and not needs_gpu):
        return 0
    return max(worlds, default=1)


def failure_line(err: BaseException) -> str:
    """The job's own exception line out of submitit's FailedJobError (which carries the whole traceback)."""
    lines = str(err).splitlines()
    for line in reversed(lines):
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b", line):
            return line.strip()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


class MicrobenchJob(Checkpointable):
    """Callable shipped to the job. After a requeue (time limit, preemption) it measures again from the start."""

    def __init__(self, out: str, worlds: list[int], models: list[str], device: str = "auto"):
        self.out, self.worlds, self.models, self.device = out, list(worlds), list(models), device

    def __call__(self) -> str:
        from infscale.extras import require

        require("torch", "the calibration microbenchmarks (infscale microbench, the `calibration` target)")
        from infscale.microbench import run_microbench

        return str(run_microbench(Path(self.out), self.worlds, self.models, self.device,
                                  log=lambda line: print(line, flush=True)))


def drive_microbench(job: MicrobenchJob, settings: LauncherSettings, folder: Path, name: str, gpus: int,
                     log: Callable[[str], None] = print) -> Path:
    """Run the measurement through the chosen executor and return the file it wrote; the job's own error (a
    submitit FailedJobError with its traceback, or the exception itself under `debug`) propagates."""
    if settings.executor == "debug":
        return Path(job())
    import submitit

    if settings.executor == "local":
        from infscale.launch.resources import local_executor

        executor = local_executor(folder)
    else:
        from infscale.launch.resources import container_python, microbench_resources, submitit_parameters

        slurm = settings.slurm
        resources = microbench_resources(gpus, slurm)
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=slurm.max_requeues,
                                         slurm_python=container_python(slurm))
        executor.update_parameters(**submitit_parameters(resources, slurm, name, []))
        from infscale.launch.registry import find_active_by_name

        active = find_active_by_name(name)
        if active:  # submitted by an earlier driver that died: wait for it rather than measure twice
            log(f"microbench: re-attached to Slurm job {active[0]} ({name})")
            return Path(submitit.SlurmJob(folder=folder, job_id=active[0]).result())
        log(f"microbench: {resources.describe()}")
    submitted = executor.submit(job)
    log(f"microbench: submitted {settings.executor} job {submitted.job_id} (output in {folder})")
    return Path(submitted.result())
