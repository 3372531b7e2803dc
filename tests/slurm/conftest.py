"""Fixtures and helpers for tests against a real Slurm cluster.

The cluster is normally the private single-node one that
``scripts/local-slurm.sh up`` starts (see docs/local-slurm.md).  When no usable
cluster answers, the tests are skipped, unless ``INFSCALE_REQUIRE_SLURM=1``, in
which case they fail (CI sets it so that a broken cluster cannot pass silently).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
LOCAL_SLURM_SCRIPT = REPO_ROOT / "scripts" / "local-slurm.sh"
REQUIRE_ENV = "INFSCALE_REQUIRE_SLURM"

#: sacct states after which a job will not run again by itself.
TERMINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "REVOKED",
        "TIMEOUT",
    }
)
#: squeue states of a job that may still run (cancelled after each test).
ACTIVE_STATES = frozenset(
    {
        "CONFIGURING",
        "PENDING",
        "REQUEUED",
        "REQUEUE_FED",
        "REQUEUE_HOLD",
        "RESIZING",
        "RUNNING",
        "SUSPENDED",
    }
)
USABLE_NODE_STATES = frozenset({"idle", "mixed", "allocated", "completing"})

T = TypeVar("T")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "slurm: needs a running Slurm cluster (scripts/local-slurm.sh up); "
        f"skipped when none answers unless {REQUIRE_ENV}=1",
    )


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def run(
    *args: str, timeout: float = 30, check: bool = True, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a Slurm command; raise with its output if ``check`` and it fails."""
    proc = subprocess.run(list(args), check=False, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
        )
    return proc


