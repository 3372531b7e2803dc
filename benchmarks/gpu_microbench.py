"""GPU microbenchmarks for the performance model's constants (run on the GPU machine; needs only torch).

  python benchmarks/gpu_microbench.py --out DIR [--allreduce-gpus 2 4]

Measures, on GPU 0 unless said otherwise (CUDA events after warm-up, median of repeats, as METHOD.md asks):
  hbm_read     bytes read / time of a full reduction over a 4 GiB bf16 tensor
  hbm_copy     (bytes read + written) / time of a 4 GiB device-to-device copy
  gemm         bf16 (and fp8 where torch._scaled_mm runs) C = A·Bᵀ at decode shapes: M = 1…512 rows against the
               weight matrices of Llama-3.1-8B at TP1 (N×K = 6144×4096 qkv, 4096×4096 o, 28672×4096 gate/up,
               4096×14336 down); FLOP/s and weight-read bandwidth
  allreduce    NCCL all-reduce of 8 KiB … 1 GiB on 2 and 4 GPUs (one process per GPU): latency and bus bandwidth
               2(n−1)/n · size / time
Writes DIR/microbench.json with the GPU, driver, torch and CUDA versions and the UTC date.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

GIB = 1024**3
LLAMA8B_WEIGHTS = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
ROWS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]


def timed(fn, repeats: int = 20, warmup: int = 5) -> float:
    """Median seconds of `fn` by CUDA events, after warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def bench_memory() -> dict[str, float]:
    x = torch.randn(2 * GIB, dtype=torch.bfloat16, device="cuda")  # 4 GiB
    y = torch.empty_like(x)
    read = timed(lambda: x.sum(dtype=torch.float32))
    copy = timed(lambda: y.copy_(x))
    nbytes = x.numel() * x.element_size()
    return {"hbm_read_bytes_per_s": nbytes / read, "hbm_copy_bytes_per_s": 2 * nbytes / copy,
            "buffer_bytes": nbytes}


def bench_gemm() -> list[dict[str, object]]:
    rows = []
    fp8 = hasattr(torch, "float8_e4m3fn") and torch.cuda.get_device_capability() >= (8, 9)
    for name, (n, k) in LLAMA8B_WEIGHTS.items():
        weight = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
        weight8 = weight.to(torch.float8_e4m3fn) if fp8 else None
        one = torch.ones((), device="cuda")
        for m in ROWS:
            a = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            seconds = timed(lambda: torch.mm(a, weight.t()))
            rows.append({"matrix": name, "dtype": "bf16", "m": m, "n": n, "k": k, "seconds": seconds,
                         "tflops": 2 * m * n * k / seconds / 1e12, "weight_bytes_per_s": n * k * 2 / seconds})
            if fp8:
                a8 = a.to(torch.float8_e4m3fn)
                m_pad = max(16, -(-m // 16) * 16)  # _scaled_mm wants dimensions that are multiples of 16
                a8 = torch.nn.functional.pad(a8.float(), (0, 0, 0, m_pad - m)).to(torch.float8_e4m3fn)
                try:
                    seconds = timed(lambda: torch._scaled_mm(a8, weight8.t(), scale_a=one, scale_b=one,
                                                             out_dtype=torch.bfloat16))
                except RuntimeError as err:  # record why, never a number that was not measured
                    rows.append({"matrix": name, "dtype": "fp8", "m": m, "error": str(err)[:200]})
                    continue
                rows.append({"matrix": name, "dtype": "fp8", "m": m, "n": n, "k": k, "seconds": seconds,
                             "tflops": 2 * m * n * k / seconds / 1e12, "weight_bytes_per_s": n * k / seconds})
    return rows


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


def environment() -> dict[str, object]:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                          "--format=csv,noheader"], capture_output=True, text=True).stdout.strip().splitlines()
    return {"date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "gpus": smi,
            "torch": torch.__version__, "cuda": torch.version.cuda, "device_count": torch.cuda.device_count(),
            "gpu_name": torch.cuda.get_device_name(0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--allreduce-gpus", type=int, nargs="*", default=[2, 4])
    parser.add_argument("--skip-gemm", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, object] = {"environment": environment()}
    report["memory"] = bench_memory()
    print(json.dumps(report["memory"]), flush=True)
    if not args.skip_gemm:
        report["gemm"] = bench_gemm()
    report["allreduce"] = [bench_allreduce(w) for w in args.allreduce_gpus if w > 1]
    (args.out / "microbench.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out / 'microbench.json'}")


if __name__ == "__main__":
    main()
