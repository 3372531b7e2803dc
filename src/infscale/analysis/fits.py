"""Scaling laws fitted to a campaign's merged cells (`results/<campaign>/fits.parquet`).

Per model × workload (ISL, OSL, arrival) × strategy family (how the GPUs are split: pure DP, TP or PP, or the
hybrids TP×DP, PP×DP, TP×PP, TP×PP×DP), with output throughput X against the GPU count N:

- Universal Scalability Law: X(N) = λN / (1 + σ(N − 1) + κN(N − 1)), λ > 0 and σ, κ ≥ 0 (contention,
  coherency); needs 3 GPU counts or more;
- power law: X(N) = a·N^b, fitted as a line in log-log space (closed form; relative errors weigh equally);
- scaling efficiency E(N) = X(N) / (N · X(1)) against the same family's 1-GPU point (pure DP, TP and PP share the
  1-GPU layout), reported per point.

Per model × layout, per-GPU throughput y against the sequence length L = ISL + OSL (the "reasoning cliff"), the
two-regime capacity model: y = c while the batch is capped by `max_num_seqs`, then y = c·(L_k / L)^α once the KV
cache caps it, with the knee L_k fitted from the data.

Parameters come from scipy's least squares (`curve_fit`) with bootstrap confidence intervals (resampled points,
2.5th–97.5th percentiles; only with at least two points more than parameters, else the interval is NaN) and R² on
the data. Infeasible, failed and pending cells are not data.
"""

from __future__ import annotations

import json
import os
import warnings
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import polars as pl
from scipy.optimize import OptimizeWarning, curve_fit

from infscale.analysis.variants import labelled, with_variant

BOOTSTRAP = 100
SEED = 0


def usl(n: np.ndarray, lam: float, sigma: float, kappa: float) -> np.ndarray:
    n = np.asarray(n, dtype=np.float64)
    return lam * n / (1 + sigma * (n - 1) + kappa * n * (n - 1))


def power_law(n: np.ndarray, a: float, b: float) -> np.ndarray:
    return a * np.asarray(n, dtype=np.float64) ** b


def capacity(length: np.ndarray, c: float, knee: float, alpha: float) -> np.ndarray:
    length = np.asarray(length, dtype=np.float64)
    return c * np.minimum(1.0, (knee / length) ** alpha)


def _usl_jacobian(n: np.ndarray, lam: float, sigma: float, kappa: float) -> np.ndarray:
    n = np.asarray(n, dtype=np.float64)
    denominator = 1 + sigma * (n - 1) + kappa * n * (n - 1)
    pairs = n * (n - 1)
    return np.column_stack([n / denominator, -lam * n * (n - 1) / denominator**2, -lam * n * pairs / denominator**2])


def _capacity_jacobian(length: np.ndarray, c: float, knee: float, alpha: float) -> np.ndarray:
    ratio = knee / np.asarray(length, dtype=np.float64)
    capped = ratio < 1  # past the knee: y = c·ratio^α
    power = np.where(capped, ratio ** alpha, 1.0)
    return np.column_stack([power, np.where(capped, c * alpha * power / knee, 0.0),
                            np.where(capped, c * power * np.log(np.where(capped, ratio, 1.0)), 0.0)])


JACOBIANS = {usl: _usl_jacobian, capacity: _capacity_jacobian}

LAWS = {
    "usl": (usl, ("lambda", "sigma", "kappa"), 3),
    "power": (power_law, ("a", "b"), 2),
    "capacity": (capacity, ("c", "knee", "alpha"), 3),
}


def family(dp: int, tp: int, pp: int) -> str:
    """The strategy family of a layout: which degrees are above 1 ('dp', 'tp', 'tp×dp', …; 'single' for 1 GPU)."""
    parts = [name for name, degree in (("tp", tp), ("pp", pp), ("dp", dp)) if degree > 1]
    return "×".join(parts) if parts else "single"


