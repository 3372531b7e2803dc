"""A Triton grouped GEMM for the MoE experts of a decode step (the fast path's `TritonOps.moe_experts`).

At decode sizes each expert gets a handful of routed rows (batch 128, top-8 of 128 experts: about 8), so the step
is bound by streaming every routed expert's weights once. One program per (expert, N tile) loops over its
expert's rows (found from the group ends on the device: no host synchronisation, so the step stays capturable)
in M tiles of 16+ rows for the matrix units, and streams its weight tile over K. The gate/up projection is "dual":
it reads the gate and up halves of the fused weight and writes silu(gate) * up, rounded as the eager path rounds
(model.grouped_experts); the down projection is a plain grouped product. An expert with no rows reads nothing.
Rows past the last group's end (slots of other ranks' experts under EP) are not written, as with
torch._grouped_mm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from infscale.backends.torch import triton_attention
from infscale.backends.torch.triton_attention import interpret_mode

if triton_attention.triton is not None:
    from infscale.backends.torch.triton_attention import _mma, _swiglu

triton = triton_attention.triton
tl = triton_attention.tl

__all__ = ["MoEConfig", "moe_experts"]


if triton is not None:

    @triton.jit
    def _moe_gemm_kernel(
        x_ptr, w_ptr, out_ptr, ends_ptr, N, K, UP_OFF,
        stride_xm, stride_we, stride_wn, stride_om,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DUAL: tl.constexpr,
        DOT_F32: tl.constexpr, IEEE: tl.constexpr,
    ):
        """out[r] = x[r] · W[e]ᵀ for the rows r of expert e (ends[e-1] … ends[e]-1); DUAL: silu(x·Wgᵀ) * (x·Wuᵀ)
        with Wu the rows UP_OFF … of W[e]."""
        pid_n = tl.program_id(0)
        e = tl.program_id(1)
        end = tl.load(ends_ptr + e)
        start = tl.load(ends_ptr + e - 1, mask=e > 0, other=0)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = rn < N
        rk = tl.arange(0, BLOCK_K)
        w_rows = w_ptr + e.to(tl.int64) * stride_we + rn.to(tl.int64)[:, None] * stride_wn
        dtype = out_ptr.dtype.element_ty
        for m0 in range(start, end, BLOCK_M):
            rm = m0 + tl.arange(0, BLOCK_M)
            mmask = rm < end
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            acc2 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for k in range(0, K, BLOCK_K):
                x = tl.load(x_ptr + rm.to(tl.int64)[:, None] * stride_xm + (k + rk)[None, :], mask=mmask[:, None],
                            other=0.0)
                w = tl.load(w_rows + (k + rk)[None, :], mask=nmask[:, None], other=0.0)
                acc = _mma(x, w, acc, DOT_F32, IEEE)
                if DUAL:
                    w2 = tl.load(w_rows + UP_OFF.to(tl.int64) * stride_wn + (k + rk)[None, :], mask=nmask[:, None],
                                 other=0.0)
                    acc2 = _mma(x, w2, acc2, DOT_F32, IEEE)
            y = acc
            if DUAL:
                y = _swiglu(acc, acc2, dtype)
            tl.store(out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :], y.to(dtype),
                     mask=mmask[:, None] & nmask[None, :])


@dataclass(frozen=True)
class MoEConfig:
    """The grouped kernel's launch: rows per M tile, output columns per program, K per step, warps, stages."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    warps: int = 4
    stages: int = 4


def _grouped(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor, n: int, up_off: int, dual: bool,
             config: MoEConfig, dot_f32: bool) -> torch.Tensor:
    rows, k = x.shape
    block_k = min(config.block_k, k & -k)  # K's largest power-of-two divisor caps the tile (tiny test models)
    if block_k < 16:
        raise ValueError(f"the grouped MoE kernel needs K ({k}) divisible by 16")
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    fp32 = x.dtype == torch.float32
    grid = (triton.cdiv(n, config.block_n), w.shape[0])
    _moe_gemm_kernel[grid](x, w, out, ends, n, k, up_off, x.stride(0), w.stride(0), w.stride(1), out.stride(0),
                           BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=block_k, DUAL=dual,
                           DOT_F32=dot_f32 or fp32, IEEE=fp32, num_warps=config.warps, num_stages=config.stages)
    return out


