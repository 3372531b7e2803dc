"""A campaign's results as flat tables (docs/results.md): the merged cells, and the per-request rows, time series
and GPU telemetry that each cell file keeps as nested lists, one row per request / sample with its cell's id.

    import infscale.results.tables as results
    cells = results.read_cells("results/demo")          # one row per planned cell (cells.parquet)
    requests = results.read_requests("results/demo")    # one row per request of every measured cell

Only the cells of the merged table are read (the plan's, never a superseded or stray file), so run `infscale
merge` first. `infscale export CONFIG` writes the same tables as Parquet files for other tools (duckdb, pandas).
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from infscale.results.columns import upgrade_frame
from infscale.results.io import cell_file

MERGED_NAME = "cells.parquet"
NESTED = {"requests": "requests_detail", "series": "series", "telemetry": "telemetry"}


def read_cells(results: Path | str) -> pl.DataFrame:
    """The merged table of a campaign (`results/<campaign>/` or its `cells.parquet`), in the current schema: a
    table written under schema 1.x is upgraded (typed lengths and arrival: results/columns.py)."""
    path = Path(results)
    path = path / MERGED_NAME if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run `infscale merge` for the campaign first")
    return upgrade_frame(pl.read_parquet(path))


def read_requests(results: Path | str, status: str = "ok") -> pl.DataFrame:
    """One row per request of every cell of the merged table with this status: cell_id, request, replica, isl,
    osl, arrival_s, first_token_s, finish_s (seconds from the cell's start), preemptions, and ttft_ms, tpot_ms
    (over the request's decode steps; null for a one-token output) and e2e_s."""
    frame = _flat(results, "requests", status)
    return frame.with_columns(
        ((pl.col("first_token_s") - pl.col("arrival_s")) * 1e3).alias("ttft_ms"),
        pl.when(pl.col("osl") > 1).then((pl.col("finish_s") - pl.col("first_token_s")) * 1e3 / (pl.col("osl") - 1))
        .alias("tpot_ms"),
        (pl.col("finish_s") - pl.col("arrival_s")).alias("e2e_s"),
    )


def read_series(results: Path | str, status: str = "ok") -> pl.DataFrame:
    """The scheduler's time series of every cell with this status: cell_id, replica, time_s, running, waiting,
    kv_occupancy, prefill_tokens (one row per sample; at most 2000 per replica)."""
    return _flat(results, "series", status)


def read_telemetry(results: Path | str, status: str = "ok") -> pl.DataFrame:
    """GPU telemetry samples of every measured cell (NVML; none for the sim backend): cell_id, gpu, time_s,
    power_w, sm_util, mem_util, sm_clock_mhz, mem_used_gib, throttle."""
    return _flat(results, "telemetry", status)


def _flat(results: Path | str, kind: str, status: str) -> pl.DataFrame:
    import pyarrow as pa

    from infscale.results.schemas import CELL_SCHEMA

    results_dir = Path(results)
    results_dir = results_dir.parent if results_dir.suffix == ".parquet" else results_dir
    column = NESTED[kind]
    empty = pl.from_arrow(pa.schema([pa.field("cell_id", pa.string()),
                                     *CELL_SCHEMA.field(column).type.value_type]).empty_table())
    ids = read_cells(results_dir).filter(pl.col("status") == status).get_column("cell_id").to_list()
    # a planned cell whose file went away since the merge is left out (the merge's next run says so)
    paths = [str(p) for p in (cell_file(results_dir, cell_id) for cell_id in ids) if p.is_file()]
    if not paths:
        return empty
    try:
        nested = pl.read_parquet(paths, columns=["cell_id", column])
    except pl.exceptions.ColumnNotFoundError:  # some files predate the list (telemetry: schema 1.0)
        frames = [pl.read_parquet(p, columns=["cell_id", column]) for p in paths if column in pl.read_parquet_schema(p)]
        nested = pl.concat(frames, how="vertical_relaxed") if frames else empty.select("cell_id")
    if nested.is_empty():
        return empty
    flat = nested.explode(column).drop_nulls(column).unnest(column)
    return pl.concat([empty, flat], how="vertical_relaxed")


def export(results: Path | str, out: Path | str) -> dict[str, Path]:
    """Write requests.parquet, series.parquet and telemetry.parquet (flat, as the readers above return them) and a
    copy of the merged table as cells.parquet into `out`; returns the files written."""
    from infscale.results.io import write_table_atomic

    out = Path(out)
    written = {"cells": write_table_atomic(read_cells(results).to_arrow(), out / MERGED_NAME)}
    for kind, reader in (("requests", read_requests), ("series", read_series), ("telemetry", read_telemetry)):
        written[kind] = write_table_atomic(reader(results).to_arrow(), out / f"{kind}.parquet")
    return written