def fit_law(law: str, x: np.ndarray, y: np.ndarray, bootstrap: int = BOOTSTRAP,
            seed: int = SEED) -> dict[str, object] | None:
    """Parameters, their bootstrap intervals and R² of one law on (x, y); None with too few points or no fit."""
    func, names, need = LAWS[law]
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(np.unique(x)) < need:
        return None
    if law == "power":
        if np.any(y <= 0):
            return None
        solve = _power_fit
        bounds = None
        best = solve(x, y)
    else:
        start, bounds = _start(law, x, y)
        best = _curve_fit(func, x, y, start, bounds)
    if best is None:
        return None
    predicted = func(x, *best)
    total = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum((y - predicted) ** 2)) / total if total > 0 else 1.0
    rng = np.random.default_rng(seed)
    samples = []
    # resampling 3–4 points for 2–3 parameters gives exact refits, not an uncertainty: no interval then
    runs = bootstrap if len(x) >= len(names) + 2 else 0
    for _ in range(runs):
        pick = rng.integers(0, len(x), len(x))
        if len(np.unique(x[pick])) < need:
            continue
        fitted = _power_fit(x[pick], y[pick]) if law == "power" else _curve_fit(func, x[pick], y[pick], best, bounds)
        if fitted is not None:
            samples.append(fitted)
    result: dict[str, object] = {"law": law, "points": len(x), "r2": r2}
    draws = np.asarray(samples) if samples else np.empty((0, len(names)))
    for index, name in enumerate(names):
        result[name] = float(best[index])
        low, high = (np.percentile(draws[:, index], [2.5, 97.5]) if len(draws) >= 20 else (np.nan, np.nan))
        result[f"{name}_low"], result[f"{name}_high"] = float(low), float(high)
    result["bootstrap_fits"] = len(samples)
    return result


def _start(law: str, x: np.ndarray, y: np.ndarray) -> tuple[list[float], tuple[list[float], list[float]]]:
    if law == "usl":
        slope = float(np.max(y / x))
        return [slope, 0.01, 0.001], ([0.0, 0.0, 0.0], [np.inf, np.inf, np.inf])
    knee = float(np.median(x))
    return [float(np.max(y)), knee, 1.0], ([0.0, float(np.min(x)) * 0.5, 0.0],
                                            [np.inf, float(np.max(x)) * 2, 5.0])


