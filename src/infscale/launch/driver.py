"""Drive one bench job to completion through the chosen executor: `debug` (in this process), `local` (a submitit
subprocess) or `slurm` (sbatch through submitit).

On Slurm the driver records every submission in the job registry before it waits, re-attaches to a job that is
still queued or running (also one a killed driver submitted but never recorded: it is found by its job name),
and applies the failure policy of launch/failures.py: time limits and preemptions resume through submitit's
checkpoint/requeue, node failures and NCCL/Xid errors are retried with the node excluded, a user's cancel is
left alone, and a job never resubmits beyond its limits.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Callable

from infscale.launch.failures import Failure, classify_state
from infscale.launch.jobfn import BenchJob, read_outcome
from infscale.launch.registry import ACTIVE_STATES, Attempt, Registry, driver_lock, find_active_by_name
from infscale.launch.resources import container_python, job_resources, local_executor, submitit_parameters
from infscale.launch.settings import LauncherSettings
from infscale.pipeline import CampaignRun
from infscale.results.integrity import MISNAMED, VALID, check_cell_file
from infscale.results.io import cell_file
from infscale.results.provenance import utc_now


class JobFailed(RuntimeError):
    """The bench job ended without all its cells, and the policy says not to try again now."""


def slurm_job_name(campaign: str, job: str) -> str:
    return f"infscale.{campaign}.{hashlib.sha256(job.encode()).hexdigest()[:10]}"


def missing_cells(run: CampaignRun, job: str) -> list[str]:
    """Cells of the job without an intact result file (measured or measured-infeasible)."""
    return [p.cell.id for p in run.jobs()[job]
            if check_cell_file(cell_file(run.results_dir, p.cell.id), p.cell.spec_hash, p.cell.spec_json).state
            != VALID]


def drive_job(run: CampaignRun, job: str, settings: LauncherSettings,
              log: Callable[[str], None] = print) -> None:
    """Return when every cell of `job` is on disk; raise JobFailed otherwise."""
    registry = Registry(run.results_dir)
    # one live driver per bench job, whatever the executor: a second one (say, of a workflow started again while
    # a killed workflow's bench job still runs) is refused instead of measuring the same cells
    with driver_lock(registry.folder / f"{job}.lock", f"bench job {job} of campaign {run.campaign.name}", log):
        if settings.executor == "debug":
            BenchJob(str(run.campaign_file), str(run.results_root), run.packing, job, settings.trtllm)()
        elif settings.executor == "local":
            _drive_local(run, job, settings)
        else:
            _drive_slurm(run, job, settings, registry, log)
    missing = missing_cells(run, job)
    if missing:
        refused = [found.reason for p in run.jobs()[job] if p.cell.id in missing
                   and (found := check_cell_file(cell_file(run.results_dir, p.cell.id), p.cell.spec_hash,
                                                 p.cell.spec_json)).state == MISNAMED]
        raise JobFailed(f"{job}: {len(missing)} cell(s) not measured (see {run.results_dir}/failures/ and "
                        "logs/measured.log); rerun to retry them"
                        + (f"; {len(refused)} refused: {refused[0]}; move that file away" if refused else ""))


def _drive_local(run: CampaignRun, job: str, settings: LauncherSettings) -> None:
    executor = local_executor(run.results_dir / "jobs" / "submitit")
    submitted = executor.submit(BenchJob(str(run.campaign_file), str(run.results_root), run.packing, job,
                                         settings.trtllm))
    submitted.result()


def _drive_slurm(run: CampaignRun, job: str, settings: LauncherSettings, registry: Registry,
                 log: Callable[[str], None]) -> None:
    name = slurm_job_name(run.campaign.name, job)
    record = registry.load(job)
    retries = 0
    excluded: list[str] = []
    while missing_cells(run, job):
        attempt = record.last
        if attempt is None or attempt.ended_at is not None:
            orphans = find_active_by_name(name)
            if orphans:  # submitted by a driver that died before recording it
                attempt = Attempt(orphans[0], utc_now(), "adopted: found queued under this job's name")
            else:
                reason = "first submission" if attempt is None else f"retry after {attempt.state}"
                attempt = _submit(run, job, settings, name, excluded, reason)
                log(f"{job}: submitted Slurm job {attempt.slurm_job_id} ({reason})")
            record.attempts.append(attempt)
            registry.save(record)
        else:
            log(f"{job}: re-attached to Slurm job {attempt.slurm_job_id} ({attempt.state})")
        state = _wait(registry, attempt, settings, log, job)
        attempt.ended_at = utc_now()
        registry.save(record)
        if not missing_cells(run, job):
            return  # every cell is on disk, whatever the end state says (e.g. a USR2 right after the last cell)
        failure = classify_state(state["state"])
        outcome = read_outcome(run.results_dir, attempt.slurm_job_id) or {}
        if outcome.get("status") == "retry_elsewhere":
            failure = Failure.RETRY_ELSEWHERE
        if failure is None:
            return  # completed: missing cells, if any, failed inside the job and are reported by drive_job
        if failure is Failure.CANCELLED:
            raise JobFailed(f"{job}: Slurm job {attempt.slurm_job_id} was cancelled; rerun to resume it")
        if failure is Failure.REQUEUE:
            raise JobFailed(f"{job}: Slurm job {attempt.slurm_job_id} ended {state['state']} after "
                            f"{settings.slurm.max_requeues} requeue(s); raise launcher.slurm.time_limit_max_min "
                            "or split the job, then rerun")
        if failure is Failure.RETRY_ELSEWHERE:
            retries += 1
            if retries > settings.slurm.max_retries:
                raise JobFailed(f"{job}: gave up after {settings.slurm.max_retries} retries "
                                f"(last: {state['state']} {outcome.get('reason', '')})")
            excluded = _exclusions(excluded, state.get("nodes", ""), settings)
            log(f"{job}: {state['state']} {outcome.get('reason', '')} on {state.get('nodes')}; retrying"
                + (f" without {','.join(excluded)}" if excluded else ""))
            continue
        raise JobFailed(f"{job}: Slurm job {attempt.slurm_job_id} ended {state['state']} "
                        f"({outcome.get('reason') or state.get('reason') or 'see its log in jobs/submitit/'})")


def _submit(run: CampaignRun, job: str, settings: LauncherSettings, name: str, excluded: list[str],
            reason: str) -> Attempt:
    import submitit

    slurm = settings.slurm
    missing = set(missing_cells(run, job))
    cells = [p for p in run.jobs()[job] if p.cell.id in missing]
    resources = job_resources(cells, run.campaign.hardware, run.campaign.spec.backend, slurm)
    executor = submitit.AutoExecutor(folder=run.results_dir / "jobs" / "submitit", cluster="slurm",
                                     slurm_max_num_timeout=slurm.max_requeues, slurm_python=container_python(slurm))
    executor.update_parameters(**submitit_parameters(resources, slurm, name, excluded))
    submitted = executor.submit(BenchJob(str(run.campaign_file.resolve()), str(run.results_root.resolve()),
                                         run.packing, job, settings.trtllm))
    return Attempt(str(submitted.job_id), utc_now(), reason, list(excluded))


def _wait(registry: Registry, attempt: Attempt, settings: LauncherSettings, log: Callable[[str], None],
          job: str) -> dict[str, str]:
    """Poll (through the campaign's shared status cache) until the Slurm job is in a terminal state."""
    interval = settings.poll_interval_s
    parent = os.getppid()
    last_state = attempt.state
    while True:
        if os.getppid() != parent:  # the workflow driver died: leave the job to Slurm, a restart re-attaches
            log(f"{job}: driver gone; Slurm job {attempt.slurm_job_id} keeps running")
            sys.exit(3)
        state = registry.states(max_age_s=interval).get(attempt.slurm_job_id)
        if state is None:
            time.sleep(interval)  # not yet in the accounting database
            continue
        if state["state"] != last_state:
            attempt.state, attempt.nodes = state["state"], state.get("nodes", "")
            last_state = state["state"]
            log(f"{job}: Slurm job {attempt.slurm_job_id} is {last_state}")
            interval = settings.poll_interval_s
        else:
            interval = min(settings.max_poll_interval_s, interval * 1.5)
        if state["state"] not in ACTIVE_STATES:
            registry.invalidate_states()
            return state
        time.sleep(interval)


def _exclusions(excluded: list[str], nodes: str, settings: LauncherSettings) -> list[str]:
    """Add the failed node(s) unless that would leave the partition without a node (then retry anywhere)."""
    import subprocess

    if not nodes or nodes == "None assigned":
        return excluded
    try:
        failed = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True,
                                timeout=60).stdout.split()
    except (OSError, subprocess.SubprocessError):
        failed = []
    candidate = sorted(set(excluded) | set(failed))
    command = ["sinfo", "-h", "-N", "-o", "%N"] + (["-p", settings.slurm.partition] if settings.slurm.partition else [])
    try:
        all_nodes = set(subprocess.run(command, capture_output=True, text=True, timeout=60).stdout.split())
    except (OSError, subprocess.SubprocessError):
        return excluded
    return candidate if all_nodes - set(candidate) else []
