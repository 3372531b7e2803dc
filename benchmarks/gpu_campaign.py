"""Measure a torch-backend campaign on the GPU machine, cheapest cells first, within a time budget.

The GPU machine has no Snakemake, submitit or polars: this calls the runner directly (the same `run_cells` a
bench job calls), one cell at a time, so every cell is written as it ends and a rerun measures only what is
missing (cells already on disk are reported as skipped). Cells are taken in order of OSL, then as the config
lists models and layouts; a cell is started only when its estimated time × `--estimate-factor` still fits before
the deadline (`--budget-s`) and, with `--max-cell-s`, within that limit (a command that may run at most so long);
a cell that does not fit is passed over and the next ones are still tried.

Estimates: `--estimate plan` (default) is the planner's steady-state guess; `--estimate sim` predicts each cell
with the sim backend (the full serving-core simulation) under the campaign's hardware constants, plus
`--setup-s` for building the model and warming up. With `--profile PATH` (a hardware profile from
`infscale calibrate`) those constants are the measured ones; the torch cells and their ids do not change.

  python benchmarks/gpu_campaign.py config/gpu-node.yaml --results-root OUT [--osl-max 4096] [--budget-s 500]
  python benchmarks/gpu_campaign.py config/gpu-node.yaml --results-root OUT --profile P.yaml --estimate sim \\
      --max-cell-s 560 --dry-run          # which cells would run, with their estimates (no GPU needed)

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

from infscale.backends.base import BuildSpec
from infscale.backends.sim.backend import SimBackend
from infscale.campaign import Campaign, load_campaign
from infscale.campaign.plan import PlannedCell, plan_campaign
from infscale.launch.runner import run_cells
from infscale.results.io import cell_file


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path)
    parser.add_argument("--results-root", type=Path, required=True)
    parser.add_argument("--hardware", help="override the config's hardware (e.g. h200-sxm)")
    parser.add_argument("--profile", type=Path, help="a hardware profile for the estimates (infscale calibrate)")
    parser.add_argument("--osl-max", type=int, help="only cells whose OSL is at most this")
    parser.add_argument("--exclude", help="skip cells whose id matches this regular expression")
    parser.add_argument("--budget-s", type=float, default=480.0, help="start no cell that may end after this")
    parser.add_argument("--max-cell-s", type=float, help="start no cell whose estimate exceeds this")
    parser.add_argument("--estimate", choices=("plan", "sim"), default="plan")
    parser.add_argument("--estimate-factor", type=float, default=3.0)
    parser.add_argument("--setup-s", type=float, default=45.0, help="model build + warm-up, added to sim estimates")
    parser.add_argument("--dry-run", action="store_true", help="print what would run, measure nothing")
    return parser.parse_args(argv)


def campaign_config(args: argparse.Namespace) -> Path:
    """The config as given, or a copy next to the results with the hardware (and profile) overridden."""
    if not (args.hardware or args.profile):
        return args.config
    spec = yaml.safe_load(args.config.read_text())
    name = args.hardware or (spec["hardware"] if isinstance(spec["hardware"], str) else spec["hardware"]["name"])
    spec["hardware"] = {"name": name, "profile": str(args.profile.resolve())} if args.profile else name
    config = args.results_root / f"{args.config.stem}.{name}.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(spec, sort_keys=False))
    return config


def estimate_seconds(item: PlannedCell, campaign: Campaign, how: str, setup_s: float) -> float:
    if how == "plan":
        return item.est_seconds
    sim = SimBackend()
    cell = item.cell.model_copy(update={"backend": "sim"})
    return float(sim.measure(cell, sim.prepare(BuildSpec.for_cells([cell]), campaign), campaign)
                 .summary["duration_s"]) + setup_s


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    campaign = load_campaign(campaign_config(args))
    results_dir = args.results_root / campaign.name
    planned = [p for p in plan_campaign(campaign) if p.feasible]
    if args.osl_max:
        planned = [p for p in planned if p.cell.osl.max_length <= args.osl_max]
    if args.exclude:
        planned = [p for p in planned if not re.search(args.exclude, p.cell.id)]
    order = {id(p): i for i, p in enumerate(planned)}
    planned.sort(key=lambda p: (p.cell.osl.max_length, order[id(p)]))
    todo = [p for p in planned if not cell_file(results_dir, p.cell.id).exists()]
    for item in planned:
        if item not in todo:
            print(f"[{0:6.0f}s] {item.cell.id}: skipped (measured)", flush=True)

    backend = None
    try:
        for item in todo:
            elapsed = time.monotonic() - started
            estimate = estimate_seconds(item, campaign, args.estimate, args.setup_s) * args.estimate_factor
            if args.max_cell_s is not None and estimate > args.max_cell_s:
                print(f"[{elapsed:6.0f}s] pass over {item.cell.id} (estimate {estimate:.0f}s > --max-cell-s "
                      f"{args.max_cell_s:.0f})", flush=True)
                continue
            if elapsed + estimate > args.budget_s:
                print(f"[{elapsed:6.0f}s] pass over {item.cell.id} (estimate {estimate:.0f}s, "
                      f"{args.budget_s - elapsed:.0f}s of the budget left)", flush=True)
                continue
            if args.dry_run:
                print(f"[{elapsed:6.0f}s] would measure {item.cell.id} (estimate {estimate:.0f}s)", flush=True)
                started -= estimate  # as if it had run
                continue
            if backend is None:
                from infscale.backends.torch.backend import TorchBackend

                backend = TorchBackend()
            (outcome,) = run_cells(campaign, [item], results_dir, backend) or [None]
            summary = outcome.summary or {}
            print(f"[{time.monotonic() - started:6.0f}s] {outcome.cell_id}: {outcome.status} "
                  f"{outcome.reason or ''} tok/s={summary.get('output_tok_s')} "
                  f"tpot_p50={summary.get('tpot_ms_p50')} energy/tok={summary.get('energy_per_output_token_j')}",
                  flush=True)
    finally:
        if backend is not None:
            backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
