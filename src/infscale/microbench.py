"""Microbenchmarks of one node for the performance model's constants (`infscale microbench`, the `microbench` rule).

Measured on the GPUs when CUDA is present (CUDA events after warm-up, medians, as the device METHOD asks), else on
the CPU with small sizes and the gloo backend (wall clock) so the same code runs in tests; the device is recorded
in `environment` and `infscale calibrate` refuses a CPU measurement for a GPU.

  memory       HBM read (a reduction) and copy bandwidth over a large buffer
  gemm         C = A·Bᵀ at decode shapes, M = 1…512 rows, against each chosen model's projection matrices sharded
               for TP = 1 and each measured GPU count; bf16, and fp8 where torch._scaled_mm runs
  attention    the torch engine's paged decode attention (its Triton kernel on GPU, the torch reference on CPU)
               for one layer of the first model against context length; KV bytes read per second
  allreduce    all-reduce latency and bus bandwidth, 2(n−1)/n · size / time (the historical key)
  engine_overhead  the torch engine's cost per iteration, as its clock counts it, for a model that does next to
               no work (2 layers, hidden 64): scheduling, launch and sampling
  collectives  per GPU count: all-reduce, all-gather, all-to-all, and the PP hand-off (a broadcast in a 2-rank
               group, as the engine's stages pass activations; half a round trip) across message sizes;
               eager and, for small messages on a GPU, per call of 20 captured in a CUDA graph

Writes microbench.json and the same measurements as tidy rows in microbench.parquet. Needs only torch, pyarrow
and this package's catalog (no polars/submitit), so it also runs on a bare GPU machine.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from infscale.catalog import get_model
from infscale.results.io import write_text_atomic

KIB, MIB, GIB = 1024, 1024**2, 1024**3
FORMAT_VERSION = 2  # 1: benchmarks/gpu_microbench.py (memory, gemm, allreduce); 2 adds attention, collectives
# and engine_overhead


# torch ≥ 2.12 renamed all_gather_into_tensor (the GPU machine has 2.11)
ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class Sizes:
    """How big and how many: full sizes on a GPU, small ones on the CPU (tests, dry runs)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.buffer_bytes = 4 * GIB if cuda else 16 * MIB
        self.rows = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512] if cuda else [1, 8, 64]
        self.message_bytes = [KIB * 4**i for i in range(11)] if cuda else [KIB * 4**i for i in range(6)]
        self.allreduce_max = GIB if cuda else MIB
        self.contexts = [1024, 2048, 4096, 8192, 16384, 32768] if cuda else [256, 1024]
        self.attention_batch = 32 if cuda else 2
        self.repeats = 20 if cuda else 5
        self.warmup = 5 if cuda else 1


def timed(fn: Callable[[], object], sizes: Sizes, repeats: int | None = None) -> float:
    """Median seconds of `fn` after warm-up: CUDA events on a GPU, the wall clock on the CPU."""
    return median_seconds(fn, sizes.cuda, repeats or sizes.repeats, sizes.warmup)


def median_seconds(fn: Callable[[], object], cuda: bool, repeats: int, warmup: int) -> float:
    """Median seconds of `repeats` calls of `fn` after `warmup` calls: between CUDA events when `cuda`, else by the
    wall clock (the timing every GPU benchmark script here uses too)."""
    for _ in range(warmup):
        fn()
    times = []
    if cuda:
        torch.cuda.synchronize()
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeats):
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    return statistics.median(times)


def device_of(sizes: Sizes) -> torch.device:
    return torch.device("cuda" if sizes.cuda else "cpu")


# ------------------------------------------------------------------------------------------------ one device


