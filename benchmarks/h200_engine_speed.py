"""The torch engine's speed on one GPU against its ceilings, and its memory check: `engine-speed/<gpu>.json`.

  PYTHONPATH=src python3 benchmarks/h200_engine_speed.py --out DIR [--parts probe prefill decode moe memory]
  PYTHONPATH=src python3 benchmarks/h200_engine_speed.py --out DIR --cpu-dry-run     # the script on CPU

Parts (each is checked before it is timed; a failed check stops that part, never the run):
  probe    the two ceilings, measured here. Memory: a read-only Triton kernel (wide loads, fp32 partial sums, a
           few launch shapes; the best is kept), the fp32-accumulated torch sum (the older probe), and a
           device-to-device copy (bytes read + written), each over a 4 GiB random bf16 tensor, CUDA events, median
           of 20; the roofline's denominator is the best of the read-only kernels and the copy, and the report
           says which. Matrix: an 8192³ bf16 product (cuBLAS) on random data, median of 10.
  prefill  Llama-3.1-8B (random bf16 weights): the flash-style paged prefill kernel checked against float64 on
           sampled query rows of long chunks (fresh 8K prompts and chunks after up to 24K cached tokens, in
           scattered blocks), its launch tuned on an 8K chunk; the fused packed forward checked against the
           plain-torch layers on a mixed batch (logits, greedy tokens, the K/V written); then the engine's own
           iteration (TorchExecutor.iteration, as a campaign cell runs it) on 8192-token prompts, one per
           iteration (max_num_tokens 8192), timed by the executor's CUDA events. FLOPs per iteration =
           2 × tokens × the projections' parameters (q/k/v/o, gate/up/down, all layers) + the LM head for the
           sampled row + causal attention 4 × heads × head_dim × Σ_i (past + i + 1) per layer; prefill_mfu =
           FLOP/s over the datasheet's dense bf16 peak (the catalog's), also given over the measured matrix rate.
  decode   Llama-3.1-8B decode steps (CUDA graph + Triton) at batch 1 and 128, context 1024, through
           torch_decode_roofline.measure (tuning, the graph checked against the eager path, then timed);
           fraction = the step's bytes / the probe's bandwidth / the median step time.
  moe      Qwen3-30B-A3B at batch 128, context 1024, the same way; the experts a step reads are counted from
           its routing (every one of the 128 at this batch, in practice).
  memory   campaign cells (torch backend, planner's KV pool, max_num_tokens 8192) at ISL 8K, 16K and 32K,
           OSL 4, for Llama-3.1-8B and Qwen3-30B-A3B: none may fail for memory; each cell's peak allocated
           memory is compared with weights + pool + the engine's activation estimate.

Writes DIR/engine-speed.json after every part (a crash keeps what came before) and prints a summary last.
Needs torch (CUDA), triton, numpy, this package and, for `memory`, pydantic + pyyaml.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

if "--cpu-dry-run" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before any @triton.jit below or in the package is defined

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch_decode_roofline as roofline  # noqa: E402
from torch_decode_roofline import CheckFailed, Clock, log, rel_err, synchronize  # noqa: E402

GIB = 1024**3
TARGETS = {"decode_batch1_roofline_fraction": 0.85, "decode_batch128_roofline_fraction": 0.80,
           "prefill_mfu": 0.60, "moe_decode_roofline_fraction": 0.75}
PARTS = ("probe", "prefill", "decode", "moe", "memory")
TINY_CONFIG = {  # a Hugging Face config.json of a toy Llama, for the memory part's dry run
    "_name_or_path": "infscale/tiny-llama-4l", "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
    "num_hidden_layers": 4, "max_position_embeddings": 4096, "vocab_size": 512, "tie_word_embeddings": True,
}


def device() -> torch.device:
    return roofline.DEVICE


def median_seconds(fn, reps: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    synchronize()
    clock = Clock()
    times = []
    for _ in range(reps):
        start = clock.mark()
        fn()
        times.append(clock.seconds(start, clock.mark()))
    return times


# ------------------------------------------------------------------------------------------------ probe

try:
    import triton
    import triton.language as tl
except ImportError:  # the script refuses to run without triton (main)
    triton = None

if triton is not None:

    @triton.jit
    def _read_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, PER_PROGRAM: tl.constexpr):
        """Stream PER_PROGRAM × BLOCK elements and write their fp32 sum (one value per program)."""
        base = tl.program_id(0).to(tl.int64) * (BLOCK * PER_PROGRAM)
        acc = tl.zeros([BLOCK], tl.float32)
        for i in range(PER_PROGRAM):
            offs = base + i * BLOCK + tl.arange(0, BLOCK)
            acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0, eviction_policy="evict_first").to(tl.float32)
        tl.store(out_ptr + tl.program_id(0), tl.sum(acc, 0))


READ_SHAPES = ((4096, 16, 8), (8192, 8, 8), (8192, 16, 16), (2048, 32, 4), (4096, 64, 8), (16384, 4, 16))


def probe(gib: float, reps: int, matmul_n: int) -> dict[str, object]:
    """Bandwidth (read-only kernels and a copy) and the bf16 matrix rate, each on random data."""
    gen = torch.Generator(device=device())
    gen.manual_seed(11)
    n = int(gib * GIB) // 2
    x = torch.randn(n, generator=gen, device=device(), dtype=torch.float32).to(torch.bfloat16)
    nbytes = n * 2
    exact = float(x.sum(dtype=torch.float64))
    scale = float(x.abs().sum(dtype=torch.float64))
    out: dict[str, object] = {"bytes": nbytes, "reps": reps}
    # the older probe: torch's fp32-accumulated sum
    times = median_seconds(lambda: x.sum(dtype=torch.float32), reps)
    got = float(x.sum(dtype=torch.float32))
    if abs(got - exact) > 1e-4 * scale:
        raise CheckFailed(f"torch sum probe: {got} against the float64 sum {exact}")
    out["torch_sum_read"] = {"bytes_per_s": nbytes / float(np.median(times)), "seconds_median": float(np.median(times))}
    # read-only Triton kernel, a few launch shapes
    shapes = []
    for block, per_program, warps in READ_SHAPES:
        if device().type != "cuda":
            block, per_program = min(block, 1024), min(per_program, 2)
        programs = triton.cdiv(n, block * per_program)
        partial = torch.full((programs,), float("nan"), dtype=torch.float32, device=device())

        def run(block=block, per_program=per_program, warps=warps, partial=partial, programs=programs):
            _read_kernel[(programs,)](x, partial, n, BLOCK=block, PER_PROGRAM=per_program, num_warps=warps)

        row: dict[str, object] = {"block": block, "per_program": per_program, "warps": warps}
        try:
            run()
            total = float(partial.double().sum())
            row["sum_error"] = abs(total - exact) / scale
            if not abs(total - exact) <= 1e-4 * scale:
                raise CheckFailed(f"read kernel {row}: sum {total} against {exact}")
            times = median_seconds(run, reps)
            row["seconds_median"] = float(np.median(times))
            row["bytes_per_s"] = nbytes / row["seconds_median"]
        except CheckFailed:
            raise
        except Exception as err:  # a shape that fails to compile is reported, not fatal
            row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
        shapes.append(row)
        del partial
    out["triton_read"] = shapes
    timed = [r for r in shapes if "bytes_per_s" in r]
    best_read = max(timed, key=lambda r: r["bytes_per_s"]) if timed else None
    # copy: bytes read + bytes written
    y = torch.empty_like(x)
    times = median_seconds(lambda: y.copy_(x), reps)
    if not torch.equal(y, x):
        raise CheckFailed("the copy probe's output differs from its input")
    copy_bw = 2 * nbytes / float(np.median(times))
    out["copy"] = {"bytes_per_s": copy_bw, "seconds_median": float(np.median(times)), "bytes_moved": 2 * nbytes}
    candidates = [("copy (torch copy_, read + write)", copy_bw),
                  ("torch fp32-accumulated sum (read-only)", out["torch_sum_read"]["bytes_per_s"])]
    if best_read is not None:
        candidates.append((f"triton read-only kernel (block {best_read['block']}, {best_read['per_program']} per "
                           f"program, {best_read['warps']} warps)", best_read["bytes_per_s"]))
    which, bandwidth = max(candidates, key=lambda c: c[1])
    out["denominator"] = {"bytes_per_s": bandwidth, "which": which,
                          "rule": "the best of the read-only kernels and the copy"}
    # the matrix ceiling
    a = torch.randn((matmul_n, matmul_n), generator=gen, device=device()).to(torch.bfloat16)
    b = torch.randn((matmul_n, matmul_n), generator=gen, device=device()).to(torch.bfloat16)
    c = a @ b
    ref_rows = (a[:4].double() @ b.double())
    if not rel_err(c[:4], ref_rows) < 1e-2:
        raise CheckFailed("the matrix probe's product is wrong")
    times = median_seconds(lambda: torch.matmul(a, b, out=c), max(3, reps // 2))
    out["matmul_bf16"] = {"n": matmul_n, "seconds_median": float(np.median(times)),
                          "flops_per_s": 2 * matmul_n**3 / float(np.median(times))}
    return out  # the buffers go with the frame (the caller empties the cache)


# ------------------------------------------------------------------------------------------------ prefill


def projection_params(model) -> int:
    """Parameters every token multiplies through (q/k/v/o and the MLP of every layer of this stage)."""
    total = 0
    for layer in model.layers:
        total += layer.attn.w_qkv.numel() + layer.attn.w_o.numel()
        mlp = layer.mlp
        total += mlp.w_gate_up.numel() + mlp.w_down.numel()
    return total


def prefill_flops(model, chunks: list[tuple[int, int]]) -> dict[str, float]:
    """FLOPs of one packed iteration of prompt chunks (past, chunk): projections, causal attention, LM head."""
    arch = model.arch
    tokens = sum(c for _, c in chunks)
    linear = 2.0 * tokens * projection_params(model)
    pairs = sum(c * p + c * (c + 1) / 2 for p, c in chunks)  # Σ over queries of the keys each one sees
    attention = 4.0 * arch.num_attention_heads * arch.head_dim * pairs * len(model.layers)
    head = 2.0 * len(chunks) * arch.hidden_size * arch.vocab_size
    return {"linear": linear, "attention": attention, "lm_head": head, "total": linear + attention + head}


def reference_rows(q, keys, values, past: int, rows: torch.Tensor) -> torch.Tensor:
    """float64 causal attention of the chunk's query rows `rows` (q [C, H, D]; keys/values [past + C, KV, D])."""
    heads, kv_heads = q.shape[1], keys.shape[1]
    qs = q[rows].double().view(len(rows), kv_heads, heads // kv_heads, q.shape[2])
    scores = torch.einsum("rkgd,tkd->rkgt", qs, keys.double()) / math.sqrt(q.shape[2])
    allowed = torch.arange(keys.shape[0], device=q.device)[None, :] <= (past + rows)[:, None]
    scores = scores.masked_fill(~allowed[:, None, None, :], float("-inf"))
    out = torch.einsum("rkgt,tkd->rkgd", torch.softmax(scores, dim=-1), values.double())
    return out.reshape(len(rows), heads, q.shape[2])


def check_prefill_kernel(k_pool, v_pool, heads: int, seqs: list[tuple[int, int]], configs, seed: int,
                         sample: int = 48) -> dict[str, object]:
    """Each launch config on a batch of chunks (past, chunk) in scattered blocks against float64 on sampled rows;
    returns the per-config errors (raises on the first failure)."""
    from infscale.backends.torch.triton_prefill import paged_prefill_attention, plan_prefill

    gen = torch.Generator(device=device())
    gen.manual_seed(seed)
    block_size, kv_heads, dim = k_pool.shape[1], k_pool.shape[2], k_pool.shape[3]
    need = [-(-(p + c) // block_size) for p, c in seqs]
    perm = torch.randperm(k_pool.shape[0], generator=gen, device=device())[: sum(need)].tolist()
    tables, rows, start = [], [], 0
    for n, (_, chunk) in zip(need, seqs):
        tables.append(perm[:n])
        perm = perm[n:]
        rows.append(start)
        start += chunk
    q = torch.randn((start, heads, dim), generator=gen, device=device()).to(k_pool.dtype)
    refs = []
    for table, row, (past, chunk) in zip(tables, rows, seqs):
        keys = k_pool[table].reshape(-1, kv_heads, dim)[: past + chunk]
        values = v_pool[table].reshape(-1, kv_heads, dim)[: past + chunk]
        picked = torch.unique(torch.cat([torch.tensor([0, chunk - 1], device=device()),
                                         torch.randint(0, chunk, (sample,), generator=gen, device=device())]))
        refs.append((row, picked, reference_rows(q[row:row + chunk], keys, values, past, picked)))
    errors = {}
    for config in configs:
        plan = plan_prefill(rows, [c for _, c in seqs], [p for p, _ in seqs], tables, device(), config.block_m)
        out = torch.full_like(q, float("nan"))
        paged_prefill_attention(q, k_pool, v_pool, plan, out, config)
        if not torch.isfinite(out).all():
            raise CheckFailed(f"prefill kernel {config}: rows left unwritten or non-finite")
        worst = max(rel_err(out[row + picked], ref) for row, picked, ref in refs)
        errors[str(config)] = worst
        if not worst <= 1e-2:
            raise CheckFailed(f"prefill kernel {config}: relative error {worst:.3g} > 1e-2 against float64")
    return {"sequences": seqs, "max_rel_err": errors, "sampled_rows_per_sequence": sample + 2}


def prefill_candidates(dry: bool):
    from infscale.backends.torch.triton_prefill import PrefillConfig

    if dry:
        return [PrefillConfig(16, 16, 4, 1), PrefillConfig(32, 16, 4, 1)]
    return [PrefillConfig(128, 64, 8, 2), PrefillConfig(128, 64, 8, 3), PrefillConfig(128, 128, 8, 2),
            PrefillConfig(64, 64, 4, 3), PrefillConfig(128, 32, 4, 3), PrefillConfig(128, 64, 4, 3),
            PrefillConfig(128, 32, 8, 3), PrefillConfig(128, 32, 4, 4), PrefillConfig(128, 64, 8, 4),
            PrefillConfig(64, 32, 4, 3)]


def tune_prefill(k_pools, v_pools, heads: int, chunk: int, configs, reps: int) -> list[dict[str, object]]:
    """Time each launch on one fresh chunk of `chunk` tokens, cycling over the layers' pools; CUDA events."""
    from infscale.backends.torch.triton_prefill import paged_prefill_attention, plan_prefill

    block_size, dim = k_pools[0].shape[1], k_pools[0].shape[3]
    table = list(range(-(-chunk // block_size)))
    gen = torch.Generator(device=device())
    gen.manual_seed(5)
    q = torch.randn((chunk, heads, dim), generator=gen, device=device()).to(k_pools[0].dtype)
    out = torch.empty_like(q)
    flops = 4.0 * heads * dim * chunk * (chunk + 1) / 2
    rows = []
    for config in configs:
        plan = plan_prefill([0], [chunk], [0], [table], device(), config.block_m)
        layer = [0]

        def run(config=config, plan=plan):
            i = layer[0] % len(k_pools)
            layer[0] += 1
            paged_prefill_attention(q, k_pools[i], v_pools[i], plan, out, config)

        row: dict[str, object] = {"config": str(config)}
        try:
            times = median_seconds(run, reps, warmup=2)
            row["seconds_median"] = float(np.median(times))
            row["flops_per_s"] = flops / row["seconds_median"]
        except Exception as err:
            row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
        rows.append(row)
        log(f"  prefill attention {config}: " + (f"{row['seconds_median'] * 1e3:.3f} ms, "
                                                 f"{row['flops_per_s'] / 1e12:.0f} TFLOP/s" if "flops_per_s" in row
                                                 else row["error"]))
    return rows


def check_packed_forward(model, block_size: int, seed: int, prompts: list[tuple[int, int]]) -> dict[str, object]:
    """A batch of prompt chunks (past, chunk) plus two decodes, through packed_layers and through the plain-torch
    layers, each on its own cache (the earlier tokens' K/V random, the same in both): logits, greedy tokens and
    the K/V each path writes in layer 0 and the last layer."""
    from infscale.backends.torch.model import BatchMeta, PrefillSeq
    from infscale.backends.torch.triton_prefill import PackedOps

    decodes = [700, 1500]
    total_blocks = sum(-(-(p + c) // block_size) for p, c in prompts) + sum(-(-c // block_size) for c in decodes)

    def build():
        cache = model.new_cache(total_blocks + 4, block_size)
        roofline.fill_cache(cache, seed)
        rows, positions, slots, pre, tables = 0, [], [], [], []
        for request, ctx in enumerate(decodes):
            tables.append(cache.allocator.ensure(request, ctx))
            positions.append(np.array([ctx - 1]))
            slots.append(cache.slots(request, ctx - 1, 1))
            rows += 1
        for i, (past, chunk) in enumerate(prompts):
            request = len(decodes) + i
            table = cache.allocator.ensure(request, past + chunk)
            positions.append(np.arange(past, past + chunk))
            slots.append(cache.slots(request, past, chunk))
            pre.append(PrefillSeq(rows, chunk, past, list(table)))
            rows += chunk
        width = max(map(len, tables))
        flat = np.concatenate(positions)
        sample = [0, 1] + [p.start + p.chunk - 1 for p in pre]
        meta = BatchMeta(positions=torch.as_tensor(flat, device=device()),
                         slots=torch.as_tensor(np.concatenate(slots), device=device()),
                         keys=torch.as_tensor(np.concatenate([np.full(len(p), r) for r, p in enumerate(positions)]),
                                              device=device()),
                         sample_index=torch.as_tensor(sample, device=device()), num_decode=len(decodes),
                         decode_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], device=device()),
                         decode_lens=torch.tensor(decodes, device=device()), prefills=pre,
                         rope_positions=int(flat.max()) + 1)
        return meta, cache, np.concatenate(slots)

    rng = np.random.default_rng(seed)
    meta, cache, slots = build()
    ids = torch.as_tensor(rng.integers(0, model.arch.vocab_size, meta.num_tokens), device=device())
    with torch.inference_mode():
        eager = model.forward_logits(ids, meta, cache)
        meta2, cache2, _ = build()
        meta2.kernels = PackedOps()
        fused = model.logits(model.packed_layers(model.embed_tokens(ids), meta2, cache2, meta2.kernels)[
            meta2.sample_index])
    kv_heads, dim = model.kv_heads, model.arch.head_dim
    where = torch.as_tensor(slots, device=device())
    kv = {name: rel_err(a.view(-1, kv_heads, dim)[where], b.view(-1, kv_heads, dim)[where])
          for name, a, b in (("k_layer0", cache2.k[0], cache.k[0]), ("v_layer0", cache2.v[0], cache.v[0]),
                             ("k_last", cache2.k[-1], cache.k[-1]), ("v_last", cache2.v[-1], cache.v[-1]))}
    report = {"prompts": prompts, "decodes": decodes, "logits_rel_err": rel_err(fused, eager),
              "token_agreement": float((fused.argmax(-1) == eager.argmax(-1)).double().mean()), "kv_rel_err": kv}
    del cache, cache2
    # as compare_with_eager holds the decode graph: shallow K/V tight, deep K/V and logits against gross errors
    if not max(kv["k_layer0"], kv["v_layer0"]) <= 2e-2:
        raise CheckFailed(f"the fused path's layer-0 K/V differ from the plain-torch layers': {report}")
    if not (max(kv.values()) <= 0.2 and report["logits_rel_err"] <= 0.2):
        raise CheckFailed(f"the fused path's logits or last-layer K/V differ grossly: {report}")
    return report


def prefill_part(args, report: dict, save) -> None:
    from infscale.backends.torch.executor import TorchExecutor
    from infscale.backends.torch.model import DecoderModel
    from infscale.catalog import get_hardware, get_model
    from infscale.serving.executor import IterationBatch

    arch = roofline.dry_run_arch() if args.cpu_dry_run else get_model("llama-3.1-8b")
    chunk = args.prefill_tokens
    part: dict[str, object] = {"model": arch.name, "chunk_tokens": chunk, "block_size": args.block_size}
    report["prefill"] = part
    log(f"prefill: building {arch.name}")
    model = DecoderModel(arch, dtype=torch.bfloat16, device=device(), seed=0)
    heads = model.layers[0].attn.heads
    longest = 3 * chunk  # a chunk after two chunks of cached prompt
    blocks = 2 * -(-longest // args.block_size) + 8
    cache = model.new_cache(blocks, args.block_size)
    roofline.fill_cache(cache, seed=3)
    configs = prefill_candidates(args.cpu_dry_run)
    small = max(1, chunk // 8)
    seqs = [(0, chunk), (2 * chunk, chunk // 2), (chunk // 2 + 5, small), (chunk + 3, 1)]
    log("prefill: checking the kernel against float64 (sampled rows, every launch config)")
    part["kernel_check"] = check_prefill_kernel(cache.k[0], cache.v[0], heads, seqs, configs, seed=1)
    save()
    log("prefill: timing the launch configs on one fresh chunk")
    part["attention_tuning"] = tune_prefill(cache.k, cache.v, heads, chunk, configs, args.reps)
    timed = [r for r in part["attention_tuning"] if "seconds_median" in r]
    best = configs[part["attention_tuning"].index(min(timed, key=lambda r: r["seconds_median"]))]
    part["attention_config"] = str(best)
    save()
    del cache
    if device().type == "cuda":
        torch.cuda.empty_cache()
    log("prefill: the fused packed forward against the plain-torch layers")
    part["forward_check"] = check_packed_forward(model, args.block_size, seed=4,
                                                 prompts=[(0, min(chunk, 1024)), (300, min(chunk, 512))])
    log(f"  logits rel err {part['forward_check']['logits_rel_err']:.2e}, token agreement "
        f"{part['forward_check']['token_agreement']:.2f}")
    save()
    # the engine's own iteration: one 8K prompt per iteration, max_num_tokens = the prompt
    iterations = args.prefill_iterations
    isl = np.full(iterations, chunk)
    blocks = 2 * -(-chunk // args.block_size) + 4
    executor = TorchExecutor(model, blocks, args.block_size, isl, np.ones(iterations, dtype=np.int64), seed=0,
                             fast=True, fast_ops="triton", graph_sizes=(1,))
    executor.packed_ops.prefill_config = best
    empty = np.zeros(0, dtype=np.int64)
    times = []
    for request in range(iterations):
        times.append(executor.iteration(IterationBatch(empty, empty, np.array([request]), np.array([chunk]),
                                                       np.array([0]))))
        executor.release(np.array([request]))
    warm = args.prefill_warmup
    seconds = float(np.median(times[warm:]))
    flops = prefill_flops(model, [(0, chunk)])
    peak = get_hardware("h200-sxm").dense_tflops["bf16"] * 1e12
    part.update({"iteration_seconds_all": times, "warmup_iterations": warm, "iteration_seconds_median": seconds,
                 "flops_per_iteration": flops, "flops_per_s": flops["total"] / seconds,
                 "datasheet_bf16_dense_flops_per_s": peak, "prefill_mfu": flops["total"] / seconds / peak,
                 "prompt_tokens_per_s": chunk / seconds, "engine_path": "TorchExecutor.iteration, fused packed "
                 "forward (triton_prefill.PackedOps)", "passed": True})
    matmul = report.get("probe", {}).get("matmul_bf16", {}).get("flops_per_s")
    if matmul:
        part["fraction_of_measured_matmul_rate"] = part["flops_per_s"] / matmul
    log("prefill: one layer's operations timed alone (where an iteration's time goes)")
    part["layer_breakdown"] = layer_breakdown(model, executor, chunk, args.reps)
    log(f"prefill: {seconds * 1e3:.1f} ms per {chunk}-token iteration, {part['flops_per_s'] / 1e12:.0f} TFLOP/s, "
        f"MFU {part['prefill_mfu']:.1%} of {peak / 1e12:.0f} TFLOP/s")
    save()
    del executor, model
    if device().type == "cuda":
        torch.cuda.empty_cache()


def layer_breakdown(model, executor, tokens: int, reps: int) -> dict[str, object]:
    """Each operation of one packed layer (a fresh `tokens`-token prompt) timed alone, CUDA events, median: the
    sum over the layers against the iteration shows what else (launch gaps, embedding, LM head) costs."""
    import torch.nn.functional as F

    from infscale.backends.torch.triton_prefill import paged_prefill_attention, plan_prefill

    ops = executor.packed_ops
    layer = model.layers[0]
    attn, mlp = layer.attn, layer.mlp
    gen = torch.Generator(device=device())
    gen.manual_seed(9)
    hidden = torch.randn((tokens, model.arch.hidden_size), generator=gen, device=device()).to(model.dtype)
    delta = torch.randn_like(hidden, dtype=torch.float32).to(model.dtype)
    positions = torch.arange(tokens, device=device())
    block_size = executor.cache.block_size
    plan = plan_prefill([0], [tokens], [0], [list(range(-(-tokens // block_size)))], device(),
                        ops.prefill_config.block_m)
    cos, sin = model._packed_rope(tokens)
    k_pool, v_pool = executor.cache.k[0], executor.cache.v[0]
    x = ops.add_rmsnorm(hidden.clone(), delta, layer.input_norm, model.eps)
    qkv = F.linear(x, attn.w_qkv)
    q = ops.rope_kv_slots(qkv, positions, positions, cos, sin, k_pool, v_pool, attn.heads, attn.kv_heads,
                          attn.head_dim, attn.b_qkv, attn.q_norm, attn.k_norm, model.eps)
    out = paged_prefill_attention(q, k_pool, v_pool, plan, config=ops.prefill_config)
    gate_up = F.linear(x, mlp.w_gate_up)
    act = ops.silu_mul(gate_up)
    steps = {
        "add_rmsnorm": lambda: ops.add_rmsnorm(hidden, delta, layer.input_norm, model.eps),
        "qkv_gemm": lambda: F.linear(x, attn.w_qkv),
        "rope_kv_write": lambda: ops.rope_kv_slots(qkv, positions, positions, cos, sin, k_pool, v_pool, attn.heads,
                                                   attn.kv_heads, attn.head_dim, attn.b_qkv, attn.q_norm,
                                                   attn.k_norm, model.eps),
        "prefill_attention": lambda: paged_prefill_attention(q, k_pool, v_pool, plan, out, ops.prefill_config),
        "o_gemm": lambda: F.linear(out.reshape(tokens, -1), attn.w_o),
        "gate_up_gemm": lambda: F.linear(x, mlp.w_gate_up),
        "silu_mul": lambda: ops.silu_mul(gate_up),
        "down_gemm": lambda: F.linear(act, mlp.w_down),
    }
    per_op = {name: float(np.median(median_seconds(fn, reps))) for name, fn in steps.items()}
    per_op["add_rmsnorm"] *= 2  # two per layer
    layers = len(model.layers)
    return {"tokens": tokens, "seconds_per_layer": per_op, "layer_seconds": sum(per_op.values()),
            "all_layers_seconds": layers * sum(per_op.values()), "layers": layers}


# ------------------------------------------------------------------------------------------------ decode


def decode_args(args) -> SimpleNamespace:
    return SimpleNamespace(check_steps=3, steps=args.decode_steps, warmup=5, tune_reps=3, graph_warmup=2,
                           min_agreement=0.0 if args.cpu_dry_run else 0.5, block_size=args.block_size)


def decode_part(args, report: dict, save, model_name: str, batches: list[int], key: str) -> None:
    from infscale.backends.torch.parallel import ParallelContext
    from infscale.catalog import get_model

    bandwidth = report.get("probe", {}).get("denominator", {}).get("bytes_per_s")
    if bandwidth is None:
        raise CheckFailed("the decode parts need the probe's bandwidth (run the probe part first)")
    arch = roofline.dry_run_arch() if args.cpu_dry_run else get_model(model_name)
    if args.cpu_dry_run and key == "moe":
        arch = arch.model_copy(update={"family": "qwen3_moe", "qk_norm": True, "num_experts": 8,
                                       "experts_per_token": 2, "moe_intermediate_size": 64})
    dargs = decode_args(args)
    if args.cpu_dry_run:
        batches = sorted({min(b, 4) for b in batches})  # the interpreter runs every program in Python
    log(f"{key}: building {arch.name} and a KV cache for batch {max(batches)}")
    model, cache = roofline.build(arch, ParallelContext.single(), device(), max(batches), args.context, dargs)
    rows = []
    report[key] = {"model": arch.name, "context": args.context, "rows": rows}
    for batch in batches:
        try:
            with torch.inference_mode():
                row = roofline.measure(model, cache, batch, args.context, dargs, bandwidth, f"{key} batch {batch}")
            if model.moe_blocks():
                row.update(moe_step_bytes(model, batch, args.context))
                row["roofline_seconds"] = row["bytes_per_step"] / bandwidth
                row["fraction_of_read_roofline"] = row["roofline_seconds"] / row["step_seconds_median"]
            row["bandwidth_denominator"] = report["probe"]["denominator"]
            log(f"{key} batch {batch}: {row['step_seconds_median'] * 1e3:.3f} ms per step, "
                f"{row['fraction_of_read_roofline']:.1%} of the roofline ({row['bytes_per_step'] / 1e9:.2f} GB)")
        except Exception as err:
            row = {"batch": batch, "passed": False, "error": f"{type(err).__name__}: {err}",
                   "traceback": traceback.format_exc()}
            log(f"{key} batch {batch} FAILED: {type(err).__name__}: {err}")
        rows.append(row)
        save()
    del model, cache
    if device().type == "cuda":
        torch.cuda.empty_cache()


def moe_step_bytes(model, batch: int, context: int) -> dict[str, float]:
    """A MoE decode step's bytes: the dense weights, the experts its tokens are routed to (counted by routing a
    batch of random hidden states through every layer's router, keyed as the graph keys its rows), the KV."""
    gen = torch.Generator(device=device())
    gen.manual_seed(batch)
    arch = model.arch
    counted = roofline.step_bytes(model, batch, context)
    expert_bytes = 0.0
    read = 0.0
    touched = []
    for block in model.moe_blocks().values():
        per_expert = (block.w_gate_up[0].numel() + block.w_down[0].numel()) * block.w_down.element_size()
        expert_bytes += per_expert * block.local_experts
        x = torch.randn((batch, arch.hidden_size), generator=gen, device=device()).to(model.dtype)
        keys = torch.arange(batch, device=device())
        _, experts = block.route(x, keys, torch.full_like(keys, context))
        hit = int(torch.unique(experts).numel())
        touched.append(hit)
        read += per_expert * hit
    model.reset_expert_counts()
    bytes_per_step = counted["bytes_per_step"] - expert_bytes + read
    return {"bytes_per_step_all_experts": counted["bytes_per_step"], "bytes_per_step": bytes_per_step,
            "experts_touched_per_layer_min": min(touched), "experts_touched_per_layer_mean": float(np.mean(touched)),
            "experts_per_layer": model.arch.num_experts}


# ------------------------------------------------------------------------------------------------ memory


def memory_breakdown(model_name: str, tokens: int) -> dict[str, object]:
    """Allocated bytes beside weights and KV pool: kept after the warm-up (kernel tuning, CUDA graphs), and the
    transient peak of one prefill iteration of `tokens` tokens on the fused path."""
    from infscale.backends.torch.executor import TorchExecutor
    from infscale.backends.torch.model import DecoderModel
    from infscale.catalog import get_model
    from infscale.memory import torch_engine_activation_bytes
    from infscale.serving.executor import IterationBatch

    arch = get_model(model_name)
    model = DecoderModel(arch, dtype=torch.bfloat16, device=device(), seed=0)
    executor = TorchExecutor(model, 2 * -(-tokens // 16) + 64, 16, np.full(2, tokens), np.full(2, 4), seed=0)
    synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    executor.warmup()
    synchronize()
    kept = torch.cuda.memory_allocated() - base
    warm_peak = torch.cuda.max_memory_allocated() - base
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    empty = np.zeros(0, dtype=np.int64)
    executor.iteration(IterationBatch(empty, empty, np.array([0]), np.array([tokens]), np.array([0])))
    synchronize()
    iteration_peak = torch.cuda.max_memory_allocated() - before
    out = {"model": model_name, "tokens": tokens, "graph_sizes": executor.graphs.sizes,
           "warmup_kept_bytes": kept, "warmup_peak_bytes": warm_peak, "iteration_peak_bytes": iteration_peak,
           "activation_estimate_bytes": torch_engine_activation_bytes(arch, 1, 1, tokens, 2),
           "reserved_bytes": torch.cuda.memory_reserved()}
    log(f"  warm-up keeps {kept / GIB:.2f} GiB (peak {warm_peak / GIB:.2f}), a {tokens}-token iteration peaks at "
        f"{iteration_peak / GIB:.2f} GiB (estimate {out['activation_estimate_bytes'] / GIB:.2f})")
    del executor, model
    torch.cuda.empty_cache()
    return out


def memory_part(args, report: dict, save) -> None:
    """Campaign cells at ISL 8K/16K/32K with max_num_tokens 8192 through TorchBackend, as a campaign runs them."""
    from infscale.backends.base import BuildSpec
    from infscale.backends.torch.backend import TorchBackend
    from infscale.campaign import campaign_from_dict
    from infscale.campaign.plan import plan_campaign
    from infscale.memory import torch_engine_activation_bytes

    rows: list[dict[str, object]] = []
    report["memory"] = {"rows": rows, "max_num_tokens": args.memory_max_num_tokens}
    if device().type == "cuda":
        log("memory: what the executor's warm-up keeps and one iteration of max_num_tokens needs (Llama-3.1-8B)")
        report["memory"]["breakdown"] = memory_breakdown("llama-3.1-8b", args.memory_max_num_tokens)
        save()
    with tempfile.TemporaryDirectory() as scratch:
        models = args.memory_models
        pairs = [[isl, 4] for isl in args.memory_isl]
        if args.cpu_dry_run:
            tiny = Path(scratch) / "config.json"
            tiny.write_text(json.dumps(TINY_CONFIG))
            models = [str(tiny)]
        backend = TorchBackend(None if not args.cpu_dry_run else "cpu")
        try:
            for model in models:
                raw = {"name": "memory-check", "backend": "torch", "hardware": args.hardware,
                       "models": [model], "layouts": ["tp1"], "requests": args.memory_requests,
                       "workloads": [{"name": "long", "pairs": pairs}],
                       "engine": {"max_num_tokens": args.memory_max_num_tokens, "max_num_seqs": 256}}
                campaign = campaign_from_dict(raw, source="h200_engine_speed")
                for item in plan_campaign(campaign):
                    cell = item.cell
                    row: dict[str, object] = {"cell_id": cell.id, "feasible": item.feasible, "reason": item.reason,
                                              "planned_kv_blocks": item.memory.kv_blocks_per_replica,
                                              "planned_weights_bytes": item.memory.weights_bytes_per_gpu,
                                              "planned_reserve_bytes": item.memory.activation_reserve_bytes}
                    rows.append(row)
                    if not item.feasible:
                        log(f"memory: {cell.id} infeasible by the plan: {item.reason}")
                        save()
                        continue
                    if device().type == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    started = time.monotonic()
                    try:
                        result = backend.measure(cell, backend.prepare(BuildSpec.for_cells([cell]), campaign),
                                                 campaign)
                        summary = result.summary
                        row.update({"status": "ok", "output_tokens": summary.get("output_tokens"),
                                    "expected_output_tokens": cell.requests * 4,
                                    "kv_pool_blocks": summary.get("kv_pool_blocks"),
                                    "input_tok_s": summary.get("input_tok_s"),
                                    "ttft_ms_p50": summary.get("ttft_ms_p50"),
                                    "duration_s": summary.get("duration_s"), "preemptions": summary.get("preemptions")})
                    except Exception as err:
                        oom = "out of memory" in str(err).lower() or isinstance(err, torch.OutOfMemoryError)
                        row.update({"status": "oom" if oom else "error", "error": f"{type(err).__name__}: "
                                                                                   f"{str(err)[:400]}"})
                    row["wall_s"] = time.monotonic() - started
                    if device().type == "cuda":
                        member = backend._local
                        held = member._model.weight_bytes() if member and member._model is not None else None
                        arch = campaign.model_for(cell)
                        per_block = 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * 2 * 16
                        pool = per_block * (row.get("kv_pool_blocks") or 0)
                        peak = torch.cuda.max_memory_allocated()
                        estimate = torch_engine_activation_bytes(arch, 1, 1, args.memory_max_num_tokens, 256)
                        row.update({"peak_allocated_bytes": peak, "weights_bytes": held, "kv_pool_bytes": pool,
                                    "device_total_bytes": torch.cuda.mem_get_info()[1],
                                    "activation_estimate_bytes": estimate})
                        if held is not None and pool:
                            beyond = peak - held - pool
                            row["peak_beyond_weights_and_pool_bytes"] = beyond
                            row["estimate_covers_peak"] = bool(beyond <= estimate)  # the estimate alone, no slack
                            row["reserve_covers_peak"] = bool(beyond <= item.memory.activation_reserve_bytes)
                    row["passed"] = row.get("status") == "ok" and row.get("output_tokens") == cell.requests * 4
                    log(f"memory: {cell.id}: {row.get('status')}, {row['wall_s']:.0f} s"
                        + (f", peak {row['peak_allocated_bytes'] / GIB:.1f} GiB, beyond weights + pool "
                           f"{row.get('peak_beyond_weights_and_pool_bytes', 0) / GIB:.2f} GiB (estimate "
                           f"{row['activation_estimate_bytes'] / GIB:.2f})" if "peak_allocated_bytes" in row else ""))
                    save()
        finally:
            backend.close()


# ------------------------------------------------------------------------------------------------ main


def environment(commit: str | None) -> dict[str, object]:
    env = roofline.environment()
    if commit:  # a copy of the tree without its .git (the device machine): the commit it was made from
        env["git_commit"] = commit
        return env
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                           timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    return env


def headline(report: dict) -> dict[str, object]:
    """The keys the issue asks for, each with its target and whether it is met (None: not measured)."""
    out: dict[str, object] = {}

    def row(part: str, batch: int):
        rows = report.get(part, {}).get("rows", [])
        return next((r for r in rows if r.get("batch") == batch and r.get("passed")), None)

    values = {
        "decode_batch1_roofline_fraction": (row("decode", 1) or {}).get("fraction_of_read_roofline"),
        "decode_batch128_roofline_fraction": (row("decode", 128) or {}).get("fraction_of_read_roofline"),
        "prefill_mfu": report.get("prefill", {}).get("prefill_mfu"),
        "moe_decode_roofline_fraction": (row("moe", 128) or {}).get("fraction_of_read_roofline"),
    }
    for key, value in values.items():
        out[key] = value
        out[f"{key}_target"] = TARGETS[key]
        out[f"{key}_met"] = None if value is None else bool(value >= TARGETS[key])
    probe = report.get("probe", {})
    out["bandwidth_probe"] = probe.get("denominator")
    memory = report.get("memory", {}).get("rows")
    if memory is not None:
        out["memory_cells_feasible_and_passed"] = [r["cell_id"] for r in memory if r.get("passed")]
        out["memory_cells_failed"] = [r["cell_id"] for r in memory if r.get("feasible") and not r.get("passed")]
    return out


def print_summary(report: dict) -> None:
    head = report.get("headline", {})
    print("\nengine speed on", report.get("environment", {}).get("gpu_name"))
    probe = head.get("bandwidth_probe") or {}
    if probe:
        print(f"  roofline bandwidth {probe['bytes_per_s'] / 1e12:.3f} TB/s: {probe['which']}")
    for key in TARGETS:
        value = head.get(key)
        status = "not measured" if value is None else ("meets" if head[f"{key}_met"] else "BELOW")
        print(f"  {key:36s} {'' if value is None else f'{value:.3f}':>7} target {TARGETS[key]:.2f}  {status}")
    if "memory_cells_failed" in head:
        print(f"  memory cells passed: {len(head['memory_cells_feasible_and_passed'])}, "
              f"failed: {head['memory_cells_failed']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--reuse", type=Path, help="an earlier engine-speed.json whose probe (and other parts "
                                                   "not run now) is kept")
    parser.add_argument("--hardware", default="h200-sxm")
    parser.add_argument("--commit", help="the git commit of the code (when the tree that runs has no .git)")
    parser.add_argument("--probe-gib", type=float, default=4.0)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--matmul-n", type=int, default=8192)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--prefill-tokens", type=int, default=8192)
    parser.add_argument("--prefill-iterations", type=int, default=12)
    parser.add_argument("--prefill-warmup", type=int, default=2)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--decode-steps", type=int, default=30)
    parser.add_argument("--memory-models", nargs="+", default=["llama-3.1-8b", "qwen3-30b-a3b"])
    parser.add_argument("--memory-isl", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--memory-requests", type=int, default=12)
    parser.add_argument("--memory-max-num-tokens", type=int, default=8192)
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="exercise the script on CPU (tiny models, the Triton interpreter); no number is real")
    args = parser.parse_args()
    if args.cpu_dry_run:
        roofline.DEVICE = torch.device("cpu")
        args.probe_gib, args.reps, args.matmul_n = 1 / 256, 2, 64
        args.prefill_tokens, args.prefill_iterations, args.prefill_warmup = 40, 3, 1
        args.context, args.decode_steps, args.block_size = 24, 3, 4
        args.memory_isl, args.memory_requests, args.memory_max_num_tokens = [24, 40], 2, 16
    elif not torch.cuda.is_available():
        print("ERROR: no CUDA device (use --cpu-dry-run to check the script on CPU)", file=sys.stderr)
        return 2
    if triton is None:
        print("ERROR: triton is not importable", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    out_file = args.out / "engine-speed.json"
    report: dict[str, object] = json.loads(args.reuse.read_text()) if args.reuse else {}
    report["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    report["environment"] = environment(args.commit)
    report.setdefault("failures", [])

    def save() -> None:
        report["headline"] = headline(report)
        out_file.write_text(json.dumps(report, indent=1, default=str))

    log(f"{report['environment']['gpu_name']}, torch {torch.__version__}, triton {report['environment']['triton']}")
    ok = True
    steps = {
        "probe": lambda: (report.__setitem__("probe", probe(args.probe_gib, args.reps, args.matmul_n)),
                          torch.cuda.empty_cache() if device().type == "cuda" else None),
        "prefill": lambda: prefill_part(args, report, save),
        "decode": lambda: decode_part(args, report, save, "llama-3.1-8b", [1, 128], "decode"),
        "moe": lambda: decode_part(args, report, save, "qwen3-30b-a3b", [128], "moe"),
        "memory": lambda: memory_part(args, report, save),
    }
    for part in PARTS:
        if part not in args.parts:
            continue
        started = time.monotonic()
        try:
            steps[part]()
            if part == "probe":
                den = report["probe"]["denominator"]
                log(f"probe: {den['bytes_per_s'] / 1e12:.3f} TB/s ({den['which']}); bf16 matmul "
                    f"{report['probe']['matmul_bf16']['flops_per_s'] / 1e12:.0f} TFLOP/s")
        except Exception as err:
            ok = False
            report["failures"].append({"part": part, "error": f"{type(err).__name__}: {err}",
                                       "traceback": traceback.format_exc()})
            log(f"{part} FAILED: {type(err).__name__}: {err}")
            traceback.print_exc()
        report.setdefault("part_seconds", {})[part] = time.monotonic() - started
        save()
    print_summary(report)
    if args.cpu_dry_run:
        print("\nCPU DRY RUN: tiny models in the Triton interpreter; no number above is a measurement")
    print(f"\nwrote {out_file}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
