"""Predictions with error bars for cells nobody has measured (8 GPUs, two nodes): the calibrated `sim` predicts
each cell, and the spread of the model's errors on measured cells (a validation table, `infscale validate`)
becomes the cell's band.

With e = (predicted − measured) / measured on the validation cells, the measurement a prediction p stands for is
p / (1 + e). The band of a metric is p / (1 + e_hi) … p / (1 + e_lo), with e_lo and e_hi the 10th and 90th
percentiles of that metric's errors (the cells `validate` keeps in its medians). The band is only as good as the
validation set is like the extrapolated cells: each row names the set (its file, its size) it was taken from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from infscale.analysis.validate import METRICS
from infscale.backends.base import BuildSpec, InfeasibleCell
from infscale.backends.sim.backend import SimBackend
from infscale.campaign import Campaign
from infscale.campaign.plan import PlannedCell
from infscale.layout import Layout

QUANTILES = (0.10, 0.90)
MIN_CELLS = 5  # fewer validation cells than this cannot give a 10–90 % band


class ExtrapolationError(ValueError):
    """The validation table cannot give error bands (missing columns, too few cells)."""


@dataclass(frozen=True)
class ErrorBand:
    metric: str
    low: float       # e at QUANTILES[0]
    high: float      # e at QUANTILES[1]
    cells: int

    def bounds(self, predicted: float) -> tuple[float, float]:
        """The measured values the prediction stands for, lowest first."""
        a, b = predicted / (1 + self.high), predicted / (1 + self.low)
        return (a, b) if a <= b else (b, a)


def _median_rows(validation: pl.DataFrame) -> pl.DataFrame:
    """The validation cells `validate` counts in its medians (all of them in a table without the flag)."""
    return validation.filter(pl.col("in_medians")) if "in_medians" in validation.columns else validation


def error_bands(validation: pl.DataFrame) -> dict[str, ErrorBand]:
    """One band per metric from a validation table's in-median cells."""
    rows = _median_rows(validation)
    bands = {}
    for metric in METRICS:
        column = f"{metric}_error"
        if column not in rows.columns:
            raise ExtrapolationError(f"the validation table has no {column} column (is it `infscale validate` "
                                     f"output?)")
        errors = rows.get_column(column).drop_nulls().to_numpy()
        if len(errors) < MIN_CELLS:
            raise ExtrapolationError(f"{len(errors)} validation cells with a {column}: at least {MIN_CELLS} are "
                                     f"needed for a {QUANTILES[0]:.0%}–{QUANTILES[1]:.0%} band")
        low, high = np.quantile(errors, QUANTILES)
        bands[metric] = ErrorBand(metric, float(low), float(high), len(errors))
    return bands


@dataclass(frozen=True)
class ValidationScope:
    """What the validation cells covered: a prediction outside it says so (`beyond_validation`)."""

    models: frozenset[str]
    precisions: frozenset[str]
    max_gpus: int
    max_osl: int

    @classmethod
    def of(cls, validation: pl.DataFrame) -> ValidationScope:
        rows = _median_rows(validation)
        # cell ids are model.precision.layout.…: the precision label is their second part
        precisions = {cell_id.split(".")[1] for cell_id in rows.get_column("cell_id").to_list()}
        gpus = [Layout.parse(text).gpus for text in rows.get_column("layout").to_list()]
        return cls(frozenset(rows.get_column("model").to_list()), frozenset(precisions), max(gpus),
                   int(rows.get_column("osl").cast(pl.Int64).max()))  # strings in a validation table

    def beyond(self, model: str, precision: str, gpus: int, osl: int) -> str | None:
        reasons = []
        if model not in self.models:
            reasons.append("model not validated")
        if precision not in self.precisions:
            reasons.append(f"{precision} not validated")
        if gpus > self.max_gpus:
            reasons.append(f"{gpus} GPUs > {self.max_gpus}")
        if osl > self.max_osl:
            reasons.append(f"OSL {osl} > {self.max_osl}")
        return "; ".join(reasons) or None


