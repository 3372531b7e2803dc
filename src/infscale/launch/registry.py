"""The job registry under `results/<campaign>/jobs/`: every submission, driver locks, and one shared status cache.

A restarted driver reads the registry and re-attaches to a Slurm job that is still queued or running instead of
submitting it again. Drivers of the same campaign share one `sacct` query per poll interval: whoever finds the
cache stale refreshes it for every active job of the campaign, under a file lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from infscale.results.io import write_text_atomic
from infscale.results.provenance import utc_now

ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
                 "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", "SPECIAL_EXIT"}


class LockHeld(RuntimeError):
    """Another live driver holds the lock."""


@dataclass
class Attempt:
    slurm_job_id: str
    submitted_at: str
    reason: str                       # why it was submitted: first, requeue after …, retry after …
    excluded_nodes: list[str] = field(default_factory=list)
    state: str = "SUBMITTED"          # last state seen
    nodes: str = ""
    ended_at: str | None = None


@dataclass
class JobRecord:
    job: str
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def last(self) -> Attempt | None:
        return self.attempts[-1] if self.attempts else None


class Registry:
    def __init__(self, results_dir: Path):
        self.folder = Path(results_dir) / "jobs"
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, job: str) -> Path:
        return self.folder / f"{job}.json"

    def load(self, job: str) -> JobRecord:
        path = self.path(job)
        if not path.exists():
            return JobRecord(job)
        data = json.loads(path.read_text())
        return JobRecord(data["job"], [Attempt(**a) for a in data["attempts"]])

    def save(self, record: JobRecord) -> None:
        write_text_atomic(self.path(record.job), json.dumps(asdict(record), indent=1))

    def records(self) -> list[JobRecord]:
        return [self.load(p.stem) for p in sorted(self.folder.glob("*.json")) if not p.name.startswith(".")]

    def active_ids(self) -> list[str]:
        return [r.last.slurm_job_id for r in self.records()
                if r.last and r.last.ended_at is None and r.last.slurm_job_id]

    # -------------------------------------------------------------------------------------------- status

    def states(self, max_age_s: float) -> dict[str, dict[str, str]]:
        """Slurm state of every active job of the campaign, from a cache refreshed at most every `max_age_s`
        by one `sacct` call for all of them."""
        cache = self.folder / ".status.json"
        with _flock(self.folder / ".status.lock"):
            try:
                data = json.loads(cache.read_text())
                if time.time() - data["queried_at"] < max_age_s:
                    return data["states"]
            except (OSError, ValueError, KeyError):
                pass  # no cache, or a damaged one: query again
            states = query_states(self.active_ids())
            write_text_atomic(cache, json.dumps({"queried_at": time.time(), "states": states}))
            return states

    def invalidate_states(self) -> None:
        with _flock(self.folder / ".status.lock"):
            (self.folder / ".status.json").unlink(missing_ok=True)


def query_states(job_ids: list[str]) -> dict[str, dict[str, str]]:
    """One `sacct` call for all `job_ids`: {id: {state, nodes, exit_code, reason}} (allocations only)."""
    if not job_ids:
        return {}
    command = ["sacct", "-X", "-n", "-P", "-j", ",".join(job_ids), "-o", "JobIDRaw,State,NodeList,ExitCode,Reason"]
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}  # a failed poll is retried at the next interval; no state is better than a wrong one
    states: dict[str, dict[str, str]] = {}
    for line in out.splitlines():
        parts = line.split("|")
        if len(parts) >= 5:
            job_id, state, nodes, exit_code, reason = parts[:5]
            states[job_id] = {"state": state.split()[0] if state else "UNKNOWN", "nodes": nodes,
                              "exit_code": exit_code, "reason": reason}
    # A job Slurm requeued (node failure, preemption) keeps its id; for a few seconds sacct still shows the old
    # terminal state while squeue already lists it as pending. The queue is the truth for jobs it still holds.
    for job_id, queued in _queued_states(set(job_ids)).items():
        previous = states.get(job_id, {"nodes": "", "exit_code": "", "reason": ""})
        states[job_id] = {**previous, "state": queued}
    return states


def _queued_states(job_ids: set[str]) -> dict[str, str]:
    """States of the given jobs that are still in the queue (one `squeue` call for the user's jobs)."""
    import getpass

    command = ["squeue", "-h", "-u", getpass.getuser(), "-o", "%i|%T"]
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    queued = {}
    for line in out.splitlines():
        job_id, _, state = line.strip().partition("|")
        if job_id in job_ids and state:
            queued[job_id] = state
    return queued


def find_active_by_name(name: str) -> list[str]:
    """Active job ids with this job name: finds a job submitted just before a driver died unrecorded."""
    command = ["squeue", "-h", "-n", name, "-o", "%i"]
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------ locks


@contextmanager
def _flock(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited: it only waits for its parent to reap it
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


@contextmanager
def driver_lock(path: Path, what: str, log: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold `path` while driving `what`. A lock whose process is dead (same host) is taken over, and `log` is
    told so."""
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": utc_now()}
    with _flock(path.with_name(path.name + ".guard")):
        if path.exists():
            try:
                holder = json.loads(path.read_text())
            except (OSError, ValueError):
                holder = {}
            same_host = holder.get("host") == me["host"]
            if holder and (not same_host or pid_alive(int(holder.get("pid", 0)))):
                raise LockHeld(
                    f"{what} is already driven by pid {holder.get('pid')} on {holder.get('host')} "
                    f"(since {holder.get('started_at')}); stop that driver first"
                    + ("" if same_host else f", or remove {path} if it is gone")
                )
            if holder and log:
                log(f"taking over {what} from a driver that is gone (pid {holder.get('pid')} on "
                    f"{holder.get('host')}, since {holder.get('started_at')})")
        path.write_text(json.dumps(me))
    try:
        yield
    finally:
        try:
            if json.loads(path.read_text()).get("pid") == me["pid"]:
                path.unlink()
        except (OSError, ValueError):
            pass
