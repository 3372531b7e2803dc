"""The plan: every cell of a campaign with a feasibility verdict, its capacity numbers and a cost estimate.

Infeasible cells stay in the plan (and in the merged results) with their reason; they are never run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from infscale.campaign.cell import Cell
from infscale.campaign.layout import Layout
from infscale.campaign.spec import Arrival, Campaign, EngineKnobs, EngineSweep, LayoutSweep, Precision
from infscale.catalog import Hardware, ModelArch
from infscale.memory import GIB, MemoryPlan, engine_reserve_bytes, plan_memory
from infscale.perfmodel import StepModel, build_step_model
from infscale.trtllm_memory import plan_trtllm_memory
from infscale.trtllm_model import TrtllmStepModel, trtllm_step_model

PACKING = ("layout", "model")


@dataclass(frozen=True)
class PlannedCell:
    cell: Cell
    job: str                  # the bench job that runs it
    feasible: bool
    reason: str | None
    memory: MemoryPlan
    max_concurrency: int      # whole layout, sequences of isl_max + osl_max tokens
    est_seconds: float        # wall time on the target GPUs (steady-state estimate)

    @property
    def est_gpu_hours(self) -> float:
        return self.est_seconds * self.cell.layout.gpus / 3600

    def capacity_columns(self) -> dict[str, object]:
        """The capacity columns of the cell's result row (see results.schemas.CAPACITY_FIELDS)."""
        return {
            "weights_gib_per_gpu": self.memory.weights_bytes_per_gpu / GIB,
            "kv_bytes_per_token_per_gpu": self.memory.kv_bytes_per_token_per_gpu,
            "kv_capacity_tokens": self.memory.kv_tokens_per_replica,
            "max_concurrency": self.max_concurrency,
        }


def job_id(cell: Cell, packing: str) -> str:
    """`layout`: one job per model × precision × layout (what a GPU allocation needs); `model`: one per model."""
    if packing == "layout":
        return cell.group_key
    if packing == "model":
        return f"{cell.model}.{cell.precision.label}.{cell.hardware}.{cell.backend}"
    raise ValueError(f"unknown packing '{packing}'; allowed: {', '.join(PACKING)}")


def plan_campaign(campaign: Campaign, packing: str = "layout") -> list[PlannedCell]:
    spec = campaign.spec
    hardware = campaign.hardware
    planned: list[PlannedCell] = []
    seen: set[str] = set()
    # what each workload expands to, independent of model and layout
    workloads = []
    engine = campaign.sim_engine
    engine_label = campaign.prediction_engine
    for workload in spec.workloads:
        knobs = [k if k.kv_memory_fraction is not None
                 else k.model_copy(update={"kv_memory_fraction": hardware.default_kv_memory_fraction})
                 for k in (workload.engine or EngineSweep()).merged_over(spec.engine)
                 .expand(campaign.engine_knob_defaults)]
        arrivals = (workload.arrival or spec.arrival).expand()
        requests_setting = workload.requests if workload.requests is not None else spec.requests
        workloads.append((workload, workload.length_pairs(), knobs, arrivals, requests_setting))
    for entry in spec.models:
        model = campaign.models[entry.name]
        for precision in entry.precision or spec.precision:
            for layout in _layouts_for(campaign, entry.name, model):
                for workload, pairs, knob_list, arrivals, requests_setting in workloads:
                    for isl, osl in pairs:
                        for knobs in knob_list:
                            # a proxy's capacity is the full model's (memory.plan_memory); its estimate stays
                            # the full run's too: an upper bound on the slice's wall time
                            memory = _memory(model, hardware, layout, precision, knobs, entry.proxy_layers,
                                             engine)
                            context = isl.max_length + osl.max_length
                            concurrency = layout.dp * memory.max_seqs(context, knobs.max_num_seqs)
                            reason = memory.problem(context, model.name, layout)
                            for arrival in arrivals:
                                count = _request_count(requests_setting, arrival, concurrency, spec)
                                cell = Cell(
                                    model=model.name, hardware=hardware.name, backend=spec.backend,
                                    precision=precision, dp=layout.dp, tp=layout.tp, pp=layout.pp, ep=layout.ep,
                                    workload=workload.name, isl=isl, osl=osl, requests=count, arrival=arrival,
                                    engine=knobs, seed=spec.seed, proxy_layers=entry.proxy_layers,
                                    hardware_profile=campaign.prediction_profile,
                                    prediction_engine=engine_label,
                                )
                                if cell.id in seen:
                                    continue
                                seen.add(cell.id)
                                seconds = 0.0 if reason else _estimate_seconds(cell, model, hardware, memory,
                                                                               engine)
                                planned.append(PlannedCell(cell, job_id(cell, packing), reason is None, reason,
                                                           memory, concurrency, seconds))
    return planned


