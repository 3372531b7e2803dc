"""CPU benchmarks of infscale itself (targets from the Foundation issue; results go in BENCHMARKS.md).

  plan     planning a 10,000-cell campaign              target < 2 s
  merge    merging 10,000 cell files                      target < 5 s
  demo     the demo campaign end to end via Snakemake    target < 60 s wall (2-core machine)

Usage: python benchmarks/run_cpu_benchmarks.py [plan] [merge] [demo]   (default: all). Medians of repeats.
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

BIG_CAMPAIGN = {
    "name": "bench-plan",
    "backend": "sim",
    "hardware": {"name": "h200-sxm", "nodes": 2},
    "models": ["llama-3.1-8b", "qwen2.5-32b", "qwen3-32b", "llama-3.3-70b", "qwen3-30b-a3b",
               {"name": "llama-3.1-405b", "precision": ["bf16", "fp8"], "layouts": {"gpus": [8, 16]}},
               {"name": "deepseek-r1", "precision": ["fp8"], "layouts": {"gpus": [8, 16]}}],
    "layouts": {"gpus": [1, 2, 4, 8]},
    "workloads": [{"name": "sweep", "isl": [256, 1024][1], "osl": [1024 * k for k in range(1, 9)]},
                  {"name": "short", "isl": 256, "osl": [128, 256, 512, 1024]}],
    "engine": {"max_num_seqs": [64, 128, 256, 512, 1024]},
}


def big_campaign(osl_values: int) -> dict:
    workloads = [dict(BIG_CAMPAIGN["workloads"][0], osl=[1024 * k for k in range(1, osl_values + 1)]),
                 BIG_CAMPAIGN["workloads"][1]]
    return dict(BIG_CAMPAIGN, workloads=workloads)


def bench_plan(repeats: int = 3) -> tuple[int, float]:
    from infscale.campaign import campaign_from_dict
    from infscale.campaign.plan import plan_campaign

    times, count = [], 0
    for _ in range(repeats):
        import infscale.campaign.plan as plan_module

        plan_module._MEMORY_CACHE.clear()
        plan_module._STEP_CACHE.clear()
        start = time.perf_counter()
        planned = plan_campaign(campaign_from_dict(BIG_CAMPAIGN, source="bench"))
        times.append(time.perf_counter() - start)
        count = len(planned)
    return count, statistics.median(times)


def bench_merge(cells: int = 10_000, repeats: int = 3) -> tuple[int, float, float]:
    """(cells, seconds through the bench jobs' summary files as the workflow merges, seconds reading every
    cell file cold, as `infscale merge` does for cells no job summary covers)."""
    from infscale.analysis.merge import merge_cells
    from infscale.campaign import campaign_from_dict
    from infscale.campaign.plan import plan_campaign
    from infscale.launch.runner import CellOutcome, write_job_summary
    from infscale.results.io import build_cell_table, cell_file, write_cell

    # more OSL values than the plan benchmark, so that at least `cells` of them are feasible
    planned = [p for p in plan_campaign(campaign_from_dict(big_campaign(14), source="bench")) if p.feasible][:cells]
    with tempfile.TemporaryDirectory() as folder:
        results = Path(folder)
        jobs: dict[str, list] = {}
        for i, item in enumerate(planned):  # synthetic metrics: this measures the I/O of the merge only
            row = {**item.cell.identity(8), "status": "ok", "output_tok_s": float(i), "duration_s": 1.0}
            table = build_cell_table(row)
            write_cell(cell_file(results, item.cell.id), table, {}, item.cell.spec_json)
            jobs.setdefault(item.job, []).append(CellOutcome(item.cell.id, "ok", summary=table.select(
                [f for f in table.column_names if f not in ("requests_detail", "series")]).to_pylist()[0]))
        summaries = [write_job_summary(results / "bench" / f"{job}.parquet", job, outs) for job, outs in jobs.items()]
        timings = {}
        for label, paths in (("indexed", summaries), ("cold", [])):
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                frame = merge_cells(planned, results, 8, paths)
                times.append(time.perf_counter() - start)
                assert frame.height == len(planned)
            timings[label] = statistics.median(times)
    return len(planned), timings["indexed"], timings["cold"]


def bench_demo() -> float:
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", folder,
                   "--profile", str(REPO / "profiles" / "local"),
                   "--config", f"campaign={REPO / 'config' / 'demo.yaml'}", f"results_root={folder}/results"]
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        elapsed = time.perf_counter() - start
        shutil.rmtree(folder, ignore_errors=True)
    return elapsed


def main() -> None:
    wanted = set(sys.argv[1:]) or {"plan", "merge", "demo"}
    machine = platform.processor() or platform.machine()
    print(f"# {time.strftime('%Y-%m-%d', time.gmtime())} {platform.node()} {machine} "
          f"{os.cpu_count()} cores, Python {platform.python_version()}")
    if "plan" in wanted:
        count, seconds = bench_plan()
        print(f"plan   {count} cells: {seconds:.2f} s (median of 3; target < 2 s)")
    if "merge" in wanted:
        count, indexed, cold = bench_merge()
        print(f"merge  {count} cells: {indexed:.2f} s through the job summary files (median of 3; target < 5 s); "
              f"{cold:.2f} s reading all {count} cell files cold")
    if "demo" in wanted:
        seconds = bench_demo()
        print(f"demo   end to end: {seconds:.1f} s wall (target < 60 s)")


if __name__ == "__main__":
    main()