def moe_experts(gathered: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, ends: torch.Tensor,
                config: MoEConfig | None = None, dot_f32: bool | None = None) -> torch.Tensor:
    """The experts of routed slots sorted by expert: gathered [S, H] (expert e's rows are ends[e-1] … ends[e]-1),
    w_gate_up [E, 2I, H], w_down [E, H, I], ends [E] int32 cumulative. Returns [S, H] (rows past ends[-1] are
    not written), the same function as model.grouped_experts."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    config = config or MoEConfig()
    dot_f32 = interpret_mode() if dot_f32 is None else dot_f32
    if gathered.stride(-1) != 1 or w_gate_up.stride(-1) != 1 or w_down.stride(-1) != 1:
        raise ValueError("the grouped MoE kernel needs rows contiguous in their last dimension")
    inter = w_gate_up.shape[1] // 2
    act = _grouped(gathered, w_gate_up, ends, inter, inter, True, config, dot_f32)
    return _grouped(act, w_down, ends, w_down.shape[1], 0, False, config, dot_f32)


def moe_candidates() -> list[MoEConfig]:
    return [MoEConfig(16, 64, 128, 4, 4), MoEConfig(16, 128, 128, 4, 3), MoEConfig(16, 64, 256, 4, 3),
            MoEConfig(16, 32, 256, 4, 4), MoEConfig(32, 64, 128, 4, 4), MoEConfig(16, 128, 64, 4, 4),
            MoEConfig(32, 128, 64, 8, 3)]


def tune_moe(ops, blocks: list, batch_sizes, reps: int = 3, tolerance: float = 2e-2,
             seed: int = 0) -> list[dict[str, object]]:
    """Choose the grouped kernel's launch for each decode batch size: route a batch of random hidden states
    through the first MoE block (counted nowhere: valid False), check every candidate against
    model.grouped_experts on those routed rows, time it over every block's experts in turn (weights streamed
    from HBM, as in the step; CUDA events of a captured graph), and set ops.moe_configs[routed slots]."""
    from infscale.backends.torch.model import grouped_experts
    from infscale.backends.torch.triton_attention import _rel_err, _time_cuda

    first = blocks[0]
    device = first.w_down.device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    log: list[dict[str, object]] = []
    for batch in sorted({int(b) for b in batch_sizes}):
        hidden = first.w_down.shape[1]
        x = torch.randn((batch, hidden), generator=gen, device=device, dtype=torch.float32).to(first.w_down.dtype)
        keys = torch.arange(batch, device=device)
        token, ends, _ = first.sorted_slots(x, keys, keys, valid=torch.zeros(batch, dtype=torch.bool, device=device))
        gathered = x[token]
        rows = int(ends[-1])
        reference = grouped_experts(gathered, first.w_gate_up, first.w_down, ends)[:rows]
        best, best_time = MoEConfig(), float("inf")
        for config in moe_candidates():
            row: dict[str, object] = {"batch": batch, "slots": gathered.shape[0], "config": str(config)}
            try:
                out = moe_experts(gathered, first.w_gate_up, first.w_down, ends, config, dot_f32=ops.interpret)
                row["rel_err"] = err = _rel_err(out[:rows], reference)
                if not err <= tolerance:
                    row["rejected"] = "wrong result"
                    log.append(row)
                    continue

                def run(config: MoEConfig = config) -> None:
                    for block in blocks:
                        moe_experts(gathered, block.w_gate_up, block.w_down, ends, config, dot_f32=ops.interpret)

                row["seconds"] = _time_cuda(run, reps) / len(blocks)
            except Exception as err:  # a launch that fails to compile is skipped, and said so
                row["rejected"] = f"{type(err).__name__}: {str(err)[:160]}"
                log.append(row)
                continue
            log.append(row)
            if row["seconds"] < best_time:
                best, best_time = config, row["seconds"]
        ops.moe_configs[gathered.shape[0]] = best
        log.append({"batch": batch, "chosen": str(best), "seconds": best_time})
    ops.tuning_log += log
    return log
