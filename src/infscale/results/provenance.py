"""Where a result came from: software, machine, scheduler job, campaign. Never environment secrets."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from datetime import datetime, timezone
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import infscale

KEY_PACKAGES = ("numpy", "pyarrow", "pydantic", "polars", "snakemake", "submitit", "torch", "tensorrt_llm",
                "nvidia-ml-py")
# Only these scheduler variables are recorded: an allow-list, so no token or password in the environment can leak.
SLURM_VARIABLES = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_NODELIST",
                   "SLURM_JOB_PARTITION", "SLURM_RESTART_COUNT", "SLURM_CLUSTER_NAME")


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the infscale checkout in use (None when installed from a wheel)."""
    if os.environ.get("INFSCALE_GIT_COMMIT"):
        return os.environ["INFSCALE_GIT_COMMIT"]
    source_dir = Path(infscale.__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(source_dir), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True)
        dirty = subprocess.run(["git", "-C", str(source_dir), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() + (DIRTY_SUFFIX if dirty else "")


DIRTY_SUFFIX = "-dirty"


def split_commit(commit: str | None) -> tuple[str | None, bool]:
    """(the commit, whether the working tree had uncommitted changes) of a `git_commit()` value."""
    if commit and commit.endswith(DIRTY_SUFFIX):
        return commit.removesuffix(DIRTY_SUFFIX), True
    return commit, False


def describe_commit(commit: str | None, dirty: bool = False) -> str:
    """How a document names the code's commit (a `git_commit()` value, or a clean one and `dirty`): code with
    uncommitted changes is never passed off as that commit's code."""
    clean, suffixed = split_commit(commit)
    dirty = dirty or suffixed
    if clean is None:
        return "an unknown commit (not run from a git checkout)"
    if dirty:
        return (f"commit `{clean}` with uncommitted changes (the working tree was dirty: the code that ran is not "
                "exactly that commit)")
    return f"commit `{clean}`"


@lru_cache(maxsize=1)
def software() -> dict[str, object]:
    versions = {}
    for name in KEY_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {
        "infscale_version": infscale.__version__,
        "git_commit": git_commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
    }


def collect(campaign: str | None = None, config_hash: str | None = None) -> dict[str, object]:
    """Provenance of the current process, for a result file's metadata."""
    return {
        **software(),
        "hostname": socket.gethostname(),
        "campaign": campaign,
        "config_hash": config_hash,
        "slurm": {k: os.environ[k] for k in SLURM_VARIABLES if k in os.environ},
    }
