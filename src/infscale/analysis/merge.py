"""Merge a campaign's cell files into one table: exactly one row per planned cell, nothing else.

Measured (or measured-infeasible) cells come from `cells/<id>.parquet`; cells the plan ruled infeasible get a row
from the plan with the reason; a cell that failed and was not yet remeasured shows its latest failure; a cell
with no file at all is `pending`. Stray files in the directory are never read.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pyarrow as pa

from infscale.campaign.plan import PlannedCell
from infscale.memory import GIB
from infscale.results.io import cell_file, write_table_atomic
from infscale.results.schemas import SUMMARY_COLUMNS, SUMMARY_SCHEMA


def merge_cells(planned: list[PlannedCell], results_dir: Path, gpus_per_node: int) -> pl.DataFrame:
    results_dir = Path(results_dir)
    present: list[str] = []
    missing: list[PlannedCell] = []
    synthetic: list[dict[str, object]] = []
    for item in planned:
        path = cell_file(results_dir, item.cell.id)
        if item.feasible and path.exists():
            present.append(str(path))
        elif item.feasible:
            missing.append(item)
        else:
            synthetic.append(_plan_row(item, gpus_per_node, "infeasible", item.reason))
    failures = _latest_failures(results_dir, {m.cell.id for m in missing})
    for item in missing:
        failure = failures.get(item.cell.id)
        synthetic.append(failure or _plan_row(item, gpus_per_node, "pending", "not measured yet"))
    frames = []
    if present:
        measured = pl.read_parquet(present, columns=SUMMARY_COLUMNS)
        frames.append(measured)
    if synthetic:
        frames.append(pl.from_arrow(pa.Table.from_pylist(synthetic, schema=SUMMARY_SCHEMA)))
    if not frames:
        return pl.from_arrow(SUMMARY_SCHEMA.empty_table())
    merged = pl.concat(frames, how="vertical_relaxed")
    order = pl.DataFrame({"cell_id": [p.cell.id for p in planned], "plan_order": range(len(planned))})
    return merged.join(order, on="cell_id", how="left").sort("plan_order").drop("plan_order")


def _plan_row(item: PlannedCell, gpus_per_node: int, status: str, reason: str | None) -> dict[str, object]:
    return {
        **item.cell.identity(gpus_per_node),
        "status": status,
        "reason": reason,
        "weights_gib_per_gpu": item.memory.weights_bytes_per_gpu / GIB,
        "kv_bytes_per_token_per_gpu": item.memory.kv_bytes_per_token_per_gpu,
        "kv_capacity_tokens": item.memory.kv_tokens_per_replica,
        "max_concurrency": item.max_concurrency,
    }


def _latest_failures(results_dir: Path, wanted: set[str]) -> dict[str, dict[str, object]]:
    """Latest failure row per cell id among `wanted` (failure files are named <cell_id>.<UTC stamp>.parquet)."""
    folder = results_dir / "failures"
    if not wanted or not folder.is_dir():
        return {}
    latest: dict[str, Path] = {}
    for path in sorted(folder.glob("*.parquet")):
        cell_id = path.name.rsplit(".", 2)[0]
        if cell_id in wanted:
            latest[cell_id] = path  # sorted by stamp, so the last one wins
    if not latest:
        return {}
    rows = pl.read_parquet([str(p) for p in latest.values()], columns=SUMMARY_COLUMNS).to_dicts()
    return {row["cell_id"]: row for row in rows}


def write_merged(frame: pl.DataFrame, path: Path, config_hash: str) -> Path:
    return write_table_atomic(frame.to_arrow(), path, {b"infscale.config_hash": config_hash.encode()})