def wait_until(
    probe: Callable[[], T | None],
    timeout: float,
    what: str,
    interval: float = 0.5,
    diagnose: Callable[[], str] | None = None,
) -> T:
    """Call ``probe`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            extra = f"\n{diagnose()}" if diagnose else ""
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}{extra}")
        time.sleep(interval)


def sacct_state(job_id: str) -> str | None:
    """The job's state from ``sacct -X -n -P -j ID -o State``, or None if unknown yet.

    ``CANCELLED by 0`` is reported as ``CANCELLED``.
    """
    proc = run("sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State", check=False)
    if proc.returncode != 0:
        return None
    lines = [line.strip() for line in proc.stdout.splitlines() if line.strip()]
    if not lines:
        return None
    return lines[-1].split()[0]


def squeue_state(job_id: str) -> str | None:
    """The job's state as slurmctld sees it now (e.g. PENDING, RUNNING), or None."""
    proc = run("squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T", check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        return None
    return proc.stdout.split()[0]


def describe_job(job_id: str) -> str:
    proc = run("scontrol", "show", "job", job_id, check=False)
    return (proc.stdout or proc.stderr).strip()


def wait_for_terminal_state(job_id: str, timeout: float = 60.0, interval: float = 0.5) -> str:
    """Poll ``sacct -X -n -P -j ID -o State`` until a terminal state; return it.

    Fails (AssertionError) after ``timeout`` seconds, showing the last state seen
    and ``scontrol show job``.
    """
    last: list[str | None] = [None]

    def probe() -> str | None:
        last[0] = sacct_state(job_id)
        return last[0] if last[0] in TERMINAL_STATES else None

    return wait_until(
        probe,
        timeout,
        f"job {job_id} to reach a terminal state in sacct",
        interval=interval,
        diagnose=lambda: f"last sacct state: {last[0]}\n{describe_job(job_id)}",
    )


def wait_for_running(job_id: str, timeout: float = 30.0) -> None:
    wait_until(
        lambda: squeue_state(job_id) == "RUNNING",
        timeout,
        f"job {job_id} to run",
        interval=0.2,
        diagnose=lambda: describe_job(job_id),
    )


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------
@dataclass
class SlurmCluster:
    """What the tests learn about the cluster they run against."""

    node_states: list[str]
    partitions: list[str]
    default_partition: str | None
    gpus: int
    enforces_associations: bool
    accounts: list[str] = field(default_factory=list)


def _probe_cluster() -> tuple[SlurmCluster | None, str]:
    commands = ("sbatch", "squeue", "sacct", "scancel", "sinfo", "scontrol", "sacctmgr")
    missing = [c for c in commands if not shutil.which(c)]
    if missing:
        return None, f"Slurm client commands not installed: {', '.join(missing)}"
    # fast first check: sinfo retries for about 10 s when slurmctld is down
    try:
        ping = run("scontrol", "ping", timeout=20, check=False)
    except subprocess.TimeoutExpired:
        return None, "scontrol ping did not answer within 20 s"
    if ping.returncode != 0:
        said = (ping.stdout.strip() or ping.stderr.strip()).splitlines()
        return None, f"slurmctld does not answer ({said[0] if said else 'scontrol ping failed'})"
    try:
        nodes = run("sinfo", "-h", "-N", "-o", "%T", timeout=20, check=False)
    except subprocess.TimeoutExpired:
        return None, "sinfo did not answer within 20 s"
    if nodes.returncode != 0:
        return None, f"sinfo failed: {nodes.stderr.strip()}"
    states = nodes.stdout.split()
    if not any(s in USABLE_NODE_STATES for s in states):
        return None, f"no idle/mixed node (node states: {states or 'none'})"
    try:
        acct = run("sacct", "-n", "-X", timeout=20, check=False)
    except subprocess.TimeoutExpired:
        return None, "sacct did not answer within 20 s"
    if acct.returncode != 0:
        return None, f"sacct does not work: {(acct.stderr or acct.stdout).strip()}"

    parts = run("sinfo", "-h", "-o", "%P", check=False).stdout.split()
    default = next((p.rstrip("*") for p in parts if p.endswith("*")), None)
    gpus = 0
    for gres in run("sinfo", "-h", "-N", "-o", "%G", check=False).stdout.split():
        # e.g. gpu:4 or gpu:a100:4(S:0)
        for item in gres.split(","):
            fields = item.split("(")[0].split(":")
            if fields[0] == "gpu" and fields[-1].isdigit():
                gpus = max(gpus, int(fields[-1]))
    config = run("scontrol", "show", "config", check=False).stdout
    enforce = any(
        line.split("=", 1)[0].strip() == "AccountingStorageEnforce" and "associations" in line
        for line in config.splitlines()
    )
    accounts = run("sacctmgr", "-n", "-P", "show", "account", "format=Account", check=False).stdout.split()
    cluster = SlurmCluster(
        node_states=states,
        partitions=[p.rstrip("*") for p in parts],
        default_partition=default,
        gpus=gpus,
        enforces_associations=enforce,
        accounts=accounts,
    )
    return cluster, ""


def _status_output() -> str:
    if not LOCAL_SLURM_SCRIPT.exists():
        return ""
    try:
        proc = subprocess.run(
            ["bash", str(LOCAL_SLURM_SCRIPT), "status"],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired:
        return "scripts/local-slurm.sh status timed out"
    return (proc.stdout + proc.stderr).strip()


def skip_or_fail(reason: str) -> None:
    """Skip the test, or fail it when INFSCALE_REQUIRE_SLURM=1."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm_cluster() -> SlurmCluster:
    """A usable Slurm cluster, or skip (fail with INFSCALE_REQUIRE_SLURM=1)."""
    cluster, reason = _probe_cluster()
    if cluster is None:
        status = _status_output()
        hint = "start one with: bash scripts/local-slurm.sh up"
        skip_or_fail(
            f"no usable Slurm cluster: {reason}; {hint}"
            + (f"\n--- scripts/local-slurm.sh status:\n{status}" if status else "")
        )
    assert cluster is not None
    return cluster


@pytest.fixture
def submit(slurm_cluster: SlurmCluster, tmp_path: Path) -> Iterator[Callable[..., str]]:
    """``submit(*sbatch_args)`` -> job id; runs in tmp_path, cancels leftovers."""
    submitted: list[str] = []

    def _submit(*args: str) -> str:
        proc = run("sbatch", "--parsable", f"--chdir={tmp_path}", "--time=5", *args, cwd=tmp_path)
        job_id = proc.stdout.strip().split(";")[0]
        assert job_id.isdigit(), f"unexpected sbatch output: {proc.stdout!r}"
        submitted.append(job_id)
        return job_id

    yield _submit
    active = [j for j in submitted if squeue_state(j) in ACTIVE_STATES]
    if active:
        run("scancel", *active, check=False)