def bench_memory(sizes: Sizes) -> dict[str, float]:
    x = torch.randn(sizes.buffer_bytes // 2, dtype=torch.bfloat16, device=device_of(sizes))
    y = torch.empty_like(x)
    read = timed(lambda: x.sum(dtype=torch.float32), sizes)
    copy = timed(lambda: y.copy_(x), sizes)
    nbytes = x.numel() * x.element_size()
    return {"hbm_read_bytes_per_s": nbytes / read, "hbm_copy_bytes_per_s": 2 * nbytes / copy, "buffer_bytes": nbytes}


def projection_shapes(model_name: str, tp: int) -> dict[str, tuple[int, int]]:
    """(N, K) of a dense decoder layer's projections on one GPU of TP `tp` (q/k/v fused, gate/up fused)."""
    arch = get_model(model_name)
    heads = arch.num_attention_heads // tp
    kv_heads = max(1, arch.num_kv_heads // tp)
    return {"qkv": ((heads + 2 * kv_heads) * arch.head_dim, arch.hidden_size),
            "o": (arch.hidden_size, heads * arch.head_dim),
            "gate_up": (2 * arch.intermediate_size // tp, arch.hidden_size),
            "down": (arch.hidden_size, arch.intermediate_size // tp)}


def bench_gemm(sizes: Sizes, models: list[str], tps: list[int]) -> list[dict[str, object]]:
    device = device_of(sizes)
    fp8 = sizes.cuda and hasattr(torch, "float8_e4m3fn") and torch.cuda.get_device_capability() >= (8, 9)
    rows: list[dict[str, object]] = []
    seen: set[tuple[int, int]] = set()
    for model in models:
        for tp in tps:
            for name, (n, k) in projection_shapes(model, tp).items():
                if (n, k) in seen:  # the same matrix shape twice would be measured twice for nothing
                    continue
                seen.add((n, k))
                weight = torch.randn(n, k, dtype=torch.bfloat16, device=device) * 0.02
                common = {"model": model, "tp": tp, "matrix": name, "n": n, "k": k}
                for m in sizes.rows:
                    a = torch.randn(m, k, dtype=torch.bfloat16, device=device)
                    seconds = timed(lambda: torch.mm(a, weight.t()), sizes)
                    rows.append({**common, "dtype": "bf16", "m": m, "seconds": seconds,
                                 "tflops": 2 * m * n * k / seconds / 1e12, "weight_bytes_per_s": n * k * 2 / seconds})
                    if fp8:
                        rows.append(_fp8_row(common, a, weight, sizes))
    return rows


def _fp8_row(common: dict[str, object], a: torch.Tensor, weight: torch.Tensor, sizes: Sizes) -> dict[str, object]:
    m, n, k = a.shape[0], weight.shape[0], weight.shape[1]
    one = torch.ones((), device=a.device)
    weight8 = weight.to(torch.float8_e4m3fn)
    padded = max(16, -(-m // 16) * 16)  # _scaled_mm wants dimensions that are multiples of 16
    a8 = torch.nn.functional.pad(a.float(), (0, 0, 0, padded - m)).to(torch.float8_e4m3fn)
    try:
        seconds = timed(lambda: torch._scaled_mm(a8, weight8.t(), scale_a=one, scale_b=one,
                                                 out_dtype=torch.bfloat16), sizes)
    except RuntimeError as err:  # record why, never a number that was not measured
        return {**common, "dtype": "fp8", "m": m, "error": str(err)[:200]}
    return {**common, "dtype": "fp8", "m": m, "seconds": seconds, "tflops": 2 * m * n * k / seconds / 1e12,
            "weight_bytes_per_s": n * k / seconds}


def bench_attention(sizes: Sizes, model: str, block_size: int = 16) -> dict[str, object]:
    """One layer's paged decode attention of `model` at TP1: a batch of equal contexts, KV bytes read per second."""
    arch = get_model(model)
    device = device_of(sizes)
    batch, heads, kv_heads, dim = sizes.attention_batch, arch.num_attention_heads, arch.num_kv_heads, arch.head_dim
    if sizes.cuda:
        from infscale.backends.torch import triton_attention

        kernel, name = triton_attention.paged_decode_attention, "triton paged decode kernel"
    else:
        from infscale.backends.torch import attention

        kernel, name = attention.paged_decode_attention, "torch reference (attention.py)"
    rows = []
    for context in sizes.contexts:
        blocks = -(-context // block_size)
        pool_shape = (batch * blocks, block_size, kv_heads, dim)
        k_pool = torch.randn(pool_shape, dtype=torch.bfloat16, device=device)
        v_pool = torch.randn(pool_shape, dtype=torch.bfloat16, device=device)
        tables = torch.randperm(batch * blocks, device=device, dtype=torch.int64).view(batch, blocks).to(torch.int32)
        lens = torch.full((batch,), context, dtype=torch.int32, device=device)
        q = torch.randn(batch, heads, dim, dtype=torch.bfloat16, device=device)
        seconds = timed(lambda: kernel(q, k_pool, v_pool, tables, lens), sizes)
        kv_bytes = 2 * batch * context * kv_heads * dim * 2
        rows.append({"context": context, "seconds": seconds, "kv_bytes": kv_bytes,
                     "kv_bytes_per_s": kv_bytes / seconds})
    return {"model": model, "kernel": name, "batch": batch, "block_size": block_size, "heads": heads,
            "kv_heads": kv_heads, "head_dim": dim, "rows": rows}


def bench_engine_overhead(sizes: Sizes) -> dict[str, object]:
    """The torch engine's fixed cost per iteration as its own clock counts it: a 2-layer, hidden-64 model (its
    kernels do next to no work) served through the serving core; what a step still costs is scheduling, launch
    and sampling. Decode-heavy (ISL 8, OSL 64) so most iterations are decode steps (CUDA graphs on a GPU)."""
    import numpy as np

    from infscale.backends.torch.parallel import ParallelContext
    from infscale.backends.torch.spawn import ServeSpec, serve_replica
    from infscale.catalog.models import ModelArch
    from infscale.serving.cluster import ReplicaConfig
    from infscale.serving.workload import Requests

    arch = ModelArch(name="overhead-probe", family="llama", num_layers=2, hidden_size=64, num_attention_heads=4,
                     num_kv_heads=2, head_dim=16, intermediate_size=128, vocab_size=256, max_context=4096,
                     rope_theta=10000.0, source="infscale.microbench (tiny probe)")
    rows = []
    for batch in ([1, 8, 32] if sizes.cuda else [1, 4]):
        isl, osl = np.full(batch, 8), np.full(batch, 64)
        config = ReplicaConfig(num_blocks=batch * 5, block_size=16, max_num_seqs=batch, max_num_tokens=512)
        spec = ServeSpec(arch, Requests(isl, osl, np.zeros(batch)), config,
                         dtype="bfloat16" if sizes.cuda else "float32", warmup=True)
        begin = time.perf_counter()
        result = serve_replica(spec, ParallelContext.single(), device_of(sizes))
        wall = time.perf_counter() - begin
        clock = float(np.nanmax(result.state.finish))  # the engine's clock: the sum of its measured iterations
        steps = result.iterations + result.decode_steps  # scheduled iterations + decode steps run in spans
        rows.append({"batch": batch, "iterations": steps, "decode_steps": result.decode_steps,
                     "graphed_steps": result.fast_steps, "engine_seconds": clock,
                     "seconds_per_iteration": clock / steps, "wall_seconds_with_build": wall})
    return {"model": "2 layers, hidden 64 (llama)", "rows": rows}


# ------------------------------------------------------------------------------------------------ collectives


def _collective_worker(rank: int, world: int, port: int, cuda: bool, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    sizes = Sizes(cuda)
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    device = device_of(sizes)
    # the PP hand-off as the engine does it: a broadcast in a group of the two neighbouring ranks
    pair = dist.new_group([0, 1])
    ops: dict[str, list[dict[str, float]]] = {"all_reduce": [], "all_gather": [], "all_to_all": [], "pp_handoff": []}
    for size in sorted(set(sizes.message_bytes) | {sizes.allreduce_max}):
        repeats = sizes.repeats if size < 256 * MIB else 8
        x = torch.ones(size // 2, dtype=torch.bfloat16, device=device)
        ops["all_reduce"].append(_measure(lambda: dist.all_reduce(x), size, sizes, repeats,
                                          bus_factor=2 * (world - 1) / world))
        if size > sizes.message_bytes[-1]:
            continue  # only the all-reduce goes on to the largest size (its bandwidth is a profile constant)
        gathered = torch.empty(world * x.numel(), dtype=x.dtype, device=device)
        ops["all_gather"].append(_measure(lambda: ALL_GATHER(gathered, x), size * world, sizes, repeats,
                                          bus_factor=(world - 1) / world))
        if x.numel() % world == 0 and (cuda or world > 1):
            exchanged = torch.empty_like(x)
            ops["all_to_all"].append(_measure(lambda: dist.all_to_all_single(exchanged, x), size, sizes, repeats,
                                              bus_factor=(world - 1) / world))
        if rank in (0, 1):
            def round_trip() -> None:  # there and back: the latency of one hand-off is half of it
                dist.broadcast(x, src=0, group=pair)
                dist.broadcast(x, src=1, group=pair)
            row = _measure(round_trip, size, sizes, repeats, bus_factor=1.0, group=pair)
            for key in ("seconds", "graph_seconds"):
                if key in row:
                    row[key] /= 2
            for key in ("bus_bytes_per_s", "graph_bus_bytes_per_s"):
                if key in row:
                    row[key] *= 2
            ops["pp_handoff"].append(row)
        dist.barrier()
    check = torch.full((1024,), float(rank + 1), device=device)  # correctness once: the sum of 1..world
    dist.all_reduce(check)
    correct = bool((check == world * (world + 1) / 2).all())
    if rank == 0:
        queue.put({"world": world, "sum_correct": correct, "ops": ops})
    dist.destroy_process_group()


GRAPHED_MAX_BYTES = 4 * MIB  # messages up to this size are also timed inside a CUDA graph
GRAPHED_CALLS = 20


def _measure(fn: Callable[[], object], size: int, sizes: Sizes, repeats: int, bus_factor: float,
             group: dist.ProcessGroup | None = None) -> dict[str, float]:
    """Eager: one call between CUDA events (launch cost included). Small messages on a GPU also `graph_seconds`:
    GRAPHED_CALLS calls captured in one CUDA graph, per call — how the engine's decode step issues them."""
    dist.barrier(group=group)
    seconds = timed(fn, sizes, repeats)
    row = {"bytes": size, "seconds": seconds, "bus_bytes_per_s": bus_factor * size / seconds}
    if sizes.cuda and size <= GRAPHED_MAX_BYTES:
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            for _ in range(GRAPHED_CALLS):
                fn()
        dist.barrier(group=group)
        row["graph_seconds"] = timed(graph.replay, sizes, repeats) / GRAPHED_CALLS
        row["graph_bus_bytes_per_s"] = bus_factor * size / row["graph_seconds"]
    return row


def bench_collectives(world: int, cuda: bool) -> dict[str, object]:
    if cuda and torch.cuda.device_count() < world:
        return {"world": world, "error": f"only {torch.cuda.device_count()} GPU(s)"}
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as probe:  # a free port for this group's rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    procs = [ctx.Process(target=_collective_worker, args=(r, world, port, cuda, queue)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        result = queue.get(timeout=900)
    finally:
        for p in procs:
            p.join(timeout=60)
    failed = [p.exitcode for p in procs if p.exitcode]
    if failed:
        raise RuntimeError(f"collective benchmark on {world} ranks: worker exit codes {failed}")
    return result


# ------------------------------------------------------------------------------------------------ the report


def environment(cuda: bool) -> dict[str, object]:
    env: dict[str, object] = {"date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "host": socket.gethostname(), "torch": torch.__version__,
                              "device": "cuda" if cuda else "cpu"}
    if cuda:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True).stdout.strip().splitlines()
        env.update(gpus=smi, cuda=torch.version.cuda, device_count=torch.cuda.device_count(),
                   gpu_name=torch.cuda.get_device_name(0))
    else:
        env.update(gpu_name="cpu", device_count=0, cpus=os.cpu_count())
    return env


def microbench_rows(report: dict[str, object]) -> list[dict[str, object]]:
    """The report as tidy rows (one per measurement) for Parquet: what was measured, its size, its time, its rate."""
    env = report.get("environment", {})
    smi = (env.get("gpus") or [""])[0].split(", ")  # nvidia-smi: name, driver, memory, clock
    common = {"gpu_name": env.get("gpu_name"), "driver": smi[1] if len(smi) > 1 else None,
              "date_utc": env.get("date_utc"), "device": env.get("device", "cuda")}
    rows: list[dict[str, object]] = []

    def add(kind: str, op: str, seconds: float | None, rate: float | None, unit: str, **size: object) -> None:
        rows.append({**common, "kind": kind, "op": op, "seconds": seconds, "rate": rate, "rate_unit": unit,
                     "world": None, "bytes": None, "graph_seconds": None, "model": None, "tp": None, "dtype": None,
                     "m": None, "n": None, "k": None, "context": None, "batch": None, **size})

    memory = report.get("memory", {})
    for op, key in (("hbm_read", "hbm_read_bytes_per_s"), ("hbm_copy", "hbm_copy_bytes_per_s")):
        if key in memory:
            add("memory", op, None, memory[key], "B/s", bytes=memory.get("buffer_bytes"))
    for g in report.get("gemm", []):
        if "seconds" in g:
            add("gemm", str(g.get("matrix")), g["seconds"], g["tflops"] * 1e12, "FLOP/s", model=g.get("model"),
                tp=g.get("tp"), dtype=g["dtype"], m=g["m"], n=g["n"], k=g["k"])
    attention = report.get("attention") or {}
    for a in attention.get("rows", []):
        add("attention", "paged_decode", a["seconds"], a["kv_bytes_per_s"], "B/s", model=attention.get("model"),
            context=a["context"], batch=attention.get("batch"), bytes=a["kv_bytes"])
    for curve in report.get("collectives", []):
        for op, measured in curve.get("ops", {}).items():
            for r in measured:
                add("collective", op, r["seconds"], r["bus_bytes_per_s"], "B/s (bus)", world=curve["world"],
                    bytes=r["bytes"], graph_seconds=r.get("graph_seconds"))
    for r in (report.get("engine_overhead") or {}).get("rows", []):
        add("engine_overhead", "iteration", r["seconds_per_iteration"], None, "", batch=r["batch"])
    return rows


def run_microbench(out: Path, worlds: list[int], models: list[str], device: str = "auto",
                   log: Callable[[str], None] = print) -> Path:
    """Measure everything and write OUT/microbench.json (never over an existing file: a measurement is kept)."""
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be auto, cuda or cpu, not {device!r}")
    cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but CUDA is not available here")
    for name in models:
        get_model(name)  # an unknown model fails before anything is measured
    target = Path(out) / "microbench.json"
    if target.exists():
        raise FileExistsError(f"{target} exists; a measurement is never overwritten (move it away to measure again)")
    sizes = Sizes(cuda)
    report: dict[str, object] = {"format_version": FORMAT_VERSION, "environment": environment(cuda)}
    report["memory"] = bench_memory(sizes)
    log(f"memory: read {report['memory']['hbm_read_bytes_per_s'] / 1e9:.0f} GB/s")
    tps = sorted({1, *[w for w in worlds if w > 1]})
    report["gemm"] = bench_gemm(sizes, models, tps)
    log(f"gemm: {len(report['gemm'])} shapes")
    report["attention"] = bench_attention(sizes, models[0])
    log(f"attention: {len(report['attention']['rows'])} contexts")
    report["engine_overhead"] = bench_engine_overhead(sizes)
    log("engine overhead: " + ", ".join(f"batch {r['batch']} {r['seconds_per_iteration'] * 1e6:.0f} us"
                                        for r in report["engine_overhead"]["rows"]))
    collectives = [bench_collectives(w, cuda) for w in worlds if w > 1]
    report["collectives"] = collectives
    report["allreduce"] = [{"world": c["world"], "sum_correct": c["sum_correct"], "sizes": c["ops"]["all_reduce"]}
                           if "ops" in c else c for c in collectives]
    log(f"collectives: {', '.join(str(c['world']) for c in collectives) or 'none'} rank(s)")
    import pyarrow as pa

    from infscale.results.io import write_table_atomic

    write_table_atomic(pa.Table.from_pylist(microbench_rows(report)), target.with_suffix(".parquet"))
    return write_text_atomic(target, json.dumps(report, indent=1))


def main(argv: list[str] | None = None) -> int:
    """`python -m infscale.microbench`: the same as `infscale microbench --out` without the CLI's other imports."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for microbench.json")
    parser.add_argument("--gpus", type=int, nargs="*", default=[2], help="GPU (rank) counts of the collectives")
    parser.add_argument("--models", nargs="+", default=["llama-3.1-8b"], help="catalog models of the GEMM shapes "
                        "(the first also gives the attention shape)")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    args = parser.parse_args(argv)
    print(f"wrote {run_microbench(args.out, args.gpus, args.models, args.device)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
