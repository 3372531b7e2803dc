"""The `torch` backend behind the Backend protocol: a cell's DP × TP × PP ranks, one process per GPU.

A one-GPU cell runs in the calling process. Larger cells run on rank processes (workers.py): spawned here and
kept for the following cells of the same size, or — in a Slurm job with one task per GPU — the job's tasks,
joined by the launcher and handed in as `ranks`. Each DP replica serves the requests routed to it on its own GPUs
at the same time as the others; the replicas' timelines, scheduler logs and GPU telemetry are gathered here and
summarised by the same code as every backend's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from infscale.backends.base import Artefact, BuildSpec, CellResult
from infscale.backends.torch.executor import pipeline_microbatches
from infscale.backends.torch.workers import (
    STATE_COLUMNS,
    CellWork,
    JoinedRanks,
    RankMember,
    RankReport,
    SpawnedRanks,
    check_reports,
)
from infscale.campaign import Campaign, Cell
from infscale.memory import plan_memory, torch_engine_reserve_bytes
from infscale.serving.cluster import ReplicaConfig, static_routes
from infscale.serving.metrics import request_rows, series_rows, summarize
from infscale.serving.scheduler import RequestState, SeriesLog
from infscale.serving.workload import generate_requests
from infscale.telemetry import merge as merge_telemetry


@dataclass
class ReplicaRecord:
    """What the metrics need of a replica that ran in another process."""

    index: int
    log: SeriesLog
    num_blocks: int
    prefill_time: float
    busy_time: float


class TorchBackend:
    name = "torch"

    def __init__(self, device: str | None = None, ranks: JoinedRanks | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._joined = ranks
        self._spawned: SpawnedRanks | None = None
        self._local: RankMember | None = None

    def prepare(self, build: BuildSpec, campaign: Campaign) -> Artefact:
        # the model is built by the ranks when the first cell comes (weights are generated on the device)
        check_device_matches(campaign.hardware.name, self.device)
        return Artefact(build=build, info={"engine": "infscale-torch", "torch": torch.__version__,
                                           "device": str(self.device), **gpu_environment(self.device)})

    def measure(self, cell: Cell, artefact: Artefact, campaign: Campaign) -> CellResult:
        work = self.cell_work(cell, campaign)
        reports = self._run(work, cell.layout.gpus)
        return assemble(work, reports, cell.layout.gpus)

    def cell_work(self, cell: Cell, campaign: Campaign) -> CellWork:
        arch = campaign.model_for(cell)
        requests = generate_requests(cell.isl, cell.osl, cell.requests, cell.arrival, cell.seed)
        routes = static_routes(requests, cell.dp, cell.arrival, cell.engine.router)
        if routes is None:
            raise NotImplementedError(f"router {cell.engine.router!r} with {cell.arrival.mode} arrivals needs the "
                                      "replicas' live load; the torch backend runs DP replicas in separate "
                                      "processes: use router round_robin")
        # checked here, before any rank builds the model (unset: the stages in turn, as before the knob existed)
        microbatches = pipeline_microbatches(cell.engine.pp_microbatches, cell.pp)
        if microbatches > 1 and cell.proxy_layers is not None:
            raise ValueError(f"{cell.id}: layer-sliced proxy runs of pipelined PP (pp_microbatches > 1) are not "
                             "supported")
        fraction = cell.engine.kv_memory_fraction or campaign.hardware.default_kv_memory_fraction
        # the engine's reserve for its largest iteration (max_num_tokens) and workspaces: the planner's too
        reserve = torch_engine_reserve_bytes(arch, cell.tp, cell.ep, cell.engine.max_num_tokens,
                                             cell.engine.max_num_seqs)
        memory = plan_memory(arch, campaign.hardware, cell.layout, cell.precision.weights, cell.precision.kv,
                             cell.engine.kv_memory_fraction, cell.engine.kv_block_size, cell.proxy_layers,
                             activation_reserve_bytes=reserve)
        # the KV pool: what the plan gives a replica (as an engine sizes it from its memory fraction); each rank
        # lowers it to what its device holds now. A proxy gets the full model's token capacity (its slice's
        # bytes per token), so its scheduler admits what a full run's would.
        config = ReplicaConfig(max(1, memory.kv_blocks_per_replica), cell.engine.kv_block_size,
                               cell.engine.max_num_seqs, cell.engine.max_num_tokens,
                               cell.engine.scheduler_policy or "max_utilization")
        return CellWork(arch=arch, tp=cell.tp, pp=cell.pp, dp=cell.dp, requests=requests, routes=routes,
                        arrival=cell.arrival, config=config,
                        dtype="bfloat16" if self.device.type == "cuda" else "float32", seed=cell.seed,
                        kv_memory_fraction=fraction,
                        activation_reserve_bytes=reserve, num_layers=cell.proxy_layers,
                        ep=cell.ep, pp_microbatches=microbatches)

    def _run(self, work: CellWork, world: int) -> list[RankReport]:
        if self._joined is not None:
            if self._joined.world != world:
                raise RuntimeError(f"this job's {self._joined.world} tasks cannot run a {world}-GPU cell")
            return self._joined.run(work)
        if world == 1:
            if self._local is None:
                self._local = RankMember(0, 1, self.device)
            return check_reports(self._local.lead(work))
        if self.device.type == "cuda" and torch.cuda.device_count() < world:
            raise RuntimeError(f"the cell needs {world} GPUs on this node; CUDA shows {torch.cuda.device_count()}")
        if self._spawned is not None and (self._spawned.world != world or not self._spawned.alive):
            self._spawned.close()
            self._spawned = None
        if self._spawned is None:
            self._spawned = SpawnedRanks(world)
        return self._spawned.run(work)

    def close(self) -> None:
        """Stop the rank processes (the runner calls this when a job's cells are done)."""
        if self._spawned is not None:
            self._spawned.close()
            self._spawned = None
        if self._joined is not None:
            self._joined.close()
            self._joined = None


def gpu_environment(device: torch.device) -> dict[str, str]:
    """GPU name, CUDA runtime and driver version for the cells' provenance (nothing on CPU)."""
    if device.type != "cuda":
        return {}
    info = {"gpu": torch.cuda.get_device_name(device), "cuda": str(torch.version.cuda)}
    try:
        import pynvml

        pynvml.nvmlInit()
        info["driver"] = str(pynvml.nvmlSystemGetDriverVersion())
        pynvml.nvmlShutdown()
    except Exception as err:  # provenance is best effort; the measurement does not depend on it
        info["driver"] = f"unknown ({type(err).__name__})"
    return info


def check_device_matches(hardware: str, device: torch.device) -> None:
    """A measurement is labelled with the campaign's hardware: refuse to label an H200's numbers 'h100-sxm'."""
    if device.type != "cuda":
        return  # CPU runs (tests) measure the engine, not the hardware
    present = torch.cuda.get_device_name(device)
    family = hardware.split("-")[0].upper()  # 'h100-sxm' -> 'H100'
    if family not in present.upper():
        raise RuntimeError(f"the campaign's hardware is {hardware!r} but this node's GPU is {present!r}; "
                           "set `hardware:` to the GPU present")


def assemble(work: CellWork, reports: list[RankReport], gpus: int) -> CellResult:
    """The cell's result from every rank's report: request timelines, replica logs, telemetry."""
    outcomes = sorted((r.replica for r in reports if r.replica is not None), key=lambda o: o.index)
    if len(outcomes) != work.dp:
        raise RuntimeError(f"{len(outcomes)} of {work.dp} replicas reported results")
    requests = work.requests
    state = RequestState(requests.isl.copy(), requests.osl.copy(), requests.arrival.copy())
    for outcome in outcomes:
        for name in STATE_COLUMNS:
            getattr(state, name)[outcome.ids] = outcome.columns[name]
    records = [ReplicaRecord(o.index, o.log, o.num_blocks, o.prefill_time, o.busy_time) for o in outcomes]
    summary = summarize(state, records, gpus)  # type: ignore[arg-type]
    summary["gpu_name"] = reports[0].device
    summary["engine_path"] = ",".join(sorted({o.engine_path for o in outcomes}))
    summary["kv_pool_blocks"] = min(o.num_blocks for o in outcomes)
    telemetry = None
    parts = [r.telemetry for r in sorted(reports, key=lambda r: r.rank) if r.telemetry is not None]
    if parts:
        telemetry = merge_telemetry(parts)
        summary.update({k: v for k, v in telemetry.summary().items() if v is not None})
        if telemetry.error is None and summary.get("energy_j") is not None:
            summary["energy_per_output_token_j"] = summary["energy_j"] / summary["output_tokens"]
    provenance = None
    if work.num_layers is not None:
        # the replicas' fixed parts differ (each measured its own): the first one's method, every one's table
        scalings = [o.scaling for o in outcomes]
        if any(s is None for s in scalings):
            raise RuntimeError("a proxy cell's replica ran without step-time scaling; its numbers are not the full "
                               "model's")
        provenance = {"proxy": {**scalings[0], "replicas": scalings}}  # type: ignore[dict-item]
    return CellResult(summary=summary, requests=request_rows(state), series=series_rows(records),  # type: ignore
                      telemetry=telemetry.series() if telemetry else None, predicted=False, provenance=provenance)
