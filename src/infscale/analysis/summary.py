"""The campaign summary (`summary.md`): status counts and, per model, output tokens/s per GPU by layout."""

from __future__ import annotations

import polars as pl

OK = pl.col("status") == "ok"


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
            reasons = frame.filter(pl.col("model") == model).get_column("reason").drop_nulls().unique().to_list()
            lines += [f"## {model}: no feasible cell", "", f"- {reasons[0] if reasons else 'no cells'}", ""]
            continue
        gpu_counts = sorted(set(rows.get_column("gpus").to_list()))
        within_node = [g for g in gpu_counts if g <= gpus_per_node]
        gpus = max(within_node) if within_node else max(gpu_counts)
        lines += _model_table(rows.filter(pl.col("gpus") == gpus), model, gpus)
    return "\n".join(lines).rstrip() + "\n"


def _model_table(rows: pl.DataFrame, model: str, gpus: int) -> list[str]:
    rows = rows.with_columns(
        (pl.col("workload") + " " + pl.col("isl") + "/" + pl.col("osl") + " " + pl.col("arrival")).alias("column"),
        (pl.col("layout") + pl.col("weight_dtype").map_elements(lambda d: "" if d == "bf16" else f" {d}",
                                                                  return_dtype=pl.String)).alias("row"),
    )
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
