"""`infscale predict --engine trtllm` for every catalog model on H100 and H200 at every TP/PP/EP layout of one
node (up to 8 GPUs per replica): each cell predicted end to end (plan, memory, serving simulation), its wall time
measured. Target: well under a second per cell.

Usage: .venv/bin/python benchmarks/trtllm_predict_speed.py [--isl 1024] [--osl 2048] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

from infscale.backends.sim.backend import SimBackend
from infscale.campaign import campaign_from_dict
from infscale.campaign.layout import enumerate_layouts
from infscale.campaign.plan import plan_campaign
from infscale.catalog import get_hardware, load_models
from infscale.opdata import data_version


def cells(model: str, hardware: str, precision: str, layout: str, isl: int, osl: int, concurrency: int) -> dict:
    return {"name": "speed", "backend": "sim", "sim": {"engine": "trtllm"}, "hardware": hardware,
            "models": [model], "precision": [precision], "layouts": [layout],
            "workloads": [{"name": "w", "isl": isl, "osl": osl, "requests": 4 * concurrency,
                           "arrival": {"mode": "concurrency", "concurrency": concurrency}}]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--isl", type=int, default=1024)
    parser.add_argument("--osl", type=int, default=2048)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args(argv)
    times, infeasible, count = [], [], 0
    slowest = ("", 0.0)
    for hardware in ("h100-sxm", "h200-sxm"):
        hw = get_hardware(hardware)
        for name, model in load_models().items():
            precision = "fp8/fp8" if model.family == "deepseek_v3" else "bf16"
            for precision in sorted({precision, "fp8/fp8"}):
                layouts = []
                for ep in (False, True):
                    for layout in enumerate_layouts(model, hw, [1, 2, 4, 8], 1, None, ep):
                        if layout.dp == 1 and layout not in layouts:
                            layouts.append(layout)
                for layout in layouts:
                    start = time.perf_counter()
                    campaign = campaign_from_dict(cells(name, hardware, precision, str(layout), args.isl,
                                                        args.osl, args.concurrency), source="speed")
                    (item,) = plan_campaign(campaign)
                    if item.feasible:
                        SimBackend().measure(item.cell, None, campaign)  # type: ignore[arg-type]
                    else:
                        infeasible.append(f"{hardware} {name} {precision} {layout}")
                    took = time.perf_counter() - start
                    times.append(took)
                    count += 1
                    if count > 1 and took > slowest[1]:
                        slowest = (f"{hardware} {name} {precision} {layout}", took)
    print(f"# predict --engine trtllm: every catalog model × H100/H200 × one-node layouts ({data_version()})")
    print(f"{time.strftime('%Y-%m-%d')} · {platform.node()} · {platform.machine()} · Python "
          f"{platform.python_version()} · ISL {args.isl}, OSL {args.osl}, concurrency {args.concurrency}")
    warm = times[1:]  # the first cell also reads the operator tables from disk
    print(f"{count} cells ({count - len(infeasible)} feasible, {len(infeasible)} infeasible by TensorRT-LLM's "
          f"memory accounting); first cell (reads the tables) {times[0]:.2f} s; the others: median "
          f"{statistics.median(warm):.3f} s, p90 {sorted(warm)[int(0.9 * len(warm))]:.3f} s, max {max(warm):.3f} s "
          f"({slowest[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
