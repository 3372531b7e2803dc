"""`infscale recommend`: which way to split a GPU budget for a model and a workload.

Every valid DP × TP × PP layout of exactly the budget is predicted by the `sim` backend (optionally with a
hardware profile) on the workload; cells already measured for the same model, hardware, layout and lengths in a
merged table given with `--measured` replace their prediction. Layouts are ranked by output throughput, or — with
SLOs on TTFT/TPOT p99 — by goodput: the output tokens of the requests that met every SLO, per second. The winner
gets one line of why, by the metric the ranking used (the runner-up as a share of it; the KV capacity against pure
DP where DP lost); times are printed in ms, or in s from 10 s up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import polars as pl

from infscale.backends.sim.backend import SimBackend
from infscale.campaign import Campaign, campaign_from_dict
from infscale.campaign.plan import PlannedCell, plan_campaign


@dataclass
class Option:
    layout: str
    dp: int
    tp: int
    pp: int
    feasible: bool
    reason: str | None
    source: str                    # predicted | measured
    output_tok_s: float = float("nan")
    output_tok_s_per_gpu: float = float("nan")
    ttft_ms_p99: float = float("nan")
    tpot_ms_p99: float = float("nan")
    goodput_tok_s: float = float("nan")
    slo_met_share: float = float("nan")
    kv_capacity_tokens: int = 0     # per replica
    max_concurrency: int = 0        # whole layout
    per_replica_sequences: int = 0  # at ISL + OSL


def budget_campaign(model: str, gpus: int, hardware: str, isl: int, osl: int, requests: int | str,
                    precision: str = "bf16", max_num_seqs: int = 256) -> Campaign:
    """An in-memory campaign: every valid layout of exactly `gpus` GPUs (whole nodes where it needs several)."""
    from infscale.catalog import get_hardware

    per_node = get_hardware(hardware).gpus_per_node
    raw = {"name": "recommend", "backend": "sim",
           "hardware": {"name": hardware, "nodes": max(1, math.ceil(gpus / per_node))},
           "models": [model], "precision": [precision], "layouts": {"gpus": [gpus]},
           "workloads": [{"name": "recommend", "isl": isl, "osl": osl, "requests": requests}],
           "engine": {"max_num_seqs": max_num_seqs}}
    return campaign_from_dict(raw, source="infscale recommend")


def recommend(campaign: Campaign, ttft_slo_ms: float | None = None, tpot_slo_ms: float | None = None,
              measured: pl.DataFrame | None = None) -> list[Option]:
    """The layouts, best first (infeasible ones last, with their reason)."""
    sim = SimBackend()
    options = []
    for item in plan_campaign(campaign):
        cell = item.cell
        option = Option(str(cell.layout), cell.dp, cell.tp, cell.pp, item.feasible, item.reason, "predicted",
                        kv_capacity_tokens=item.memory.kv_tokens_per_replica, max_concurrency=item.max_concurrency,
                        per_replica_sequences=item.max_concurrency // max(cell.dp, 1))
        if item.feasible:
            row = _measured_row(measured, item)
            if row is not None:
                _fill(option, row, None, ttft_slo_ms, tpot_slo_ms)
                option.source = "measured"
            else:
                result = sim.measure(cell, None, campaign)  # type: ignore[arg-type]
                _fill(option, result.summary, result.requests, ttft_slo_ms, tpot_slo_ms)
        options.append(option)
    slos = ttft_slo_ms is not None or tpot_slo_ms is not None
    key = (lambda o: o.goodput_tok_s) if slos else (lambda o: o.output_tok_s)
    return sorted(options, key=lambda o: (not o.feasible, -(key(o) if np.isfinite(key(o)) else -1)))


def _measured_row(measured: pl.DataFrame | None, item: PlannedCell) -> dict | None:
    if measured is None:
        return None
    cell = item.cell
    rows = measured.filter((pl.col("status") == "ok") & (pl.col("model") == cell.model)
                           & (pl.col("hardware") == cell.hardware) & (pl.col("layout") == str(cell.layout))
                           & (pl.col("isl_max") == cell.isl.max_length) & (pl.col("osl_max") == cell.osl.max_length)
                           & ~pl.col("predicted").fill_null(False))
    return rows.row(0, named=True) if rows.height else None


def _fill(option: Option, summary: dict, requests: dict | None, ttft_slo: float | None,
          tpot_slo: float | None) -> None:
    option.output_tok_s = float(summary["output_tok_s"])
    option.output_tok_s_per_gpu = float(summary["output_tok_s_per_gpu"])
    option.ttft_ms_p99 = float(summary["ttft_ms_p99"])
    option.tpot_ms_p99 = float(summary["tpot_ms_p99"])
    if ttft_slo is None and tpot_slo is None:
        return
    if requests is None:  # a measured summary: the percentiles decide for the whole cell
        met = ((ttft_slo is None or option.ttft_ms_p99 <= ttft_slo)
               and (tpot_slo is None or option.tpot_ms_p99 <= tpot_slo))
        option.slo_met_share = 1.0 if met else 0.0
        option.goodput_tok_s = option.output_tok_s if met else 0.0
        return
    first = (requests["first_token_s"] - requests["arrival_s"]) * 1e3
    tpot = (requests["finish_s"] - requests["first_token_s"]) / np.maximum(requests["osl"] - 1, 1) * 1e3
    ok = np.ones(len(first), dtype=bool)
    if ttft_slo is not None:
        ok &= first <= ttft_slo
    if tpot_slo is not None:
        ok &= tpot <= tpot_slo
    duration = float(summary["duration_s"])
    option.slo_met_share = float(ok.mean()) if len(ok) else 0.0
    option.goodput_tok_s = float(requests["osl"][ok].sum()) / duration if duration > 0 else 0.0


def why(options: list[Option], osl: int, ttft_slo_ms: float | None = None, tpot_slo_ms: float | None = None) -> str:
    """One line on why the winner wins, by the metric the layouts were ranked on (goodput under the SLOs when
    given, else output throughput), with the runner-up against it and, where pure DP lost, the KV capacity."""
    feasible = [o for o in options if o.feasible]
    if not feasible:
        return "no layout of this budget can run the model on this hardware: " + (options[0].reason or "")
    slos = [f"{name} p99 ≤ {limit / 1e3:g} s" if limit >= 10_000 else f"{name} p99 ≤ {limit:,g} ms"
            for name, limit in (("TTFT", ttft_slo_ms), ("TPOT", tpot_slo_ms)) if limit is not None]
    value = (lambda o: o.goodput_tok_s) if slos else (lambda o: o.output_tok_s)
    metric = f"goodput under the SLOs ({', '.join(slos)})" if slos else "output throughput"
    best = feasible[0]
    if slos and not value(best) > 0:
        return (f"no layout meets the SLOs ({', '.join(slos)}) with any request: ranked by goodput, all 0; the "
                f"fastest TTFT p99 is {format_ms(min(o.ttft_ms_p99 for o in feasible))} ({_label(best)} listed "
                "first by the table's order)")
    line = f"{_label(best)}: highest {metric}, {value(best):,.0f} tok/s"
    if slos:
        line += f" ({best.slo_met_share:.0%} of requests within them; output throughput {best.output_tok_s:,.0f} tok/s)"
    runner = feasible[1] if len(feasible) > 1 else None
    if runner is not None:
        share = value(runner) / value(best)
        line += f"; next: {_label(runner)} at {share:.0%} of its {'goodput' if slos else 'throughput'}"
    pure_dp = next((o for o in feasible if o.tp == 1 and o.pp == 1), None)
    if pure_dp is not None and pure_dp is not best:
        ratio = best.kv_capacity_tokens * best.dp / max(pure_dp.kv_capacity_tokens * pure_dp.dp, 1)
        line += (f"; it has {ratio:.1f}× the KV capacity of {_label(pure_dp)}, which is capped at "
                 f"{pure_dp.per_replica_sequences} sequences per replica at OSL {osl}")
    return line


def format_ms(value_ms: float) -> str:
    """A time for a person: milliseconds below 10 s, seconds from there (offline TTFTs reach minutes)."""
    if value_ms != value_ms:
        return "—"
    return f"{value_ms / 1e3:,.1f} s" if value_ms >= 10_000 else f"{value_ms:,.0f} ms" if value_ms >= 100 \
        else f"{value_ms:.1f} ms"


def _label(option: Option | None) -> str:
    if option is None:
        return "-"
    parts = [f"{name.upper()}{degree}" for name, degree in (("tp", option.tp), ("pp", option.pp), ("dp", option.dp))
             if degree > 1]
    return "×".join(parts) or "1 GPU"
