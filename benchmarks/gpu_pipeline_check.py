"""Pipelined PP against the stages in turn: the same PP cell measured twice on the GPUs.

Runs Llama-3.1-8B (bf16, random weights) at one PP layout (pp2, tp2pp2, dp2pp2, pp4 …) with the engine knob
`pp_microbatches` unset (the torch engine runs the whole batch through its stages in turn) and 0 (the decode step
split into one micro-batch per stage, the stages a ring), through the torch backend exactly as a campaign cell
runs (TorchBackend.measure), and writes a JSON with both runs' output tok/s, TPOT p50 and TTFT p50 and the
pipelined run's relative differences. Needs only torch, this package, pydantic and pyyaml.

  python benchmarks/gpu_pipeline_check.py --layout tp2pp2 --out gpu_pipeline_check.json   # GPUs
  python benchmarks/gpu_pipeline_check.py --tiny --layout pp2 --out /tmp/pipe-cpu.json    # CPU, tiny model

`--tiny` runs the same code path on CPU with an 8-layer toy model: a check of the script, not of the speed-up.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from gpu_proxy_check import compare_runs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", default="pp2", help="a PP layout, e.g. pp2, tp2pp2, dp2pp2 (default pp2)")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--isl", type=int, default=1024)
    parser.add_argument("--osl", type=int, default=512)
    parser.add_argument("--hardware", default="h100-sxm", help="the campaign's hardware (the GPU present)")
    parser.add_argument("--out", type=Path, default=Path("gpu_pipeline_check.json"))
    parser.add_argument("--tiny", action="store_true", help="CPU: a toy 8-layer model and a small workload")
    args = parser.parse_args(argv)
    if args.tiny:
        args.requests, args.isl, args.osl = min(args.requests, 6), min(args.isl, 24), min(args.osl, 8)
    return args


def campaign_dict(args: argparse.Namespace, model: str, microbatches: int | None) -> dict[str, Any]:
    engine = {} if microbatches is None else {"pp_microbatches": microbatches}
    return {"name": "pipeline-check", "backend": "torch", "hardware": args.hardware, "models": [model],
            "layouts": [args.layout], "requests": args.requests, "engine": engine,
            "workloads": [{"name": "check", "isl": args.isl, "osl": args.osl}]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return compare_runs(args, ("in_turn", "pipelined"),
                        lambda model: (campaign_dict(args, model, None), campaign_dict(args, model, 0)),
                        {"layout": args.layout})


if __name__ == "__main__":
    sys.exit(main())
