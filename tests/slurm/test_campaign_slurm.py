"""Acceptance tests of the Slurm launcher: whole campaigns driven by ``infscale run`` through sbatch on a real
(local, single-node) Slurm cluster, with cancels, time limits, node failures, killed drivers, OOM cells and bad
profiles.

Start the cluster first: ``bash scripts/local-slurm.sh up``. Every test uses its own campaign name (with a random
suffix), so its Slurm job names ``infscale.<campaign>.<hash>`` and the ``sacct`` queries on them never collide
with another test's or an earlier run's. Faults come from the sim backend's injection hooks
(``INFSCALE_SIM_DELAY_S``, ``INFSCALE_SIM_FAIL``), which reach the Slurm jobs through sbatch's default
``--export=ALL``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from .conftest import TERMINAL_STATES, SlurmCluster, run, wait_until

pytestmark = pytest.mark.slurm

REPO_ROOT = Path(__file__).resolve().parents[2]
PROFILE = REPO_ROOT / "profiles" / "slurm"
PYTHON = sys.executable
ACCOUNT = "infscale-test"
#: columns of cells.parquet that legitimately differ between two runs of the same cells
VOLATILE_COLUMNS = ("started_at", "ended_at")
#: fast polling so that the tests do not wait on the launcher's backoff
FAST_POLL = {"poll_interval_s": 1, "max_poll_interval_s": 3}


# --------------------------------------------------------------------------------------------------- helpers


@dataclass
class Measured:
    """One line of results/<c>/logs/measured.log."""

    time: str
    cell_id: str
    status: str
    host: str
    slurm_job_id: str
    reason: str


@dataclass
class SacctJob:
    job_id: str
    name: str
    state: str
    account: str


@dataclass
class DriverResult:
    returncode: int
    output: str
    seconds: float


@dataclass
class Campaign:
    """One campaign under tmp_path: its files, how to drive it, and what Slurm and the results say about it."""

    root: Path
    name: str
    spec: dict
    launcher: dict
    results_root: Path = field(init=False)
    outputs: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.results_root = self.root / "results"
        self.workdir = self.root / "wd"
        self.workdir.mkdir(exist_ok=True)
        self.config = self.root / "campaign.yaml"
        self.config.write_text(yaml.safe_dump({"name": self.name, **self.spec}, sort_keys=False))
        self.write_settings(self.launcher)

    # ------------------------------------------------------------------ files
    def write_settings(self, launcher: dict, path: Path | None = None) -> Path:
        path = path or self.root / "settings.yaml"
        path.write_text(yaml.safe_dump({"packing": "layout", "launcher": launcher}, sort_keys=False))
        return path

    @property
    def settings(self) -> Path:
        return self.root / "settings.yaml"

    @property
    def results_dir(self) -> Path:
        return self.results_root / self.name

    def groups(self) -> dict[str, list[str]]:
        """Bench job (layout group) -> its cell ids, as the launcher packs them."""
        from infscale.pipeline import CampaignRun

        campaign_run = CampaignRun(self.config, self.results_root, "layout")
        return {job: [p.cell.id for p in planned if p.feasible] for job, planned in campaign_run.jobs().items()}

    def job_names(self) -> dict[str, str]:
        """Bench job -> its Slurm job name."""
        from infscale.launch.driver import slurm_job_name

        return {job: slurm_job_name(self.name, job) for job in self.groups()}

    def cell_ids(self) -> list[str]:
        return sorted(c for cells in self.groups().values() for c in cells)

    # ------------------------------------------------------------------ driving
    def command(self, settings: Path | None = None, results_root: Path | None = None,
                extra: tuple[str, ...] = ()) -> list[str]:
        command = [PYTHON, "-m", "infscale", "run", str(self.config), "--profile", str(PROFILE),
                   "--settings", str(settings or self.settings),
                   "--results-root", str(results_root or self.results_root), "--directory", str(self.workdir)]
        return command + (["--", *extra] if extra else [])

    @staticmethod
    def environment(**faults: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("INFSCALE_SIM_")}
        env.update(faults)
        return env

    def popen(self, env: dict[str, str] | None = None, **kwargs: object) -> subprocess.Popen[str]:
        path = self.root / f"driver-{len(self.outputs)}.out"
        self.outputs.append(str(path))
        with open(path, "w") as log:  # the child keeps its own copy of the descriptor
            return subprocess.Popen(self.command(**kwargs), cwd=self.root,  # type: ignore[arg-type]
                                    env=env or self.environment(), stdout=log, stderr=subprocess.STDOUT,
                                    text=True, start_new_session=True)

    def reap(self, proc: subprocess.Popen[str], timeout: float) -> DriverResult:
        """Wait for a driver started by popen(); kill its whole session if it overruns."""
        started = time.monotonic()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_session(proc)
            raise AssertionError(f"infscale run did not finish within {timeout:.0f}s\n{self.diagnose()}") from None
        return DriverResult(proc.returncode, Path(self.outputs[-1]).read_text(), time.monotonic() - started)

    def drive(self, timeout: float = 240, env: dict[str, str] | None = None, **kwargs: object) -> DriverResult:
        """Run ``infscale run`` to its end (its own session, killed on timeout)."""
        started = time.monotonic()
        proc = self.popen(env=env, **kwargs)
        result = self.reap(proc, timeout)
        result.seconds = time.monotonic() - started
        return result

    def drive_ok(self, timeout: float = 240, env: dict[str, str] | None = None, **kwargs: object) -> DriverResult:
        result = self.drive(timeout=timeout, env=env, **kwargs)
        assert result.returncode == 0, f"infscale run exited {result.returncode}\n{self.diagnose()}"
        return result

    # ------------------------------------------------------------------ observing
    def measured(self) -> list[Measured]:
        path = self.results_dir / "logs" / "measured.log"
        if not path.exists():
            return []
        rows = []
        for line in path.read_text().splitlines():
            if line.strip():
                parts = line.split("\t")
                rows.append(Measured(*(parts + [""] * 6)[:6]))
        return rows

    def ok_cells(self) -> list[str]:
        return [m.cell_id for m in self.measured() if m.status == "ok"]

    def sacct_jobs(self, duplicates: bool = False) -> list[SacctJob]:
        """Every allocation (one line per job id, or per run with duplicates) named infscale.<campaign>.*"""
        command = ["sacct", "-X", "-n", "-P", "-S", "now-2days", "-E", "now+1days",
                   "-o", "JobIDRaw,JobName%200,State,Account"]
        if duplicates:
            command.insert(1, "-D")
        prefix = f"infscale.{self.name}."
        jobs = []
        for line in run(*command).stdout.splitlines():
            parts = line.split("|")
            if len(parts) >= 4 and parts[1].startswith(prefix):
                jobs.append(SacctJob(parts[0], parts[1], parts[2].split()[0] if parts[2] else "", parts[3]))
        return jobs

    def settled_jobs(self, expected: int, timeout: float = 30) -> list[SacctJob]:
        """sacct_jobs() once it lists at least `expected` jobs, all in a terminal state: right after a job ends,
        a time-window sacct query may not list it yet (seen once: empty although `sacct -j ID` had it)."""
        last: list[SacctJob] = []

        def probe() -> bool:
            last[:] = self.sacct_jobs()
            return len(last) >= expected and all(j.state in TERMINAL_STATES for j in last)

        wait_until(probe, timeout, f"sacct to list {expected} finished job(s) of campaign {self.name}",
                   diagnose=lambda: f"sacct lists: {last}\n{self.diagnose()}")
        time.sleep(1)  # a late duplicate would show up now
        return self.sacct_jobs()

    def squeue(self) -> list[tuple[str, str, str]]:
        """(job id, state, name) of this campaign's jobs that slurmctld still lists as active."""
        out = run("squeue", "-h", "-o", "%i|%T|%j", check=False).stdout
        prefix = f"infscale.{self.name}."
        return [tuple(line.split("|", 2)) for line in out.splitlines()  # type: ignore[misc]
                if line.count("|") == 2 and line.split("|", 2)[2].startswith(prefix)]

    def running_ids(self) -> list[str]:
        return [job_id for job_id, state, _ in self.squeue() if state == "RUNNING"]

    def merged(self):  # -> polars.DataFrame
        import polars as pl

        return pl.read_parquet(self.results_dir / "cells.parquet").sort("cell_id")

    def cancel_leftovers(self) -> None:
        ids = [job_id for job_id, _, _ in self.squeue()]
        if ids:
            run("scancel", *ids, check=False)

    def diagnose(self) -> str:
        """Everything useful when a test fails: driver output, squeue, sacct, bench and job logs."""
        parts = []
        for name in self.outputs:
            parts.append(f"--- {name} (last 60 lines)\n" + tail(Path(name), 60))
        parts.append("--- squeue\n" + run("squeue", "-t", "all", check=False).stdout)
        parts.append("--- sacct -D (this campaign)\n" + "\n".join(
            f"{j.job_id} {j.name} {j.state} {j.account}" for j in self.sacct_jobs(duplicates=True)))
        parts.append("--- sinfo -N\n" + run("sinfo", "-N", "-o", "%N %T %E", check=False).stdout)
        parts.append("--- measured.log\n" + tail(self.results_dir / "logs" / "measured.log", 40))
        for path in sorted((self.results_dir / "logs" / "bench").glob("*.log")):
            parts.append(f"--- {path.name} (last 25 lines)\n" + tail(path, 25))
        for path in sorted((self.results_dir / "jobs" / "submitit").glob("*.err")):
            parts.append(f"--- {path.name} (last 15 lines)\n" + tail(path, 15))
        for path in sorted((self.results_dir / "jobs").glob("*.json")):
            parts.append(f"--- registry {path.name}\n" + tail(path, 40))
        return "\n".join(parts)


def tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as err:
        return f"({err})"


def kill_session(proc: subprocess.Popen[str]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def campaign_spec(layouts: list[str], osl: list[int]) -> dict:
    return {"hardware": "h200-sxm", "models": ["llama-3.1-8b"], "layouts": layouts, "requests": 16,
            "workloads": [{"name": "w", "isl": 128, "osl": osl}]}


def slurm_launcher(**slurm: object) -> dict:
    return {"executor": "slurm", **FAST_POLL,
            "slurm": {"partition": "debug", "time_limit_min_min": 2, "signal_delay_s": 5, **slurm}}


def all_sacct_ids() -> set[str]:
    out = run("sacct", "-X", "-n", "-P", "-S", "now-2days", "-E", "now+1days", "-o", "JobIDRaw").stdout
    return {line.strip() for line in out.splitlines() if line.strip()}


def wait_job_gone(job_id: str, timeout: float = 60) -> None:
    """Until slurmctld no longer lists the job as active or completing (its processes are gone)."""
    def gone() -> bool:
        out = run("squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T", check=False).stdout.split()
        return not out or out[0] not in {"RUNNING", "COMPLETING", "PENDING", "REQUEUED", "CONFIGURING",
                                         "SIGNALING", "STAGE_OUT", "SUSPENDED"}
    wait_until(gone, timeout, f"job {job_id} to end and its processes to go", interval=0.5)


@pytest.fixture
def make_campaign(slurm_cluster: SlurmCluster, tmp_path: Path) -> Iterator:
    """``make_campaign(tag, spec, launcher)`` -> Campaign with a unique name; cancels its jobs afterwards."""
    made: list[Campaign] = []

    def _make(tag: str, spec: dict, launcher: dict) -> Campaign:
        campaign = Campaign(tmp_path / tag, f"st-{tag}-{uuid.uuid4().hex[:6]}", spec, launcher)
        made.append(campaign)
        return campaign

    yield _make
    for campaign in made:
        campaign.cancel_leftovers()


def node_name() -> str:
    nodes = run("sinfo", "-h", "-N", "-p", "debug", "-o", "%N").stdout.split()
    assert nodes, "no node in partition debug"
    return nodes[0]


def node_state(node: str) -> str:
    return run("sinfo", "-h", "-N", "-n", node, "-o", "%T", check=False).stdout.strip().split("\n")[0]


def resume_node(node: str) -> None:
    """Bring the node back (ReturnToService=2 may already have done so: then scontrol says the state is invalid)."""
    state = node_state(node)
    if state.rstrip("*~#").startswith(("down", "drain", "fail")):
        run("scontrol", "update", f"nodename={node}", "state=resume", check=False)
    wait_until(lambda: node_state(node).rstrip("*~#") in {"idle", "mixed", "allocated", "completing"}, 60,
               f"node {node} to be usable again", interval=1,
               diagnose=lambda: run("sinfo", "-N", "-o", "%N %T %E", check=False).stdout)


# ----------------------------------------------------------------------------------------------------- tests


def test_campaign_completes_through_sbatch_and_matches_debug(make_campaign) -> None:
    """12 cells in 3 layout groups: one COMPLETED sbatch job per group (under the account), every cell ok once,
    and the merged table equal, metric by metric, to the same campaign run in the driver's process."""
    import polars as pl
    from polars.testing import assert_frame_equal

    camp = make_campaign("complete", campaign_spec(["dp1", "tp2", "tp4"], [64, 128, 256, 512]),
                         slurm_launcher(account=ACCOUNT))
    groups = camp.groups()
    assert len(groups) == 3 and sum(map(len, groups.values())) == 12, groups
    camp.drive_ok(timeout=180)

    names = camp.job_names()
    jobs = camp.settled_jobs(len(groups))
    for job, name in names.items():
        by_name = [j for j in jobs if j.name == name]
        assert [j.state for j in by_name] == ["COMPLETED"], (job, by_name, camp.diagnose())
        assert by_name[0].account == ACCOUNT, by_name
        # the same through sacct's own name filter
        out = run("sacct", "-X", "-n", "-P", "-S", "now-2days", f"--name={name}", "-o", "State").stdout.split()
        assert out == ["COMPLETED"], (name, out)
    assert len(jobs) == len(groups), jobs

    measured = camp.measured()
    assert sorted(m.cell_id for m in measured) == camp.cell_ids(), camp.diagnose()
    assert {m.status for m in measured} == {"ok"}
    job_of_name = {j.name: j.job_id for j in jobs}
    for job, cells in groups.items():  # each group's cells measured inside its own Slurm job
        assert {m.slurm_job_id for m in measured if m.cell_id in cells} == {job_of_name[names[job]]}

    # the same campaign in the driver's process, into another results root
    debug_root = camp.root / "results-debug"
    debug_settings = camp.write_settings({"executor": "debug"}, camp.root / "settings-debug.yaml")
    camp.drive_ok(timeout=180, settings=debug_settings, results_root=debug_root)
    debug = pl.read_parquet(debug_root / camp.name / "cells.parquet").sort("cell_id")
    slurm = camp.merged()
    assert slurm.height == 12 and slurm["status"].to_list() == ["ok"] * 12
    assert_frame_equal(slurm.drop(VOLATILE_COLUMNS), debug.drop(VOLATILE_COLUMNS))
    assert len(camp.settled_jobs(len(groups))) == len(groups), "the debug run submitted Slurm jobs"


def test_scancel_then_rerun_measures_only_unfinished_cells(make_campaign) -> None:
    """A group job cancelled midway makes the driver fail; the rerun completes and measures only what is missing."""
    camp = make_campaign("cancel", campaign_spec(["dp1", "tp2"], [64, 96, 128, 192, 256, 384, 512, 768]),
                         slurm_launcher())
    groups = camp.groups()
    assert len(groups) == 2 and all(len(c) == 8 for c in groups.values()), groups
    target_job = next(j for j in groups if "dp1tp1pp1" in j)
    target_cells = set(groups[target_job])
    target_name = camp.job_names()[target_job]

    proc = camp.popen(env=camp.environment(INFSCALE_SIM_DELAY_S="2"))
    try:
        def target_running_with_cells() -> str | None:
            ids = [i for i, state, name in camp.squeue() if name == target_name and state == "RUNNING"]
            done = sum(c in target_cells for c in camp.ok_cells())
            return ids[0] if ids and done >= 2 else None

        job_id = wait_until(target_running_with_cells, 90, "the dp1 group job to run and measure 2 cells",
                            diagnose=camp.diagnose)
        run("scancel", job_id)
        first = camp.reap(proc, timeout=120)
    finally:
        if proc.poll() is None:
            kill_session(proc)
    assert first.returncode != 0, f"the driver succeeded although job {job_id} was cancelled\n{camp.diagnose()}"
    bench_log = (camp.results_dir / "logs" / "bench" / f"{target_job}.log").read_text()
    assert "cancelled" in bench_log, bench_log
    wait_job_gone(job_id)  # a cell finishing during KillWait still lands in measured.log: count after that

    before = camp.measured()
    before_ok = [m.cell_id for m in before if m.status == "ok"]
    assert len(before_ok) == len(set(before_ok))
    assert 2 <= sum(c in target_cells for c in before_ok) < 8, (
        f"the cancel should have interrupted the dp1 group\n{camp.diagnose()}")

    camp.drive_ok(timeout=180)
    after = camp.measured()
    second = after[len(before):]
    ok = Counter(m.cell_id for m in after if m.status == "ok")
    assert sorted(ok) == camp.cell_ids() and set(ok.values()) == {1}, (ok, camp.diagnose())
    assert len(second) == len(camp.cell_ids()) - len(before_ok), (second, before_ok)
    assert {m.cell_id for m in second} == set(camp.cell_ids()) - set(before_ok)
    assert all(m.slurm_job_id != job_id for m in second)
    states = sorted(j.state for j in camp.settled_jobs(len(groups) + 1) if j.name == target_name)
    assert states == ["CANCELLED", "COMPLETED"], states
    assert camp.merged()["status"].to_list() == ["ok"] * 16


def test_killed_driver_reattaches_without_resubmitting(make_campaign) -> None:
    """A second driver is refused while the first lives; the first is SIGKILLed with its jobs running; a new
    driver re-attaches: one Slurm job per group in sacct, every cell ok once."""
    camp = make_campaign("sigkill", campaign_spec(["dp1", "tp2", "tp4"], [64, 128, 256, 512]), slurm_launcher())
    groups = camp.groups()
    env = camp.environment(INFSCALE_SIM_DELAY_S="4")
    proc = camp.popen(env=env)
    try:
        wait_until(camp.running_ids, 90, "an infscale job of the campaign to run", diagnose=camp.diagnose)

        second = camp.drive(timeout=90, env=env)
        assert second.returncode != 0, second.output
        assert "already driven by pid" in second.output and str(proc.pid) in second.output, second.output
        assert proc.poll() is None, "the first driver died while the second was refused"

        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            kill_session(proc)
    active_at_kill = camp.squeue()
    assert active_at_kill, f"every job ended before the kill: the test proves nothing\n{camp.diagnose()}"

    camp.drive_ok(timeout=180, env=env)
    bench_logs = "\n".join(p.read_text() for p in (camp.results_dir / "logs" / "bench").glob("*.log"))
    # the new driver (bench logs are rewritten by each run) submitted nothing and waited on the killed one's jobs
    assert "submitted Slurm job" not in bench_logs, bench_logs
    for job_id, _, _ in active_at_kill:
        assert f"Slurm job {job_id} " in bench_logs, (job_id, bench_logs)
    jobs = camp.settled_jobs(len(groups))
    by_name = Counter(j.name for j in jobs)
    assert by_name == Counter(camp.job_names().values()), (jobs, active_at_kill, camp.diagnose())
    assert {j.state for j in jobs} == {"COMPLETED"}, jobs
    ok = Counter(camp.ok_cells())
    assert sorted(ok) == camp.cell_ids() and set(ok.values()) == {1}, (ok, camp.diagnose())
    assert camp.merged()["status"].to_list() == ["ok"] * sum(map(len, groups.values()))


def test_cuda_oom_cell_is_infeasible_and_not_remeasured(make_campaign) -> None:
    camp = make_campaign("oom", campaign_spec(["dp1", "tp2"], [64, 128, 256]), slurm_launcher())
    victim = next(c for c in camp.cell_ids() if "dp1tp2pp1" in c and ".i128-o256." in c)
    env = camp.environment(INFSCALE_SIM_FAIL=r"oom:dp1tp2pp1\.i128-o256\.")
    camp.drive_ok(timeout=180, env=env)

    merged = camp.merged()
    rows = {r["cell_id"]: r for r in merged.to_dicts()}
    assert rows[victim]["status"] == "infeasible", rows[victim]
    assert "CUDA out of memory" in (rows[victim]["reason"] or ""), rows[victim]
    assert all(r["status"] == "ok" for c, r in rows.items() if c != victim), merged.select("cell_id", "status")
    log = camp.measured()
    assert [(m.cell_id, m.status) for m in log if m.cell_id == victim] == [(victim, "infeasible")]
    assert "CUDA out of memory" in next(m.reason for m in log if m.cell_id == victim)
    jobs_before = camp.settled_jobs(2)

    # a plain rerun, and one that forces every rule (so each bench job really looks at its cells again)
    camp.drive_ok(timeout=120, env=env)
    camp.drive_ok(timeout=120, env=env, extra=("--forceall",))
    assert len(camp.measured()) == len(log), camp.measured()[len(log):]
    assert [j.job_id for j in camp.settled_jobs(2)] == [j.job_id for j in jobs_before], "a rerun submitted jobs"
    assert camp.merged().filter(camp.merged()["cell_id"] == victim)["status"].to_list() == ["infeasible"]


@pytest.mark.parametrize(
    "slurm, expected",
    [
        pytest.param({"partition": "nosuch-partition"}, ["launcher.slurm.partition", "'nosuch-partition'"],
                     id="unknown-partition"),
        pytest.param({"time_limit_max_min": -5}, ["launcher.slurm.time_limit_max_min", "-5", "greater than 0"],
                     id="negative-time-limit"),
        pytest.param({"account": "x;rm -rf /"}, ["launcher.slurm.account", "'x;rm -rf /'", "may hold only"],
                     id="shell-metacharacter-account"),
        pytest.param({"account": "no-such-account"}, ["launcher.slurm.account", "'no-such-account'",
                                                      ACCOUNT], id="unknown-account"),
    ],
)
def test_bad_profile_fails_before_submission(make_campaign, slurm_cluster: SlurmCluster, slurm: dict,
                                             expected: list[str]) -> None:
    camp = make_campaign("badprofile", campaign_spec(["dp1"], [64, 128]), slurm_launcher(**slurm))
    before = all_sacct_ids()
    result = camp.drive(timeout=120)
    assert result.returncode != 0, result.output
    for text in expected:
        assert text in result.output, f"{text!r} not in the output:\n{result.output}"
    if "partition" in slurm:
        assert all(p in result.output for p in slurm_cluster.partitions), (slurm_cluster.partitions, result.output)
    assert all_sacct_ids() == before, "a job was submitted"
    assert camp.sacct_jobs() == [] and camp.squeue() == []
    assert not (camp.results_dir / "jobs" / "submitit").exists()


def test_time_limit_requeues_and_resumes(make_campaign) -> None:
    """8 cells x 12 s under a 1-minute limit: submitit checkpoints on USR2, the same job id is requeued and
    resumes at the next unfinished cell until the group is done; no cell is measured ok twice."""
    camp = make_campaign("timeout", campaign_spec(["dp1"], [64, 96, 128, 192, 256, 384, 512, 768]),
                         slurm_launcher(time_limit_max_min=1, time_limit_min_min=1, max_requeues=4))
    result = camp.drive(timeout=420, env=camp.environment(INFSCALE_SIM_DELAY_S="12"))

    jobs = camp.settled_jobs(1)
    runs = [j.state for j in camp.sacct_jobs(duplicates=True) if jobs and j.job_id == jobs[0].job_id]
    ok = [m for m in camp.measured() if m.status == "ok"]
    counts = Counter(m.cell_id for m in ok)
    assert len(runs) >= 2 and "REQUEUED" in runs, (runs, camp.diagnose())  # the time limit really hit
    assert sorted(counts) == camp.cell_ids() and set(counts.values()) == {1}, (counts, camp.diagnose())
    assert {m.slurm_job_id for m in ok} == {jobs[0].job_id}
    if result.returncode != 0 and jobs[0].state == "FAILED":
        pytest.fail(f"every cell is on disk, but the last run of job {jobs[0].job_id} ended FAILED (USR2 landed "
                    "as it finished) and the driver failed the campaign: the bug that "
                    f"test_job_failing_after_all_cells_are_on_disk_does_not_fail_the_campaign pins\n{camp.diagnose()}")
    assert result.returncode == 0, f"infscale run exited {result.returncode}\n{camp.diagnose()}"
    # one job id, never resubmitted; its last run may end FAILED when USR2 lands just as it finishes (cells safe)
    assert len(jobs) == 1 and jobs[0].state in ("COMPLETED", "FAILED"), (jobs, camp.diagnose())
    assert camp.merged()["status"].to_list() == ["ok"] * 8


RACE_SCRIPT = """
import sys, time
from pathlib import Path
from infscale.launch.registry import Registry
registry, end = Registry(Path(sys.argv[2])), time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    registry.states(max_age_s=3600) if sys.argv[1] == "poll" else registry.invalidate_states()
"""


def test_status_cache_survives_a_concurrent_invalidation(tmp_path: Path) -> None:
    """The bench drivers of one campaign share results/<c>/jobs/.status.json. One whose job ends calls
    invalidate_states() (an unlink outside the .status.lock) while another is inside states() between
    `cache.exists()` and `cache.read_text()`: the poller crashes with FileNotFoundError, its bench job exits 1
    and the campaign fails (seen in test_campaign_completes_through_sbatch_and_matches_debug, 3 groups ending
    together). Reproduced here without Slurm: one process polls the cache, another invalidates it."""
    results_dir = tmp_path / "results" / "race"
    pollers = [subprocess.Popen([PYTHON, "-c", RACE_SCRIPT, "poll", str(results_dir), "3"], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    invalidator = subprocess.run([PYTHON, "-c", RACE_SCRIPT, "invalidate", str(results_dir), "3"],
                                 capture_output=True, text=True, timeout=60)
    outputs = [(p.wait(timeout=60), p.stdout.read() if p.stdout else "") for p in pollers]
    assert invalidator.returncode == 0, invalidator.stderr
    for returncode, output in outputs:
        assert returncode == 0, f"Registry.states() crashed while another driver invalidated the cache:\n{output}"


def test_job_failing_after_all_cells_are_on_disk_does_not_fail_the_campaign(make_campaign) -> None:
    """drive_job's contract: return when every cell of the job is on disk. A group job whose batch script ends
    non-zero *after* its cells are measured (here a setup line `trap 'exit 3' EXIT`; in the wild a USR2 that
    lands as the job finishes, which the time-limit test above runs into now and then: the step dies of signal
    12 and sacct says FAILED) must not fail the campaign."""
    camp = make_campaign("failafter", campaign_spec(["dp1"], [64, 128, 256]),
                         slurm_launcher(setup=[["trap", "exit 3", "EXIT"]]))
    result = camp.drive(timeout=180)
    jobs = camp.settled_jobs(1)
    assert [j.state for j in jobs] == ["FAILED"], (jobs, camp.diagnose())  # the scenario really happened
    ok = Counter(camp.ok_cells())
    assert sorted(ok) == camp.cell_ids() and set(ok.values()) == {1}, camp.diagnose()
    outcome = json.loads((camp.results_dir / "jobs" / "outcomes" / f"{jobs[0].job_id}.json").read_text())
    assert outcome["status"] == "done", outcome
    assert result.returncode == 0, (
        f"infscale run exited {result.returncode} although every cell is on disk\n{camp.diagnose()}")
    assert camp.merged()["status"].to_list() == ["ok"] * 3


def test_node_down_mid_job_requeues_and_campaign_completes(make_campaign) -> None:
    """The node goes DOWN under a running group job: Slurm (JobRequeue=1) requeues it, and the driver must wait
    for the requeued job (same id) instead of counting NODE_FAIL as a failed attempt; all cells end ok."""
    # sacct keeps saying NODE_FAIL for ~5 s after the failure while squeue already says PENDING (requeued): poll
    # fast, so the driver surely looks inside that window (with the default backoff it sometimes misses it)
    launcher = {**slurm_launcher(), "poll_interval_s": 0.25, "max_poll_interval_s": 0.5}
    camp = make_campaign("nodedown", campaign_spec(["dp1"], [64, 96, 128, 192, 256, 384]), launcher)
    node = node_name()
    proc = camp.popen(env=camp.environment(INFSCALE_SIM_DELAY_S="3"))
    try:
        wait_until(lambda: camp.running_ids() and len(camp.ok_cells()) >= 1, 90,
                   "the group job to run and measure a cell", diagnose=camp.diagnose)
        (job_id,) = camp.running_ids()
        try:
            run("scontrol", "update", f"nodename={node}", "state=down", "reason=infscale-test")
            time.sleep(5)
        finally:
            resume_node(node)
        result = camp.reap(proc, timeout=180)
    finally:
        if proc.poll() is None:
            kill_session(proc)
        resume_node(node)
    runs = [j.state for j in camp.sacct_jobs(duplicates=True)]
    assert "NODE_FAIL" in runs, (runs, camp.diagnose())  # the fault really happened
    (bench_log,) = [p.read_text() for p in (camp.results_dir / "logs" / "bench").glob("*.log")]
    assert "retrying" not in bench_log, (
        "the driver spent its retries (launcher.slurm.max_retries) on a job Slurm had requeued itself; it gives "
        f"up once sacct's stale NODE_FAIL outlasts them\n{camp.diagnose()}")
    assert result.returncode == 0, (
        f"infscale run exited {result.returncode} after the node came back\n{camp.diagnose()}")
    ok = Counter(camp.ok_cells())
    assert sorted(ok) == camp.cell_ids() and set(ok.values()) == {1}, (ok, camp.diagnose())
    assert {j.job_id for j in camp.settled_jobs(1)} == {job_id}, "the requeued job was not waited for"
    assert camp.merged()["status"].to_list() == ["ok"] * 6


def test_torch_backend_runs_one_task_per_gpu_rank(make_campaign) -> None:
    """The torch backend through sbatch: a TP2 and a DP2 cell run as jobs of two tasks (one per GPU rank, gloo
    on this CPU-only cluster) that join one process group; task 0 measures, the other follows it."""
    import polars as pl

    if os.environ.get("INFSCALE_REQUIRE_TORCH") != "1":
        pytest.importorskip("torch")
    tiny = REPO_ROOT / "tests" / "data" / "hf" / "tiny-llama.json"
    spec = {"backend": "torch", "hardware": "h100-sxm", "models": [str(tiny)], "layouts": ["dp1", "tp2", "dp2"],
            "requests": 4, "engine": {"max_num_seqs": 4, "max_num_tokens": 64},
            "workloads": [{"name": "w", "isl": 16, "osl": 6}]}
    camp = make_campaign("torchranks", spec, slurm_launcher(account=ACCOUNT, cpus_per_gpu=2, mem_per_gpu_gb=4))
    groups = camp.groups()
    assert len(groups) == 3, groups
    camp.drive_ok(timeout=300)

    merged = camp.merged()
    assert merged["status"].to_list() == ["ok"] * 3, merged.select("cell_id", "status", "reason")
    assert (merged["output_tokens"] == 4 * 6).all() and not merged["predicted"].any()
    jobs = {j.name: j.job_id for j in camp.settled_jobs(3)}
    for job, name in camp.job_names().items():
        gpus = 1 if ".dp1tp1pp1" in groups[job][0] else 2
        steps = run("sacct", "-n", "-P", "-j", jobs[name], "-o", "JobID,NTasks,AllocTRES").stdout.splitlines()
        tasks = [int(line.split("|")[1]) for line in steps if line.split("|")[0].endswith(".0")]
        assert tasks == [gpus], (job, steps)  # the job step ran one task per GPU rank
        assert f"gres/gpu={gpus}" in steps[0], steps
    tp2 = next(c for c in camp.cell_ids() if ".dp1tp2pp1." in c)
    assert pl.read_parquet(camp.results_dir / "cells" / f"{tp2}.parquet")["gpu_name"].to_list() == ["cpu"]


@pytest.mark.parametrize("flow", ["pytorch", "engine"])
def test_trtllm_backend_runs_mpi_job_steps_inside_the_job(make_campaign, tmp_path: Path, flow: str) -> None:
    """The trtllm backend through sbatch with stand-ins for trtllm-bench and trtllm-llmapi-launch (TensorRT-LLM
    cannot be installed here): a TP2 cell's ranks are one `srun --mpi=pmix` step of 2 tasks inside the job, a DP2
    cell's replicas two concurrent steps on their own GPUs; every cell ends ok with the stand-in's numbers. The
    engine flow first builds each engine once, in a Slurm job of its own, and the bench jobs run on it."""
    import polars as pl

    standin = REPO_ROOT / "tests" / "trtllm" / "standin"
    log = tmp_path / "standin.jsonl"
    model_dir = tmp_path / "hf"
    model_dir.mkdir()
    tiny = REPO_ROOT / "tests" / "data" / "hf" / "tiny-llama.json"
    (model_dir / "config.json").write_text(tiny.read_text())
    spec = {"backend": "trtllm", "hardware": "h100-sxm", "models": [str(tiny)], "layouts": ["dp1", "tp2", "dp2"],
            "requests": 4, "engine": {"max_num_seqs": 4, "max_num_tokens": 256},
            "workloads": [{"name": "w", "isl": 16, "osl": 10}]}
    launcher = slurm_launcher(account=ACCOUNT, cpus_per_gpu=1, mem_per_gpu_gb=2)
    launcher["trtllm"] = {"flow": flow, "version": "1.2.1", "model_paths": {"tiny-llama": str(model_dir)},
                          "workspace": str(tmp_path / "work"), "warmup": 0,
                          "engine_cache": str(tmp_path / "engines"), "gpu_name": "NVIDIA H100 80GB HBM3"}
    camp = make_campaign(f"trtllm-{flow}", spec, launcher)
    env = camp.environment(PATH=f"{standin}{os.pathsep}{os.environ['PATH']}", STANDIN_LOG=str(log))
    camp.drive_ok(timeout=240, env=env)

    merged = camp.merged()
    assert merged["status"].to_list() == ["ok"] * 3, merged.select("cell_id", "status", "reason")
    assert (merged["output_tokens"] == 40).all() and set(merged["engine_path"]) == {f"trtllm-{flow}"}
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    launches = [c for c in calls if "launch_rank" in c and c["kind"] == "run"]
    # DP1: one step of 1 task; TP2: one step of 2 tasks (ranks 0 and 1); DP2: two steps of 1 task
    assert sorted((c["ntasks"], c["launch_rank"]) for c in launches) == [("1", 0)] * 3 + [("2", 0), ("2", 1)], \
        launches
    tp_step = [c for c in launches if c["ntasks"] == "2"]
    one_gpu = [c for c in launches if c["ntasks"] == "1"]
    assert {len(c["cuda_visible_devices"].split(",")) for c in tp_step} == {2}  # both of its job's GPUs
    # the DP2 job's two steps (the one job with two one-task steps): one GPU each, not the same one
    by_job = Counter(c["job"] for c in one_gpu)
    (dp_job,) = [job for job, steps in by_job.items() if steps == 2]
    dp_steps = [c for c in one_gpu if c["job"] == dp_job]
    assert len({c["step"] for c in dp_steps}) == 2, dp_steps
    assert all("," not in c["cuda_visible_devices"] for c in dp_steps), dp_steps
    assert len({c["cuda_visible_devices"] for c in dp_steps}) == 2, dp_steps
    runs = [c for c in calls if "argv" in c and "throughput" in c["argv"]]
    assert len(runs) == 4 and all("--streaming" in c["argv"] for c in runs)  # dp1, tp2, and two DP replicas
    builds = [c for c in calls if "argv" in c and "build" in c["argv"]]
    if flow == "pytorch":
        assert builds == [] and all("--backend" in c["argv"] and "pytorch" in c["argv"] for c in runs)
        expected_jobs = 3
    else:  # two engines (TP1 for dp1 and dp2, TP2), each built once in its own job, then run from the cache
        assert len(builds) == 2 and len(list((camp.results_dir / "engines").glob("*.json"))) == 2
        engine_dirs = {c["argv"][c["argv"].index("--engine_dir") + 1] for c in runs}
        assert len(engine_dirs) == 2 and all(Path(d, "manifest.json").exists() for d in engine_dirs)
        expected_jobs = 5
    jobs = camp.settled_jobs(expected_jobs)
    assert len(jobs) == expected_jobs and all(j.state == "COMPLETED" for j in jobs), jobs
    tp2 = merged.filter(pl.col("tp") == 2)
    assert tp2["output_tok_s_per_gpu"][0] == pytest.approx(tp2["output_tok_s"][0] / 2)
