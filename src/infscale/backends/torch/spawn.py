"""Run a function on N local ranks, and serve a replica's requests on them.

`run_on_ranks` starts N processes (torch.multiprocessing, spawn), joins them into one process group (gloo on CPU,
NCCL when CUDA is present) and returns each rank's result. On Slurm the same worker functions run under one
task per rank instead (the launcher issue); only the process-group set-up differs.

Control flow of a multi-rank replica: every rank runs the same serving core on the same requests. The scheduler is
deterministic given the executor's durations, and the executor makes all ranks return the driver rank's
durations, so the ranks ask for identical batches with no command channel between them (see executor.py).
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from infscale.backends.torch.executor import TorchExecutor
from infscale.backends.torch.model import DecoderModel
from infscale.backends.torch.parallel import ParallelContext
from infscale.backends.torch.routing import ExpertPopularity
from infscale.campaign.spec import Arrival
from infscale.catalog.models import ModelArch
from infscale.serving.cluster import ReplicaConfig, serve
from infscale.serving.scheduler import RequestState
from infscale.serving.workload import Requests

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def local_device(rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_rank(rank: int, world_size: int, local_rank: int, init_method: str,
              timeout: timedelta | None = None) -> torch.device:
    """Join the process group (NCCL with one GPU per local rank, gloo on CPU); this rank's device."""
    device = local_device(local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
        # N ranks share the host's cores; oversubscribed intra-op threads make gloo collectives crawl
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            **({"timeout": timeout} if timeout else {}))
    return device


def _rank_main(rank: int, fn: Callable[..., Any], world_size: int, port: int, out_dir: str,
               args: tuple[Any, ...]) -> None:
    init_rank(rank, world_size, rank, f"tcp://127.0.0.1:{port}")
    try:
        result = fn(rank, world_size, *args)
        with open(Path(out_dir) / f"rank{rank}.pkl", "wb") as handle:
            pickle.dump(result, handle)
    finally:
        dist.destroy_process_group()


def run_on_ranks(fn: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` fresh processes in one process group; return the
    results in rank order. `fn` must be importable (a module-level function); an exception on any rank is
    raised here with that rank's traceback."""
    with tempfile.TemporaryDirectory(prefix="infscale-ranks-") as out_dir:
        mp.start_processes(_rank_main, args=(fn, world_size, free_port(), out_dir, args), nprocs=world_size,
                           start_method="spawn", join=True)
        results = []
        for rank in range(world_size):
            with open(Path(out_dir) / f"rank{rank}.pkl", "rb") as handle:
                results.append(pickle.load(handle))
    return results


# ---------------------------------------------------------------------------------------------- serving


@dataclass
class ServeSpec:
    """One replica run: the model, its layout and the requests (the executor's KV pool = config.num_blocks)."""

    arch: ModelArch
    requests: Requests
    config: ReplicaConfig
    tp: int = 1
    pp: int = 1
    ep: int = 1
    dtype: str = "bfloat16"
    seed: int = 0
    num_layers: int | None = None
    popularity: ExpertPopularity = field(default_factory=ExpertPopularity)
    arrival: Arrival = field(default_factory=Arrival)
    warmup: bool = False
    fast: bool | None = None            # the executor's CUDA-graph path (None: on for CUDA where supported)
    fast_ops: str | None = None         # "torch" or "triton" (None: triton where available)
    pp_microbatches: int = 1            # pp: pipelined decode (one micro-batch per stage); 1: stages in turn


@dataclass
class ServeResult:
    state: RequestState
    tokens: dict[int, np.ndarray]          # generated tokens per request
    expert_counts: dict[int, np.ndarray]   # MoE layers of this rank's stage
    expert_targets: dict[int, np.ndarray]
    decode_steps: int
    fast_steps: int                      # decode steps run as (captured or recorded) graphs
    iterations: int


def serve_replica(spec: ServeSpec, ctx: ParallelContext, device: torch.device) -> ServeResult:
    """Build the model on this rank and run the requests through the serving core (on every rank)."""
    model = DecoderModel(spec.arch, ctx, DTYPES[spec.dtype], device, spec.seed, spec.num_layers, spec.popularity)
    requests = spec.requests
    executor = TorchExecutor(model, spec.config.num_blocks, spec.config.block_size, requests.isl, requests.osl,
                             spec.seed, fast=spec.fast, fast_ops=spec.fast_ops,
                             pp_microbatches=spec.pp_microbatches)
    if spec.warmup:
        executor.warmup()
    state, _ = serve(requests, 1, spec.config, spec.arrival, "round_robin", lambda _: executor)
    executor.check_outputs()
    return ServeResult(
        state=state,
        tokens={r: executor.generated_tokens(r) for r in range(len(requests))},
        expert_counts=model.expert_counts(),
        expert_targets=model.expert_targets(),
        decode_steps=executor.decode_iterations,
        fast_steps=executor.fast_steps,
        iterations=executor.iterations,
    )


def serve_worker(rank: int, world_size: int, specs: list[ServeSpec]) -> list[ServeResult] | None:
    """Run each spec on ranks 0 … tp*pp-1 of the world (all ranks take part in creating the groups); rank 0
    returns the results."""
    results = []
    for spec in specs:
        ctx = ParallelContext.create(spec.tp, spec.pp, ep=spec.ep)
        if ctx is not None and (ctx.size > 1 or rank == 0):  # a one-rank spec runs on rank 0 only
            results.append(serve_replica(spec, ctx, local_device(rank)))
        dist.barrier()
    return results if rank == 0 else None


def serve_on_ranks(specs: list[ServeSpec]) -> list[ServeResult]:
    """Run the specs one after another on max(tp * pp) spawned ranks; rank 0's results."""
    world = max(spec.tp * spec.pp for spec in specs)
    if world == 1:
        return [serve_replica(spec, ParallelContext.single(), local_device(0)) for spec in specs]
    return run_on_ranks(serve_worker, world, specs)[0]
