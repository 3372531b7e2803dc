"""One process per GPU for a cell: DP replicas on disjoint ranks, each replica `tp * pp` consecutive ranks.

Rank 0 leads: it sends each cell's `CellWork` to every rank over a CPU (gloo) control group. Every rank builds its
part of its replica (model, KV pool, warm-up), the ranks agree that all of them are ready and on the KV pool size,
then the DP replicas serve their requests at the same time, each through the shared serving core, while every
rank samples its own GPU's telemetry. Rank 0 gathers one `RankReport` per rank.

Where the processes come from:
- `SpawnedRanks`: this (driver) process starts `world` processes with torch.multiprocessing (local runs, tests);
- `JoinedRanks`: the processes are the Slurm tasks of the job (one per GPU, started by submitit); this process is
  task 0 and the other tasks run `follow()` (see launch/jobfn.py).

Routing is decided up front (`serving.cluster.static_routes`): replicas in separate processes cannot see each
other's live load, so least-loaded routing of Poisson arrivals is refused here.
"""

from __future__ import annotations

import gc
import os
import socket
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from infscale.backends.torch.executor import TorchExecutor
from infscale.backends.torch.model import DecoderModel
from infscale.backends.torch.parallel import ParallelContext, kv_heads_local
from infscale.backends.torch.routing import ExpertPopularity
from infscale.backends.torch.spawn import DTYPES, free_port, init_rank
from infscale.campaign.spec import Arrival
from infscale.catalog.models import ModelArch
from infscale.memory import device_kv_budget_bytes
from infscale.serving.cluster import ReplicaConfig, Route, run_route
from infscale.serving.scheduler import Replica, RequestState, SeriesLog
from infscale.serving.workload import Requests
from infscale.telemetry import GpuSampler, GpuTelemetry

STATE_COLUMNS = ("replica", "arrival", "first_token", "finish", "preemptions")
# a rank that stops answering (NCCL hang, dead peer) fails the cell after this long instead of holding the job
COLLECTIVE_TIMEOUT = timedelta(minutes=float(os.environ.get("INFSCALE_RANK_TIMEOUT_MIN", "30")))
CPU_KV_BYTES = int(os.environ.get("INFSCALE_TORCH_CPU_KV_BYTES", str(256 * 1024**2)))


class RankFailure(RuntimeError):
    """A rank could not run its part of the cell; the message starts with the rank and host."""


@dataclass
class CellWork:
    """Everything a rank needs to run its part of one cell."""

    arch: ModelArch
    tp: int
    pp: int
    dp: int
    requests: Requests
    routes: list[Route]
    arrival: Arrival
    config: ReplicaConfig               # num_blocks = the most any replica may use (plan and need); ranks lower it
    dtype: str = "bfloat16"
    seed: int = 0
    num_layers: int | None = None       # a layer-sliced proxy: run this many layers, scale steps to arch's
    ep: int = 1                         # MoE experts split over ep groups of the TP ranks
    pp_microbatches: int = 1            # pp: decode pipelined over the stages; 1: the stages in turn
    popularity: ExpertPopularity = field(default_factory=ExpertPopularity)
    kv_memory_fraction: float = 0.9     # of the device's memory for weights + activations + KV (as the planner)
    # kept free beside weights and KV for the largest iteration and the workspaces (memory.torch_engine_reserve_bytes)
    activation_reserve_bytes: float = 2 * 1024**3
    telemetry_interval_s: float = 0.1


@dataclass
class ReplicaOutcome:
    """One DP replica's results, from its driver rank: its requests' timelines and its scheduler log."""

    index: int
    ids: np.ndarray
    columns: dict[str, np.ndarray]
    log: SeriesLog
    num_blocks: int
    prefill_time: float
    busy_time: float
    decode_steps: int
    expert_counts: dict[int, np.ndarray]
    engine_path: str = "eager"          # cuda_graphs when the replica's decode steps ran as CUDA graphs
    scaling: dict | None = None         # a proxy's step-time scaling (proxy.LayerScaling.provenance)


