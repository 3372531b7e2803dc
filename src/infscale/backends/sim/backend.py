"""The `sim` backend: the analytical step-time model driving the shared serving core. No GPU, seconds per cell."""

from __future__ import annotations

import os
import re
import time

from infscale.backends.base import Artefact, BuildSpec, CellResult, InfeasibleCell
from infscale.backends.sim.stepmodel import SimExecutor, TrtllmExecutor
from infscale.campaign import Campaign, Cell
from infscale.campaign.plan import cell_step_model, replica_memory
from infscale.serving.cluster import ReplicaConfig, serve
from infscale.serving.metrics import request_rows, series_rows, summarize
from infscale.serving.workload import generate_requests

# Fault injection, to test the launcher end to end on a real Slurm cluster without GPUs (docs/slurm.md):
#   INFSCALE_SIM_DELAY_S=2           every cell takes at least 2 s of wall time
#   INFSCALE_SIM_FAIL=oom:REGEX      cells whose id matches REGEX raise a CUDA out-of-memory error
#   INFSCALE_SIM_FAIL=nccl:REGEX     … an NCCL error (the node is suspect); error:REGEX … a plain error
_FAULTS = {
    "oom": "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB (injected by INFSCALE_SIM_FAIL)",
    "nccl": "NCCL error: unhandled system error, NCCL version 2.21.5 (injected by INFSCALE_SIM_FAIL)",
    "error": "ValueError: injected failure (INFSCALE_SIM_FAIL)",
}


def _inject_faults(cell_id: str) -> None:
    delay = float(os.environ.get("INFSCALE_SIM_DELAY_S", "0") or 0)
    if delay > 0:
        time.sleep(delay)
    spec = os.environ.get("INFSCALE_SIM_FAIL")
    if spec:
        kind, _, pattern = spec.partition(":")
        if kind not in _FAULTS:
            raise ValueError(f"INFSCALE_SIM_FAIL={spec!r}: kind must be one of {', '.join(_FAULTS)}")
        if re.search(pattern, cell_id):
            raise RuntimeError(_FAULTS[kind])


class SimBackend:
    name = "sim"

    def prepare(self, build: BuildSpec, campaign: Campaign) -> Artefact:
        return Artefact(build=build, info={"engine": "infscale-sim"})

    def measure(self, cell: Cell, artefact: Artefact, campaign: Campaign) -> CellResult:
        _inject_faults(cell.id)
        model = campaign.model_for(cell)
        hardware = campaign.hardware
        # a proxy cell is predicted for the full model (the sim has no slice to scale): the row keeps its
        # proxy_layers label, and the prediction is what the proxy's scaled measurement stands for
        engine = campaign.sim_engine
        memory = replica_memory(model, hardware, cell.layout, cell.precision.weights, cell.precision.kv,
                                cell.engine, cell.proxy_layers, engine)
        problem = memory.problem(cell.isl.max_length + cell.osl.max_length, cell.model, cell.layout)
        if problem:
            raise InfeasibleCell(problem)
        step_model = cell_step_model(model, hardware, cell, engine)
        executor = TrtllmExecutor(step_model) if engine == "trtllm" else SimExecutor(step_model)
        # TensorRT-LLM's capacity scheduler guarantees no eviction unless told otherwise; the roofline model
        # schedules as vLLM does (preemption by recompute)
        policy = cell.engine.scheduler_policy or ("guaranteed_no_evict" if engine == "trtllm" else "max_utilization")
        requests = generate_requests(cell.isl, cell.osl, cell.requests, cell.arrival, cell.seed)
        config = ReplicaConfig(memory.kv_blocks_per_replica, cell.engine.kv_block_size, cell.engine.max_num_seqs,
                               cell.engine.max_num_tokens, policy)
        state, replicas = serve(requests, cell.dp, config, cell.arrival, cell.engine.router, lambda _: executor)
        return CellResult(
            summary={**summarize(state, replicas, cell.layout.gpus), "kv_pool_blocks": config.num_blocks},
            requests=request_rows(state),
            series=series_rows(replicas),
            predicted=True,
            provenance=_provenance(cell, model.num_layers, campaign, engine, policy),
        )


def _provenance(cell: Cell, full_layers: int, campaign: Campaign, engine: str | None = None,
                policy: str | None = None) -> dict[str, object] | None:
    """What the prediction rests on beyond the cell: the engine model and its data, the hardware profile's
    constants, a proxy's label."""
    provenance: dict[str, object] = {}
    if engine == "trtllm":
        from infscale.opdata import data_version

        provenance["engine_model"] = {"engine": "trtllm", "operator_data": data_version(),
                                      "capacity_policy": policy,
                                      "method": "iteration times composed from measured TensorRT-LLM operator "
                                                "latencies (docs/perfmodel.md §7)"}
    if campaign.profile is not None:
        provenance["hardware_profile"] = campaign.profile.provenance()
    if cell.proxy_layers is not None:
        provenance["proxy"] = {"proxy_layers": cell.proxy_layers, "full_layers": full_layers,
                               "method": "none: the sim predicts the full model; proxy_layers only labels the cell"}
    return provenance or None
