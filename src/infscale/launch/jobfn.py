"""What runs inside a Slurm (or local submitit) job: one bench job's cells, resumable after a requeue."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from submitit.helpers import Checkpointable

from infscale.results.io import write_text_atomic
from infscale.results.provenance import utc_now


class NodeProblem(RuntimeError):
    """An error that points at the node or fabric (NCCL, Xid, ECC): the job stops so it can be retried elsewhere."""


class BenchJob(Checkpointable):
    """Callable shipped to the job. On USR2 (time limit or preemption) submitit requeues it with the same
    arguments; cells already on disk are skipped, so it resumes at the next unfinished cell."""

    def __init__(self, campaign_file: str, results_root: str, packing: str, job: str,
                 backend_options: dict | None = None):
        self.campaign_file = campaign_file
        self.results_root = results_root
        self.packing = packing
        self.job = job
        self.backend_options = backend_options  # site settings of the backend (the launcher's `trtllm:` section)

    def __call__(self) -> dict[str, object]:
        from infscale.launch.runner import run_cells
        from infscale.pipeline import CampaignRun

        run = CampaignRun(Path(self.campaign_file), Path(self.results_root), self.packing)
        outcome: dict[str, object] = {"job": self.job, "host": socket.gethostname(),
                                      "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "started_at": utc_now()}
        backend = None
        if run.campaign.spec.backend == "trtllm":
            from infscale.backends import get_backend

            if task_count() > 1 and task_rank() != 0:
                # a multi-node trtllm job gets one task per node; the first starts the MPI job steps
                return {**outcome, "status": "idle", "ended_at": utc_now()}
            backend = get_backend("trtllm", self.backend_options)
        elif run.campaign.spec.backend == "torch" and task_count() > 1:
            # one task per GPU: task 0 runs the cells and leads; the others serve their ranks until it stops
            from infscale.backends.torch.backend import TorchBackend
            from infscale.backends.torch.workers import JoinedRanks, join_slurm_tasks

            member = join_slurm_tasks()
            if member.rank != 0:
                member.follow()
                return {**outcome, "status": "follower", "rank": member.rank, "ended_at": utc_now()}
            backend = TorchBackend(ranks=JoinedRanks(member))
        try:
            outcomes = run_cells(run.campaign, run.jobs().get(self.job, []), run.results_dir, backend)
        except NodeProblem as err:
            outcome.update(status="retry_elsewhere", reason=str(err), ended_at=utc_now())
            write_outcome(run.results_dir, outcome)
            raise
        finally:
            if backend is not None and hasattr(backend, "close"):
                backend.close()  # releases the torch backend's follower tasks
        failed = [o for o in outcomes if o.status == "failed"]
        outcome.update(status="failed" if failed else "done", ended_at=utc_now(),
                       measured=sum(o.status != "skipped" for o in outcomes),
                       failed=[{"cell_id": o.cell_id, "reason": o.reason} for o in failed])
        write_outcome(run.results_dir, outcome)
        return outcome


def task_count() -> int:
    """Tasks of this submitit job (1 outside one, or for the local executor)."""
    if "SUBMITIT_EXECUTOR" not in os.environ:
        return 1
    import submitit

    return submitit.JobEnvironment().num_tasks


def task_rank() -> int:
    """This task's global rank in its submitit job (0 outside one)."""
    if "SUBMITIT_EXECUTOR" not in os.environ:
        return 0
    import submitit

    return submitit.JobEnvironment().global_rank


def outcome_file(results_dir: Path, slurm_job_id: str | None) -> Path:
    return Path(results_dir) / "jobs" / "outcomes" / f"{slurm_job_id or 'local'}.json"


def write_outcome(results_dir: Path, outcome: dict[str, object]) -> None:
    path = outcome_file(results_dir, outcome.get("slurm_job_id"))  # type: ignore[arg-type]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(outcome, indent=1))


def read_outcome(results_dir: Path, slurm_job_id: str) -> dict[str, object] | None:
    path = outcome_file(results_dir, slurm_job_id)
    return json.loads(path.read_text()) if path.exists() else None
