"""How well infscale's `trtllm` engine model predicts measured TensorRT-LLM deployments, beside AIConfigurator.

`aiconfigurator-core` ships `systems/silicon_sample.csv`: measured TTFT and TPOT of real TensorRT-LLM deployments
with their configuration. This benchmark takes its aggregated TensorRT-LLM rows on H100/H200 (backend trtllm, mode
agg, system h100_sxm / h200_sxm), predicts each with infscale (`sim` backend, `sim.engine: trtllm`: closed-loop
arrivals at the row's concurrency, trtllm-bench's defaults for everything the row does not fix), and — when the
`aiconfigurator` package is installed — asks AIConfigurator's own estimator (`cli_estimate`, mode agg) for the same
rows as a peer. No constant is fitted to these rows; two discrete modelling choices can be switched to see their
effect (`--staggered` client starts, `--moe-routing`).

Reported per model family and overall: median and p90 of |predicted − measured| / measured, TTFT and TPOT, for
both. Rows infscale cannot represent are listed as skipped with the reason.

Usage:  .venv/bin/python benchmarks/trtllm_model_accuracy.py [--no-peer] [--rows N] [--out rows.csv]
                  [--peer-from rows.csv] [--staggered] [--moe-routing power_law_1.01|power_law_1.2|balanced]
        (the peer needs `pip install -c constraints.txt aiconfigurator==0.12.0` in the same environment; it takes
        seconds per row, so `--peer-from` reuses the AIConfigurator columns of an earlier `--out` file)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import platform
import re
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from infscale.opdata import data_version, package_dir

# silicon model path -> (infscale catalog model, the model path AIConfigurator ships a config for, family label)
MODELS = {
    "meta-llama/Llama-3.1-8B-Instruct": ("llama-3.1-8b", "meta-llama/Meta-Llama-3.1-8B", "Llama-3.1-8B"),
    "meta-llama/Llama-3.1-70B": ("llama-3.1-70b", "meta-llama/Meta-Llama-3.1-70B", "Llama-3.1-70B"),
    "Qwen/Qwen3-32B": ("qwen3-32b", "Qwen/Qwen3-32B", "Qwen3-32B"),
    "Qwen/Qwen3-235B-A22B-FP8": ("qwen3-235b-a22b", "Qwen/Qwen3-235B-A22B-FP8", "Qwen3-235B-A22B"),
    "deepseek-ai/DeepSeek-R1": ("deepseek-r1", "deepseek-ai/DeepSeek-R1", "DeepSeek-R1/V3"),
    "deepseek-ai/DeepSeek-V3": ("deepseek-v3", "deepseek-ai/DeepSeek-V3", "DeepSeek-R1/V3"),
}
UNSUPPORTED = {
    "openai/gpt-oss-120b": "gpt-oss architecture (alternating sliding-window attention with sinks, MXFP4 experts) "
                           "is not in infscale's catalog",
}
HARDWARE = {"h100_sxm": "h100-sxm", "h200_sxm": "h200-sxm"}
REQUESTS_PER_CLIENT = 8      # closed loop: each of the row's concurrent clients sends this many requests
STAGGER = False              # True: clients spread over one request's latency (`--staggered`); False: all start
                             # at t=0, as trtllm-bench starts them


@dataclass
class Row:
    id: str
    family: str
    model: str
    peer_model: str
    system: str
    precision: str
    fp8_gemm: str | None
    isl: int
    osl: int
    concurrency: int
    tp: int
    ep: int
    moe_tp: int
    ttft_ms: float
    tpot_ms: float


def silicon_rows() -> tuple[list[Row], list[tuple[str, str]]]:
    """The aggregated TRT-LLM rows on H100/H200, mapped to infscale cells; and (row id, reason) for the rest."""
    frame = pl.read_csv(package_dir() / "systems" / "silicon_sample.csv", infer_schema_length=None)
    frame = frame.filter((pl.col("backend") == "trtllm") & (pl.col("mode") == "agg")
                         & pl.col("system").is_in(list(HARDWARE)))
    rows, skipped = [], []
    for r in frame.iter_rows(named=True):
        reason = _unsupported(r)
        if reason:
            skipped.append((r["id"], reason))
            continue
        model, peer_model, family = MODELS[r["model_path"]]
        quant = r["gemm_quant_mode"]
        precision = "bf16" if quant is None else "fp8/fp8"   # FP8 weights run with FP8 KV (trtllm-bench's flow)
        tp = int(r["tp_size"])
        moe_ep = int(r["moe_ep_size"] or 1) or 1
        moe_tp = int(r["moe_tp_size"] or 1) or 1
        dense = model in ("llama-3.1-8b", "llama-3.1-70b", "qwen3-32b")
        concurrency = _concurrency(r)
        rows.append(Row(r["id"], family, model, peer_model, r["system"], precision, quant, int(r["isl"]),
                        int(r["osl"]), concurrency, tp, 1 if dense else moe_ep, tp if dense else moe_tp,
                        float(r["silicon_ttft_ms"]), float(r["silicon_tpot_ms"])))
    return rows, skipped


def _concurrency(r: dict) -> int:
    match = re.search(r"silicon_concurrency=(\d+)", r["silicon_data_source"] or "")
    return int(match.group(1)) if match else int(r["batch_size"])


def _unsupported(r: dict) -> str | None:
    if r["model_path"] in UNSUPPORTED:
        return UNSUPPORTED[r["model_path"]]
    if r["model_path"] not in MODELS:
        return f"no catalog entry for {r['model_path']}"
    if r["gemm_quant_mode"] not in (None, "fp8", "fp8_block"):
        return f"precision {r['gemm_quant_mode']} (infscale models bf16 and fp8)"
    if (r["attention_dp_size"] or 1) > 1:
        return "attention data parallelism (enable_attention_dp) is not an infscale layout"
    if int(r["tp_size"]) * int(r["pp_size"] or 1) > 8:
        return "more than 8 GPUs per replica (multi-node wide-EP)"
    dense = MODELS[r["model_path"]][0] in ("llama-3.1-8b", "llama-3.1-70b", "qwen3-32b")
    if not dense and int(r["moe_tp_size"] or 1) * int(r["moe_ep_size"] or 1) != int(r["tp_size"]):
        return "moe_tp × moe_ep ≠ tp"
    return None


# ---------------------------------------------------------------------------------------------- infscale


def infscale_predict(row: Row) -> tuple[float, float, float]:
    """(TTFT ms, TPOT ms, seconds this prediction took): infscale's mean TTFT and TPOT of the closed-loop cell."""
    from infscale.backends.sim.backend import SimBackend
    from infscale.campaign import campaign_from_dict
    from infscale.campaign.plan import plan_campaign

    layout = f"tp{row.tp}" + (f"ep{row.ep}" if row.ep > 1 else "")
    start = time.perf_counter()
    campaign = campaign_from_dict({
        "name": "silicon", "backend": "sim", "sim": {"engine": "trtllm"},
        "hardware": HARDWARE[row.system], "models": [row.model], "precision": [row.precision],
        "layouts": [layout],
        "workloads": [{"name": "row", "isl": row.isl, "osl": row.osl,
                       "requests": REQUESTS_PER_CLIENT * row.concurrency,
                       "arrival": {"mode": "concurrency", "concurrency": row.concurrency, "stagger": STAGGER}}],
    }, source=row.id)
    (item,) = plan_campaign(campaign)
    if not item.feasible:
        return float("nan"), float("nan"), time.perf_counter() - start
    summary = SimBackend().measure(item.cell, None, campaign).summary  # type: ignore[arg-type]
    return summary["ttft_ms_mean"], summary["tpot_ms_mean"], time.perf_counter() - start


