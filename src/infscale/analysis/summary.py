"""The campaign summary (`summary.md`): status counts and, per model, output tokens/s per GPU by layout.

Cells that share a table row and column (an engine knob or the KV dtype swept) are told apart by the knobs that
differ between them, appended to the layout: `dp1tp2pp2 (pp_microbatches=0)`."""

from __future__ import annotations

import polars as pl

OK = pl.col("status") == "ok"
# what may tell apart cells of one model, layout, weight dtype and workload column
VARIANT_FIELDS = ("kv_dtype", "max_num_seqs", "max_num_tokens", "kv_memory_fraction", "kv_block_size", "router",
                  "pp_microbatches", "requests", "seed")


def summary_markdown(frame: pl.DataFrame, campaign: str, backend: str, hardware: str, gpus_per_node: int) -> str:
    counts = dict(frame.group_by("status").len().iter_rows())
    kind = "predicted by the analytical model" if backend == "sim" else "measured"
    lines = [
        f"# Campaign `{campaign}` — backend `{backend}` on `{hardware}` ({kind})",
        "",
        f"{frame.height} cells planned: " + ", ".join(f"{counts.get(s, 0)} {s}" for s in
                                                      ("ok", "infeasible", "failed", "pending") if counts.get(s)),
        "",
    ]
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


def _with_variants(rows: pl.DataFrame, keys: list[str], column: str) -> pl.DataFrame:
    """`column` + " (knob=value, …)" for the rows that share `keys` with another row, naming the fields of
    VARIANT_FIELDS that differ within their group (pp_microbatches read from the cell's JSON)."""
    if "pp_microbatches" not in rows.columns:
        rows = rows.with_columns(pl.col("cell_json").str.json_path_match("$.engine.pp_microbatches")
                                 .alias("pp_microbatches"))
    labels = rows.get_column(column).to_list()
    indexed = rows.with_row_index("_row")
    for _, group in indexed.group_by(keys, maintain_order=True):
        if group.height < 2:
            continue
        varying = [f for f in VARIANT_FIELDS if f in group.columns and group.get_column(f).n_unique() > 1]
        for row in group.iter_rows(named=True):
            knobs = ", ".join(f"{f}={'—' if row[f] is None else row[f]}" for f in varying)
            labels[row["_row"]] = f"{row[column]} ({knobs})"
    return rows.with_columns(pl.Series(column, labels, dtype=pl.String))


def _measured_table(rows: pl.DataFrame) -> list[str]:
    """Every measured cell with its throughput, latency, batch, KV and energy numbers (not for the sim, whose
    campaigns run to thousands of cells)."""
    if rows.is_empty():
        return []
    rows = _with_variants(rows, ["model", "layout", "weight_dtype", "workload", "isl", "osl", "arrival"], "layout")
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
    rows = _with_variants(rows, ["row", "column"], "row")
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