def _layouts_for(campaign: Campaign, entry_name: str, model: ModelArch) -> list[Layout]:
    chosen = campaign.layouts[entry_name]
    if not isinstance(chosen, LayoutSweep):
        return chosen
    return chosen.layouts(model, campaign.hardware, campaign.spec.hardware.nodes)


def _request_count(setting: int | str, arrival: Arrival, concurrency: int, spec) -> int:
    if setting != "auto":
        return int(setting)
    slots = arrival.concurrency if arrival.mode == "concurrency" else concurrency
    return max(spec.min_requests, min(spec.max_requests, spec.requests_per_slot * max(slots or 0, 1)))


# Catalog entries hold dicts (unhashable), so the caches are keyed by names: many cells share these.
_MEMORY_CACHE: dict[tuple, MemoryPlan] = {}
_STEP_CACHE: dict[tuple, StepModel] = {}


def engine_kv_dtype(engine: str | None, weight_dtype: str, kv_dtype: str) -> str:
    """The KV cache dtype the engine runs: TensorRT-LLM with FP8 weights keeps its KV in FP8 (trtllm-bench's FP8
    build forces it; ModelOpt's FP8 checkpoints carry it), whatever the cell's precision says for KV."""
    return "fp8" if engine == "trtllm" and weight_dtype == "fp8" else kv_dtype


def replica_memory(model: ModelArch, hardware: Hardware, layout: Layout, weight_dtype: str, kv_dtype: str,
                   knobs: EngineKnobs, proxy_layers: int | None, engine: str | None) -> MemoryPlan:
    """One replica's memory as the cell's engine accounts for it: TensorRT-LLM's KV is a fraction of the memory
    free after weights and workspace; the others' a fraction of the device (memory.py)."""
    if engine == "trtllm":
        kv_dtype = engine_kv_dtype(engine, weight_dtype, kv_dtype)
        return plan_trtllm_memory(model, hardware, layout, weight_dtype, kv_dtype, knobs.kv_memory_fraction,
                                  knobs.kv_block_size, knobs.max_num_tokens, knobs.max_num_seqs)
    # the torch engine's own activation reserve (its largest max_num_tokens iteration), so the planner, the sim
    # and the engine size one KV pool; the roofline model keeps the hardware's assumption
    reserve = engine_reserve_bytes(engine, model, layout.tp, layout.ep, knobs.max_num_tokens, knobs.max_num_seqs)
    return plan_memory(model, hardware, layout, weight_dtype, kv_dtype, knobs.kv_memory_fraction,
                       knobs.kv_block_size, proxy_layers, activation_reserve_bytes=reserve)


def cell_step_model(model: ModelArch, hardware: Hardware, cell: Cell, engine: str | None
                    ) -> StepModel | TrtllmStepModel:
    """The iteration-time model a cell is predicted with: TensorRT-LLM's measured operators, or the roofline."""
    if engine == "trtllm":
        kv_dtype = engine_kv_dtype(engine, cell.precision.weights, cell.precision.kv)
        return trtllm_step_model(model, hardware, cell.layout, cell.precision.weights, kv_dtype,
                                 max_batch_size=cell.engine.max_num_seqs)
    return _step_model(model, hardware, cell.layout, cell.precision.weights, cell.precision.kv,
                       cell.engine.pp_microbatches)


def _memory(model: ModelArch, hardware: Hardware, layout: Layout, precision: Precision, knobs: EngineKnobs,
            proxy_layers: int | None, engine: str | None) -> MemoryPlan:
    # the efficiency constants are part of the key: a hardware profile changes them under the same hardware name
    key = (model.name, model.source, hardware.name, hardware.efficiency, layout, precision.weights, precision.kv,
           knobs.kv_memory_fraction, knobs.kv_block_size, proxy_layers, engine,
           (knobs.max_num_tokens, knobs.max_num_seqs) if engine in ("trtllm", "torch") else None)
    if key not in _MEMORY_CACHE:
        _MEMORY_CACHE[key] = replica_memory(model, hardware, layout, precision.weights, precision.kv, knobs,
                                            proxy_layers, engine)
    return _MEMORY_CACHE[key]


def _step_model(model: ModelArch, hardware: Hardware, layout: Layout, weight_dtype: str, kv_dtype: str,
                pp_microbatches: int | None) -> StepModel:
    key = (model.name, model.source, hardware.name, hardware.efficiency, layout, weight_dtype, kv_dtype,
           pp_microbatches)
    if key not in _STEP_CACHE:
        _STEP_CACHE[key] = build_step_model(model, hardware, layout, weight_dtype, kv_dtype,
                                            pp_microbatches=pp_microbatches)
    return _STEP_CACHE[key]


def _estimate_seconds(cell: Cell, model: ModelArch, hardware: Hardware, memory: MemoryPlan,
                      engine: str | None = None) -> float:
    """Steady state: each replica runs B sequences at the average context ISL + OSL/2; plus prefill."""
    step_model = cell_step_model(model, hardware, cell, engine)
    isl, osl = cell.isl.mean_length, cell.osl.mean_length
    average_context = isl + osl / 2
    batch = max(1, min(cell.engine.max_num_seqs,
                       memory.max_seqs(int(average_context), cell.engine.max_num_seqs),
                       -(-cell.requests // cell.dp)))
    if cell.arrival.mode == "concurrency":
        batch = max(1, min(batch, -(-(cell.arrival.concurrency or 1) // cell.dp)))
    step, _ = step_model.decode_line(batch, batch * average_context)
    decode_seconds = cell.requests * osl / (cell.dp * batch / step)
    chunk = cell.engine.max_num_tokens
    prefill_step = step_model.iteration_time(max(1, int(chunk // max(isl, 1))), chunk, chunk, chunk * isl / 2,
                                             prefill=True)
    prefill_seconds = cell.requests * isl / chunk * prefill_step / cell.dp
    if cell.arrival.mode == "poisson":
        return max(decode_seconds + prefill_seconds, cell.requests / (cell.arrival.rate or 1.0))
    return decode_seconds + prefill_seconds


def plan_rows(planned: list[PlannedCell], gpus_per_node: int) -> list[dict[str, object]]:
    rows = []
    for item in planned:
        cell = item.cell
        rows.append({
            **cell.identity(gpus_per_node),
            "job": item.job,
            "group": cell.group_key,
            "precision": cell.precision.label,
            "feasible": item.feasible,
            "reason": item.reason,
            **item.capacity_columns(),
            "est_seconds": item.est_seconds,
            "est_gpu_hours": item.est_gpu_hours,
        })
    return rows


def write_plan(planned: list[PlannedCell], gpus_per_node: int, path: Path) -> Path:
    import polars as pl

    from infscale.results.io import write_table_atomic

    frame = pl.DataFrame(plan_rows(planned, gpus_per_node), infer_schema_length=None)
    return write_table_atomic(frame.to_arrow(), path)
