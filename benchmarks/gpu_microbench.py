"""GPU microbenchmarks for the performance model's constants, as the first session ran them (run on the GPU
machine; needs torch and this package: PYTHONPATH=src). `python -m infscale.microbench` measures all of this and
more; this script keeps the first session's command, its all-reduce sizes and its output keys.

  python benchmarks/gpu_microbench.py --out DIR [--allreduce-gpus 2 4]

Measures, on GPU 0 unless said otherwise (CUDA events after warm-up, median of repeats, as METHOD.md asks):
  hbm_read     bytes read / time of a full reduction over a 4 GiB bf16 tensor
  hbm_copy     (bytes read + written) / time of a 4 GiB device-to-device copy
  gemm         bf16 (and fp8 where torch._scaled_mm runs) C = A·Bᵀ at decode shapes: M = 1…512 rows against the
               weight matrices of Llama-3.1-8B at TP1 (N×K = 6144×4096 qkv, 4096×4096 o, 28672×4096 gate/up,
               4096×14336 down); FLOP/s and weight-read bandwidth
  allreduce    NCCL all-reduce of 8 KiB … 1 GiB on 2 and 4 GPUs (one process per GPU): latency and bus bandwidth
               2(n−1)/n · size / time
Writes DIR/microbench.json with the GPU, driver, torch and CUDA versions and the UTC date. The memory and GEMM
timings are infscale.microbench's own functions at their GPU sizes.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from infscale.microbench import GIB, Sizes, bench_gemm, median_seconds
from infscale.microbench import bench_memory as _bench_memory
from infscale.microbench import environment as _environment

GPU = Sizes(cuda=True)  # 4 GiB buffers, M = 1…512, 20 repeats after 5 warm-ups: this script's sizes


def timed(fn, repeats: int = 20, warmup: int = 5) -> float:
    """Median seconds of `fn` by CUDA events, after warm-up (also used by gpu_fastpath_checks.py)."""
    return median_seconds(fn, True, repeats, warmup)


def bench_memory() -> dict[str, float]:
    return _bench_memory(GPU)


def bench_llama8b_gemm() -> list[dict[str, object]]:
    """The decode GEMMs of Llama-3.1-8B at TP1 (qkv 6144×4096, o 4096×4096, gate/up 28672×4096, down 4096×14336)."""
    return bench_gemm(GPU, ["llama-3.1-8b"], [1])


def _allreduce_worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    results = []
    size = 8 * 1024
    while size <= GIB:
        x = torch.ones(size // 2, dtype=torch.bfloat16, device="cuda")
        dist.all_reduce(x)
        dist.barrier()
        seconds = timed(lambda: dist.all_reduce(x), repeats=20 if size < 256 * 1024**2 else 8, warmup=3)
        results.append({"bytes": size, "seconds": seconds,
                        "bus_bytes_per_s": 2 * (world - 1) / world * size / seconds})
        size *= 4
    check = torch.full((1024,), float(rank + 1), device="cuda")  # correctness once: sum of 1..world
    dist.all_reduce(check)
    correct = bool((check == world * (world + 1) / 2).all())
    if rank == 0:
        queue.put({"world": world, "sizes": results, "sum_correct": correct})
    dist.destroy_process_group()


def bench_allreduce(world: int) -> dict[str, object]:
    if torch.cuda.device_count() < world:
        return {"world": world, "error": f"only {torch.cuda.device_count()} GPU(s)"}
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = 29500 + world
    procs = [ctx.Process(target=_allreduce_worker, args=(r, world, port, queue)) for r in range(world)]
    for p in procs:
        p.start()
    result = queue.get(timeout=600)
    for p in procs:
        p.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--allreduce-gpus", type=int, nargs="*", default=[2, 4])
    parser.add_argument("--skip-gemm", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, object] = {"environment": _environment(cuda=True)}
    report["memory"] = bench_memory()
    print(json.dumps(report["memory"]), flush=True)
    if not args.skip_gemm:
        report["gemm"] = bench_llama8b_gemm()
    report["allreduce"] = [bench_allreduce(w) for w in args.allreduce_gpus if w > 1]
    (args.out / "microbench.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out / 'microbench.json'}")


if __name__ == "__main__":
    main()
