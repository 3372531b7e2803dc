"""Engine variants: what tells apart cells of one model, layout and workload when a campaign sweeps an engine knob
(or the KV dtype). The summary, the fits and the figures append the label to the layout (`dp1tp2pp2
(pp_microbatches=0)`), so no row, fit or line silently stands for, or mixes, several cells."""

from __future__ import annotations

import polars as pl

VARIANT_FIELDS = ("kv_dtype", "max_num_seqs", "max_num_tokens", "kv_memory_fraction", "kv_block_size", "router",
                  "pp_microbatches", "requests", "seed")
# one cell, but for variants
CELL_KEYS = ["model", "weight_dtype", "layout", "workload", "isl_label", "osl_label", "arrival"]


def with_variant(rows: pl.DataFrame, keys: list[str] | None = None) -> pl.DataFrame:
    """`rows` with a `variant` column: for rows that share `keys` (default: everything but the variant fields)
    with another row, "field=value, …" of the VARIANT_FIELDS that differ within their group; "" for the others.
    pp_microbatches is read from the cell's JSON (it has no column of its own)."""
    keys = keys or CELL_KEYS
    if "pp_microbatches" not in rows.columns and "cell_json" in rows.columns:
        rows = rows.with_columns(pl.col("cell_json").str.json_path_match("$.engine.pp_microbatches")
                                 .alias("pp_microbatches"))
    labels = [""] * rows.height
    # only the groups of two or more rows are walked (a large sim campaign has one row per group)
    shared = rows.with_row_index("_row").filter(pl.len().over(keys) > 1)
    for _, group in shared.group_by(keys, maintain_order=True):
        varying = [f for f in VARIANT_FIELDS if f in group.columns and group.get_column(f).n_unique() > 1]
        for row in group.iter_rows(named=True):
            labels[row["_row"]] = ", ".join(f"{f}={'—' if row[f] is None else row[f]}" for f in varying)
    return rows.with_columns(pl.Series("variant", labels, dtype=pl.String))


def labelled(column: str) -> pl.Expr:
    """`column` + " (variant)" where the row has a variant (use after with_variant)."""
    return pl.when(pl.col("variant") == "").then(pl.col(column)) \
        .otherwise(pl.col(column) + " (" + pl.col("variant") + ")")
