"""Triton kernels of the torch backend's fast decode path, and `TritonOps`, the object the fast path calls them through.

The main kernel is the paged decode attention (flash-decoding): one program per (request, KV head, context
partition) reads only the blocks listed in the request's block table, handles all query heads of that KV head's
GQA group together (padded to 16 rows for the matrix units), accumulates in fp32 with an online softmax, and
either writes the output directly (one partition) or a partial result that a second, small kernel combines (several
partitions: long contexts at small batch, so that enough programs run). `block_size` is a compile-time constant.

Beside it, the small fused operations a decode step needs, so that a step is a few large kernels rather than
hundreds of small ones (what makes it fit the HBM roofline once it runs as one CUDA graph):
  - `add_rmsnorm`: residual += delta (delta in bf16, or fp32 split-K partials of the previous projection, summed
    here), then RMSNorm; one kernel instead of ~8;
  - `rope_kv`: QKV bias, QK-norm (Qwen3), RoPE from precomputed cos/sin tables, and the KV-cache write of the new
    token by slot; one kernel instead of ~25;
  - `linear`: x · Wᵀ for decode-sized x, as a GEMV (one row, no matrix units, long contiguous weight rows) or a
    skinny GEMM (tl.dot), optionally split over K (fp32 partials for `add_rmsnorm`) and optionally "dual" (the
    SwiGLU gate/up pair: out = silu(x·Wg) * (x·Wu) straight from the two halves of the fused weight). Which
    variant (or cuBLAS through torch) serves which shape and batch is measured on the device (`tune_linear`), so
    the fast path is never slower than the library.

Rounding mimics the eager path (model.py): every value the eager path stores in the model dtype is rounded to
it here as well, so the two paths differ only by accumulation order.

Interpreter (TRITON_INTERPRET=1, CPU tensors, for the tests): numpy has no bfloat16, and the interpreter treats
bf16 arithmetic and bf16 tl.dot as integer arithmetic, so every kernel converts bf16 to fp32 before any
arithmetic, and, in interpreter mode only, feeds tl.dot fp32 operands (`DOT_F32`). On the GPU, dots take bf16
operands with fp32 accumulation; fp32 models use IEEE-precision dots (no TF32).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None
    tl = None

__all__ = ["AttnConfig", "LinearConfig", "TritonOps", "available", "interpret_mode", "paged_decode_attention"]


def available() -> bool:
    return triton is not None


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# ------------------------------------------------------------------------------------------------ kernels

if triton is not None:

    @triton.jit
    def _mma(x, w, acc, DOT_F32: tl.constexpr, IEEE: tl.constexpr):
        """acc + x · wᵀ on the matrix units: fp32 operands in the interpreter (DOT_F32), IEEE for fp32 models."""
        if DOT_F32:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        if IEEE:
            out = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        else:
            out = tl.dot(x, tl.trans(w), acc)
        return out

    @triton.jit
    def _swiglu(gate_acc, up_acc, dtype: tl.constexpr):
        """silu(gate) * up from fp32 values, each stored value rounded to `dtype` as the eager path stores it."""
        gate = gate_acc.to(dtype).to(tl.float32)
        up = up_acc.to(dtype).to(tl.float32)
        return (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32) * up

    @triton.jit
    def _softmax_step(q, k, v, valid, m_i, l_i, acc, scale_log2, round_to: tl.constexpr, MASKED: tl.constexpr,
                      DOT_F32: tl.constexpr, IEEE: tl.constexpr):
        """One key tile of an online softmax in the exp2 domain: scores q · kᵀ · scale (−inf where `valid` is
        False when MASKED), the running maximum and sum rescaled, and the P · V accumulator with P rounded to
        `round_to` (the model dtype). Returns (m, l, acc)."""
        if DOT_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2
        else:
            s = tl.dot(q, tl.trans(k)) * scale_log2
        if MASKED:
            s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            pv = tl.dot(p, v, input_precision="ieee")
        elif DOT_F32:
            pv = tl.dot(p.to(round_to).to(tl.float32), v)
        else:
            pv = tl.dot(p.to(v.dtype), v)
        return m_new, l_i, acc * alpha[:, None] + pv

    @triton.jit
    def _paged_decode_kernel(
        q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, out_ptr, part_o_ptr, part_ml_ptr,
        scale_log2,
        stride_qb, stride_qh,
        stride_kblk, stride_ktok, stride_khead,
        stride_tb,
        stride_ob, stride_oh,
        NUM_SPLITS: tl.constexpr, PARTITION: tl.constexpr,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr,
    ):
        kvh = tl.program_id(0)  # fastest: the KV heads of one token (contiguous in the pool) are read together
        b = tl.program_id(1)
        split = tl.program_id(2)
        ctx = tl.load(lens_ptr + b).to(tl.int32)
        if NUM_SPLITS == 1:
            start = 0
            end = ctx
        else:
            start = split * PARTITION
            end = tl.minimum(start + PARTITION, ctx)
        g = tl.arange(0, GROUP_PAD)
        gmask = g < GROUP
        heads = kvh * GROUP + g
        d = tl.arange(0, HEAD_DIM)
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=gmask[:, None], other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
        m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        table_row = table_ptr + b * stride_tb
        head_off = kvh * stride_khead
        for t0 in range(start, end, BLOCK_N):
            toks = t0 + tl.arange(0, BLOCK_N)
            tmask = toks < end
            blk = tl.load(table_row + toks // BLOCK_SIZE, mask=tmask, other=0).to(tl.int64)
            row = blk * stride_kblk + (toks % BLOCK_SIZE) * stride_ktok + head_off
            k = tl.load(k_ptr + row[:, None] + d[None, :], mask=tmask[:, None], other=0.0)
            v = tl.load(v_ptr + row[:, None] + d[None, :], mask=tmask[:, None], other=0.0)
            m_i, l_i, acc = _softmax_step(q, k, v, tmask[None, :], m_i, l_i, acc, scale_log2,
                                          out_ptr.dtype.element_ty, True, DOT_F32, IEEE)
        if NUM_SPLITS == 1:
            out = acc / l_i[:, None]
            tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=gmask[:, None])
        else:
            # partial results: o [B, H, S, D] normalised by its own l; (m, l) [B, H, S, 2]; an empty partition
            # (start >= ctx) leaves m = -inf, l = 0, which the reduction masks out
            l_safe = tl.where(l_i > 0, l_i, 1.0)
            out = acc / l_safe[:, None]
            num_heads = tl.num_programs(0) * GROUP
            base = (b * num_heads + heads) * NUM_SPLITS + split
            tl.store(part_o_ptr + base[:, None] * HEAD_DIM + d[None, :], out, mask=gmask[:, None])
            tl.store(part_ml_ptr + base * 2, m_i, mask=gmask)
            tl.store(part_ml_ptr + base * 2 + 1, l_i, mask=gmask)

    @triton.jit
    def _paged_decode_reduce_kernel(
        part_o_ptr, part_ml_ptr, lens_ptr, out_ptr, stride_ob, stride_oh,
        NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, PARTITION: tl.constexpr, HEAD_DIM: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        num_heads = tl.num_programs(1)
        ctx = tl.load(lens_ptr + b).to(tl.int32)
        active = (ctx + PARTITION - 1) // PARTITION
        s = tl.arange(0, SPLITS_PAD)
        smask = s < active
        base = (b * num_heads + h) * NUM_SPLITS + s
        m = tl.load(part_ml_ptr + base * 2, mask=smask, other=float("-inf"))
        l_part = tl.load(part_ml_ptr + base * 2 + 1, mask=smask, other=0.0)
        m_max = tl.max(m, 0)
        w = tl.where(smask, tl.exp2(m - m_max) * l_part, 0.0)
        d = tl.arange(0, HEAD_DIM)
        o = tl.load(part_o_ptr + base[:, None] * HEAD_DIM + d[None, :], mask=smask[:, None], other=0.0)
        out = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
        tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty))

    @triton.jit
    def _add_rmsnorm_kernel(
        res_ptr, delta_ptr, w_ptr, out_ptr, N, eps,
        stride_res, stride_dm, stride_ds, stride_out,
        DELTA: tl.constexpr, PARTS: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """DELTA: 0 none, 1 a tensor in the model dtype [M, N], 2 fp32 split-K partials [PARTS, M, N]."""
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        dtype = out_ptr.dtype.element_ty
        h = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0).to(tl.float32)
        if DELTA == 1:
            delta = tl.load(delta_ptr + row * stride_dm + cols, mask=mask, other=0.0).to(tl.float32)
        if DELTA == 2:
            delta = tl.zeros([BLOCK], tl.float32)
            for part in tl.static_range(PARTS):
                delta += tl.load(delta_ptr + part * stride_ds + row * stride_dm + cols, mask=mask, other=0.0)
            delta = delta.to(dtype).to(tl.float32)  # the projection's output, rounded as the eager path stores it
        if DELTA != 0:
            h = (h + delta).to(dtype).to(tl.float32)
            tl.store(res_ptr + row * stride_res + cols, h.to(dtype), mask=mask)
        var = tl.sum(h * h, 0) / N
        normed = (h * tl.rsqrt(var + eps)).to(dtype).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_out + cols, (normed * w).to(dtype), mask=mask)

    @triton.jit
    def _rope_kv_kernel(
        qkv_ptr, bias_ptr, qn_ptr, kn_ptr, lens_ptr, table_ptr, cos_ptr, sin_ptr,
        q_out_ptr, k_pool_ptr, v_pool_ptr, eps,
        stride_qkv, stride_qo_t, stride_qo_h, stride_tb, stride_slot,
        HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_QK_NORM: tl.constexpr, BY_SLOT: tl.constexpr, HEADS_PER: tl.constexpr,
    ):
        """One program per (token, tile of HEADS_PER heads), heads 0 … HEADS-1 the queries and HEADS … HEADS+KV-1
        the KV heads (the latter also store V). qkv [T, (HEADS + 2 KV) · D] as the fused projection writes it;
        token t of a decode batch sits at position lens[t] - 1, in slot table[t, pos // BLOCK_SIZE] · BLOCK_SIZE
        + pos % …; BY_SLOT (a packed batch): lens_ptr holds each token's position and table_ptr its flat slot."""
        t = tl.program_id(0)
        HALF: tl.constexpr = HEAD_DIM // 2
        h = tl.program_id(1) * HEADS_PER + tl.arange(0, HEADS_PER)
        i = tl.arange(0, HALF)
        dtype = q_out_ptr.dtype.element_ty
        is_q = h < HEADS
        is_k = (h >= HEADS) & (h < HEADS + KV_HEADS)
        live = is_q | is_k
        if BY_SLOT:
            pos = tl.load(lens_ptr + t).to(tl.int64)
        else:
            pos = tl.load(lens_ptr + t).to(tl.int64) - 1
        cos = tl.load(cos_ptr + pos * HALF + i)[None, :]
        sin = tl.load(sin_ptr + pos * HALF + i)[None, :]
        base = qkv_ptr + t.to(tl.int64) * stride_qkv
        cols = h[:, None] * HEAD_DIM + i[None, :]
        x1 = tl.load(base + cols, mask=live[:, None], other=0.0).to(tl.float32)
        x2 = tl.load(base + HALF + cols, mask=live[:, None], other=0.0).to(tl.float32)
        if HAS_BIAS:
            x1 = (x1 + tl.load(bias_ptr + cols, mask=live[:, None], other=0.0).to(tl.float32)).to(dtype).to(tl.float32)
            x2 = (x2 + tl.load(bias_ptr + HALF + cols, mask=live[:, None], other=0.0).to(tl.float32)).to(
                dtype).to(tl.float32)
        if HAS_QK_NORM:
            r = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / HEAD_DIM + eps)[:, None]
            w1 = tl.where(is_q[:, None], tl.load(qn_ptr + i)[None, :].to(tl.float32),
                          tl.load(kn_ptr + i)[None, :].to(tl.float32))
            w2 = tl.where(is_q[:, None], tl.load(qn_ptr + HALF + i)[None, :].to(tl.float32),
                          tl.load(kn_ptr + HALF + i)[None, :].to(tl.float32))
            x1 = ((x1 * r).to(dtype).to(tl.float32) * w1).to(dtype).to(tl.float32)
            x2 = ((x2 * r).to(dtype).to(tl.float32) * w2).to(dtype).to(tl.float32)
        y1 = (x1 * cos - x2 * sin).to(dtype)
        y2 = (x2 * cos + x1 * sin).to(dtype)
        q_rows = q_out_ptr + t.to(tl.int64) * stride_qo_t + h[:, None] * stride_qo_h
        tl.store(q_rows + i[None, :], y1, mask=is_q[:, None])
        tl.store(q_rows + HALF + i[None, :], y2, mask=is_q[:, None])
        if BY_SLOT:
            slot = tl.load(table_ptr + t).to(tl.int64)
        else:
            block = tl.load(table_ptr + t * stride_tb + pos // BLOCK_SIZE).to(tl.int64)
            slot = block * BLOCK_SIZE + pos % BLOCK_SIZE
        kvh = tl.where(is_k, h - HEADS, 0)
        dst = slot * stride_slot + kvh[:, None] * HEAD_DIM
        tl.store(k_pool_ptr + dst + i[None, :], y1, mask=is_k[:, None])
        tl.store(k_pool_ptr + dst + HALF + i[None, :], y2, mask=is_k[:, None])
        j = tl.arange(0, HEAD_DIM)[None, :]
        vcols = (h[:, None] + KV_HEADS) * HEAD_DIM + j
        v = tl.load(base + vcols, mask=is_k[:, None], other=0.0)
        if HAS_BIAS:
            vb = tl.load(bias_ptr + vcols, mask=is_k[:, None], other=0.0).to(tl.float32)
            v = (v.to(tl.float32) + vb).to(dtype)
        tl.store(v_pool_ptr + dst + j, v, mask=is_k[:, None])

    @triton.jit
    def _finish_kernel(
        logits_ptr, valid_ptr, result_ptr, ids_ptr, lens_ptr, V, stride_l, stride_r,
        BLOCK: tl.constexpr,
    ):
        """Per row: greedy token (first index of the maximum, as torch.argmax) and whether every logit is
        finite; result[0, row] = token, result[1, row] = finite or padding row; the row's next input id is the
        token and its context grows by one if it is valid."""
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        best = tl.full([BLOCK], float("-inf"), tl.float32)
        best_idx = tl.zeros([BLOCK], tl.int32)
        bad = tl.zeros([BLOCK], tl.int32)
        for start in range(0, V, BLOCK):
            idx = start + cols
            mask = idx < V
            x = tl.load(logits_ptr + row * stride_l + idx, mask=mask, other=float("-inf")).to(tl.float32)
            bad += (mask & ((x != x) | (tl.abs(x) == float("inf")))).to(tl.int32)
            take = x > best
            best = tl.where(take, x, best)
            best_idx = tl.where(take, idx, best_idx)
        top = tl.max(best, 0)
        token = tl.min(tl.where(best == top, best_idx, V), 0)
        token = tl.minimum(token, V - 1)  # an all -inf / NaN row still gives a valid id (it is flagged below)
        valid = tl.load(valid_ptr + row).to(tl.int32)
        ok = (tl.sum(bad, 0) == 0) | (valid == 0)
        tl.store(result_ptr + row, token.to(tl.int64))
        tl.store(result_ptr + stride_r + row, ok.to(tl.int64))
        tl.store(ids_ptr + row, token.to(tl.int64))
        tl.store(lens_ptr + row, tl.load(lens_ptr + row) + valid.to(tl.int64))

    @triton.jit
    def _gemv_kernel(
        x_ptr, w_ptr, out_ptr, N, K, K_SPLIT, UP_OFF, stride_wn,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DUAL: tl.constexpr, PARTIAL: tl.constexpr,
        EVEN_K: tl.constexpr,
    ):
        """One row of x (M = 1): out[n] = Σ_k x[k] W[n, k] over this program's K range, without matrix units.
        Each program streams BLOCK_N long weight rows (16-byte loads along K); the products are summed per lane
        and reduced across the tile once, at the end."""
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = rn < N
        rk = tl.arange(0, BLOCK_K)
        k_lo = pid_s * K_SPLIT
        k_hi = tl.minimum(k_lo + K_SPLIT, K)
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        x_ptrs = x_ptr + k_lo + rk
        w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * stride_wn + (k_lo + rk)[None, :]
        if DUAL:
            acc2 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
            w2_ptrs = w_ptrs + UP_OFF.to(tl.int64) * stride_wn
        for k in range(k_lo, k_hi, BLOCK_K):
            if EVEN_K:
                x = tl.load(x_ptrs).to(tl.float32)
                w = tl.load(w_ptrs, mask=nmask[:, None], other=0.0, eviction_policy="evict_first")
            else:
                kmask = (k + rk) < k_hi
                x = tl.load(x_ptrs, mask=kmask, other=0.0).to(tl.float32)
                w = tl.load(w_ptrs, mask=nmask[:, None] & kmask[None, :], other=0.0, eviction_policy="evict_first")
            acc += w.to(tl.float32) * x[None, :]
            if DUAL:
                if EVEN_K:
                    w2 = tl.load(w2_ptrs, mask=nmask[:, None], other=0.0, eviction_policy="evict_first")
                else:
                    w2 = tl.load(w2_ptrs, mask=nmask[:, None] & kmask[None, :], other=0.0,
                                 eviction_policy="evict_first")
                acc2 += w2.to(tl.float32) * x[None, :]
                w2_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        y = tl.sum(acc, 1)
        dtype = out_ptr.dtype.element_ty
        if DUAL:
            y = _swiglu(y, tl.sum(acc2, 1), x_ptr.dtype.element_ty)
        if PARTIAL:
            tl.store(out_ptr + pid_s * N + rn, y, mask=nmask)
        else:
            tl.store(out_ptr + rn, y.to(dtype), mask=nmask)

    @triton.jit
    def _gemm_kernel(
        x_ptr, w_ptr, out_ptr, M, N, K, K_SPLIT, UP_OFF, stride_xm, stride_wn, stride_om,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DUAL: tl.constexpr,
        PARTIAL: tl.constexpr, EVEN_K: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr,
    ):
        """A skinny GEMM on the matrix units: out[M, N] = x[M, K] · W[N, K]ᵀ (M padded to BLOCK_M ≥ 16)."""
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_s = tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mmask = rm < M
        nmask = rn < N
        rk = tl.arange(0, BLOCK_K)
        k_lo = pid_s * K_SPLIT
        k_hi = tl.minimum(k_lo + K_SPLIT, K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + (k_lo + rk)[None, :]
        w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * stride_wn + (k_lo + rk)[None, :]
        if DUAL:
            acc2 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            w2_ptrs = w_ptrs + UP_OFF.to(tl.int64) * stride_wn
        for k in range(k_lo, k_hi, BLOCK_K):
            if EVEN_K:
                x = tl.load(x_ptrs, mask=mmask[:, None], other=0.0)
                w = tl.load(w_ptrs, mask=nmask[:, None], other=0.0)
            else:
                kmask = (k + rk) < k_hi
                x = tl.load(x_ptrs, mask=mmask[:, None] & kmask[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=nmask[:, None] & kmask[None, :], other=0.0)
            acc = _mma(x, w, acc, DOT_F32, IEEE)
            if DUAL:
                if EVEN_K:
                    w2 = tl.load(w2_ptrs, mask=nmask[:, None], other=0.0)
                else:
                    w2 = tl.load(w2_ptrs, mask=nmask[:, None] & kmask[None, :], other=0.0)
                acc2 = _mma(x, w2, acc2, DOT_F32, IEEE)
                w2_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        dtype = out_ptr.dtype.element_ty
        y = acc
        if DUAL:
            y = _swiglu(acc, acc2, x_ptr.dtype.element_ty)
        omask = mmask[:, None] & nmask[None, :]
        if PARTIAL:
            tl.store(out_ptr + pid_s * M * N + rm[:, None] * N + rn[None, :], y, mask=omask)
        else:
            tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], y.to(dtype), mask=omask)


# ------------------------------------------------------------------------------------------------ configs


@dataclass(frozen=True)
class AttnConfig:
    """Paged decode attention launch: tokens per inner tile, warps, pipeline stages, and the context partition
    (0 = one partition per request: no second pass)."""

    block_n: int = 64
    warps: int = 4
    stages: int = 2
    partition: int = 0


@dataclass(frozen=True)
class LinearConfig:
    """How one projection runs: `torch` (cuBLAS), `gemv` (M = 1, no matrix units) or `gemm` (tl.dot), with its
    tile, split over K (split > 1 gives fp32 partials, only where the consumer sums them) and launch shape."""

    kind: str = "torch"
    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    split: int = 1
    warps: int = 4
    stages: int = 3

    def label(self) -> str:
        if self.kind == "torch":
            return "torch"
        m = "" if self.kind == "gemv" else f"m{self.block_m}"
        return f"{self.kind}:{m}n{self.block_n}k{self.block_k}s{self.split}w{self.warps}st{self.stages}"


def default_attn_config(batch: int, kv_heads: int, max_context: int, sms: int = 132) -> AttnConfig:
    """Split the context only when batch × KV heads leaves most of the chip idle: aim for ~4 programs per SM at
    the longest context the graph serves, never partitions shorter than 64 tokens."""
    programs = batch * kv_heads
    if programs >= 2 * sms or max_context <= 128:
        return AttnConfig()
    want = max(1, (4 * sms) // programs)
    partition = max(64, _pow2(-(-max_context // want)))
    if partition >= max_context:
        return AttnConfig()
    return AttnConfig(partition=partition)


def linear_candidates(m: int, n: int, k: int, dual: bool, partial_ok: bool) -> list[LinearConfig]:
    """The variants `tune_linear` times for an [m, k] · [n, k]ᵀ projection (always including cuBLAS). K tiles
    are clipped to K's largest power-of-two divisor (tiny test models); a split must divide K into whole tiles."""
    out = [LinearConfig("torch")]
    splits = [1, 2, 4] if partial_ok else [1]
    k_pow2 = k & -k

    def tile(bk: int) -> int:
        return min(bk, k_pow2)

    if m == 1:
        for bn, bk, warps, stages in ((8, 512, 4, 1), (16, 256, 4, 1), (4, 512, 4, 1), (8, 256, 2, 1),
                                      (16, 512, 8, 1), (8, 512, 4, 3), (2, 1024, 4, 1)):
            for split in splits:
                cfg = LinearConfig("gemv", 1, bn, tile(bk), split, warps, stages)
                if k % (split * cfg.block_k) == 0 and cfg not in out:
                    out.append(cfg)
    bm = min(128, max(16, _pow2(m)))
    if m <= 16:
        tiles = ((16, 64, 256, 4, 4), (16, 32, 256, 4, 4), (16, 128, 128, 4, 4), (16, 64, 128, 4, 6))
    elif m <= 64:
        tiles = ((bm, 64, 128, 4, 4), (bm, 128, 64, 4, 4), (bm, 32, 256, 4, 4))
    else:
        tiles = ((64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 64, 128, 4, 4))
    for bm_, bn, bk, warps, stages in tiles:
        if dual and bm_ * bn > 64 * 128:
            continue
        for split in splits:
            cfg = LinearConfig("gemm", bm_, bn, max(16, tile(bk)), split, warps, stages)
            if k % (split * cfg.block_k) == 0 and cfg not in out:
                out.append(cfg)
    return out


# ------------------------------------------------------------------------------------------------ ops


class TritonOps:
    """The fast decode path's operations through the kernels above (GPU, or the interpreter on CPU tensors).

    `linear_configs` maps (site, M) to the chosen `LinearConfig` (filled by `tune_linear`; without an entry the
    defaults below apply); `attn_configs` maps a batch size to its `AttnConfig`."""

    name = "triton"

    def __init__(self, default_linear: LinearConfig | None = None):
        if triton is None:
            raise RuntimeError("triton is not installed: the fast decode path's kernels need it")
        self.interpret = interpret_mode()
        self.linear_configs: dict[tuple[str, int], LinearConfig] = {}
        self.attn_configs: dict[int, AttnConfig] = {}
        self.moe_configs: dict[int, object] = {}  # routed slots -> triton_moe.MoEConfig
        self.default_linear = default_linear
        self.tuning_log: list[dict[str, object]] = []

    # -------------------------------------------------------------------------------------------- linear

    def linear_config(self, site: str, m: int, n: int, k: int, partial_ok: bool) -> LinearConfig:
        cfg = self.linear_configs.get((site, m))
        if cfg is None:
            cfg = self.default_linear
            if cfg is None:
                cfg = LinearConfig("gemv", 1, 8, 512, 1, 4, 1) if m == 1 else LinearConfig("torch")
        if cfg.split > 1 and not partial_ok:
            cfg = replace(cfg, split=1)
        return cfg

    def linear(self, x: torch.Tensor, w: torch.Tensor, site: str = "", partial_ok: bool = False,
               config: LinearConfig | None = None) -> torch.Tensor:
        """x [M, K] · w[N, K]ᵀ -> [M, N] in x's dtype, or fp32 partials [S, M, N] (only if partial_ok)."""
        m, k = x.shape
        n = w.shape[0]
        cfg = config or self.linear_config(site, m, n, k, partial_ok)
        return self._run_linear(cfg, x, w, n, 0, dual=False)

    def gate_up(self, x: torch.Tensor, w_gate_up: torch.Tensor, site: str = "gate_up",
                config: LinearConfig | None = None) -> torch.Tensor:
        """silu(x · Wgᵀ) * (x · Wuᵀ) with W = [Wg; Wu] (the fused weight): [M, I]."""
        m, k = x.shape
        inter = w_gate_up.shape[0] // 2
        cfg = config or self.linear_config(site, m, inter, k, False)
        if cfg.split > 1:  # silu is not linear: the pair is never split over K
            cfg = replace(cfg, split=1)
        return self._run_linear(cfg, x, w_gate_up, inter, inter, dual=True)

    def _run_linear(self, cfg: LinearConfig, x: torch.Tensor, w: torch.Tensor, n: int, up_off: int,
                    dual: bool) -> torch.Tensor:
        m, k = x.shape
        if cfg.kind == "torch" or x.stride(-1) != 1 or w.stride(-1) != 1:
            if dual:
                gate, up = torch.nn.functional.linear(x, w).chunk(2, dim=-1)
                return torch.nn.functional.silu(gate) * up
            return torch.nn.functional.linear(x, w)
        split = cfg.split
        block_k = min(cfg.block_k, _pow2(k))
        k_split = -(-k // split)
        k_split = -(-k_split // block_k) * block_k
        even = k % block_k == 0 and k_split * split == k
        partial = split > 1
        if partial:
            out = torch.empty((split, m, n), dtype=torch.float32, device=x.device)
        else:
            out = torch.empty((m, n), dtype=x.dtype, device=x.device)
        if cfg.kind == "gemv" and m == 1:
            block_n = min(cfg.block_n, _pow2(n))
            grid = (triton.cdiv(n, block_n), split)
            _gemv_kernel[grid](x, w, out, n, k, k_split, up_off, w.stride(0),
                               BLOCK_N=block_n, BLOCK_K=block_k, DUAL=dual, PARTIAL=partial, EVEN_K=even,
                               num_warps=cfg.warps, num_stages=cfg.stages)
            return out
        block_m = max(16, min(cfg.block_m, _pow2(m)))
        block_n = max(16, min(cfg.block_n, _pow2(n)))
        block_k = max(16, block_k)
        even = k % block_k == 0 and k_split * split == k and k_split % block_k == 0
        grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m), split)
        fp32 = x.dtype == torch.float32
        _gemm_kernel[grid](x, w, out, m, n, k, k_split, up_off, x.stride(0), w.stride(0), n,
                           BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DUAL=dual, PARTIAL=partial,
                           EVEN_K=even, DOT_F32=self.interpret or fp32, IEEE=fp32,
                           num_warps=cfg.warps, num_stages=cfg.stages)
        return out

    # -------------------------------------------------------------------------------------------- small ops

    def add_rmsnorm(self, residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                    eps: float) -> torch.Tensor:
        """residual += delta (in place; delta [M, N] or fp32 partials [S, M, N] or None); returns
        rms_norm(residual) · weight, rounded as model.rms_norm rounds."""
        m, n = residual.shape
        out = torch.empty_like(residual)
        if delta is None:
            mode, parts, dptr, sdm, sds = 0, 1, residual, 0, 0
        elif delta.dim() == 3:
            mode, parts, dptr, sdm, sds = 2, delta.shape[0], delta, delta.stride(1), delta.stride(0)
        else:
            mode, parts, dptr, sdm, sds = 1, 1, delta, delta.stride(0), 0
        block = _pow2(n)
        warps = 4 if block <= 1024 else (8 if block <= 4096 else 16)
        _add_rmsnorm_kernel[(m,)](residual, dptr, weight, out, n, eps, residual.stride(0), sdm, sds, out.stride(0),
                                  DELTA=mode, PARTS=parts, BLOCK=block, num_warps=warps)
        return out

    def rope_kv(self, qkv: torch.Tensor, lens: torch.Tensor, tables: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, heads: int, kv_heads: int,
                head_dim: int, bias: torch.Tensor | None, q_norm: torch.Tensor | None,
                k_norm: torch.Tensor | None, eps: float) -> torch.Tensor:
        """Bias, QK-norm, RoPE of one new token per request (position lens - 1); its K/V written to its slot
        (from the block table); returns the queries [B, H, D]."""
        return self._rope_kv(qkv, lens, tables, tables.stride(0), cos, sin, k_pool, v_pool, heads, kv_heads,
                             head_dim, bias, q_norm, k_norm, eps, by_slot=False)

    def rope_kv_slots(self, qkv: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, heads: int, kv_heads: int,
                      head_dim: int, bias: torch.Tensor | None, q_norm: torch.Tensor | None,
                      k_norm: torch.Tensor | None, eps: float) -> torch.Tensor:
        """As rope_kv for every token of a packed batch, each at its own position, its K/V written to its own
        flat slot (block · block_size + offset); returns the queries [T, H, D]."""
        return self._rope_kv(qkv, positions, slots, 0, cos, sin, k_pool, v_pool, heads, kv_heads, head_dim, bias,
                             q_norm, k_norm, eps, by_slot=True)

    def _rope_kv(self, qkv, where, tables, stride_tb, cos, sin, k_pool, v_pool, heads, kv_heads, head_dim, bias,
                 q_norm, k_norm, eps, by_slot: bool) -> torch.Tensor:
        tokens = qkv.shape[0]
        q = torch.empty((tokens, heads, head_dim), dtype=qkv.dtype, device=qkv.device)
        dummy = cos
        # a tile of heads per program: a few programs per token (one per head left prefill's 8K tokens × 40 heads
        # as 330K tiny programs); small decode batches keep more, smaller programs in flight
        per = min(_pow2(heads + kv_heads), 16 if tokens >= 256 else 4)
        _rope_kv_kernel[(tokens, triton.cdiv(heads + kv_heads, per))](
            qkv, bias if bias is not None else dummy, q_norm if q_norm is not None else dummy,
            k_norm if k_norm is not None else dummy, where, tables, cos, sin, q, k_pool, v_pool, eps,
            qkv.stride(0), q.stride(0), q.stride(1), stride_tb, kv_heads * head_dim,
            HEADS=heads, KV_HEADS=kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=k_pool.shape[1],
            HAS_BIAS=bias is not None, HAS_QK_NORM=q_norm is not None, BY_SLOT=by_slot, HEADS_PER=per,
            num_warps=4 if per >= 8 else (1 if head_dim <= 128 else 2))
        return q

    def finish(self, logits: torch.Tensor, valid: torch.Tensor, result: torch.Tensor, ids: torch.Tensor,
               lens: torch.Tensor) -> None:
        """Greedy tokens into result[0] and ids, finite flags into result[1], lens += valid (all in place)."""
        batch, vocab = logits.shape
        block = min(4096, _pow2(vocab))
        _finish_kernel[(batch,)](logits, valid, result, ids, lens, vocab, logits.stride(0), result.stride(0),
                                 BLOCK=block, num_warps=8 if block >= 2048 else 4)

    def moe_experts(self, gathered: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                    ends: torch.Tensor) -> torch.Tensor:
        """The MoE experts of a decode step through triton_moe's grouped kernel (model.grouped_experts' function);
        its launch from `moe_configs` by routed slots (tuned on the device), else the default."""
        from infscale.backends.torch.triton_moe import moe_experts

        return moe_experts(gathered, w_gate_up, w_down, ends, self.moe_configs.get(gathered.shape[0]),
                           dot_f32=self.interpret)

    def attention(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, tables: torch.Tensor,
                  lens: torch.Tensor, max_context: int, config: AttnConfig | None = None) -> torch.Tensor:
        batch = q.shape[0]
        if config is None:
            config = self.attn_configs.get(batch) or default_attn_config(batch, k_pool.shape[2], max_context)
        return paged_decode_attention(q, k_pool, v_pool, tables, lens, max_context, config,
                                      dot_f32=self.interpret)


def paged_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, tables: torch.Tensor,
                           context_lens: torch.Tensor, max_context: int | None = None,
                           config: AttnConfig | None = None, dot_f32: bool | None = None) -> torch.Tensor:
    """The Triton version of attention.paged_decode_attention (same arguments and result): q [B, H, D]; pools
    [N, block_size, KV, D]; tables [B, M] (int32 or int64, padded with any valid block id); context_lens [B]
    (the new token included; every entry ≥ 1). `max_context` bounds context_lens (default: M · block_size); it
    fixes the number of partitions, so it must stay the same across replays of a captured graph."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    batch, heads, dim = q.shape
    _, block_size, kv_heads, pool_dim = k_pool.shape
    if pool_dim != dim or heads % kv_heads or dim & (dim - 1) or dim < 16:
        raise ValueError(f"unsupported attention shape: q {tuple(q.shape)}, pool {tuple(k_pool.shape)} "
                         "(head_dim must be a power of two ≥ 16 and heads a multiple of the KV heads)")
    if k_pool.stride(-1) != 1 or q.stride(-1) != 1 or k_pool.stride() != v_pool.stride():
        raise ValueError("q and the pools must be contiguous in the head dimension, K and V alike")
    max_context = int(max_context or tables.shape[1] * block_size)
    config = config or default_attn_config(batch, kv_heads, max_context)
    dot_f32 = interpret_mode() if dot_f32 is None else dot_f32
    group = heads // kv_heads
    out = torch.empty_like(q)
    splits = 1 if not config.partition else -(-max_context // config.partition)
    partition = config.partition or max_context
    if splits > 1:
        part_o = torch.empty((batch, heads, splits, dim), dtype=torch.float32, device=q.device)
        part_ml = torch.empty((batch, heads, splits, 2), dtype=torch.float32, device=q.device)
    else:
        part_o = part_ml = out
    fp32 = q.dtype == torch.float32
    block_n = max(16, config.block_n)
    _paged_decode_kernel[(kv_heads, batch, splits)](
        q, k_pool, v_pool, tables, context_lens, out, part_o, part_ml,
        math.log2(math.e) / math.sqrt(dim),
        q.stride(0), q.stride(1),
        k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        tables.stride(0),
        out.stride(0), out.stride(1),
        NUM_SPLITS=splits, PARTITION=partition, GROUP=group, GROUP_PAD=max(16, _pow2(group)), HEAD_DIM=dim,
        BLOCK_SIZE=block_size, BLOCK_N=block_n, DOT_F32=dot_f32 or fp32, IEEE=fp32,
        num_warps=config.warps, num_stages=config.stages)
    if splits > 1:
        _paged_decode_reduce_kernel[(batch, heads)](
            part_o, part_ml, context_lens, out, out.stride(0), out.stride(1),
            NUM_SPLITS=splits, SPLITS_PAD=_pow2(splits), PARTITION=partition, HEAD_DIM=dim, num_warps=4)
    return out


# ------------------------------------------------------------------------------------------------ tuning


def _time_cuda(fn, reps: int, warmup: int = 1) -> float:
    """Median seconds of fn() by CUDA events, fn captured in a CUDA graph first (fn may loop over several
    weights): host launch costs stay out, as in the captured decode step. Without CUDA (the interpreter, for
    tests and dry runs): wall-clock time of fn()."""
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        import time

        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        times.sort()
        return times[len(times) // 2]
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del graph
    times.sort()
    return times[len(times) // 2]


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


REFERENCE_ROWS = 8192  # weight rows per float64 slice of the tuning reference (its memory bound)


def _linear_reference(x: torch.Tensor, w: torch.Tensor, dual: bool) -> torch.Tensor:
    """x · wᵀ in float64, over slices of w's rows: a whole float64 copy of the LM head (128256 × 4096) would
    hold 4 GiB during the warm-up, after the KV pool is sized (seen on an H200, 2026-12-04)."""
    xd = x.double()
    y = torch.cat([xd @ w[i:i + REFERENCE_ROWS].double().T for i in range(0, w.shape[0], REFERENCE_ROWS)], dim=1)
    if dual:
        gate, up = y.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up
    return y


def tune_linear(ops: TritonOps, sites: dict[str, tuple[list[torch.Tensor], bool, bool]], batch_sizes,
                reps: int = 3, tolerance: float = 2e-2, seed: int = 0) -> list[dict[str, object]]:
    """Choose, for every projection site and batch size, the fastest correct variant (CUDA only).

    sites: name -> (the weights of that site in every layer, dual (the SwiGLU gate/up pair), partial_ok (its
    consumer sums split-K partials)). Each candidate is first checked against a float64 product on fresh random
    input (relative error ≤ `tolerance`, finite) and then timed over every layer's weight in turn (weights that
    do not fit in L2, as in the real step): median of `reps` passes, CUDA events. Sets ops.linear_configs and
    returns one log row per (site, batch size, candidate). Without CUDA it runs only in the interpreter (tests,
    dry runs), where its timings mean nothing."""
    if not torch.cuda.is_available() and not ops.interpret:
        raise RuntimeError("tune_linear times on the GPU (or checks variants in the interpreter)")
    log: list[dict[str, object]] = []
    device = weights_device = next(iter(sites.values()))[0][0].device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    for site, (weights, dual, partial_ok) in sites.items():
        rows, k = weights[0].shape
        n = rows // 2 if dual else rows
        for m in sorted({int(b) for b in batch_sizes}):
            x = torch.randn((m, k), generator=gen, device=weights_device, dtype=torch.float32)
            x = x.to(weights[0].dtype)
            ref = _linear_reference(x, weights[0], dual)
            best, best_time = LinearConfig("torch"), float("inf")
            for cfg in linear_candidates(m, n, k, dual, partial_ok):
                row: dict[str, object] = {"site": site, "m": m, "n": n, "k": k, "config": cfg.label()}
                try:
                    def run(w: torch.Tensor, cfg: LinearConfig = cfg) -> torch.Tensor:
                        if dual:
                            return ops.gate_up(x, w, site, config=cfg)
                        return ops.linear(x, w, site, partial_ok=True, config=cfg)

                    out = run(weights[0])
                    if out.dim() == 3:
                        out = out.sum(0)
                    err = _rel_err(out, ref)
                    row["rel_err"] = err
                    if not err <= tolerance:
                        row["rejected"] = "wrong result"
                        log.append(row)
                        continue
                    passes = max(1, 4 // len(weights))
                    seconds = _time_cuda(lambda: [run(w) for w in weights for _ in range(passes)], reps)
                    row["seconds"] = seconds / (len(weights) * passes)
                except Exception as err:  # a variant that fails to compile or launch is skipped, and said so
                    row["rejected"] = f"{type(err).__name__}: {str(err)[:160]}"
                    log.append(row)
                    continue
                log.append(row)
                if row["seconds"] < best_time:
                    best, best_time = cfg, row["seconds"]
            ops.linear_configs[(site, m)] = best
            log.append({"site": site, "m": m, "chosen": best.label(), "seconds": best_time,
                        "bytes_per_s": (rows * k * weights[0].element_size()) / best_time})
    ops.tuning_log += log
    return log


def attn_candidates(batch: int, kv_heads: int, max_context: int) -> list[AttnConfig]:
    base = default_attn_config(batch, kv_heads, max_context)
    out = [base]
    if batch * kv_heads >= 264:
        partitions = [0, 256, 512]
    else:
        partitions = sorted({base.partition, 0, 64, 128, 256})
    for partition in partitions:
        if partition and partition >= max_context:
            continue
        for block_n, warps, stages in ((64, 4, 2), (64, 4, 3), (128, 4, 2), (32, 4, 2)):
            if partition and partition < block_n:
                continue
            cfg = AttnConfig(block_n, warps, stages, partition)
            if cfg not in out:
                out.append(cfg)
    return out


def tune_attention(ops: TritonOps, q: torch.Tensor, pools: list[tuple[torch.Tensor, torch.Tensor]],
                   tables: torch.Tensor, lens: torch.Tensor, max_context: int, reference: torch.Tensor,
                   reps: int = 5, tolerance: float = 1e-2) -> list[dict[str, object]]:
    """Choose the attention launch for q's batch size on real data: each candidate checked on pools[0] against
    `reference` (the plain-torch attention's output on the same inputs), then timed over every layer's pools in
    turn (so a small batch's KV is not served from L2); sets ops.attn_configs[batch]."""
    batch = q.shape[0]
    log: list[dict[str, object]] = []
    best, best_time = None, float("inf")
    for cfg in attn_candidates(batch, pools[0][0].shape[2], max_context):
        row: dict[str, object] = {"batch": batch, "config": str(cfg)}
        try:
            out = paged_decode_attention(q, pools[0][0], pools[0][1], tables, lens, max_context, cfg)
            err = _rel_err(out, reference)
            row["rel_err"] = err
            if not err <= tolerance:
                row["rejected"] = "wrong result"
                log.append(row)
                continue

            def run(cfg: AttnConfig = cfg) -> None:
                for k_pool, v_pool in pools:
                    paged_decode_attention(q, k_pool, v_pool, tables, lens, max_context, cfg)

            seconds = _time_cuda(run, reps) / len(pools)
            row["seconds"] = seconds
        except Exception as err:
            row["rejected"] = f"{type(err).__name__}: {str(err)[:160]}"
            log.append(row)
            continue
        log.append(row)
        if seconds < best_time:
            best, best_time = cfg, seconds
    if best is None:
        raise RuntimeError(f"no attention variant passed its check at batch {batch}: {log}")
    ops.attn_configs[batch] = best
    log.append({"batch": batch, "chosen": str(best), "seconds": best_time})
    ops.tuning_log += log
    return log
