"""Predicted against measured: the `sim` backend predicts every measured cell of a campaign (same model, layout,
requests, engine settings), and the relative errors are kept per cell.

error = (predicted - measured) / measured, for output throughput, TPOT p50 and TTFT p50. Cells whose decode ran
the torch engine's eager path (per-op dispatch on the host: PP and MoE so far) measure the engine, not the
hardware the model describes: they are listed but left out of the medians.
"""

from __future__ import annotations

import polars as pl

from infscale.backends.base import BuildSpec, InfeasibleCell
from infscale.backends.sim.backend import SimBackend
from infscale.campaign import Campaign
from infscale.campaign.plan import PlannedCell

METRICS = {"output_tok_s": "output tok/s", "tpot_ms_p50": "TPOT p50 ms", "ttft_ms_p50": "TTFT p50 ms"}


def measured_cells(merged: pl.DataFrame) -> pl.DataFrame:
    return merged.filter((pl.col("status") == "ok") & ~pl.col("predicted").fill_null(False))


def predict_cells(campaign: Campaign, planned: list[PlannedCell], rows: pl.DataFrame) -> list[dict | None]:
    """The sim's summary for each row's cell (None when the model calls it infeasible)."""
    cells = {p.cell.id: p.cell for p in planned}
    sim = SimBackend()
    out: list[dict | None] = []
    for cell_id in rows.get_column("cell_id").to_list():
        cell = cells[cell_id]
        try:
            out.append(sim.measure(cell, sim.prepare(BuildSpec.for_cells([cell]), campaign), campaign).summary)
        except InfeasibleCell:
            out.append(None)
    return out


def validate(campaign: Campaign, planned: list[PlannedCell], merged: pl.DataFrame,
             fitted_on: list[str] = ()) -> pl.DataFrame:
    """One row per measured cell: measured, predicted and error per metric; `in_medians` marks the cells the
    medians use, `held_out` those a profile was not fitted on."""
    measured = measured_cells(merged)
    fitted = set(fitted_on)
    rows = []
    for row, predicted in zip(measured.iter_rows(named=True), predict_cells(campaign, planned, measured)):
        out: dict[str, object] = {k: row.get(k) for k in ("cell_id", "model", "layout", "isl", "osl", "gpu_name",
                                                           "engine_path")}
        out["in_medians"] = row.get("engine_path") != "eager"
        out["held_out"] = row["cell_id"] not in fitted
        # the model thinks the cell cannot run although it did: worth seeing
        out["note"] = None if predicted is not None else "sim: infeasible"
        for metric in METRICS:
            value, guess = row.get(metric), (predicted or {}).get(metric)
            out[f"{metric}_measured"], out[f"{metric}_predicted"] = value, guess
            out[f"{metric}_error"] = (guess - value) / value if value and guess is not None else None
        rows.append(out)
    return pl.DataFrame(rows, infer_schema_length=None)


def validation_markdown(frame: pl.DataFrame, campaign: str, hardware: str, profile: str | None = None) -> str:
    constants = f"profile `{profile}`" if profile else "the catalog's constants (no profile)"
    lines = [f"# Validation of the `sim` model on campaign `{campaign}` ({hardware}, {constants})", "",
             "error = (predicted − measured) / measured. Medians over the cells on the CUDA-graph path; eager-path "
             "cells (host-bound) are listed but not in the medians.", ""]
    scoped = frame.filter(pl.col("in_medians"))
    groups = [("all", scoped)]
    if not frame.get_column("held_out").all():
        groups += [("fitted on", scoped.filter(~pl.col("held_out"))), ("held out", scoped.filter(pl.col("held_out")))]
    lines += ["| cells | metric | n | median abs. error | worst cell | its error |", "|---|---|---|---|---|---|"]
    for group, rows in groups:
        for metric, label in METRICS.items():
            errors = rows.filter(pl.col(f"{metric}_error").is_not_null())
            if errors.is_empty():
                lines.append(f"| {group} | {label} | 0 | — | — | — |")
                continue
            worst = errors.sort(pl.col(f"{metric}_error").abs(), descending=True).row(0, named=True)
            median = errors.get_column(f"{metric}_error").abs().median()
            lines.append(f"| {group} | {label} | {errors.height} | {median:.1%} | {worst['cell_id']} | "
                         f"{worst[f'{metric}_error']:+.1%} |")
    lines += ["", "| model | layout | OSL | engine | " + " | ".join(
        f"{label} meas. / pred. (err.)" for label in METRICS.values()) + " |", "|" + "---|" * (4 + len(METRICS))]
    for row in frame.iter_rows(named=True):
        values = []
        for metric in METRICS:
            measured, predicted, error = (row[f"{metric}_{k}"] for k in ("measured", "predicted", "error"))
            values.append("—" if predicted is None or measured is None else
                          f"{measured:,.2f} / {predicted:,.2f} ({error:+.0%})")
        lines.append(f"| {row['model']} | {row['layout']} | {row['osl']} | {row['engine_path']} | "
                     + " | ".join(values) + " |")
    notes = [f"- {row['cell_id']}: {row['note']}" for row in frame.iter_rows(named=True) if row["note"]]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"