# ---------------------------------------------------------------------------------------------- peer


def peer_available() -> bool:
    try:
        import aiconfigurator.cli.api  # noqa: F401
    except ImportError:
        return False
    return True


def peer_predict(row: Row) -> tuple[float, float]:
    """AIConfigurator's own agg estimate of the row (its default database version), as a peer."""
    from aiconfigurator.cli.api import cli_estimate

    kwargs = dict(mode="agg", backend_name="trtllm", isl=row.isl, osl=row.osl, batch_size=row.concurrency,
                  tp_size=row.tp, pp_size=1, attention_dp_size=1)
    if row.model not in ("llama-3.1-8b", "llama-3.1-70b", "qwen3-32b"):
        kwargs.update(moe_tp_size=row.moe_tp, moe_ep_size=row.ep)
    if row.fp8_gemm:
        kwargs.update(gemm_quant_mode=row.fp8_gemm, kvcache_quant_mode="fp8")
        if row.model not in ("llama-3.1-8b", "llama-3.1-70b", "qwen3-32b"):
            kwargs.update(moe_quant_mode=row.fp8_gemm)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = cli_estimate(row.peer_model, row.system, **kwargs)
    return float(result.ttft), float(result.tpot)


# ---------------------------------------------------------------------------------------------- report


def _err(predicted: float, measured: float) -> float:
    return abs(predicted - measured) / measured if np.isfinite(predicted) else float("nan")


def summarize(frame: pl.DataFrame, who: list[str]) -> list[str]:
    lines = ["| family | rows | " + " | ".join(f"{w} TTFT med / p90 | {w} TPOT med / p90" for w in who) + " |",
             "|---|---|" + "---|---|" * len(who)]
    groups = [(f, frame.filter(pl.col("family") == f)) for f in sorted(set(frame["family"]))] + [("all", frame)]
    for family, rows in groups:
        cells = []
        for w in who:
            for metric in ("ttft", "tpot"):
                errors = rows.get_column(f"{w}_{metric}_err").drop_nans().drop_nulls().to_numpy()
                cells.append(f"{np.median(errors):.1%} / {np.quantile(errors, 0.9):.1%}" if len(errors) else "—")
        lines.append(f"| {family} | {rows.height} | " + " | ".join(cells) + " |")
    return lines


def _earlier_peer(path: Path) -> dict[str, tuple[float, float]]:
    frame = pl.read_csv(path)
    return {r["id"]: (r["aic_ttft_ms"], r["aic_tpot_ms"]) for r in frame.iter_rows(named=True)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-peer", action="store_true", help="skip AIConfigurator's estimate")
    parser.add_argument("--rows", type=int, help="only the first N rows (a quick look)")
    parser.add_argument("--out", type=Path, help="write every row's numbers to this CSV")
    parser.add_argument("--peer-from", type=Path, help="take AIConfigurator's numbers from an earlier --out CSV")
    parser.add_argument("--moe-routing", choices=("power_law_1.01", "power_law_1.2", "balanced"),
                        help="the MoE tables' routing distribution (default: infscale's, power_law_1.01)")
    parser.add_argument("--staggered", action="store_true", help="spread the clients' starts over one request's "
                        "latency (the steady state) instead of starting them all at t=0 as trtllm-bench does")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    global STAGGER
    STAGGER = args.staggered
    if args.moe_routing:
        import infscale.trtllm_model as trtllm_model

        trtllm_model.MOE_ROUTING = args.moe_routing

    rows, skipped = silicon_rows()
    rows = rows[: args.rows] if args.rows else rows
    earlier = _earlier_peer(args.peer_from) if args.peer_from else None
    use_peer = not args.no_peer and (earlier is not None or peer_available())
    records = []
    seconds = []
    for i, row in enumerate(rows):
        ttft, tpot, took = infscale_predict(row)
        seconds.append(took)
        record = {"id": row.id, "family": row.family, "system": row.system, "precision": row.precision,
                  "isl": row.isl, "osl": row.osl, "concurrency": row.concurrency, "tp": row.tp, "ep": row.ep,
                  "measured_ttft_ms": row.ttft_ms, "measured_tpot_ms": row.tpot_ms,
                  "infscale_ttft_ms": ttft, "infscale_tpot_ms": tpot,
                  "infscale_ttft_err": _err(ttft, row.ttft_ms), "infscale_tpot_err": _err(tpot, row.tpot_ms)}
        if use_peer:
            try:
                peer_ttft, peer_tpot = earlier[row.id] if earlier is not None else peer_predict(row)
            except Exception as err:  # noqa: BLE001 (a peer failure is a row without a peer number)
                print(f"  peer failed on {row.id}: {type(err).__name__}: {err}", file=sys.stderr)
                peer_ttft = peer_tpot = float("nan")
            record.update({"aic_ttft_ms": peer_ttft, "aic_tpot_ms": peer_tpot,
                           "aic_ttft_err": _err(peer_ttft, row.ttft_ms), "aic_tpot_err": _err(peer_tpot, row.tpot_ms)})
        records.append(record)
        if (i + 1) % 50 == 0:
            print(f"  {i + 1}/{len(rows)} rows", file=sys.stderr)
    frame = pl.DataFrame(records, infer_schema_length=None)
    if args.out:
        frame.write_csv(args.out)

    who = ["infscale"] + (["aic"] if use_peer else [])
    print(f"# TensorRT-LLM model accuracy on silicon_sample.csv ({data_version()})")
    import infscale.trtllm_model as trtllm_model

    print(f"{time.strftime('%Y-%m-%d')} · {platform.node()} · {platform.processor() or platform.machine()} · "
          f"Python {platform.python_version()} · peer: {'aiconfigurator' if use_peer else 'not run'} · clients "
          f"{'staggered' if STAGGER else 'start together'} · MoE routing {trtllm_model.MOE_ROUTING} · "
          f"{REQUESTS_PER_CLIENT} requests per client")
    print()
    print("Absolute relative error |predicted − measured| / measured (median / p90):")
    print()
    print("\n".join(summarize(frame, who)))
    print()
    print(f"{len(rows)} rows predicted; infscale seconds per cell: median {statistics.median(seconds):.2f}, "
          f"max {max(seconds):.2f}")
    reasons: dict[str, int] = {}
    for _, reason in skipped:
        reasons[reason] = reasons.get(reason, 0) + 1
    print(f"{len(skipped)} rows skipped:")
    for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1]):
        print(f"  {count:4d}  {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