def _power_fit(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    b, log_a = np.polyfit(np.log(x), np.log(y), 1)
    return np.array([float(np.exp(log_a)), float(b)])


def _curve_fit(func, x: np.ndarray, y: np.ndarray, start, bounds) -> np.ndarray | None:
    """Levenberg–Marquardt (MINPACK, fast) first; the bounded trust-region solver only when its optimum lies
    outside the bounds (e.g. a USL whose best σ or κ would be negative)."""
    start = np.clip(start, bounds[0], bounds[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OptimizeWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            params, _ = curve_fit(func, x, y, p0=start, method="lm", maxfev=20000, jac=JACOBIANS.get(func))
            if np.all(np.isfinite(params)) and np.all(params >= bounds[0]) and np.all(params <= bounds[1]):
                return params
        except (RuntimeError, ValueError):
            pass
        try:
            params, _ = curve_fit(func, x, y, p0=start, bounds=bounds, maxfev=20000, jac=JACOBIANS.get(func))
        except (RuntimeError, ValueError):
            return None
    return params if np.all(np.isfinite(params)) else None


# ------------------------------------------------------------------------------------------- campaigns


def fit_campaign(merged: pl.DataFrame, bootstrap: int = BOOTSTRAP, workers: int | None = None,
                 parallel_above: int = 64) -> pl.DataFrame:
    """Every law that has enough points, one row per fit; `params` holds the parameters as JSON too. The fits are
    independent, so they run on `workers` processes (default: the CPUs, at most 8) when there are many."""
    ok = merged.filter(pl.col("status") == "ok").with_columns(
        pl.struct("dp", "tp", "pp").map_elements(lambda r: family(r["dp"], r["tp"], r["pp"]),
                                                 return_dtype=pl.String).alias("family"))
    tasks: list[tuple[dict[str, object], str, np.ndarray, np.ndarray]] = []
    keys = ("model", "weight_dtype", "workload", "isl_label", "osl_label", "arrival")
    for group, cells in ok.group_by(keys, maintain_order=True):
        base = dict(zip(keys, group))
        single = cells.filter(pl.col("gpus") == 1)
        for fam in sorted(set(cells.get_column("family").to_list()) - {"single"}):
            points = pl.concat([single, cells.filter(pl.col("family") == fam)]) if "×" not in fam else \
                cells.filter(pl.col("family") == fam)
            # one point per GPU count: the family's best layout there (e.g. tp2×dp4 vs tp4×dp2 at 8 GPUs)
            best = points.group_by("gpus").agg(pl.col("output_tok_s").max()).sort("gpus")
            x = best.get_column("gpus").to_numpy()
            y = best.get_column("output_tok_s").to_numpy()
            for law in ("usl", "power"):
                tasks.append(({**base, "family": fam, "x": "gpus", "y": "output_tok_s"}, law, x, y))
    # one capacity curve per layout and engine variant (cells of a swept knob are not fitted as one curve)
    ok = with_variant(ok).with_columns(labelled("layout").alias("curve"))
    for group, cells in ok.group_by(("model", "weight_dtype", "workload", "curve", "arrival"), maintain_order=True):
        model, dtype, workload, curve, arrival = group
        x = (cells.get_column("isl_max") + cells.get_column("osl_max")).to_numpy()
        y = cells.get_column("output_tok_s_per_gpu").to_numpy()
        tasks.append(({"model": model, "weight_dtype": dtype, "workload": workload, "isl_label": None,
                       "osl_label": None, "arrival": arrival, "family": curve, "x": "isl+osl",
                       "y": "output_tok_s_per_gpu"},
                      "capacity", x, y))
    workers = workers or min(8, os.cpu_count() or 1)
    args = [(law, x, y, bootstrap) for _, law, x, y in tasks]
    if workers > 1 and len(tasks) > parallel_above:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(_fit_task, args, chunksize=16))
    else:
        results = [_fit_task(a) for a in args]
    rows = [{**base, **_flat(fit)} for (base, _, _, _), fit in zip(tasks, results) if fit is not None]
    return pl.DataFrame(rows, infer_schema_length=None) if rows else pl.DataFrame()


def _fit_task(args: tuple[str, np.ndarray, np.ndarray, int]) -> dict[str, object] | None:
    law, x, y, bootstrap = args
    return fit_law(law, x, y, bootstrap)


def _flat(fit: dict[str, object]) -> dict[str, object]:
    names = LAWS[str(fit["law"])][1]
    params = {n: fit[n] for n in names}
    out: dict[str, object] = {"law": fit["law"], "points": fit["points"], "r2": fit["r2"],
                              "bootstrap_fits": fit["bootstrap_fits"], "params": json.dumps(params)}
    for slot, name in enumerate(names):  # fixed columns p0..p2 so laws share one table
        out[f"p{slot}_name"] = name
        out[f"p{slot}"], out[f"p{slot}_low"], out[f"p{slot}_high"] = (fit[name], fit[f"{name}_low"],
                                                                      fit[f"{name}_high"])
    return out


def scaling_efficiency(merged: pl.DataFrame) -> pl.DataFrame:
    """E(N) = X(N) / (N · X(1)) per model × workload × layout, against the 1-GPU cell of the same workload."""
    ok = merged.filter(pl.col("status") == "ok")
    keys = ["model", "weight_dtype", "workload", "isl_label", "osl_label", "arrival"]
    single = ok.filter(pl.col("gpus") == 1).select(*keys, pl.col("output_tok_s").alias("single_tok_s"))
    return (ok.join(single, on=keys, how="inner")
            .with_columns((pl.col("output_tok_s") / (pl.col("gpus") * pl.col("single_tok_s"))).alias("efficiency"))
            .select(*keys, "layout", "gpus", "output_tok_s", "efficiency"))
