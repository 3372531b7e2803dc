"""First GPU run of the torch backend's reference path (no CUDA graphs, no fused paged-attention kernel yet).

Checks that the engine runs on CUDA (token counts = OSL, finite logits, TP1 and TP2 give the same greedy tokens)
and measures the decode step of Llama-3.1-8B (bf16, random weights) against the HBM read roofline measured in the
same run: bytes per decode step (weights touched: every layer and the LM head, not the input embedding; plus the
KV cache read) divided by the bandwidth of a full-tensor reduction.

  python benchmarks/torch_gpu_smoke.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from infscale.backends.torch.parallel import ParallelContext
from infscale.backends.torch.spawn import ServeSpec, serve_on_ranks, serve_replica
from infscale.campaign.spec import Arrival
from infscale.catalog import get_model
from infscale.memory import kv_bytes_per_token_per_gpu
from infscale.serving.cluster import ReplicaConfig
from infscale.serving.workload import Requests


def hbm_read_bandwidth() -> float:
    x = torch.randn(1024**3, dtype=torch.bfloat16, device="cuda")  # 2 GiB
    for _ in range(3):
        x.sum(dtype=torch.float32)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        x.sum(dtype=torch.float32)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return x.numel() * 2 / float(np.median(times))


def run(batch: int, isl: int, osl: int, tp: int = 1) -> dict[str, object]:
    arch = get_model("llama-3.1-8b")
    requests = Requests(np.full(batch, isl), np.full(batch, osl), np.zeros(batch))
    config = ReplicaConfig(num_blocks=batch * ((isl + osl) // 16 + 2), block_size=16, max_num_seqs=max(batch, 1),
                           max_num_tokens=8192)
    spec = ServeSpec(arch, requests, config, tp=tp, warmup=True, arrival=Arrival())
    start = time.perf_counter()
    if tp == 1:
        result = serve_replica(spec, ParallelContext.single(), torch.device("cuda"))
    else:
        result = serve_on_ranks([spec])[0]
    wall = time.perf_counter() - start
    state = result.state
    tpot = (state.finish - state.first_token) / (state.osl - 1)
    counts = arch.param_counts()
    weight_bytes = (counts.total - counts.embedding) * 2 / tp if counts.lm_head else counts.total * 2 / tp
    context = isl + osl / 2
    kv_bytes = batch * context * kv_bytes_per_token_per_gpu(arch, "bf16", tp, 1)
    return {"batch": batch, "isl": isl, "osl": osl, "tp": tp, "wall_s": wall,
            "tpot_ms_median": float(np.median(tpot) * 1e3), "bytes_per_step": weight_bytes + kv_bytes,
            "tokens": {int(k): v.tolist()[:8] for k, v in list(result.tokens.items())[:2]},
            "all_osl": bool(all(len(v) == osl for v in result.tokens.values()))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    bandwidth = hbm_read_bandwidth()
    report: dict[str, object] = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                                 "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                 "hbm_read_bytes_per_s": bandwidth, "runs": []}
    for batch, isl, osl, tp in ((1, 1024, 64, 1), (32, 1024, 64, 1), (128, 1024, 32, 1), (1, 1024, 64, 2)):
        if tp > torch.cuda.device_count():
            continue
        row = run(batch, isl, osl, tp)
        row["roofline_fraction"] = row["bytes_per_step"] / bandwidth / (row["tpot_ms_median"] / 1e3)
        report["runs"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "tokens"}), flush=True)
    tp1 = next(r for r in report["runs"] if r["tp"] == 1 and r["batch"] == 1)
    tp2 = next((r for r in report["runs"] if r["tp"] == 2), None)
    report["tp1_equals_tp2_tokens"] = None if tp2 is None else tp1["tokens"] == tp2["tokens"]
    print("tp1 == tp2 greedy tokens:", report["tp1_equals_tp2_tokens"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "torch_gpu_smoke.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
