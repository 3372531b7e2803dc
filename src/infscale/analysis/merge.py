"""Merge a campaign's cell files into one table: exactly one row per planned cell, nothing else.

Measured (or measured-infeasible) cells come from `cells/<id>.parquet` — through the bench jobs' summary files
(one Parquet per job holding its cells' summary rows) where they cover the cell, else from the cell file itself;
a row is only taken while its cell file exists with the same spec hash. Cells the plan ruled infeasible get a row
from the plan with the reason; a cell that failed and was not yet remeasured shows its latest failure; a cell
with no file at all is `pending`. Stray files in the directory are never read.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from infscale.campaign.plan import PlannedCell
from infscale.results.io import cell_file, failure_cell_id, write_table_atomic
from infscale.results.schemas import SUMMARY_COLUMNS, SUMMARY_SCHEMA


def merge_cells(planned: list[PlannedCell], results_dir: Path, gpus_per_node: int,
                summaries: list[Path] = ()) -> pl.DataFrame:
    results_dir = Path(results_dir)
    on_disk = {p.cell.id: p.cell.spec_hash for p in planned
               if p.feasible and cell_file(results_dir, p.cell.id).exists()}
    indexed = _rows_from_summaries(summaries, on_disk)
    covered = set(indexed.get_column("cell_id").to_list()) if indexed is not None else set()
    present = [str(cell_file(results_dir, cell_id)) for cell_id in on_disk if cell_id not in covered]
    missing = [p for p in planned if p.feasible and p.cell.id not in on_disk]
    synthetic = [_plan_row(p, gpus_per_node, "infeasible", p.reason) for p in planned if not p.feasible]
    failures = _latest_failures(results_dir, {m.cell.id for m in missing})
    for item in missing:
        failure = failures.get(item.cell.id)
        synthetic.append(failure or _plan_row(item, gpus_per_node, "pending", "not measured yet"))
    frames = [] if indexed is None else [indexed]
    if present:  # a file under a planned id but with another spec is never taken for that cell
        direct = read_summary_rows(present)
        foreign = direct.filter(pl.col("spec_hash") != pl.col("cell_id").replace_strict(on_disk, default=None))
        if foreign.height:
            raise ValueError(f"{foreign.height} cell file(s) hold another spec than their name says, e.g. "
                             f"{cell_file(results_dir, foreign['cell_id'][0])}; move them away")
        frames.append(direct)
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
