"""Typed columns of a cell's workload: request lengths and arrival as numbers, from the cell's spec (plain dicts).

Schema 2.0 stores a request length as numbers (docs/results.md):

- `isl` / `osl`: whole tokens — the fixed length, or the mean of the distribution as drawn (within [min, cap]),
  rounded to a whole token;
- `isl_label` / `osl_label`: the label of the cell id ('1024', 'LN6000s0.9c32768');
- `isl_dist` / `osl_dist`: fixed | normal | lognormal; `…_median`: the median of the distribution before clipping
  (the fixed value; a normal's mean; a lognormal's median); `…_sigma`: a lognormal's sigma of the log length;
  `…_std`: a normal's standard deviation in tokens; `…_min` / `…_max`: the smallest and largest length drawn.

The arrival as `arrival_mode` (offline | concurrency | poisson), `concurrency` (requests in flight) and `rate`
(requests per second), beside the label `arrival` ('off', 'c256', 'r4').

`upgrade_row` / `upgrade_frame` turn the summary rows of a schema-1.x file (lengths and arrival as labels only)
into schema-2.0 rows, from the spec JSON every row carries (`cell_json`).
"""

from __future__ import annotations

import json
import math
from typing import Any

LENGTHS = ("isl", "osl")
LENGTH_SUFFIXES = ("", "_label", "_dist", "_median", "_sigma", "_std", "_min", "_max")
ARRIVAL_COLUMNS = ("arrival_mode", "concurrency", "rate")


def _normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def _normal_pdf(x: float) -> float:
    return math.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def clipped_mean(dist: dict[str, Any]) -> float:
    """The mean length of a distribution whose draws are clipped to [min, cap] (serving/workload.py draws so)."""
    kind = dist.get("dist", "fixed")
    if kind == "fixed":
        return float(dist["value"])
    low, high = float(dist.get("min") or 1), float(dist["cap"])
    if kind == "normal":
        mean, std = float(dist["mean"]), float(dist["std"])
        if std == 0:
            return min(max(mean, low), high)
        a, b = (low - mean) / std, (high - mean) / std
        return (low * _normal_cdf(a) + mean * (_normal_cdf(b) - _normal_cdf(a))
                + std * (_normal_pdf(a) - _normal_pdf(b)) + high * (1 - _normal_cdf(b)))
    mu, sigma = math.log(float(dist["median"])), float(dist["sigma"])
    if sigma == 0:
        return min(max(math.exp(mu), low), high)
    log_low, log_high = math.log(low), math.log(high)
    inside = math.exp(mu + sigma**2 / 2) * (_normal_cdf((log_high - mu - sigma**2) / sigma)
                                           - _normal_cdf((log_low - mu - sigma**2) / sigma))
    return (low * _normal_cdf((log_low - mu) / sigma) + inside
            + high * (1 - _normal_cdf((log_high - mu) / sigma)))


def length_columns(prefix: str, dist: dict[str, Any], label: str) -> dict[str, Any]:
    """The typed columns of one request length (`prefix` isl or osl) from its spec (LengthDist as a dict)."""
    kind = dist.get("dist", "fixed")
    fixed = kind == "fixed"
    median = {"fixed": dist.get("value"), "normal": dist.get("mean"), "lognormal": dist.get("median")}[kind]
    return {
        prefix: int(round(clipped_mean(dist))),
        f"{prefix}_label": label,
        f"{prefix}_dist": kind,
        f"{prefix}_median": None if median is None else float(median),
        f"{prefix}_sigma": float(dist["sigma"]) if kind == "lognormal" else None,
        f"{prefix}_std": float(dist["std"]) if kind == "normal" else None,
        f"{prefix}_min": int(dist["value"]) if fixed else int(dist.get("min") or 1),
        f"{prefix}_max": int(dist["value"]) if fixed else int(dist["cap"]),
    }


def arrival_columns(arrival: dict[str, Any]) -> dict[str, Any]:
    mode = arrival.get("mode", "offline")
    return {"arrival_mode": mode,
            "concurrency": int(arrival["concurrency"]) if mode == "concurrency" else None,
            "rate": float(arrival["rate"]) if mode == "poisson" else None}


def workload_columns(spec: dict[str, Any], isl_label: str, osl_label: str) -> dict[str, Any]:
    """Every typed workload column of a cell from its spec (the cell JSON as a dict)."""
    return {**length_columns("isl", spec["isl"], isl_label), **length_columns("osl", spec["osl"], osl_label),
            **arrival_columns(spec.get("arrival") or {})}


def is_legacy(row_or_columns: dict[str, Any] | list[str]) -> bool:
    """A schema-1.x summary (lengths as labels in `isl`/`osl`, no `isl_label`)."""
    names = row_or_columns if isinstance(row_or_columns, list) else list(row_or_columns)
    return "isl" in names and "isl_label" not in names


def upgrade_row(row: dict[str, Any]) -> dict[str, Any]:
    """A schema-1.x summary row with the schema-2.0 workload columns (from its `cell_json`)."""
    if not is_legacy(row):
        return row
    upgraded = {k: v for k, v in row.items() if k not in LENGTHS}
    isl_label, osl_label = row.get("isl"), row.get("osl")
    spec = json.loads(row["cell_json"]) if row.get("cell_json") else None
    if spec is None:  # no spec to read: the labels alone (fixed lengths are numbers; distributions stay null)
        for prefix, label in (("isl", isl_label), ("osl", osl_label)):
            upgraded.update({prefix: int(label) if label and label.isdigit() else None, f"{prefix}_label": label})
        return upgraded
    return {**upgraded, **workload_columns(spec, isl_label, osl_label)}


def upgrade_frame(frame):  # polars.DataFrame -> polars.DataFrame
    """`upgrade_row` for a whole polars frame: the typed columns computed once per distinct cell spec."""
    import polars as pl

    if not is_legacy(frame.columns):
        return frame
    keys = frame.select("cell_json", "isl", "osl").unique(maintain_order=True)
    rows = [upgrade_row(dict(zip(("cell_json", "isl", "osl"), values))) for values in keys.iter_rows()]
    typed = pl.DataFrame(rows, schema=_typed_schema(), infer_schema_length=None).with_columns(
        keys.get_column("isl").alias("_isl"), keys.get_column("osl").alias("_osl"))
    replaced = [c for c in typed.columns if c in frame.columns and c not in ("cell_json", "isl", "osl")]
    return (frame.drop(replaced).rename({"isl": "_isl", "osl": "_osl"})
            .join(typed, on=["cell_json", "_isl", "_osl"], how="left", nulls_equal=True).drop("_isl", "_osl"))


def _typed_schema() -> dict:
    import polars as pl

    schema: dict[str, object] = {"cell_json": pl.String}
    for prefix in LENGTHS:
        schema.update({prefix: pl.Int64, f"{prefix}_label": pl.String, f"{prefix}_dist": pl.String,
                       f"{prefix}_median": pl.Float64, f"{prefix}_sigma": pl.Float64, f"{prefix}_std": pl.Float64,
                       f"{prefix}_min": pl.Int64, f"{prefix}_max": pl.Int64})
    schema.update({"arrival_mode": pl.String, "concurrency": pl.Int64, "rate": pl.Float64})
    return schema
