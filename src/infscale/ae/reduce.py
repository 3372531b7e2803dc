"""Reduced-scale reproduction profiles: a campaign derived from a full one that a reviewer can run.

- `cpu`: the same matrix (models, layouts, workloads, requests, engine knobs, seed) on the `sim` backend. It needs
  no GPU and runs in well under a minute; its numbers are the performance model's predictions for the campaign's
  hardware, so a rerun reproduces them exactly and the claims are checked on predicted evidence.
- `1gpu`: the `torch` backend on one GPU of the campaign's hardware: each model's single-GPU layout where it fits,
  OSL capped (`osl_max`, default 1024) and at most `max_requests` requests per cell (default 16). Models that do
  not fit on one GPU are left out, with why.

The expected wall time is computed from the plan before anything runs: the planner's per-cell estimate on the
target GPUs plus fixed overheads (below) for `1gpu`; for `cpu` a per-campaign start-up plus a small per-cell cost.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from infscale.campaign import SpecError, campaign_from_dict
from infscale.campaign.plan import plan_campaign
from infscale.yamlfile import YamlFileError, read_yaml

TARGETS = ("cpu", "1gpu")
# Wall-time overheads the planner's steady-state estimate leaves out (rough; on the 2-core development machine
# the whole reduced gpu-node campaign ran through Snakemake in about 20 s, each sim cell in < 0.05 s).
SIM_STARTUP_S = 30.0          # Snakemake + one Python start-up per rule
SIM_PER_CELL_S = 0.1
TORCH_STARTUP_S = 60.0        # Snakemake, Python and torch imports, CUDA context
TORCH_PER_BUILD_S = 60.0      # one model built per layout group: random weights, CUDA graphs, Triton autotune
TORCH_PER_CELL_S = 15.0       # warm-up and KV pool set-up per cell


@dataclass
class Reduced:
    target: str
    raw: dict                      # the derived campaign, as written to YAML
    cells: int                     # feasible cells
    expected_s: float
    notes: list[str] = field(default_factory=list)

    def yaml_text(self, source: str) -> str:
        header = (f"# Reduced-scale reproduction profile '{self.target}' of {source}, written by "
                  f"`infscale ae reduce`.\n# {self.cells} cells; expected wall time about "
                  f"{format_duration(self.expected_s)}.\n")
        header += "".join(f"# {note}\n" for note in self.notes)
        return header + yaml.safe_dump(self.raw, sort_keys=False, allow_unicode=True, width=120)


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def reduce_campaign(campaign_file: Path, target: str = "cpu", osl_max: int = 1024, max_requests: int = 16) -> Reduced:
    """Derive the `target` profile of a campaign file (see the module doc)."""
    if target not in TARGETS:
        raise ValueError(f"target '{target}': allowed {', '.join(TARGETS)}")
    try:
        raw = read_yaml(campaign_file, "campaign file")
    except YamlFileError as err:
        raise SpecError([str(err)]) from None
    if not isinstance(raw, dict) or "name" not in raw:
        raise ValueError(f"{campaign_file}: not a campaign file")
    reduced = copy.deepcopy(raw)
    reduced["name"] = f"{raw['name']}-{target}"
    notes: list[str] = []
    if target == "cpu":
        reduced["backend"] = "sim"
        reduced["description"] = (f"{raw.get('description', raw['name'])} — reduced for a CPU: the same cells, "
                                  "predicted by the sim backend")
        if raw.get("backend", "sim") != "sim":
            notes.append(f"The original runs the {raw.get('backend')} backend; these numbers are sim predictions.")
        campaign = campaign_from_dict(reduced, source=f"{campaign_file} ({target})")
        planned = [p for p in plan_campaign(campaign) if p.feasible]
        expected = SIM_STARTUP_S + SIM_PER_CELL_S * len(planned)
        return Reduced(target, reduced, len(planned), expected, notes)

    # 1gpu: the torch backend, one GPU, the 1-GPU layout of each model that fits
    full = campaign_from_dict(copy.deepcopy(raw), source=str(campaign_file))
    reduced["backend"] = "torch"
    reduced["description"] = (f"{raw.get('description', raw['name'])} — reduced to one GPU: single-GPU layout, "
                              f"OSL ≤ {osl_max}, ≤ {max_requests} requests per cell")
    hardware = reduced.get("hardware")
    reduced["hardware"] = {**hardware, "nodes": 1} if isinstance(hardware, dict) else hardware
    reduced["layouts"] = ["dp1tp1pp1"]
    models = []
    for entry in raw["models"]:
        entry = {"name": entry} if isinstance(entry, str) else dict(entry)
        entry.pop("layouts", None)
        models.append(entry)
    reduced["models"] = models
    workloads = []
    for workload in raw["workloads"]:
        workload = dict(workload)
        if isinstance(workload.get("osl"), list):
            kept = [o for o in workload["osl"] if o <= osl_max] or [osl_max]
            workload["osl"] = kept
        elif isinstance(workload.get("osl"), int) and workload["osl"] > osl_max:
            workload["osl"] = osl_max
        elif isinstance(workload.get("osl"), dict):
            workload["osl"] = {**workload["osl"], "cap": min(int(workload["osl"].get("cap", osl_max)), osl_max)}
        if "pairs" in workload:
            workload["pairs"] = [[i, min(o, osl_max)] for i, o in workload["pairs"]]
        if isinstance(workload.get("requests"), int):
            workload["requests"] = min(workload["requests"], max_requests)
        workloads.append(workload)
    reduced["workloads"] = workloads
    requests = raw.get("requests", "auto")
    reduced["requests"] = min(requests, max_requests) if isinstance(requests, int) else max_requests
    campaign = campaign_from_dict(reduced, source=f"{campaign_file} ({target})")
    planned = plan_campaign(campaign)
    fitting = {p.cell.model for p in planned if p.feasible}
    dropped = [m for m in full.models.values() if m.name not in fitting]
    if dropped:
        for arch in dropped:
            reason = next((p.reason for p in planned if p.cell.model == arch.name and p.reason), "infeasible")
            notes.append(f"{arch.name} is left out: on one {full.hardware.name}: {reason}")
        reduced["models"] = [m for m, arch in zip(models, full.models.values()) if arch.name in fitting]
        if not reduced["models"]:
            raise ValueError(f"{campaign_file}: no model of the campaign fits on one {full.hardware.name}")
        campaign = campaign_from_dict(reduced, source=f"{campaign_file} ({target})")
        planned = plan_campaign(campaign)
    feasible = [p for p in planned if p.feasible]
    builds = {p.cell.group_key for p in feasible}
    expected = (TORCH_STARTUP_S + TORCH_PER_BUILD_S * len(builds) + TORCH_PER_CELL_S * len(feasible)
                + sum(p.est_seconds for p in feasible))
    return Reduced(target, reduced, len(feasible), expected, notes)
