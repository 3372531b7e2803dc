"""Merge a campaign's cell files into one table: exactly one row per planned cell, nothing else.

Every planned cell's file is checked first (results/integrity.py: complete, and recording the cell its name says).
Intact cells (measured, or measured-infeasible) come from `cells/<id>.parquet`: through the bench jobs' summary
files (one Parquet per job holding its cells' summary rows) where they cover the cell, else from the cell file
itself; a summary row is only taken while its cell file is intact with the same spec hash. A cell whose file is
gone though it was measured is `missing`, one whose file is unreadable or truncated is `damaged` (with `repair`,
the file is moved to `damaged/`), one whose file records another cell is `misnamed` (the file is never read into
the table): never `ok`. Cells the plan ruled infeasible get a row from the plan with the reason; a cell that
failed and was not yet remeasured shows its latest failure; any other cell without a file is `pending`. Stray
files in the directory are never read.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from infscale.campaign.plan import PlannedCell
from infscale.results.integrity import check_cells
from infscale.results.io import cell_file, failure_cell_id, write_table_atomic
from infscale.results.schemas import SUMMARY_COLUMNS, SUMMARY_SCHEMA


def merge_cells(planned: list[PlannedCell], results_dir: Path, gpus_per_node: int,
                summaries: list[Path] = (), repair: bool = False) -> pl.DataFrame:
    results_dir = Path(results_dir)
    check = check_cells(results_dir, {p.cell.id: (p.cell.spec_hash, p.cell.spec_json) for p in planned if p.feasible},
                        list(summaries), repair)
    on_disk = {p.cell.id: p.cell.spec_hash for p in planned if p.cell.id in check.valid}
    indexed = _rows_from_summaries(check.summaries, on_disk)
    covered = set(indexed.get_column("cell_id").to_list()) if indexed is not None else set()
    present = [str(cell_file(results_dir, cell_id)) for cell_id in on_disk if cell_id not in covered]
    missing = [p for p in planned if p.feasible and p.cell.id not in on_disk]
    synthetic = [_plan_row(p, gpus_per_node, "infeasible", p.reason) for p in planned if not p.feasible]
    failures = _latest_failures(results_dir, {m.cell.id for m in missing})
    for item in missing:
        problem = check.status(item.cell.id)  # missing, damaged or misnamed: its own status, never ok
        synthetic.append(_plan_row(item, gpus_per_node, *problem) if problem else
                         failures.get(item.cell.id) or _plan_row(item, gpus_per_node, "pending", "not measured yet"))
    frames = [] if indexed is None else [indexed]
    if present:
        frames.append(read_summary_rows(present))
    if synthetic:
        frames.append(pl.from_arrow(pa.Table.from_pylist(synthetic, schema=SUMMARY_SCHEMA)))
    if not frames:
        return pl.from_arrow(SUMMARY_SCHEMA.empty_table())
    merged = pl.concat(frames, how="vertical_relaxed")
    order = pl.DataFrame({"cell_id": [p.cell.id for p in planned], "plan_order": range(len(planned))})
    return merged.join(order, on="cell_id", how="inner").sort("plan_order").drop("plan_order")


def read_summary_rows(paths: list[str]) -> pl.DataFrame:
    """The summary columns of result files; files of an older minor schema version (without the columns added
    since) are read one by one and the missing columns are null."""
    try:
        return pl.read_parquet(paths, columns=SUMMARY_COLUMNS)
    except pl.exceptions.ColumnNotFoundError:
        empty = pl.from_arrow(SUMMARY_SCHEMA.empty_table())
        frames = [pl.read_parquet(path, columns=[c for c in SUMMARY_COLUMNS if c in pq.read_schema(path).names])
                  for path in paths]
        return pl.concat([empty, *frames], how="diagonal_relaxed").select(SUMMARY_COLUMNS)


def _rows_from_summaries(summaries: list[Path], wanted: dict[str, str]) -> pl.DataFrame | None:
    """Rows found in bench-job summary files for the `wanted` cells (id -> spec hash), one per cell."""
    frames = [read_summary_rows([str(path)]) for path in summaries if Path(path).exists()]
    if not frames or not wanted:
        return None
    expected = pl.DataFrame({"cell_id": list(wanted), "expected_hash": list(wanted.values())})
    rows = pl.concat(frames, how="vertical_relaxed").join(expected, on="cell_id", how="inner")
    rows = rows.filter(pl.col("spec_hash") == pl.col("expected_hash")).drop("expected_hash")
    return rows.unique("cell_id", keep="first", maintain_order=True)


def _plan_row(item: PlannedCell, gpus_per_node: int, status: str, reason: str | None) -> dict[str, object]:
    return {
        **item.cell.identity(gpus_per_node),
        "status": status,
        "reason": reason,
        **item.capacity_columns(),
    }


def _latest_failures(results_dir: Path, wanted: set[str]) -> dict[str, dict[str, object]]:
    """Latest failure row per cell id among `wanted` (failure files are named <cell_id>.<UTC stamp>.parquet)."""
    folder = results_dir / "failures"
    if not wanted or not folder.is_dir():
        return {}
    latest: dict[str, Path] = {}
    for path in sorted(folder.glob("*.parquet")):
        cell_id = failure_cell_id(path)
        if cell_id in wanted:
            latest[cell_id] = path  # sorted by stamp, so the last one wins
    if not latest:
        return {}
    rows = read_summary_rows([str(p) for p in latest.values()]).to_dicts()
    return {row["cell_id"]: row for row in rows}


def write_merged(frame: pl.DataFrame, path: Path, config_hash: str) -> Path:
    return write_table_atomic(frame.to_arrow(), path, {b"infscale.config_hash": config_hash.encode()})
