"""The campaign summary (`summary.md`): status counts, a legend, and per model one table of output tokens/s per GPU
of every layout measured, grouped by GPU count (cells of a swept engine knob told apart by it:
analysis/variants.py); for measured backends also every cell's throughput, latency and energy."""

from __future__ import annotations

import polars as pl

from infscale.analysis.variants import labelled, with_variant
from infscale.results.schemas import FILE_PROBLEMS, MERGED_STATUSES

OK = pl.col("status") == "ok"
LEGEND = [
    "How to read the tables: one per model, a row per layout measured, grouped by GPU count, a column per workload. "
    "Values are output tokens/s per GPU (the layout's output throughput ÷ its GPUs), so layouts of one GPU count "
    "(TP against DP against PP) compare along a group, and GPU counts against each other down the table; **bold** "
    "is the best layout of its GPU count for that workload; — no ok cell (infeasible, failed or pending: "
    "`cells.parquet` has the reason).",
    "",
    "- layout `dpXtpYppZ` (`epW`): X data-parallel replicas of Y-way tensor- and Z-way pipeline-parallel engines "
    "(W-way expert parallelism); a weights dtype other than bf16 follows it, a swept engine knob in brackets;",
    "- column `workload ISL/OSL arrival`: input and output lengths in tokens — a number is fixed, `LN6000s0.9c32768` "
    "lognormal (median 6000, sigma 0.9, capped at 32768), `N4000s1000c8000` normal (mean, standard deviation, cap); "
    "arrival `off` offline (every request at t = 0; TTFT includes the queueing), `c256` 256 requests kept in "
    "flight (closed loop), `r4` Poisson arrivals at 4 requests/s;",
    "- GPUs: the layout's GPU count, with its nodes where it spans more than one.",
    "",
]


def summary_markdown(frame: pl.DataFrame, campaign: str, backend: str, hardware: str, gpus_per_node: int) -> str:
    counts = dict(frame.group_by("status").len().iter_rows())
    kind = "predicted by the analytical model" if backend == "sim" else "measured"
    lines = [
        f"# Campaign `{campaign}` — backend `{backend}` on `{hardware}` ({kind})",
        "",
        f"{frame.height} cells planned: " + ", ".join(f"{counts.get(s, 0)} {s}" for s in MERGED_STATUSES
                                                      if counts.get(s)),
        "",
    ]
    problems = frame.filter(pl.col("status").is_in(FILE_PROBLEMS))
    if problems.height:  # first, so nobody reads the tables below as complete
        lines += ["## cell files needing attention", "",
                  f"{problems.height} planned cell(s) have a missing, damaged or misnamed file (see "
                  "`logs/cell-check.log` and `damaged/`); a rerun measures the missing and damaged ones again, a "
                  "misnamed file must be moved away by hand:", ""]
        lines += [f"- `{row['cell_id']}`: {row['status']}: {row['reason']}"
                  for row in problems.select("cell_id", "status", "reason").iter_rows(named=True)]
        lines.append("")
    lines += LEGEND
    for model in frame.get_column("model").unique(maintain_order=True).to_list():
        rows = frame.filter((pl.col("model") == model) & OK)
        if rows.is_empty():
            cells = frame.filter(pl.col("model") == model)
            reasons = cells.get_column("reason").drop_nulls().unique().to_list()
            title = "no feasible cell" if set(cells.get_column("status")) <= {"infeasible"} else "no cell measured"
            lines += [f"## {model}: {title}", "", f"- {reasons[0] if reasons else 'no cells'}", ""]
            continue
        lines += _model_table(rows, model, gpus_per_node)
    if backend != "sim":
        lines += _measured_table(frame.filter(OK))
    return "\n".join(lines).rstrip() + "\n"


MEASURED_COLUMNS = [  # (column, header, format)
    ("model", "model", "{}"), ("layout", "layout", "{}"), ("isl_label", "ISL", "{}"), ("osl_label", "OSL", "{}"),
    ("output_tok_s", "tok/s", "{:,.0f}"), ("output_tok_s_per_gpu", "tok/s/GPU", "{:,.0f}"),
    ("tpot_ms_p50", "TPOT p50 ms", "{:.2f}"), ("tpot_ms_p99", "TPOT p99 ms", "{:.2f}"),
    ("mean_running_batch", "mean batch", "{:.1f}"), ("mean_kv_occupancy", "KV occ.", "{:.0%}"),
    ("energy_per_output_token_j", "J/token", "{:.3f}"), ("mean_power_w", "power W", "{:,.0f}"),
    ("engine_path", "engine", "{}"),
]


def _measured_table(rows: pl.DataFrame) -> list[str]:
    """Every measured cell with its throughput, latency, batch, KV and energy numbers (not for the sim, whose
    campaigns run to thousands of cells)."""
    if rows.is_empty():
        return []
    rows = with_variant(rows).with_columns(labelled("layout").alias("layout"))
    lines = ["## measured cells", "", "| " + " | ".join(h for _, h, _ in MEASURED_COLUMNS) + " |",
             "|" + "---|" * len(MEASURED_COLUMNS)]
    for row in rows.iter_rows(named=True):
        values = [("—" if row.get(c) is None else f.format(row[c])) for c, _, f in MEASURED_COLUMNS]
        lines.append("| " + " | ".join(values) + " |")
    lines.append("")
    return lines


def _model_table(rows: pl.DataFrame, model: str, gpus_per_node: int) -> list[str]:
    """Every measured layout of a model, grouped by GPU count (rows) against every workload (columns); the best
    layout of each GPU count per workload in bold, where that GPU count has two or more."""
    rows = rows.with_columns(
        (pl.col("workload") + " " + pl.col("isl_label") + "/" + pl.col("osl_label") + " "
         + pl.col("arrival")).alias("column"),
        (pl.col("layout") + pl.col("weight_dtype").map_elements(lambda d: "" if d == "bf16" else f" {d}",
                                                                  return_dtype=pl.String)).alias("row"),
    )
    rows = with_variant(rows).with_columns(labelled("row").alias("row"))
    columns = rows.get_column("column").unique(maintain_order=True).to_list()
    best = rows.group_by("gpus", "column").agg(pl.col("output_tok_s_per_gpu").max().alias("best"),
                                                pl.len().alias("layouts"))
    best = {(g, c): value for g, c, value, n in best.iter_rows() if n > 1}
    values = {(r["row"], r["column"]): r["output_tok_s_per_gpu"] for r in rows.iter_rows(named=True)}
    lines = [f"## {model}: output tokens/s per GPU, by GPU count (best of each GPU count in bold)", "",
             "| GPUs | layout | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 2)]
    order = rows.select("gpus", "row").unique(maintain_order=True).sort("gpus", maintain_order=True)
    for gpus, row_name in order.iter_rows():
        cells = []
        for column in columns:
            value = values.get((row_name, column))
            if value is None:
                cells.append("—")
                continue
            text = f"{value:,.0f}"
            cells.append(f"**{text}**" if value == best.get((gpus, column)) else text)
        nodes = -(-gpus // gpus_per_node)
        lines.append(f"| {gpus}{f' ({nodes} nodes)' if nodes > 1 else ''} | {row_name} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines
