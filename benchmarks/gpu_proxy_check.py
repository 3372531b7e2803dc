"""Check a layer-sliced proxy against the full run it stands for: the same cell measured twice on the GPU(s).

Runs Llama-3.1-8B (bf16, random weights) at one layout as a full run and as a proxy of `--proxy-layers` layers
(default 8 of 32) on the same small workload, through the torch backend exactly as a campaign cell runs
(TorchBackend.measure: the cell's ranks, KV pool, warm-up, the proxy's fixed-part calibration, the serving
core), and writes a JSON with both runs' output tok/s, TPOT p50 and TTFT p50 and the proxy's relative
differences. Needs only torch, this package, pydantic and pyyaml (no polars, submitit or Snakemake).

  python benchmarks/gpu_proxy_check.py --layout tp2 --out gpu_proxy_check.json          # GPU(s)
  python benchmarks/gpu_proxy_check.py --tiny --layout tp2 --out /tmp/proxy-cpu.json    # CPU, tiny model

`--tiny` runs the same code path on CPU with an 8-layer toy model (proxy of 2 layers by default there): a check
of the script, not of the proxy's accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from infscale.backends.base import BuildSpec
from infscale.backends.torch.backend import TorchBackend
from infscale.campaign import campaign_from_dict
from infscale.campaign.plan import plan_campaign

METRICS = ("output_tok_s", "tpot_ms_p50", "ttft_ms_p50", "duration_s")
TINY_CONFIG = {  # a Hugging Face config.json of a toy Llama (8 layers), for --tiny
    "_name_or_path": "infscale/tiny-llama-8l", "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
    "num_hidden_layers": 8, "max_position_embeddings": 4096, "vocab_size": 512, "tie_word_embeddings": True,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", default="tp2", help="the layout of both runs, e.g. tp2, dp1, pp2 (default tp2)")
    parser.add_argument("--proxy-layers", type=int, help="layers the proxy runs (default 8; 2 with --tiny)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--isl", type=int, default=1024)
    parser.add_argument("--osl", type=int, default=512)
    parser.add_argument("--hardware", default="h100-sxm", help="the campaign's hardware (the GPU present)")
    parser.add_argument("--out", type=Path, default=Path("gpu_proxy_check.json"))
    parser.add_argument("--tiny", action="store_true", help="CPU: a toy 8-layer model and a small workload")
    args = parser.parse_args(argv)
    if args.tiny:
        args.requests, args.isl, args.osl = min(args.requests, 6), min(args.isl, 24), min(args.osl, 8)
    if args.proxy_layers is None:
        args.proxy_layers = 2 if args.tiny else 8
    return args


def campaign_dict(args: argparse.Namespace, model: str, proxy: int | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": model}
    if proxy is not None:
        entry["proxy_layers"] = proxy
    return {"name": "proxy-check", "backend": "torch", "hardware": args.hardware, "models": [entry],
            "layouts": [args.layout], "requests": args.requests,
            "workloads": [{"name": "check", "isl": args.isl, "osl": args.osl}]}


def measure(backend: TorchBackend, raw: dict[str, Any]) -> dict[str, Any]:
    campaign = campaign_from_dict(raw, source="gpu_proxy_check")
    (item,) = plan_campaign(campaign)
    if not item.feasible:
        raise SystemExit(f"{item.cell.id}: infeasible: {item.reason}")
    started = time.monotonic()
    result = backend.measure(item.cell, backend.prepare(BuildSpec.for_cells([item.cell]), campaign), campaign)
    summary = result.summary
    return {"cell_id": item.cell.id, "wall_s": time.monotonic() - started,
            "kv_capacity_tokens": item.memory.kv_tokens_per_replica,
            "kv_pool_blocks": summary.get("kv_pool_blocks"), "engine_path": summary.get("engine_path"),
            "output_tokens": summary.get("output_tokens"), "gpu_name": summary.get("gpu_name"),
            **{m: summary.get(m) for m in METRICS},
            "provenance": result.provenance}


def relative(proxy: dict[str, Any], full: dict[str, Any]) -> dict[str, float | None]:
    """(proxy − full) / full per metric."""
    return {m: (proxy[m] - full[m]) / full[m] if proxy.get(m) is not None and full.get(m) else None for m in METRICS}


def compare_runs(args: argparse.Namespace, names: tuple[str, str],
                 campaigns: Callable[[str], tuple[dict[str, Any], dict[str, Any]]], settings: dict[str, Any]) -> int:
    """Measure the one-cell campaigns `campaigns(model)` gives (Llama-3.1-8B, or the toy model on CPU with
    --tiny) one after the other on one backend, refuse runs that generated different token counts, and write
    `args.out`: `settings`, both runs under `names` and the second's relative difference from the first."""
    with tempfile.TemporaryDirectory() as scratch:
        model = "llama-3.1-8b"
        device = None
        if args.tiny:
            model = str(Path(scratch) / "config.json")
            Path(model).write_text(json.dumps(TINY_CONFIG))
            device = "cpu"
        backend = TorchBackend(device)
        runs = []
        try:
            for name, raw in zip(names, campaigns(model)):
                runs.append(measure(backend, raw))
                print(f"{name}: {json.dumps({k: runs[-1][k] for k in METRICS})}", flush=True)
        finally:
            backend.close()
    base, other = runs
    if other["output_tokens"] != base["output_tokens"]:
        raise SystemExit(f"the runs generated {base['output_tokens']} and {other['output_tokens']} tokens")
    report = {**settings, "requests": args.requests, "isl": args.isl, "osl": args.osl, "tiny": args.tiny,
              names[0]: base, names[1]: other, "relative_difference": relative(other, base)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(f"relative differences ({names[1]} vs {names[0]}): {json.dumps(report['relative_difference'])}")
    print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return compare_runs(args, ("full", "proxy"),
                        lambda model: (campaign_dict(args, model, None), campaign_dict(args, model, args.proxy_layers)),
                        {"layout": args.layout, "proxy_layers": args.proxy_layers})


if __name__ == "__main__":
    sys.exit(main())
