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