@dataclass
class RankReport:
    rank: int
    host: str
    device: str
    replica: ReplicaOutcome | None = None
    telemetry: GpuTelemetry | None = None
    error: str | None = None


# ------------------------------------------------------------------------------------------- one rank


class RankMember:
    """This process's place in the world and what it keeps between cells (groups, the last model)."""

    def __init__(self, rank: int, world: int, device: torch.device):
        self.rank, self.world, self.device = rank, world, device
        self.host = socket.gethostname()
        # collectives of the control plane run on CPU tensors: gloo, whatever the model's backend is
        # (a one-rank member runs in the calling process and touches no process group)
        self.control = dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT) \
            if world > 1 and dist.get_backend() != "gloo" else None
        self._contexts: dict[tuple[int, int, int], ParallelContext] = {}
        self._model_key: tuple | None = None
        self._model: DecoderModel | None = None

    # ------------------------------------------------------------------------------ lead / follow

    def lead(self, work: CellWork | None) -> list[RankReport]:
        """Rank 0: send `work` (None: stop) to every rank, run this rank's part, gather every rank's report."""
        if self.world > 1:
            dist.broadcast_object_list([work], src=0, group=self.control)
        return self._run(work) if work is not None else []

    def follow(self) -> None:
        """Ranks > 0: run each cell rank 0 sends until it sends None."""
        while True:
            box: list[Any] = [None]
            dist.broadcast_object_list(box, src=0, group=self.control)
            if box[0] is None:
                return
            self._run(box[0])

    # ------------------------------------------------------------------------------ a cell

    def _run(self, work: CellWork) -> list[RankReport]:
        report = RankReport(self.rank, self.host, self._device_name())
        executor = None
        try:
            ctx = self._context(work)  # every rank takes part in creating every replica's groups
            executor, replica_config = self._build(work, ctx)
            replica_index = self.rank // (work.tp * work.pp)
            report.replica, report.telemetry = self._serve(work, ctx, executor, replica_config, replica_index)
        except _PeerFailed:
            report.error = None  # another rank's error is the one reported
        except Exception as err:
            report.error = _describe(self.rank, self.host, err)
        finally:
            del executor
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        if self.world == 1:
            return [report]
        reports: list[RankReport] | None = [None] * self.world if self.rank == 0 else None  # type: ignore[list-item]
        dist.gather_object(report, reports, dst=0, group=self.control)
        return reports or []

    def _context(self, work: CellWork) -> ParallelContext:
        key = (work.tp, work.pp, work.dp, work.ep)
        if key not in self._contexts:
            size = work.tp * work.pp
            if size * work.dp != self.world:
                raise RankFailure(f"the cell needs {size * work.dp} ranks, this group has {self.world}")
            mine = None
            for replica in range(work.dp):
                ctx = ParallelContext.create(work.tp, work.pp, base_rank=replica * size, ep=work.ep)
                if ctx is not None and replica == self.rank // size:
                    mine = ctx
            self._contexts[key] = mine if mine is not None else ParallelContext.single()
        return self._contexts[key]

    def _build(self, work: CellWork, ctx: ParallelContext) -> tuple[TorchExecutor, ReplicaConfig]:
        """Model (kept for the next cell when it is the same), KV pool, warm-up; the ranks agree on the pool."""
        error = None
        blocks = 0
        try:
            model = self._model_for(work, ctx)
            blocks = self._device_blocks(work, model)
        except Exception as err:
            error = _describe(self.rank, self.host, err)
        blocks = self._agree_min(blocks, error)
        num_blocks = min(work.config.num_blocks, blocks)
        config = ReplicaConfig(num_blocks, work.config.block_size, work.config.max_num_seqs,
                               work.config.max_num_tokens, work.config.capacity_policy)
        executor = None
        try:
            executor = TorchExecutor(model, num_blocks, config.block_size, work.requests.isl, work.requests.osl,
                                     work.seed, pp_microbatches=work.pp_microbatches)
            executor.warmup()  # kernel tuning, CUDA-graph capture, first-use costs: never inside the measurement
            if work.num_layers is not None and work.num_layers < work.arch.num_layers:
                executor.calibrate_proxy(work.arch.num_layers)  # from here on, steps count as the full model's
        except Exception as err:
            error = _describe(self.rank, self.host, err)
        self._agree_min(num_blocks, error)
        return executor, config  # type: ignore[return-value]

    def _model_for(self, work: CellWork, ctx: ParallelContext) -> DecoderModel:
        key = (work.arch.model_dump_json(), work.tp, work.pp, work.ep, work.dp, work.dtype, work.seed,
               work.num_layers, work.popularity)
        if key != self._model_key:
            self._model = None  # free the last one before building the next
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self._model = DecoderModel(work.arch, ctx, DTYPES[work.dtype], self.device, work.seed, work.num_layers,
                                       work.popularity)
            self._model_key = key
        self._model.reset_expert_counts()
        return self._model

    def _device_blocks(self, work: CellWork, model: DecoderModel) -> int:
        """KV blocks this rank can hold: what the planner's arithmetic leaves on this device (device_kv_budget_bytes;
        a fixed budget on CPU)."""
        arch = work.arch
        layers = len(model.layer_ids)
        heads = kv_heads_local(arch.num_kv_heads, work.tp)
        per_token = 2 * layers * heads * arch.head_dim * torch.tensor([], dtype=DTYPES[work.dtype]).element_size()
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            # as the planner counts: the fraction of the device's memory, less what is held now (weights, the CUDA
            # context), less the reserve for the largest iteration, the graphs and the workspaces (allocated later)
            budget = int(device_kv_budget_bytes(free, total, work.kv_memory_fraction, work.activation_reserve_bytes))
        else:
            budget = CPU_KV_BYTES
        return max(1, budget // (per_token * work.config.block_size))

    def _agree_min(self, value: int, error: str | None) -> int:
        """Every rank's value and error; the smallest value, or stop every rank when any of them failed."""
        gathered: list[Any] = [(value, error)]
        if self.world > 1:
            gathered = [None] * self.world
            dist.all_gather_object(gathered, (value, error), group=self.control)
        errors = [e for _, e in gathered if e]
        if errors:
            if error:
                raise RankFailure(error)
            raise _PeerFailed(errors[0])
        return min(v for v, _ in gathered)

    def _serve(self, work: CellWork, ctx: ParallelContext, executor: TorchExecutor, config: ReplicaConfig,
               index: int) -> tuple[ReplicaOutcome | None, GpuTelemetry | None]:
        requests = work.requests
        state = RequestState(requests.isl.copy(), requests.osl.copy(), requests.arrival.copy())
        replica = Replica(index, state, executor, config.num_blocks, config.block_size, config.max_num_seqs,
                          config.max_num_tokens, config.capacity_policy)
        uuids = [_uuid(self.device)] if self.device.type == "cuda" else []
        sampler = GpuSampler(uuids, work.telemetry_interval_s) if uuids else None
        if sampler:
            sampler.start()
        try:
            run_route(replica, work.routes[index], requests.arrival)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        finally:
            telemetry = sampler.stop() if sampler else None
        ids = np.asarray(replica.planned if replica.planned else work.routes[index].ids(), dtype=np.int64)
        executor.check_outputs(ids)  # no number from a run whose outputs are wrong
        if not ctx.is_driver:
            return None, telemetry
        outcome = ReplicaOutcome(
            index=index, ids=ids, columns={name: getattr(state, name)[ids].copy() for name in STATE_COLUMNS},
            log=replica.log, num_blocks=config.num_blocks, prefill_time=replica.prefill_time,
            busy_time=replica.busy_time, decode_steps=executor.decode_iterations,
            expert_counts=executor.model.expert_counts(),
            engine_path="eager" if executor.graphs is None else "cuda_graphs",
            scaling=executor.scaling.provenance() if executor.scaling is not None else None)
        return outcome, telemetry

    def _device_name(self) -> str:
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"


class _PeerFailed(RuntimeError):
    """Another rank failed while building; this rank stops the cell quietly (its error is reported)."""


def _uuid(device: torch.device) -> str:
    return f"GPU-{torch.cuda.get_device_properties(device).uuid}"


def _describe(rank: int, host: str, err: BaseException) -> str:
    last = traceback.format_exception_only(type(err), err)[-1].strip()
    return f"rank {rank} on {host}: {last}"


def check_reports(reports: list[RankReport]) -> list[RankReport]:
    """Raise the first rank's error (its message keeps the original, e.g. 'CUDA out of memory', so the runner
    classifies it); else the reports."""
    errors = [r.error for r in reports if r.error]
    if errors:
        raise RankFailure(errors[0])
    return reports


# ------------------------------------------------------------------------------------------- process groups


def init_process_group(rank: int, world: int, local_rank: int, init_method: str) -> RankMember:
    device = init_rank(rank, world, local_rank, init_method, COLLECTIVE_TIMEOUT)
    return RankMember(rank, world, device)


def _spawned_main(rank: int, world: int, port: int, commands: Any, results: Any) -> None:
    member = init_process_group(rank, world, rank, f"tcp://127.0.0.1:{port}")
    try:
        if rank != 0:
            member.follow()
            return
        while True:
            work = commands.get()
            try:
                reports = member.lead(work)
                results.put(("ok", reports))
            except Exception as err:
                results.put(("error", _describe(rank, member.host, err)))
            if work is None:
                return
    finally:
        dist.destroy_process_group()


class SpawnedRanks:
    """`world` local processes (one per GPU, or gloo on CPU) kept alive across cells of the same world size."""

    def __init__(self, world: int):
        self.world = world
        context = mp.get_context("spawn")
        self._commands, self._results = context.Queue(), context.Queue()
        port = free_port()
        self._processes = [
            context.Process(target=_spawned_main, name=f"infscale-rank{rank}", daemon=True,
                            args=(rank, world, port, self._commands if rank == 0 else None,
                                  self._results if rank == 0 else None))
            for rank in range(world)
        ]
        for process in self._processes:
            process.start()

    def run(self, work: CellWork) -> list[RankReport]:
        self._commands.put(work)
        while True:
            try:
                status, payload = self._results.get(timeout=1.0)
                break
            except Exception:  # queue.Empty: check that every rank is still alive
                dead = [(p.name, p.exitcode) for p in self._processes if p.exitcode is not None]
                if dead:
                    self.close()
                    raise RankFailure(f"{dead[0][0]} exited with code {dead[0][1]} during the cell") from None
        if status == "error":
            raise RankFailure(payload)
        return check_reports(payload)

    def close(self) -> None:
        if all(p.exitcode is None for p in self._processes):
            self._commands.put(None)
        deadline = time.monotonic() + 30
        for process in self._processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.terminate()
                process.join()

    @property
    def alive(self) -> bool:
        return all(p.is_alive() for p in self._processes)


class JoinedRanks:
    """The Slurm tasks of this job, already in one process group; this process is rank 0."""

    def __init__(self, member: RankMember):
        if member.rank != 0:
            raise ValueError("only rank 0 leads; the other tasks call RankMember.follow()")
        self.member = member
        self.world = member.world

    def run(self, work: CellWork) -> list[RankReport]:
        return check_reports(self.member.lead(work))

    def close(self) -> None:
        self.member.lead(None)
        dist.destroy_process_group()

    @property
    def alive(self) -> bool:
        return True


def join_slurm_tasks() -> RankMember:
    """Join the job's tasks (submitit sets their rank, world size and the first node's address)."""
    from submitit.helpers import TorchDistributedEnvironment

    env = TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return init_process_group(env.rank, env.world_size, env.local_rank, "env://")
