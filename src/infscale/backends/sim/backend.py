"""The `sim` backend: the analytical step-time model driving the shared serving core. No GPU, seconds per cell."""

from __future__ import annotations

from infscale.backends.base import Artefact, BuildSpec, CellResult, InfeasibleCell
from infscale.backends.sim.stepmodel import SimExecutor
from infscale.perfmodel import build_step_model
from infscale.campaign import Campaign, Cell
from infscale.memory import plan_memory
from infscale.serving.cluster import ReplicaConfig, serve
from infscale.serving.metrics import request_rows, series_rows, summarize
from infscale.serving.workload import generate_requests


class SimBackend:
    name = "sim"

    def prepare(self, build: BuildSpec, campaign: Campaign) -> Artefact:
        return Artefact(build=build, info={"engine": "infscale-sim"})

    def measure(self, cell: Cell, artefact: Artefact, campaign: Campaign) -> CellResult:
        model = campaign.model_for(cell)
        hardware = campaign.hardware
        memory = plan_memory(model, hardware, cell.layout, cell.precision.weights, cell.precision.kv,
                             cell.engine.kv_memory_fraction, cell.engine.kv_block_size)
        problem = memory.problem(cell.isl.max_length + cell.osl.max_length, cell.model, cell.layout)
        if problem:
            raise InfeasibleCell(problem)
        step_model = build_step_model(model, hardware, cell.layout, cell.precision.weights, cell.precision.kv)
        requests = generate_requests(cell.isl, cell.osl, cell.requests, cell.arrival, cell.seed)
        config = ReplicaConfig(memory.kv_blocks_per_replica, cell.engine.kv_block_size, cell.engine.max_num_seqs,
                               cell.engine.max_num_tokens)
        executor = SimExecutor(step_model)
        state, replicas = serve(requests, cell.dp, config, cell.arrival, cell.engine.router, lambda _: executor)
        return CellResult(
            summary=summarize(state, replicas, cell.layout.gpus),
            requests=request_rows(state),
            series=series_rows(replicas),
            predicted=True,
        )
