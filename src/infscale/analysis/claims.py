"""The seed paper's testable claims (C1–C12 of the project's reference notes, §3), checked on a campaign's merged
cells: each returns PASS, FAIL or NOT TESTABLE (with why) and the numbers it used, and says whether those numbers
were measured or predicted (sim).

The claims speak of one 8-GPU node; where a campaign has fewer GPUs per node (a 4-GPU measurement), "DP-max" and
"TP-max" mean the largest GPU count the campaign has both of, and the evidence names that count.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import polars as pl

PASS, FAIL, UNTESTABLE = "PASS", "FAIL", "NOT TESTABLE"
SMALL_MODEL_MAX_B = 10e9      # "8B": the claims' small dense model
MID_MODEL_RANGE_B = (20e9, 40e9)  # "32B"


@dataclass
class Verdict:
    claim: str
    title: str
    verdict: str
    evidence: str
    numbers: dict[str, object] = field(default_factory=dict)
    source: str | None = None        # measured | predicted | mixed (None when not testable)
    criterion: str = ""              # what PASS needs (CRITERIA), set by check_claims

    def row(self) -> dict[str, object]:
        return {"claim": self.claim, "title": self.title, "verdict": self.verdict, "evidence": self.evidence,
                "criterion": self.criterion, "numbers": json.dumps(self.numbers, default=float),
                "source": self.source}


def _source(rows: pl.DataFrame) -> str:
    predicted = set(rows.get_column("predicted").fill_null(False).to_list())
    return "mixed" if len(predicted) > 1 else ("predicted" if predicted == {True} else "measured")


def _ok(merged: pl.DataFrame) -> pl.DataFrame:
    return merged.filter(pl.col("status") == "ok")


def _models_by_size(merged: pl.DataFrame, params: dict[str, float], low: float, high: float) -> list[str]:
    return [m for m in merged.get_column("model").unique(maintain_order=True).to_list()
            if low <= params.get(m, np.nan) < high]


def _pure(rows: pl.DataFrame, kind: str, gpus: int) -> pl.DataFrame:
    """Cells of the pure DP (dp=N) or pure TP (tp=N) layout of N GPUs."""
    if kind == "dp":
        return rows.filter((pl.col("dp") == gpus) & (pl.col("tp") == 1) & (pl.col("pp") == 1))
    return rows.filter((pl.col("tp") == gpus) & (pl.col("dp") == 1) & (pl.col("pp") == 1))


def _dp_tp_ratios(rows: pl.DataFrame) -> tuple[int | None, pl.DataFrame]:
    """Output throughput of DP-max over TP-max per (ISL, OSL) at the largest GPU count that has both."""
    for gpus in sorted(set(rows.get_column("gpus").to_list()), reverse=True):
        if gpus < 2:
            break
        dp, tp = _pure(rows, "dp", gpus), _pure(rows, "tp", gpus)
        keys = ["isl_max", "osl_max", "arrival", "workload"]
        joined = dp.select(*keys, pl.col("output_tok_s").alias("dp_tok_s"),
                           pl.col("max_kv_occupancy").alias("dp_kv"), pl.col("preemptions").alias("dp_preempt"),
                           pl.col("mean_running_batch").alias("dp_batch"),
                           (pl.min_horizontal(pl.col("max_num_seqs"), pl.col("requests") / pl.col("dp")))
                           .alias("dp_offered"), "predicted").join(
            tp.select(*keys, pl.col("output_tok_s").alias("tp_tok_s"), pl.col("preemptions").alias("tp_preempt")),
            on=keys, how="inner")
        if joined.height:
            return gpus, joined.with_columns((pl.col("dp_tok_s") / pl.col("tp_tok_s")).alias("ratio")).sort(
                "osl_max")
    return None, pl.DataFrame()


# ------------------------------------------------------------------------------------------- the claims


def c1(merged: pl.DataFrame, ctx: dict) -> Verdict:
    title = "Small model, short output: DP-max beats TP-max (ratio > 1.3)"
    for model in _models_by_size(merged, ctx["params"], 0, SMALL_MODEL_MAX_B):
        gpus, ratios = _dp_tp_ratios(_ok(merged).filter(pl.col("model") == model))
        short = ratios.filter(pl.col("osl_max") <= 2048) if gpus else ratios
        if gpus and short.height:
            ratio = float(short.get_column("ratio").max())
            return Verdict("C1", title, PASS if ratio > 1.3 else FAIL,
                           f"{model}: DP{gpus}/TP{gpus} output throughput {ratio:.2f} at OSL ≤ 2K",
                           {"model": model, "gpus": gpus, "ratio": ratio}, _source(short))
    return Verdict("C1", title, UNTESTABLE, "needs pure DP and pure TP cells of the same GPU count for a ≤10B model "
                   "at OSL ≤ 2K")


def c2(merged: pl.DataFrame, ctx: dict) -> Verdict:
    title = "Small model, long output: DP becomes capacity-bound; the DP/TP ratio falls with OSL"
    for model in _models_by_size(merged, ctx["params"], 0, SMALL_MODEL_MAX_B):
        gpus, ratios = _dp_tp_ratios(_ok(merged).filter(pl.col("model") == model))
        if gpus and ratios.get_column("osl_max").n_unique() >= 2:
            first, last = ratios.row(0, named=True), ratios.row(-1, named=True)
            falls = last["ratio"] < first["ratio"]
            # capacity-bound at the longest OSL: a replica runs fewer sequences than it is offered (max_num_seqs
            # or its share of the requests) while its KV pool fills up, or it has to preempt
            capped = (last["dp_batch"] or 0) < 0.9 * last["dp_offered"]
            kv_bound = (capped and (last["dp_kv"] or 0) >= 0.9) or (last["dp_preempt"] or 0) > 0
            numbers = {"model": model, "gpus": gpus, "osl": [first["osl_max"], last["osl_max"]],
                       "ratio": [first["ratio"], last["ratio"]], "dp_max_kv_occupancy_longest": last["dp_kv"],
                       "dp_mean_batch_longest": last["dp_batch"], "dp_offered_longest": last["dp_offered"],
                       "dp_preemptions_longest": last["dp_preempt"]}
            return Verdict("C2", title, PASS if falls and kv_bound else FAIL,
                           f"{model}: DP{gpus}/TP{gpus} {first['ratio']:.2f} at OSL {first['osl_max']} → "
                           f"{last['ratio']:.2f} at OSL {last['osl_max']}; there a DP replica ran "
                           f"{(last['dp_batch'] or 0):.1f} of {last['dp_offered']:.0f} sequences offered, peak KV "
                           f"occupancy {(last['dp_kv'] or 0):.0%}, {last['dp_preempt'] or 0} preemptions", numbers,
                           _source(ratios))
    return Verdict("C2", title, UNTESTABLE, "needs pure DP and TP cells of one GPU count of a ≤10B model at two or "
                   "more OSLs")


def c3(merged: pl.DataFrame, ctx: dict) -> Verdict:
    title = "Heavy-tailed OSL: DP replicas unevenly loaded; least-loaded routing narrows the gap"
    rows = _ok(merged).filter((pl.col("osl_dist") == "lognormal") & (pl.col("dp") > 1))
    if rows.is_empty() or rows.get_column("router").n_unique() < 2:
        return Verdict("C3", title, UNTESTABLE, "needs DP cells with a distributed (lognormal) OSL under both the "
                       "round_robin and least_loaded routers")
    by_router = rows.group_by("router").agg(pl.col("replica_kv_occupancy_cv").median(),
                                            pl.col("e2e_s_p99").median())
    values = {r["router"]: r for r in by_router.iter_rows(named=True)}
    rr, ll = values["round_robin"], values["least_loaded"]
    better = ll["replica_kv_occupancy_cv"] <= rr["replica_kv_occupancy_cv"]
    return Verdict("C3", title, PASS if better and rr["replica_kv_occupancy_cv"] > 0 else FAIL,
                   f"median CV of per-replica KV occupancy: round-robin {rr['replica_kv_occupancy_cv']:.3f}, "
                   f"least-loaded {ll['replica_kv_occupancy_cv']:.3f}",
                   {"cv": {k: v["replica_kv_occupancy_cv"] for k, v in values.items()}}, _source(rows))


def c4(merged: pl.DataFrame, ctx: dict) -> Verdict:
    title = "Compute utilisation falls as OSL grows (capacity-bound decode)"
    rows = _ok(merged).filter(pl.col("gpu_sm_util_mean").is_not_null()) if "gpu_sm_util_mean" in merged.columns \
        else pl.DataFrame()
    if rows.is_empty() or rows.get_column("osl_max").n_unique() < 2:
        return Verdict("C4", title, UNTESTABLE, "needs GPU telemetry (measured cells) at two or more OSLs; the sim "
                       "predicts no utilisation")
    trends = []
    for (_, _), cells in rows.group_by(("model", "layout"), maintain_order=True):  # plan order: reproducible
        cells = cells.sort("osl_max")
        if cells.height >= 2:
            trends.append(float(cells.get_column("gpu_sm_util_mean")[-1] - cells.get_column("gpu_sm_util_mean")[0]))
    if not trends:
        return Verdict("C4", title, UNTESTABLE, "no layout was measured at two OSLs")
    falling = sum(t < 0 for t in trends)
    return Verdict("C4", title, PASS if falling > len(trends) / 2 else FAIL,
                   f"NVML utilisation (time the GPU ran any kernel; not DCGM's SM activity) fell from the shortest "
                   f"to the longest OSL in {falling} of {len(trends)} layouts", {"changes_pct_points": trends},
                   _source(rows))


def c5(merged: pl.DataFrame, ctx: dict) -> Verdict:
    title = "~32B model: at OSL ≥ 4K the best layout has TP ≥ 2, with sublinear gains in TP"
    for model in _models_by_size(merged, ctx["params"], *MID_MODEL_RANGE_B):
        rows = _ok(merged).filter((pl.col("model") == model) & (pl.col("osl_max") >= 4096))
        if rows.is_empty():
            continue
        gpus = int(rows.get_column("gpus").max())
        at_n = rows.filter(pl.col("gpus") == gpus)
        best = at_n.group_by(["isl_max", "osl_max"]).agg(pl.col("output_tok_s").arg_max().alias("i"),
                                                          pl.col("tp").alias("tps")).sort(["isl_max", "osl_max"])
        tp_of_best = [row["tps"][row["i"]] for row in best.iter_rows(named=True)]
        return Verdict("C5", title, PASS if all(t >= 2 for t in tp_of_best) else FAIL,
                       f"{model} at {gpus} GPUs, OSL ≥ 4K: TP of the best layout {tp_of_best}",
                       {"model": model, "gpus": gpus, "best_tp": tp_of_best}, _source(at_n))
    return Verdict("C5", title, UNTESTABLE, "needs cells of a 20–40B model at OSL ≥ 4K")


def c6(merged: pl.DataFrame, ctx: dict) -> Verdict:
    title = "A crossover model size where the best layout leaves pure DP"
    rows = _ok(merged)
    # the largest GPU count at which two or more models have a pure-DP cell
    dp_rows = rows.filter((pl.col("dp") == pl.col("gpus")) & (pl.col("gpus") > 1))
    counts = dp_rows.group_by("gpus").agg(pl.col("model").n_unique().alias("models")).filter(pl.col("models") >= 2)
    if counts.is_empty():
        return Verdict("C6", title, UNTESTABLE, "needs two or more model sizes with a pure-DP layout of one GPU count")
    gpus = int(counts.get_column("gpus").max())
    at_n = rows.filter((pl.col("gpus") == gpus) & pl.col("model").is_in(dp_rows.filter(
        pl.col("gpus") == gpus).get_column("model").unique().to_list()))
    best = at_n.sort("output_tok_s", descending=True).unique(["model", "isl_max", "osl_max"], keep="first")
    sizes = sorted((ctx["params"].get(m, np.nan), m) for m in best.get_column("model").unique().to_list())
    pure_dp = {m: float((best.filter(pl.col("model") == m).get_column("dp") == gpus).mean()) for _, m in sizes}
    crossover = next((m for _, m in sizes if pure_dp[m] < 0.5), None)
    smallest = sizes[0][1]
    holds = crossover is not None and crossover != smallest
    if crossover == smallest:
        found = f"; even the smallest model's best layout is mostly not DP{gpus}"
    else:
        found = f"; crossover at {crossover}" if crossover else "; no crossover"
    return Verdict("C6", title, PASS if holds else FAIL,
                   f"share of workloads whose best {gpus}-GPU layout is DP{gpus}: "
                   + ", ".join(f"{m} {pure_dp[m]:.0%}" for _, m in sizes) + found,
                   {"gpus": gpus, "pure_dp_share": pure_dp, "crossover": crossover}, _source(best))


def c7(merged: pl.DataFrame, ctx: dict) -> Verdict:
    title = "Per-GPU throughput falls with sequence length past a knee (the reasoning cliff)"
    fits = ctx.get("fits")
    if fits is None or fits.is_empty() or fits.filter(pl.col("law") == "capacity").is_empty():
        return Verdict("C7", title, UNTESTABLE, "needs capacity fits (three or more OSLs of one layout)")
    capacity = fits.filter((pl.col("law") == "capacity") & (pl.col("r2") > 0.8))
    if capacity.is_empty():
        return Verdict("C7", title, FAIL, "no layout's per-GPU throughput follows the two-regime form (R² ≤ 0.8)")
    ok = _ok(merged)
    lengths = (ok.get_column("isl_max") + ok.get_column("osl_max"))
    inside = capacity.filter((pl.col("p1") > lengths.min()) & (pl.col("p1") < lengths.max()))
    share = inside.height / capacity.height
    return Verdict("C7", title, PASS if share >= 0.5 else FAIL,
                   f"{inside.height} of {capacity.height} well-fitted layouts (R² > 0.8) have their knee inside the "
                   f"measured ISL+OSL range; median exponent past it {float(capacity.get_column('p2').median()):.2f}",
                   {"layouts_with_knee": inside.height, "fitted": capacity.height}, _source(ok))


def c8(merged: pl.DataFrame, ctx: dict) -> Verdict:
    title = "405B in a node: TP8 beats PP8 and PP×TP on TPOT"
    rows = _ok(merged).filter(pl.col("model").str.contains("405b") & (pl.col("gpus") == 8))
    tp8, pp8 = _pure(rows, "tp", 8), rows.filter((pl.col("pp") == 8) & (pl.col("dp") == 1))
    if tp8.is_empty() or pp8.is_empty():
        return Verdict("C8", title, UNTESTABLE, "needs 8-GPU TP8 and PP8 cells of Llama-3.1-405B")
    keys = ["isl_max", "osl_max", "weight_dtype"]
    joined = tp8.select(*keys, pl.col("tpot_ms_p50").alias("tp")).join(
        pp8.select(*keys, pl.col("tpot_ms_p50").alias("pp")), on=keys)
    wins = int((joined.get_column("tp") < joined.get_column("pp")).sum())
    return Verdict("C8", title, PASS if wins == joined.height and wins else FAIL,
                   f"TP8 has the lower TPOT p50 in {wins} of {joined.height} workloads", {"wins": wins},
                   _source(rows))


def c9(merged: pl.DataFrame, ctx: dict) -> Verdict:
    title = "405B on two nodes: TP8×PP2 beats TP16"
    rows = _ok(merged).filter(pl.col("model").str.contains("405b") & (pl.col("gpus") == 16))
    tp16 = _pure(rows, "tp", 16)
    hybrid = rows.filter((pl.col("tp") == 8) & (pl.col("pp") == 2))
    if tp16.is_empty() or hybrid.is_empty():
        return Verdict("C9", title, UNTESTABLE, "needs 16-GPU TP16 and TP8×PP2 cells of Llama-3.1-405B")
    keys = ["isl_max", "osl_max", "weight_dtype"]
    joined = hybrid.select(*keys, pl.col("output_tok_s").alias("h")).join(
        tp16.select(*keys, pl.col("output_tok_s").alias("t")), on=keys)
    wins = int((joined.get_column("h") > joined.get_column("t")).sum())
    return Verdict("C9", title, PASS if wins == joined.height and wins else FAIL,
                   f"TP8×PP2 out-produces TP16 in {wins} of {joined.height} workloads", {"wins": wins}, _source(rows))


def c10(merged: pl.DataFrame, ctx: dict) -> Verdict:
    return Verdict("C10", "DeepSeek-R1: all-to-all and synchronisation take a growing share of the step",
                   UNTESTABLE, "needs a per-operation profile of the step; infscale's cells hold whole-step metrics")


def c11(merged: pl.DataFrame, ctx: dict) -> Verdict:
    return Verdict("C11", "DeepSeek-R1: DP-attention + EP gives far more KV capacity than TP8", UNTESTABLE,
                   "needs DP-attention layouts, which infscale's layouts cannot express yet (EP is modelled inside "
                   "TP; the MLA latent stays replicated)")


def c12(merged: pl.DataFrame, ctx: dict) -> Verdict:
    title = "Long outputs move the time from prefill to decode (vs the (2048, 128) control)"
    ok = _ok(merged)
    control = ok.filter((pl.col("osl_max") <= 256) & (pl.col("isl_max") >= 1024))
    reasoning = ok.filter(pl.col("osl_max") >= 8192)
    if control.is_empty() or reasoning.is_empty():
        return Verdict("C12", title, UNTESTABLE, "needs a short-output control (OSL ≤ 256) and OSL ≥ 8K cells")
    keys = ["model", "layout", "weight_dtype"]
    joined = control.group_by(keys).agg(pl.col("prefill_time_share").median().alias("control")).join(
        reasoning.group_by(keys).agg(pl.col("prefill_time_share").median().alias("reasoning")), on=keys)
    if joined.is_empty():
        return Verdict("C12", title, UNTESTABLE, "no layout has both the control and a long-output cell")
    lower = int((joined.get_column("reasoning") < joined.get_column("control")).sum())
    return Verdict("C12", title, PASS if lower == joined.height else FAIL,
                   f"prefill time share is lower at OSL ≥ 8K than in the control for {lower} of {joined.height} "
                   f"layouts (medians {float(joined.get_column('reasoning').median()):.1%} vs "
                   f"{float(joined.get_column('control').median()):.1%})",
                   {"layouts": joined.height, "lower": lower},
                   _source(pl.concat([control, reasoning], how="diagonal_relaxed")))


CLAIMS: list[Callable[[pl.DataFrame, dict], Verdict]] = [c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12]

# What each check needs to say PASS: its criterion, shown beside every verdict (a FAIL or NOT TESTABLE says what was
# not met or not there to test).
CRITERIA = {
    "C1": "for a ≤10B model, pure DP over pure TP of the same (largest shared) GPU count: output throughput ratio "
          "> 1.3 at some OSL ≤ 2K",
    "C2": "for a ≤10B model, the DP/TP throughput ratio falls from the shortest to the longest OSL, and at the "
          "longest a DP replica is capacity-bound: it runs < 90 % of the sequences offered at ≥ 90 % peak KV "
          "occupancy, or it preempts",
    "C3": "DP cells with a lognormal OSL under both routers; least-loaded's median CV of per-replica KV occupancy "
          "≤ round-robin's, which is > 0",
    "C4": "GPU telemetry (measured cells) at two or more OSLs; NVML utilisation falls from the shortest to the "
          "longest OSL in more than half of the layouts",
    "C5": "for a 20–40B model at its largest GPU count, the best layout of every workload with OSL ≥ 4K has TP ≥ 2",
    "C6": "at the largest GPU count where two or more models have a pure-DP cell, the smallest model's best layout "
          "is pure DP in half its workloads or more, and some larger model's in fewer than half",
    "C7": "capacity fits (three or more OSLs of a layout); of those with R² > 0.8, at least half have their knee "
          "inside the measured ISL+OSL range",
    "C8": "Llama-3.1-405B at 8 GPUs: TP8 has a lower TPOT p50 than PP8 in every workload measured for both",
    "C9": "Llama-3.1-405B at 16 GPUs: TP8×PP2 has a higher output throughput than TP16 in every workload measured "
          "for both",
    "C10": "a per-operation profile of DeepSeek-R1's step (all-to-all and synchronisation share against sequence "
           "length)",
    "C11": "DP-attention + EP layouts of DeepSeek-R1 with more KV capacity than TP8",
    "C12": "a short-output control (OSL ≤ 256, ISL ≥ 1K) and OSL ≥ 8K cells of the same layouts; the prefill time "
           "share at OSL ≥ 8K is lower than the control's in every such layout",
}


def check_claims(merged: pl.DataFrame, params: dict[str, float], fits: pl.DataFrame | None = None) -> list[Verdict]:
    """Every claim's verdict, with its criterion. `params`: total parameters per model name (to tell the 8B from
    the 32B)."""
    ctx = {"params": params, "fits": fits}
    verdicts = [claim(merged, ctx) for claim in CLAIMS]
    for verdict in verdicts:
        verdict.criterion = CRITERIA[verdict.claim]
    return verdicts


def claims_markdown(verdicts: list[Verdict], campaign: str) -> str:
    lines = [f"# The paper's claims on campaign `{campaign}`", "",
             "Each claim passes when its criterion holds on this campaign's cells; FAIL: the cells are there and it "
             "does not hold; NOT TESTABLE: the cells it needs are not.", "",
             "| claim | verdict | evidence | passes when | numbers from |", "|---|---|---|---|---|"]
    for v in verdicts:
        lines.append(f"| **{v.claim}** {v.title} | {v.verdict} | {v.evidence} | {v.criterion} | {v.source or '—'} |")
    return "\n".join(lines) + "\n"
