"""The campaign summary (`summary.md`): status counts and, per model, output tokens/s per GPU by layout (cells of a
swept engine knob told apart by it: analysis/variants.py)."""

from __future__ import annotations

import polars as pl

from infscale.analysis.variants import labelled, with_variant
from infscale.results.schemas import FILE_PROBLEMS, MERGED_STATUSES

OK = pl.col("status") == "ok"


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
    for model in frame.get_column("model").unique(maintain_order=True).to_list():
        rows = frame.filter((pl.col("model") == model) & OK)
        if rows.is_empty():
            cells = frame.filter(pl.col("model") == model)
            reasons = cells.get_column("reason").drop_nulls().unique().to_list()
            title = "no feasible cell" if set(cells.get_column("status")) <= {"infeasible"} else "no cell measured"
            lines += [f"## {model}: {title}", "", f"- {reasons[0] if reasons else 'no cells'}", ""]
            continue
        gpu_counts = sorted(set(rows.get_column("gpus").to_list()))
        within_node = [g for g in gpu_counts if g <= gpus_per_node]
        gpus = max(within_node) if within_node else max(gpu_counts)
        lines += _model_table(rows.filter(pl.col("gpus") == gpus), model, gpus)
    if backend != "sim":
        lines += _measured_table(frame.filter(OK))
    return "\n".join(lines).rstrip() + "\n"


MEASURED_COLUMNS = [  # (column, header, format)
    ("model", "model", "{}"), ("layout", "layout", "{}"), ("isl", "ISL", "{}"), ("osl", "OSL", "{}"),
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


def _model_table(rows: pl.DataFrame, model: str, gpus: int) -> list[str]:
    rows = rows.with_columns(
        (pl.col("workload") + " " + pl.col("isl") + "/" + pl.col("osl") + " " + pl.col("arrival")).alias("column"),
        (pl.col("layout") + pl.col("weight_dtype").map_elements(lambda d: "" if d == "bf16" else f" {d}",
                                                                  return_dtype=pl.String)).alias("row"),
    )
    rows = with_variant(rows).with_columns(labelled("row").alias("row"))
    columns = rows.get_column("column").unique(maintain_order=True).to_list()
    best = {c: rows.filter(pl.col("column") == c).get_column("output_tok_s_per_gpu").max() for c in columns}
    header = f"| layout ({gpus} GPUs) | " + " | ".join(columns) + " |"
    lines = [f"## {model}: output tokens/s per GPU (best in bold)", "", header,
             "|" + "---|" * (len(columns) + 1)]
    for row_name in rows.get_column("row").unique(maintain_order=True).to_list():
        cells = []
        for column in columns:
            match = rows.filter((pl.col("row") == row_name) & (pl.col("column") == column))
            if match.is_empty():
                cells.append("—")
                continue
            value = match.get_column("output_tok_s_per_gpu")[0]
            text = f"{value:,.0f}"
            cells.append(f"**{text}**" if value == best[column] else text)
        lines.append(f"| {row_name} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines
