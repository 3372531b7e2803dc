"""The `torch` backend behind the Backend protocol: one replica per process, measured by the shared serving core.

This first wrapper runs layouts whose replicas are single GPUs (TP = PP = 1; DP replicas are measured one after
the other, each on the same device, so their timelines are what each GPU would see on its own). Multi-rank
replicas (TP/PP) run through `spawn.serve_on_ranks` but are not wired into campaigns yet.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from infscale.backends.base import Artefact, BuildSpec, CellResult
from infscale.backends.torch.executor import TorchExecutor
from infscale.backends.torch.model import DecoderModel
from infscale.backends.torch.parallel import ParallelContext
from infscale.campaign import Campaign, Cell
from infscale.memory import plan_memory
from infscale.serving.cluster import ReplicaConfig, serve
from infscale.serving.metrics import request_rows, series_rows, summarize
from infscale.serving.workload import generate_requests

CPU_KV_BYTES = int(os.environ.get("INFSCALE_TORCH_CPU_KV_BYTES", str(256 * 1024**2)))


class TorchBackend:
    name = "torch"

    def __init__(self, device: str | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def prepare(self, build: BuildSpec, campaign: Campaign) -> Artefact:
        # the model is built per cell (weights are generated on the device in seconds); multi-rank layouts are
        # refused cell by cell in `measure`, so they are recorded as failures with the reason
        return Artefact(build=build, info={"engine": "infscale-torch", "torch": torch.__version__,
                                           "device": str(self.device)})

    def measure(self, cell: Cell, artefact: Artefact, campaign: Campaign) -> CellResult:
        if cell.tp * cell.pp > 1:
            raise NotImplementedError(f"the torch backend runs single-GPU replicas in campaigns so far; "
                                      f"{cell.layout} needs the multi-rank launcher")
        arch = campaign.model_for(cell)
        memory = plan_memory(arch, campaign.hardware, cell.layout, cell.precision.weights, cell.precision.kv,
                             cell.engine.kv_memory_fraction, cell.engine.kv_block_size)
        requests = generate_requests(cell.isl, cell.osl, cell.requests, cell.arrival, cell.seed)
        block = cell.engine.kv_block_size
        needed = int(np.sum(-(-(requests.isl + requests.osl) // block)))
        num_blocks = min(memory.kv_blocks_per_replica, needed, self._device_blocks(arch, block))
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        model = DecoderModel(arch, ParallelContext.single(), dtype, self.device, cell.seed)
        executors: list[TorchExecutor] = []

        def make_executor(_: int) -> TorchExecutor:
            executor = TorchExecutor(model, num_blocks, block, requests.isl, requests.osl, cell.seed)
            executor.warmup()  # kernel tuning, CUDA-graph capture, first-use costs: never inside the measurement
            executors.append(executor)
            return executor

        config = ReplicaConfig(num_blocks, block, cell.engine.max_num_seqs, cell.engine.max_num_tokens)
        state, replicas = serve(requests, cell.dp, config, cell.arrival, cell.engine.router, make_executor)
        for index, executor in enumerate(executors):  # each replica's requests got exactly their OSL tokens
            executor.check_outputs(np.flatnonzero(state.replica == index))
        summary = summarize(state, replicas, cell.layout.gpus)
        return CellResult(summary=summary, requests=request_rows(state), series=series_rows(replicas),
                          predicted=False)

    def _device_blocks(self, arch, block: int) -> int:
        """KV blocks the device can hold now: free CUDA memory (90 %), or a fixed budget on CPU."""
        per_token = 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * (2 if self.device.type == "cuda" else 4)
        budget = int(torch.cuda.mem_get_info(self.device)[0] * 0.9) if self.device.type == "cuda" else CPU_KV_BYTES
        return max(1, budget // (per_token * block))
