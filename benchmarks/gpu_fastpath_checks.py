"""GPU checks of the fast decode path's two newer pieces: the sync-free grouped-GEMM MoE block and PP stages
captured as CUDA graphs (hand-offs and the sampled tokens inside the graph).

1. MoE block (one Qwen3-30B-A3B layer's experts, bf16, uniform popularity): the grouped path against the
   per-expert loop (relative error), and both timed with CUDA events after warm-up (medians), with the bytes of the
   experts each batch touches over the measured HBM read bandwidth.
2. Greedy tokens of small fp32 models served by the graphed path on 2 and 4 GPUs (TP2×PP2, MoE PP2)
   against the single-GPU eager path, with the plain-torch ops (expected: identical) and the Triton kernels
   (reported: share of identical tokens; tl.dot may round fp32 inputs through TF32).

  python benchmarks/gpu_fastpath_checks.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from gpu_microbench import timed  # benchmarks/ is on sys.path when a script here runs

from infscale.backends.torch.model import DecoderModel
from infscale.backends.torch.parallel import ParallelContext
from infscale.backends.torch.spawn import ServeSpec, serve_on_ranks, serve_replica
from infscale.catalog import get_model
from infscale.catalog.models import ModelArch
from infscale.serving.cluster import ReplicaConfig
from infscale.serving.workload import Requests

MOE_MODEL = "qwen3-30b-a3b"


def _median_ms(fn, repeats: int = 20) -> float:
    return timed(fn, repeats=repeats, warmup=3) * 1e3


def hbm_read_bandwidth() -> float:
    x = torch.randn(1024**3, dtype=torch.bfloat16, device="cuda")  # 2 GiB
    seconds = _median_ms(lambda: x.sum(dtype=torch.float32)) / 1e3
    return x.numel() * 2 / seconds


def moe_block_check(bandwidth: float) -> list[dict[str, object]]:
    arch = get_model(MOE_MODEL)
    model = DecoderModel(arch, dtype=torch.bfloat16, device="cuda", seed=0, num_layers=1)
    block = model.layers[0].mlp
    expert_bytes = block.w_gate_up[0].numel() * 2 + block.w_down[0].numel() * 2
    rows = []
    for batch in (1, 8, 32, 64, 128):
        x = torch.randn(batch, arch.hidden_size, dtype=torch.bfloat16, device="cuda")
        keys = torch.arange(batch, device="cuda")
        positions = torch.full((batch,), 1500, device="cuda")
        weights, experts = block.route(x, keys, positions)
        grouped = block.partial(x, keys, positions)
        loop = block.experts_loop(x, weights, experts)
        rel = float((grouped.double() - loop.double()).norm() / loop.double().norm())
        touched = int(torch.unique(experts).numel())
        grouped_ms = _median_ms(lambda: block.partial(x, keys, positions))
        loop_ms = _median_ms(lambda: block.experts_loop(x, weights, experts))
        # as the decode step runs it: captured in a CUDA graph (no host launches, no host synchronisation)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            block.partial(x, keys, positions)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = block.partial(x, keys, positions)
        graph.replay()
        graph_rel = float((captured.double() - grouped.double()).norm() / grouped.double().norm())
        graph_ms = _median_ms(graph.replay)
        row = {"batch": batch, "experts_touched": touched, "rel_error_grouped_vs_loop": rel,
               "rel_error_graph_vs_grouped": graph_rel, "grouped_ms": grouped_ms, "loop_ms": loop_ms,
               "graph_ms": graph_ms, "expert_bytes_read": touched * expert_bytes,
               "graph_read_fraction_of_hbm": touched * expert_bytes / bandwidth / (graph_ms / 1e3)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _tiny(family: str, **extra) -> ModelArch:
    fields = dict(name=f"tiny-{family}", family=family, num_layers=4, hidden_size=256, num_attention_heads=8,
                  num_kv_heads=4, head_dim=32, intermediate_size=512, vocab_size=1024, max_context=4096,
                  rope_theta=1e6, source="benchmarks/gpu_fastpath_checks.py")
    if family in ("qwen3", "qwen3_moe"):
        fields["qk_norm"] = True
    if family == "qwen3_moe":
        fields.update(num_experts=16, experts_per_token=4, moe_intermediate_size=128)
    fields.update(extra)
    return ModelArch(**fields)


def token_checks() -> list[dict[str, object]]:
    isl, osl = np.array([40, 17, 63, 25, 33, 9]), np.array([30, 45, 20, 38, 27, 50])
    requests = Requests(isl, osl, np.zeros(len(isl)))
    config = ReplicaConfig(num_blocks=256, block_size=16, max_num_seqs=6, max_num_tokens=256)
    # one spawn per case on exactly tp × pp ranks (a world larger than the case left idle ranks waiting in a
    # barrier while the case's ranks set up their NCCL groups: it hung on the GPU machine)
    cases = [("llama tp2pp2", _tiny("llama"), 2, 2), ("qwen3_moe pp2", _tiny("qwen3_moe"), 1, 2)]
    print(f"token checks: {len(cases)} single-GPU eager references", flush=True)
    reference = {name: serve_replica(ServeSpec(arch, requests, config, dtype="float32", seed=3, fast=False),
                                     ParallelContext.single(), torch.device("cuda"))
                 for name, arch, _, _ in cases}
    rows = []
    for ops in ("torch", "triton"):
        for name, arch, tp, pp in cases:
            print(f"token checks: {name}, the graphed path with {ops} ops", flush=True)
            spec = ServeSpec(arch, requests, config, tp=tp, pp=pp, dtype="float32", seed=3, fast=True, fast_ops=ops)
            result = serve_on_ranks([spec])[0]
            ref = reference[name]
            differs = {r: result.tokens[r] != ref.tokens[r] for r in sorted(ref.tokens)}
            row = {"case": name, "ops": ops, "tp": tp, "pp": pp, "fast_steps": result.fast_steps,
                   "decode_steps": result.decode_steps, "tokens": int(osl.sum()),
                   "identical_tokens": int(sum((~d).sum() for d in differs.values())),
                   "first_difference_per_request": [int(np.argmax(d)) if d.any() else None for d in differs.values()]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--part", choices=["moe", "tokens"], action="append", help="default: both")
    args = parser.parse_args()
    parts = args.part or ["moe", "tokens"]
    bandwidth = hbm_read_bandwidth()
    report = {"gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(), "torch": torch.__version__,
              "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "hbm_read_bytes_per_s": bandwidth}
    if "moe" in parts:
        report["moe_model"] = MOE_MODEL
        report["moe_block"] = moe_block_check(bandwidth)
    if "tokens" in parts:
        report["tokens"] = token_checks()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"gpu_fastpath_checks.{'+'.join(parts)}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
