"""Measure a torch-backend campaign on the GPU machine, cheapest cells first, within a time budget.

The GPU machine has no Snakemake, submitit or polars: this calls the runner directly (the same `run_cells` a
bench job calls), one cell at a time, so every cell is written as it ends and a rerun measures only what is
missing. Cells are taken in order of OSL, then as the config lists models and layouts; a cell is started only
when the sim's estimate of its time × 3 still fits before the deadline.

  python benchmarks/gpu_campaign.py config/gpu-node.yaml --results-root OUT [--osl-max 4096] [--budget-s 500]

The GPU named in the campaign's `hardware` must be the one present (checked by the backend); pass
`--hardware h200-sxm` on H200 (a copy of the config with that hardware is written next to the results).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import yaml

from infscale.backends.torch.backend import TorchBackend
from infscale.campaign import load_campaign
from infscale.campaign.plan import plan_campaign
from infscale.launch.runner import run_cells


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path)
    parser.add_argument("--results-root", type=Path, required=True)
    parser.add_argument("--hardware", help="override the config's hardware (e.g. h200-sxm)")
    parser.add_argument("--osl-max", type=int, help="only cells whose OSL is at most this")
    parser.add_argument("--exclude", help="skip cells whose id matches this regular expression")
    parser.add_argument("--budget-s", type=float, default=480.0, help="start no cell that may end after this")
    parser.add_argument("--estimate-factor", type=float, default=3.0)
    args = parser.parse_args()

    started = time.monotonic()
    config = args.config
    if args.hardware:
        spec = yaml.safe_load(config.read_text())
        spec["hardware"] = args.hardware
        config = args.results_root / f"{config.stem}.{args.hardware}.yaml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(yaml.safe_dump(spec, sort_keys=False))
    campaign = load_campaign(config)
    results_dir = args.results_root / campaign.name
    planned = [p for p in plan_campaign(campaign) if p.feasible]
    if args.osl_max:
        planned = [p for p in planned if p.cell.osl.max_length <= args.osl_max]
    if args.exclude:
        planned = [p for p in planned if not re.search(args.exclude, p.cell.id)]
    order = {id(p): i for i, p in enumerate(planned)}
    planned.sort(key=lambda p: (p.cell.osl.max_length, order[id(p)]))

    backend = TorchBackend()
    try:
        for item in planned:
            elapsed = time.monotonic() - started
            if elapsed + item.est_seconds * args.estimate_factor > args.budget_s:
                print(f"[{elapsed:6.0f}s] stop before {item.cell.id} (estimate {item.est_seconds:.0f}s)", flush=True)
                break
            (outcome,) = run_cells(campaign, [item], results_dir, backend) or [None]
            summary = outcome.summary or {}
            print(f"[{time.monotonic() - started:6.0f}s] {outcome.cell_id}: {outcome.status} "
                  f"{outcome.reason or ''} tok/s={summary.get('output_tok_s')} "
                  f"tpot_p50={summary.get('tpot_ms_p50')} energy/tok={summary.get('energy_per_output_token_j')}",
                  flush=True)
    finally:
        backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
