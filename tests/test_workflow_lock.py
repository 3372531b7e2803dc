"""`infscale run` and Snakemake's working-directory lock: a live holder is refused, a dead one's lock is removed
(and said so), and a run after `kill -9` of the driver completes the campaign without --unlock or
--rerun-incomplete from the user."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.workflow

# four bench jobs (one per layout), so that a kill at the first cell leaves the campaign half done
CAMPAIGN = {"name": "kill", "backend": "sim", "hardware": "h200-sxm", "models": ["llama-3.1-8b"],
            "layouts": ["dp1", "tp2", "dp2", "tp4"], "requests": 400,
            "workloads": [{"name": "a", "isl": 128, "osl": [256, 512, 1024]}]}


def run_command(workdir: Path) -> list[str]:
    config = workdir / "kill.yaml"
    if not config.exists():
        config.write_text(yaml.safe_dump(CAMPAIGN))
        (workdir / "settings.yaml").write_text(yaml.safe_dump({"packing": "layout"}))
    return [sys.executable, "-m", "infscale", "run", str(config), "--profile", str(REPO / "profiles" / "local"),
            "--settings", str(workdir / "settings.yaml"), "--results-root", str(workdir / "results"),
            "--directory", str(workdir)]


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_a_live_snakemake_holding_the_lock_is_refused(tmp_path: Path) -> None:
    (tmp_path / "Snakefile").write_text('rule all:\n    output: "slow.txt"\n    shell: "sleep 60; touch {output}"\n')
    holder = subprocess.Popen([sys.executable, "-m", "snakemake", "--snakefile", str(tmp_path / "Snakefile"),
                               "--directory", str(tmp_path), "--cores", "1"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        locks = tmp_path / ".snakemake" / "locks"
        wait_for(lambda: locks.is_dir() and any(locks.iterdir()), 60, "the holder's lock")
        held = sorted(p.name for p in locks.iterdir())
        result = subprocess.run(run_command(tmp_path), capture_output=True, text=True, timeout=120)
        assert result.returncode == 1
        (line,) = result.stderr.strip().splitlines()                                  # one clear line
        assert line.startswith(f"a live snakemake (pid {holder.pid}: {sys.executable} -m snakemake --snakefile ")
        assert line.endswith(f") holds the lock of {tmp_path}; wait for it to end or stop it (infscale never "
                             "removes a live lock)")
        assert sorted(p.name for p in locks.iterdir()) == held and holder.poll() is None   # left alone
        assert not (tmp_path / "results" / "kill" / "cells").exists()                     # nothing ran
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()


@pytest.mark.parametrize("killed", ["everything", "the driver only"])
def test_a_run_after_kill_9_of_the_driver_completes_the_campaign(tmp_path: Path, killed: str) -> None:
    """`everything`: the driver, its snakemake and the bench jobs die by SIGKILL (a lost node or terminal):
    Snakemake's lock and incomplete markers stay behind. `the driver only`: its snakemake is told to stop
    (SIGTERM when its parent dies), finishes the running jobs and exits, rather than going on unwatched."""
    command = run_command(tmp_path)
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    cells = tmp_path / "results" / "kill" / "cells"
    wait_for(lambda: cells.is_dir() and any(cells.glob("*.parquet")), 120, "the first cell")
    (child,) = [int(pid) for pid in Path(f"/proc/{driver.pid}/task/{driver.pid}/children").read_text().split()]
    if killed == "everything":
        os.killpg(driver.pid, signal.SIGKILL)
    else:
        os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    wait_for(lambda: not alive(child), 120, "the driver's snakemake to stop")
    assert len(list(cells.glob("*.parquet"))) < 12                                   # killed mid-run
    if killed == "everything":
        assert any((tmp_path / ".snakemake" / "locks").iterdir())                    # a stale lock …
        assert any((tmp_path / ".snakemake" / "incomplete").iterdir())               # … and incomplete outputs

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "infscale run: taking over campaign kill from a driver that is gone (pid " in rerun.stderr
    if killed == "everything":
        assert f"infscale run: removed the Snakemake lock of {tmp_path}: the snakemake that held it is gone" \
            in rerun.stderr
    merged = pl.read_parquet(tmp_path / "results" / "kill" / "cells.parquet")
    assert merged.height == 12 and set(merged["status"]) == {"ok"}
    assert "12 cells planned: 12 ok" in rerun.stdout                                 # the summary, printed
    logs = "".join(p.read_text() for p in (tmp_path / "results" / "kill" / "logs" / "bench").glob("*.log"))
    assert "Traceback" not in logs and "ResultExistsError" not in logs
