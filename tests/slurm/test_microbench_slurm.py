"""`infscale microbench CONFIG --launcher <slurm settings>` on the real (local) Slurm cluster: one sbatch job
through submitit, with the profile's account and CPU sizing, that writes the campaign's microbench.json.

Start the cluster first: ``bash scripts/local-slurm.sh up``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from .conftest import SlurmCluster, run, wait_until

pytestmark = pytest.mark.slurm

ACCOUNT = "infscale-test"


def write_campaign(tmp_path: Path, slurm_cluster: SlurmCluster) -> tuple[str, list[str]]:
    """(campaign name, the `infscale microbench` command) of a sim campaign with a TP2 layout."""
    if ACCOUNT not in slurm_cluster.accounts:
        pytest.fail(f"needs the {ACCOUNT} account of scripts/local-slurm.sh (accounts: {slurm_cluster.accounts})")
    name = f"mbslurm-{uuid.uuid4().hex[:8]}"
    config = tmp_path / "campaign.yaml"
    config.write_text(yaml.safe_dump({
        "name": name, "backend": "sim", "hardware": "h200-sxm", "models": ["llama-3.1-8b"],
        "layouts": ["dp1", "tp2"], "requests": 8, "workloads": [{"name": "w", "isl": 128, "osl": [128]}]}))
    launcher = tmp_path / "launcher.yaml"
    launcher.write_text(yaml.safe_dump({
        "executor": "slurm", "poll_interval_s": 1, "max_poll_interval_s": 3,
        "slurm": {"account": ACCOUNT, "cpus_per_cpu_job": 2, "mem_per_cpu_job_gb": 2, "time_limit_min_min": 5}}))
    results = tmp_path / "results"
    command = [sys.executable, "-m", "infscale", "microbench", str(config), "--results-root", str(results),
               "--launcher", str(launcher)]
    return name, command


def test_microbench_runs_as_one_slurm_job(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    from infscale.launch.driver import slurm_job_name

    name, command = write_campaign(tmp_path, slurm_cluster)
    results = tmp_path / "results"
    started = time.monotonic()
    first = subprocess.run(command, capture_output=True, text=True, timeout=180)
    seconds = time.monotonic() - started
    assert first.returncode == 0, first.stdout + first.stderr
    assert seconds < 120, f"the Slurm microbenchmark took {seconds:.0f} s"
    assert "0 GPU(s), 1 task(s)/node, 2 CPU(s)/task, 2 GB" in first.stdout  # a sim campaign: a CPU job

    target = results / name / "calibration" / "h200-sxm" / "microbench.json"
    report = json.loads(target.read_text())
    assert report["environment"]["device"] == "cpu"
    assert [c["world"] for c in report["collectives"]] == [2] and report["collectives"][0]["sum_correct"]

    job_name = slurm_job_name(name, "microbench.h200-sxm")

    def accounted() -> list[list[str]]:
        out = run("sacct", "-X", "-n", "-P", "--name", job_name, "-S", "now-1hour", "-o",
                  "JobID,State,Account,AllocTRES").stdout
        rows = [line.split("|") for line in out.splitlines() if line.strip()]
        return rows if rows and all(row[1] == "COMPLETED" for row in rows) else []

    rows = wait_until(accounted, 30, f"sacct to show job {job_name} COMPLETED")
    assert len(rows) == 1, rows                         # exactly one sbatch job
    job_id, _, account, tres = rows[0]
    assert account == ACCOUNT and "cpu=2" in tres and "gres/gpu" not in tres
    submission = results / name / "jobs" / "submitit" / f"{job_id}_submission.sh"
    assert f"#SBATCH --job-name={job_name}" in submission.read_text()

    # a second run finds the measurement and submits nothing
    again = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "exists" in again.stdout, again.stdout + again.stderr
    assert len(run("sacct", "-X", "-n", "-P", "--name", job_name, "-S", "now-1hour", "-o", "JobID")
               .stdout.split()) == 1


def test_a_rerun_reattaches_to_the_job_of_a_killed_driver(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    from infscale.launch.driver import slurm_job_name

    name, command = write_campaign(tmp_path, slurm_cluster)
    job_name = slurm_job_name(name, "microbench.h200-sxm")
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: run("squeue", "-h", "-n", job_name, "-o", "%i").stdout.strip(), 60,
                   f"job {job_name} to be queued")
    finally:
        driver.kill()
        driver.wait(timeout=30)
    again = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "re-attached to Slurm job" in again.stdout
    assert (tmp_path / "results" / name / "calibration" / "h200-sxm" / "microbench.json").exists()
    ids = run("sacct", "-X", "-n", "-P", "--name", job_name, "-S", "now-1hour", "-o", "JobID").stdout.split()
    assert len(ids) == 1, ids  # measured once
