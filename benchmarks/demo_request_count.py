"""How much the demo's cheaper request count (2 × max concurrency, at least 128) moves its numbers.

Simulates every feasible cell of config/demo.yaml twice — as configured, and with the defaults (4 × max
concurrency, no floor) — and prints the distribution of the relative difference in output tokens/s per GPU.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import yaml

from infscale.backends.sim.backend import SimBackend
from infscale.campaign import campaign_from_dict
from infscale.campaign.plan import plan_campaign

REPO = Path(__file__).resolve().parents[1]


def per_gpu_throughput(raw: dict) -> dict[tuple, float]:
    campaign = campaign_from_dict(raw, source="demo")
    backend = SimBackend()
    out = {}
    for item in plan_campaign(campaign):
        if item.feasible:
            cell = item.cell
            key = (cell.model, cell.precision.label, str(cell.layout), cell.workload, cell.isl.label, cell.osl.label)
            out[key] = backend.measure(cell, None, campaign).summary["output_tok_s_per_gpu"]
    return out


def main() -> None:
    demo = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    reference = {k: v for k, v in demo.items() if k not in ("requests_per_slot", "min_requests")}
    start = time.perf_counter()
    cheap = per_gpu_throughput(demo)
    middle = time.perf_counter()
    full = per_gpu_throughput(reference)
    end = time.perf_counter()
    diff = np.array([abs(cheap[k] / full[k] - 1) for k in full])
    worst = max(full, key=lambda k: abs(cheap[k] / full[k] - 1))
    print(f"{len(diff)} cells; |demo/default - 1| in output tok/s per GPU: median {np.median(diff):.2%}, "
          f"p90 {np.percentile(diff, 90):.2%}, max {diff.max():.2%} ({'.'.join(worst)})")
    print(f"simulation time in-process: demo settings {middle - start:.1f} s, defaults {end - middle:.1f} s")


if __name__ == "__main__":
    main()