def extrapolate(campaign: Campaign, planned: list[PlannedCell], bands: dict[str, ErrorBand],
                band_source: str, profile: str | None, scope: ValidationScope | None = None) -> pl.DataFrame:
    """One row per feasible cell: the sim's prediction of each metric with its band; `predicted` is always True;
    `beyond_validation` names how the cell lies outside what the validation cells covered."""
    sim = SimBackend()
    rows = []
    for item in planned:
        if not item.feasible:
            continue
        cell = item.cell
        out: dict[str, object] = {"cell_id": cell.id, "model": cell.model, "precision": cell.precision.label,
                                  "layout": str(cell.layout), "gpus": cell.layout.gpus,
                                  "isl": cell.isl.max_length, "osl": cell.osl.max_length, "predicted": True,
                                  "profile": profile, "band_source": band_source, "note": None}
        out["beyond_validation"] = (scope.beyond(cell.model, cell.precision.label, cell.layout.gpus,
                                                 cell.osl.max_length) if scope else None)
        try:
            summary = sim.measure(cell, sim.prepare(BuildSpec.for_cells([cell]), campaign), campaign).summary
        except InfeasibleCell as err:
            summary = {}
            out["note"] = f"sim: infeasible ({err})"
        for metric, band in bands.items():
            value = summary.get(metric)
            low, high = band.bounds(value) if value is not None else (None, None)
            out[metric], out[f"{metric}_low"], out[f"{metric}_high"] = value, low, high
        out["output_tok_s_per_gpu"] = summary.get("output_tok_s_per_gpu")
        rows.append(out)
    return pl.DataFrame(rows, infer_schema_length=None)


def predictions_markdown(table: pl.DataFrame, campaign_name: str, bands: dict[str, ErrorBand],
                         band_source: str, profile: str | None, recorded_at: str) -> str:
    lines = [
        f"# Predictions for campaign `{campaign_name}` (not measurements)",
        "",
        f"Recorded {recorded_at} by `infscale extrapolate`, before any of these cells was measured. Sim backend, "
        f"hardware profile `{profile or 'none (catalog constants)'}`. Bands: the {QUANTILES[0]:.0%}–"
        f"{QUANTILES[1]:.0%} range of the model's relative errors on measured cells (`{band_source}`), applied to "
        f"each prediction:",
        "",
        "| metric | validation cells | error 10th pct. | error 90th pct. |",
        "|---|---|---|---|",
    ]
    for metric, band in bands.items():
        lines.append(f"| {METRICS[metric]} | {band.cells} | {band.low:+.1%} | {band.high:+.1%} |")
    lines += ["", "The band holds only as far as the cells resemble the validation cells; the last column says how "
              "each cell lies beyond them.", "",
              "| model | precision | layout | OSL | output tok/s (band) | per GPU | TPOT p50 ms (band) | "
              "TTFT p50 ms (band) | beyond the validation cells |", "|---|---|---|---|---|---|---|---|---|"]

    def cell(row: dict, metric: str, digits: int) -> str:
        if row[metric] is None:
            return "—"
        return f"{row[metric]:,.{digits}f} ({row[f'{metric}_low']:,.{digits}f}–{row[f'{metric}_high']:,.{digits}f})"

    for row in table.sort(["model", "layout", "osl"]).iter_rows(named=True):
        per_gpu = f"{row['output_tok_s_per_gpu']:,.0f}" if row["output_tok_s_per_gpu"] is not None else "—"
        lines.append(f"| {row['model']} | {row['precision']} | {row['layout']} | {row['osl']} | "
                     f"{cell(row, 'output_tok_s', 0)} | {per_gpu} | {cell(row, 'tpot_ms_p50', 2)} | "
                     f"{cell(row, 'ttft_ms_p50', 0)} | {row['beyond_validation'] or '—'} |"
                     + (f" {row['note']}" if row["note"] else ""))
    return "\n".join(lines) + "\n"
