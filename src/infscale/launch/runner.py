"""Run one bench job: its cells in-process, one artefact per build key, one result file per cell as it ends.

Cells whose result file already holds the same spec hash are skipped, so a job that died midway (or a rerun
after new cells were added) measures only what is missing. A failure is recorded in `failures/` with its
reason and the cell is retried by the next run; measured files are never overwritten.
"""

from __future__ import annotations

import os
import socket
import traceback
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyarrow as pa

from infscale.backends import Backend, BuildSpec, CellResult, InfeasibleCell, get_backend
from infscale.campaign import Campaign
from infscale.campaign.plan import PlannedCell
from infscale.launch.failures import Failure, classify_error
from infscale.results import provenance
from infscale.results.integrity import DAMAGED, MISNAMED, VALID, FileCheck, check_cell_file, move_aside
from infscale.results.io import (
    build_cell_table,
    cell_file,
    failure_file,
    measured_log,
    read_summary,
    write_cell,
    write_table_atomic,
)
from infscale.results.schemas import SUMMARY_COLUMNS, SUMMARY_SCHEMA


@dataclass
class CellOutcome:
    cell_id: str
    status: str          # ok | infeasible | failed | skipped (already measured)
    reason: str | None = None
    summary: dict | None = None  # the cell's summary row (None when failed)




def run_cells(campaign: Campaign, planned: list[PlannedCell], results_dir: Path, backend: Backend | None = None,
              progress: Callable[[CellOutcome], None] | None = None) -> list[CellOutcome]:
    owned = backend is None
    backend = backend or get_backend(campaign.spec.backend)
    gpus_per_node = campaign.hardware.gpus_per_node
    by_build: dict[BuildSpec, list[PlannedCell]] = defaultdict(list)
    outcomes: list[CellOutcome] = []
    for item in planned:
        if not item.feasible:
            continue  # infeasible by the plan: never run (the merge reports them from the plan)
        path = cell_file(results_dir, item.cell.id)
        found = check_cell_file(path, item.cell.spec_hash, item.cell.spec_json)
        if found.state == VALID:
            try:
                outcomes.append(CellOutcome(item.cell.id, "skipped", summary=read_summary(path)))
                continue
            except (OSError, pa.ArrowException) as err:  # an intact footer over damaged data
                found = FileCheck(DAMAGED, f"its summary row cannot be read ({err})")
        if found.state == MISNAMED:  # an id collision or a hand-edited file: never overwrite, never guess
            outcomes.append(CellOutcome(item.cell.id, "failed", f"{found.reason}; move it away to measure the cell"))
            continue
        if found.state == DAMAGED:  # kept in damaged/ with its reason, and measured again below
            move_aside(results_dir, path, found.reason or "damaged")
        by_build[BuildSpec.for_cells([item.cell])].append(item)
    try:
        for build, items in by_build.items():
            artefact = backend.prepare(BuildSpec.for_cells([i.cell for i in items]), campaign)
            for item in items:
                cell = item.cell
                started = provenance.utc_now()
                row = {**cell.identity(gpus_per_node), **item.capacity_columns(), "started_at": started}
                result: CellResult | None = None
                node_problem: str | None = None
                try:
                    result = backend.measure(cell, artefact, campaign)
                    row.update(result.summary, status="ok", predicted=result.predicted)
                except InfeasibleCell as err:
                    row.update(status="infeasible", reason=str(err))
                except Exception as err:  # classified by its message: see launch/failures.py
                    last = traceback.format_exception_only(type(err), err)[-1].strip()
                    failure = classify_error(last)
                    row.update(status="infeasible" if failure is Failure.INFEASIBLE else "failed", reason=last)
                    if failure is Failure.RETRY_ELSEWHERE:
                        node_problem = last
                row["ended_at"] = provenance.utc_now()
                table = build_cell_table(row, result.requests if result else None, result.series if result else None,
                                         result.telemetry if result else None)
                meta = {**provenance.collect(campaign.name, campaign.config_hash), "artefact": artefact.info,
                        "started_at": started, "ended_at": row["ended_at"]}
                if result is not None and result.provenance:
                    meta["measurement"] = result.provenance
                if row["status"] == "failed":
                    write_cell(failure_file(results_dir, cell.id), table, meta, cell.spec_json)
                else:
                    write_cell(cell_file(results_dir, cell.id), table, meta, cell.spec_json)
                summary = None if row["status"] == "failed" else table.select(SUMMARY_COLUMNS).to_pylist()[0]
                outcome = CellOutcome(cell.id, row["status"], row.get("reason"), summary)
                outcomes.append(outcome)
                _log_measurement(results_dir, outcome)
                if progress:
                    progress(outcome)
                if node_problem:
                    from infscale.launch.jobfn import NodeProblem

                    raise NodeProblem(f"{cell.id}: {node_problem}")
    finally:
        if owned and hasattr(backend, "close"):  # rank processes and the like
            backend.close()
    return outcomes


def _log_measurement(results_dir: Path, outcome: CellOutcome) -> None:
    """Append-only audit trail: which cell was measured when, where, by which Slurm job, with what result."""
    path = measured_log(results_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = "\t".join([provenance.utc_now(), outcome.cell_id, outcome.status, socket.gethostname(),
                      os.environ.get("SLURM_JOB_ID", "-"), (outcome.reason or "").replace("\t", " ")[:300]])
    with open(path, "a") as handle:
        handle.write(line + "\n")



def job_outcomes(planned: list[PlannedCell], results_dir: Path) -> list[CellOutcome]:
    """The outcome of every cell of a job whose cells are all on disk (read back from the cell files)."""
    return [CellOutcome(p.cell.id, "skipped", summary=read_summary(cell_file(results_dir, p.cell.id)))
            for p in planned]


def write_job_summary(path: Path, job: str, outcomes: list[CellOutcome]) -> Path:
    """The bench rule's output: the summary rows of every cell of the job (an index over its cell files, so
    the merge reads one file per job instead of one per cell; the cell files stay the source of truth)."""
    rows = [o.summary for o in outcomes if o.summary is not None]
    table = pa.Table.from_pylist(rows, schema=SUMMARY_SCHEMA)
    return write_table_atomic(table, path, {b"infscale.job": job.encode(),
                                            b"infscale.written_at": provenance.utc_now().encode()})


__all__ = ["CellOutcome", "run_cells", "write_job_summary", "failure_file"]
