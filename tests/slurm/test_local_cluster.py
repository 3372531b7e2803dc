"""End-to-end checks of the local Slurm cluster with the real sbatch/squeue/sacct/scancel.

Start the cluster first: ``bash scripts/local-slurm.sh up``.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import (
    SlurmCluster,
    describe_job,
    run,
    skip_or_fail,
    wait_for_running,
    wait_for_terminal_state,
    wait_until,
)

pytestmark = pytest.mark.slurm


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def test_batch_job_completes(submit: Callable[..., str], tmp_path: Path) -> None:
    job = submit("-o", str(tmp_path / "out-%j.txt"), "--wrap", "echo hi")
    assert wait_for_terminal_state(job, timeout=60) == "COMPLETED"
    assert _read(tmp_path / f"out-{job}.txt").strip() == "hi"


def test_gpu_job_sees_two_devices(
    slurm_cluster: SlurmCluster, submit: Callable[..., str], tmp_path: Path
) -> None:
    if slurm_cluster.gpus < 2:
        skip_or_fail(f"the cluster's node has {slurm_cluster.gpus} GPUs; this test needs 2")
    env_file = tmp_path / "env.txt"
    job = submit("--gpus-per-node=2", "-o", str(tmp_path / "out-%j.txt"), "--wrap", f"env > {env_file}")
    assert wait_for_terminal_state(job, timeout=60) == "COMPLETED"
    env = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)
    assert "CUDA_VISIBLE_DEVICES" in env, sorted(k for k in env if k.startswith(("SLURM", "CUDA")))
    ids = env["CUDA_VISIBLE_DEVICES"].split(",")
    assert len(ids) == 2 and len(set(ids)) == 2, env["CUDA_VISIBLE_DEVICES"]
    assert all(i.isdigit() for i in ids), env["CUDA_VISIBLE_DEVICES"]


def test_scancel_marks_job_cancelled(submit: Callable[..., str], tmp_path: Path) -> None:
    job = submit("-o", str(tmp_path / "out-%j.txt"), "--wrap", "sleep 300")
    wait_for_running(job)
    run("scancel", job)
    assert wait_for_terminal_state(job, timeout=60) == "CANCELLED"


def test_requeue_reruns_with_restart_count(submit: Callable[..., str], tmp_path: Path) -> None:
    out = tmp_path / "requeue.txt"
    job = submit(
        "--requeue",
        "--open-mode=append",
        "-o",
        str(out),
        "--wrap",
        'echo "restart=${SLURM_RESTART_COUNT:-0}"; sleep 300',
    )
    wait_for_running(job)
    wait_until(
        lambda: "restart=0" in _read(out),
        30,
        "the first run to start",
        diagnose=lambda: describe_job(job),
    )
    run("scontrol", "requeue", job)
    # the rerun may start only after AuthInfo=cred_expire (10 s in the local cluster)
    wait_until(
        lambda: "restart=1" in _read(out),
        60,
        "the requeued job to run again with SLURM_RESTART_COUNT=1",
        diagnose=lambda: f"output so far: {_read(out)!r}\n{describe_job(job)}",
    )
    # the first run's output also holds slurmstepd's "*** JOB ... DUE TO JOB REQUEUE ***"
    runs = [line for line in _read(out).splitlines() if line.startswith("restart=")]
    assert runs == ["restart=0", "restart=1"]
    run("scancel", job)
    assert wait_for_terminal_state(job, timeout=60) == "CANCELLED"


def test_unknown_partition_is_rejected(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    name = "no-such-partition-infscale"
    assert name not in slurm_cluster.partitions
    proc = subprocess.run(
        ["sbatch", "--parsable", f"--partition={name}", "--wrap", "true"],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert proc.returncode != 0, f"sbatch accepted an unknown partition: {proc.stdout!r}"
    assert "partition" in (proc.stdout + proc.stderr).lower(), proc.stderr


def test_second_partition_and_account_are_accepted(
    slurm_cluster: SlurmCluster, submit: Callable[..., str]
) -> None:
    if "gpu" not in slurm_cluster.partitions or "infscale-test" not in slurm_cluster.accounts:
        pytest.skip("needs the gpu partition and infscale-test account of scripts/local-slurm.sh")
    job = submit("--partition=gpu", "--account=infscale-test", "--wrap", "true")
    assert wait_for_terminal_state(job, timeout=60) == "COMPLETED"

    def recorded() -> str:
        # slurmdbd may fill in the partition a moment after the final state
        out = run("sacct", "-X", "-n", "-P", "-j", job, "-o", "Partition,Account").stdout.strip()
        return out if out == "gpu|infscale-test" else ""

    wait_until(recorded, 30, f"sacct to record job {job} in partition gpu, account infscale-test")


def test_unknown_account_is_rejected(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    if not slurm_cluster.enforces_associations:
        pytest.skip("the cluster does not enforce accounts (AccountingStorageEnforce)")
    proc = subprocess.run(
        ["sbatch", "--parsable", "--account=no-such-account-infscale", "--wrap", "true"],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert proc.returncode != 0, f"sbatch accepted an unknown account: {proc.stdout!r}"
    assert "account" in (proc.stdout + proc.stderr).lower(), proc.stderr
