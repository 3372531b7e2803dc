"""Terminal tables (rich) for plans."""

from __future__ import annotations

from collections import defaultdict

from rich.console import Console
from rich.table import Table

from infscale.pipeline import CampaignRun


def print_plan(run: CampaignRun, per_cell: bool = False, console: Console | None = None) -> None:
    console = console or Console(width=200)
    campaign = run.campaign
    title = (f"plan of '{campaign.name}': backend {campaign.spec.backend}, {campaign.hardware.name} "
             f"× up to {campaign.spec.hardware.nodes} node(s) of {campaign.hardware.gpus_per_node} GPUs")
    table = Table(title=title, show_lines=False)
    if per_cell:
        for column in ("cell", "GPUs", "requests", "max conc.", "verdict", "est. GPU-h"):
            table.add_column(column, justify="right" if column not in ("cell", "verdict") else "left")
        for item in run.planned:
            verdict = "feasible" if item.feasible else f"infeasible: {item.reason}"
            table.add_row(item.cell.id, str(item.cell.layout.gpus), str(item.cell.requests),
                          str(item.max_concurrency), verdict, f"{item.est_gpu_hours:.2f}")
    else:
        groups: dict[tuple, list] = defaultdict(list)
        for item in run.planned:
            groups[(item.cell.model, item.cell.precision.label, str(item.cell.layout))].append(item)
        for column in ("model", "precision", "layout", "GPUs", "nodes", "cells", "feasible", "infeasible",
                       "est. GPU-h", "why infeasible (first)"):
            table.add_column(column, justify="right" if column in ("GPUs", "nodes", "cells", "feasible",
                                                                    "infeasible", "est. GPU-h") else "left")
        for (model, precision, layout), items in groups.items():
            feasible = sum(i.feasible for i in items)
            reason = next((i.reason for i in items if not i.feasible), "")
            first = items[0].cell.layout
            table.add_row(model, precision, layout, str(first.gpus), str(first.nodes(campaign.hardware.gpus_per_node)),
                          str(len(items)), str(feasible), str(len(items) - feasible),
                          f"{sum(i.est_gpu_hours for i in items):.1f}", reason or "")
    console.print(table)
    feasible = [i for i in run.planned if i.feasible]
    console.print(
        f"total: {len(run.planned)} cells, {len(feasible)} feasible, {len(run.planned) - len(feasible)} infeasible; "
        f"{len(run.jobs())} bench jobs ({run.packing} packing); "
        f"estimated {sum(i.est_gpu_hours for i in feasible):,.1f} GPU-hours on {campaign.hardware.name}"
    )
    if campaign.spec.backend == "trtllm":
        print_engines(run, console)


def print_engines(run: CampaignRun, console: Console) -> None:
    """The TensorRT engines the `engine` flow builds: one per build spec of the feasible cells, about the size of
    the weights of one replica (engines bake the weights in; the pytorch flow builds none)."""
    from infscale.launch.engines import engine_groups

    # one engine serves every workload of its layout: the longest sequence decides its max_seq_len
    engines = engine_groups(run.planned)
    table = Table(title="engines to build (flow 'engine'; the 'pytorch' flow builds none)")
    for column in ("model", "weights", "TP", "PP", "max seq len", "max batch", "max tokens", "cells",
                   "est. size GiB"):
        table.add_column(column, justify="left" if column in ("model", "weights") else "right")
    total = 0.0
    for build, items in engines.items():
        first = items[0]
        replica_gpus = first.cell.layout.gpus_per_replica
        size = first.memory.weights_bytes_per_gpu * replica_gpus / 2**30
        total += size
        table.add_row(build.model, build.weight_dtype, str(build.tp), str(build.pp),
                      str(max(i.cell.isl.max_length + i.cell.osl.max_length for i in items)),
                      str(build.max_num_seqs), str(build.max_num_tokens), str(len(items)), f"{size:,.0f}")
    console.print(table)
    console.print(f"{len(engines)} engines, about {total:,.0f} GiB in the engine cache")


def print_status(run: CampaignRun, console: Console | None = None) -> bool:
    """Cells done / pending / failed per bench job with its Slurm job and state; True when all are done."""
    from rich.progress_bar import ProgressBar

    from infscale.launch.registry import Registry, query_states
    from infscale.results.integrity import VALID, check_cell_file
    from infscale.results.io import cell_file, failure_cell_id

    console = console or Console(width=200)
    registry = Registry(run.results_dir)
    records = {r.job: r for r in registry.records()}
    active = [r.last.slurm_job_id for r in records.values() if r.last and r.last.ended_at is None]
    live = query_states(active) if active else {}
    failures = run.results_dir / "failures"
    failed_ids = {failure_cell_id(p) for p in failures.glob("*.parquet")} if failures.is_dir() else set()
    table = Table(title=f"status of '{run.campaign.name}' ({run.results_dir})")
    for column in ("bench job", "cells", "done", "pending", "failed", "Slurm job", "state", "attempts"):
        table.add_column(column, justify="left" if column in ("bench job", "Slurm job", "state") else "right")
    total = done_total = 0
    for job, items in run.jobs().items():
        on_disk = {i.cell.id for i in items
                   if check_cell_file(cell_file(run.results_dir, i.cell.id), i.cell.spec_hash,
                                      i.cell.spec_json).state == VALID}
        done = len(on_disk)
        failed = sum(i.cell.id in failed_ids for i in items if i.cell.id not in on_disk)
        record = records.get(job)
        attempt = record.last if record else None
        state = live.get(attempt.slurm_job_id, {}).get("state", attempt.state) if attempt else "-"
        table.add_row(job, str(len(items)), str(done), str(len(items) - done - failed), str(failed),
                      attempt.slurm_job_id if attempt else "-", state,
                      str(len(record.attempts)) if record else "0")
        total += len(items)
        done_total += done
    console.print(table)
    infeasible = sum(not p.feasible for p in run.planned)
    console.print(ProgressBar(total=max(total, 1), completed=done_total, width=60))
    console.print(f"{done_total}/{total} feasible cells done; {infeasible} infeasible by the plan (never run)")
    return done_total == total
