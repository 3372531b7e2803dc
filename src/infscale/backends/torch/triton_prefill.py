"""Triton kernels of the torch backend's packed (prefill and mixed) iteration, and `PackedOps`, which the eager
forward calls them through when the executor runs on the GPU with Triton.

The main kernel is a flash-style paged prefill attention: the prompt chunks of every sequence in the batch in
one launch. Each program takes BLOCK_M consecutive queries of one sequence's chunk and one query head, reads
that sequence's K/V straight from the paged pools through its block table (its earlier cached tokens and the
causal part of the chunk, written just before), and keeps an online softmax in fp32: no score matrix is ever
materialised, so the memory an iteration needs grows with its tokens, not with their square. Keys every query
of the tile may see are read without a mask; only the last tiles (the diagonal) are masked. Programs are
ordered longest first (the host sorts the query tiles by how many keys they read) and the query heads of one
tile are neighbours in the grid, so the heads of a GQA group read the same K/V while it is in L2.

Beside it, what makes the rest of a packed iteration a few large kernels instead of many small ones:
  - `rope_kv` (triton_attention's kernel, slot mode): bias, QK-norm, RoPE and the K/V write of every token of
    the batch by its own position and KV slot;
  - `silu_mul`: silu(gate) * up from the fused gate/up projection's output, rounded as model.py rounds;
  - `add_rmsnorm` (triton_attention's kernel): residual += delta, then RMSNorm.

Under the interpreter (TRITON_INTERPRET=1, CPU tensors, the tests) dots take fp32 operands, as in
triton_attention (numpy has no bfloat16).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from infscale.backends.torch import triton_attention
from infscale.backends.torch.triton_attention import interpret_mode

if triton_attention.triton is not None:
    from infscale.backends.torch.triton_attention import _softmax_step, _swiglu

triton = triton_attention.triton
tl = triton_attention.tl

__all__ = ["PackedOps", "PrefillConfig", "PrefillPlan", "paged_prefill_attention", "plan_prefill"]


if triton is not None:

    @triton.jit
    def _paged_prefill_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr,
        tile_seq_ptr, tile_m_ptr, seq_row_ptr, seq_chunk_ptr, seq_past_ptr,
        scale_log2,
        stride_qt, stride_qh,
        stride_kblk, stride_ktok, stride_khead,
        stride_tb,
        stride_ot, stride_oh,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr,
    ):
        h = tl.program_id(0)  # fastest: a tile's query heads run side by side (a GQA group shares its K/V reads)
        tile = tl.program_id(1)
        seq = tl.load(tile_seq_ptr + tile)
        m0 = tl.load(tile_m_ptr + tile)
        row0 = tl.load(seq_row_ptr + seq).to(tl.int64)
        chunk = tl.load(seq_chunk_ptr + seq)
        past = tl.load(seq_past_ptr + seq)
        kvh = h // GROUP
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mmask = offs_m < chunk
        qpos = past + offs_m  # the query's position: it sees keys 0 … qpos
        d = tl.arange(0, HEAD_DIM)
        q_rows = (row0 + offs_m.to(tl.int64)) * stride_qt + h * stride_qh
        q = tl.load(q_ptr + q_rows[:, None] + d[None, :], mask=mmask[:, None], other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        table_row = tables_ptr + seq.to(tl.int64) * stride_tb
        head_off = kvh * stride_khead
        # keys 0 … past+m0-1 are seen by every query of the tile: whole BLOCK_N tiles of them need no mask
        hi = tl.minimum(past + m0 + BLOCK_M, past + chunk)
        full_end = ((past + m0) // BLOCK_N) * BLOCK_N
        for n0 in range(0, full_end, BLOCK_N):
            toks = n0 + tl.arange(0, BLOCK_N)
            blk = tl.load(table_row + toks // BLOCK_SIZE).to(tl.int64)
            rows = blk * stride_kblk + (toks % BLOCK_SIZE) * stride_ktok + head_off
            k = tl.load(k_ptr + rows[:, None] + d[None, :])
            v = tl.load(v_ptr + rows[:, None] + d[None, :])
            m_i, l_i, acc = _softmax_step(q, k, v, toks[None, :] >= 0, m_i, l_i, acc, scale_log2,
                                          out_ptr.dtype.element_ty, False, DOT_F32, IEEE)
        # the diagonal: keys up to the tile's last query, masked per query (causal) and at the chunk's end
        for n0 in range(full_end, hi, BLOCK_N):
            toks = n0 + tl.arange(0, BLOCK_N)
            tmask = toks < hi
            blk = tl.load(table_row + toks // BLOCK_SIZE, mask=tmask, other=0).to(tl.int64)
            rows = blk * stride_kblk + (toks % BLOCK_SIZE) * stride_ktok + head_off
            k = tl.load(k_ptr + rows[:, None] + d[None, :], mask=tmask[:, None], other=0.0)
            v = tl.load(v_ptr + rows[:, None] + d[None, :], mask=tmask[:, None], other=0.0)
            m_i, l_i, acc = _softmax_step(q, k, v, (toks[None, :] <= qpos[:, None]) & tmask[None, :], m_i, l_i,
                                          acc, scale_log2, out_ptr.dtype.element_ty, True, DOT_F32, IEEE)
        out = acc / l_i[:, None]  # every query sees at least key 0, so l_i > 0 on every row
        o_rows = (row0 + offs_m.to(tl.int64)) * stride_ot + h * stride_oh
        tl.store(out_ptr + o_rows[:, None] + d[None, :], out.to(out_ptr.dtype.element_ty), mask=mmask[:, None])

    @triton.jit
    def _silu_mul_kernel(x_ptr, out_ptr, N, stride_x, stride_o, BLOCK: tl.constexpr):
        """out[m, :] = silu(x[m, :N]) * x[m, N:2N], each product rounded to the model dtype as F.silu(g) * u."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < N
        dtype = out_ptr.dtype.element_ty
        gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * stride_x + N + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_o + cols, _swiglu(gate, up, dtype).to(dtype), mask=mask)


# ------------------------------------------------------------------------------------------------ plan


@dataclass(frozen=True)
class PrefillConfig:
    """The prefill attention's launch: queries per program, keys per inner tile, warps, pipeline stages."""

    block_m: int = 128
    block_n: int = 64
    warps: int = 8
    stages: int = 2


@dataclass
class PrefillPlan:
    """The device-side description of one batch's prompt chunks for the kernel (built once per iteration,
    shared by every layer): per sequence its first row in the packed batch, chunk length, cached tokens
    before the chunk and block table; per program tile its sequence and first query (longest work first)."""

    rows: torch.Tensor        # [S] int32
    chunks: torch.Tensor      # [S] int32
    pasts: torch.Tensor       # [S] int32
    tables: torch.Tensor      # [S, M] int32 (padded with block 0)
    tile_seq: torch.Tensor    # [tiles] int32
    tile_m: torch.Tensor      # [tiles] int32
    block_m: int

    @property
    def num_tiles(self) -> int:
        return int(self.tile_seq.shape[0])


def plan_prefill(rows: list[int], chunks: list[int], pasts: list[int], tables: list[list[int]],
                 device: torch.device | str, block_m: int) -> PrefillPlan:
    """The plan for sequences whose chunk i occupies rows rows[i] … rows[i]+chunks[i]-1 of the packed batch at
    positions pasts[i] …, its blocks listed in tables[i] (at least ceil((past+chunk)/block_size) of them)."""
    if not (len(rows) == len(chunks) == len(pasts) == len(tables)) or not rows:
        raise ValueError("plan_prefill needs one row, chunk, past and table per sequence (at least one)")
    chunk_arr = np.asarray(chunks, dtype=np.int64)
    past_arr = np.asarray(pasts, dtype=np.int64)
    if (chunk_arr <= 0).any() or (past_arr < 0).any():
        raise ValueError(f"prefill chunks must be positive and pasts non-negative: {chunks}, {pasts}")
    tiles_per_seq = -(-chunk_arr // block_m)
    tile_seq = np.repeat(np.arange(len(chunks), dtype=np.int64), tiles_per_seq)
    first = np.cumsum(tiles_per_seq) - tiles_per_seq
    tile_m = (np.arange(len(tile_seq), dtype=np.int64) - first[tile_seq]) * block_m
    work = past_arr[tile_seq] + tile_m  # keys a tile reads, up to its diagonal: schedule the longest first
    order = np.argsort(-work, kind="stable")
    width = max(len(t) for t in tables)
    table = np.zeros((len(tables), width), dtype=np.int32)
    for i, t in enumerate(tables):
        table[i, : len(t)] = t
    packed = np.concatenate([np.asarray(rows, dtype=np.int32), chunk_arr.astype(np.int32), past_arr.astype(np.int32),
                             tile_seq[order].astype(np.int32), tile_m[order].astype(np.int32)])
    on_device = torch.from_numpy(packed).to(device)  # one host-to-device copy for the small vectors
    s, n = len(chunks), len(tile_seq)
    return PrefillPlan(rows=on_device[:s], chunks=on_device[s:2 * s], pasts=on_device[2 * s:3 * s],
                       tables=torch.from_numpy(table).to(device), tile_seq=on_device[3 * s:3 * s + n],
                       tile_m=on_device[3 * s + n:], block_m=block_m)


# ------------------------------------------------------------------------------------------------ launches


def paged_prefill_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, plan: PrefillPlan,
                            out: torch.Tensor | None = None, config: PrefillConfig | None = None,
                            dot_f32: bool | None = None) -> torch.Tensor:
    """Causal attention of every prompt chunk in `plan`: q [T, H, D] (the packed batch's queries; only the
    plan's rows are read), K/V already written to the pools [N, block_size, KV, D]. Writes the plan's rows of
    `out` (default: a new tensor like q, its other rows left unwritten) and returns it."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    config = config or PrefillConfig()
    if config.block_m != plan.block_m:
        raise ValueError(f"the plan was made for block_m {plan.block_m}, the launch uses {config.block_m}")
    tokens, heads, dim = q.shape
    _, block_size, kv_heads, pool_dim = k_pool.shape
    if pool_dim != dim or heads % kv_heads or dim & (dim - 1) or dim < 16:
        raise ValueError(f"unsupported attention shape: q {tuple(q.shape)}, pool {tuple(k_pool.shape)} "
                         "(head_dim must be a power of two ≥ 16 and heads a multiple of the KV heads)")
    if k_pool.stride(-1) != 1 or q.stride(-1) != 1 or k_pool.stride() != v_pool.stride():
        raise ValueError("q and the pools must be contiguous in the head dimension, K and V alike")
    out = torch.empty_like(q) if out is None else out
    fp32 = q.dtype == torch.float32
    dot_f32 = interpret_mode() if dot_f32 is None else dot_f32
    _paged_prefill_kernel[(heads, plan.num_tiles)](
        q, k_pool, v_pool, out, plan.tables, plan.tile_seq, plan.tile_m, plan.rows, plan.chunks, plan.pasts,
        math.log2(math.e) / math.sqrt(dim),
        q.stride(0), q.stride(1),
        k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        plan.tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=heads // kv_heads, HEAD_DIM=dim, BLOCK_SIZE=block_size, BLOCK_M=config.block_m,
        BLOCK_N=config.block_n, DOT_F32=dot_f32 or fp32, IEEE=fp32,
        num_warps=config.warps, num_stages=config.stages)
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[M, 2I] -> silu(gate) * up [M, I] (the SwiGLU activation of the fused gate/up projection's output)."""
    m, two_i = gate_up.shape
    inter = two_i // 2
    out = torch.empty((m, inter), dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(inter))
    _silu_mul_kernel[(m, triton.cdiv(inter, block))](gate_up, out, inter, gate_up.stride(0), out.stride(0),
                                                     BLOCK=block, num_warps=4)
    return out


class PackedOps:
    """What the eager forward of a packed batch (prompt chunks and decodes) runs through on the GPU: the kernels
    above, triton_attention's decode attention, add_rmsnorm and rope_kv, and cuBLAS for the projections.
    `prefill_config` is the prefill attention's launch (tuned on the device by the engine-speed benchmark)."""

    name = "triton"

    def __init__(self, decode_ops=None, prefill_config: PrefillConfig | None = None):
        if triton is None:
            raise RuntimeError("triton is not installed: the packed iteration's kernels need it")
        self.decode_ops = decode_ops or triton_attention.TritonOps()
        self.prefill_config = prefill_config or PrefillConfig()
        self.interpret = interpret_mode()

    def plan(self, meta) -> PrefillPlan | None:
        """The batch's prefill plan, built on the first layer and kept on `meta` for the others."""
        if not meta.prefills:
            return None
        if meta.prefill_plan is None:
            meta.prefill_plan = plan_prefill([p.start for p in meta.prefills], [p.chunk for p in meta.prefills],
                                             [p.past for p in meta.prefills], [p.blocks for p in meta.prefills],
                                             meta.positions.device, self.prefill_config.block_m)
        return meta.prefill_plan

    def add_rmsnorm(self, residual, delta, weight, eps):
        return self.decode_ops.add_rmsnorm(residual, delta, weight, eps)

    def rope_kv_slots(self, qkv, positions, slots, cos, sin, k_pool, v_pool, heads, kv_heads, head_dim, bias,
                      q_norm, k_norm, eps):
        return self.decode_ops.rope_kv_slots(qkv, positions, slots, cos, sin, k_pool, v_pool, heads, kv_heads,
                                             head_dim, bias, q_norm, k_norm, eps)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return silu_mul(gate_up)

    def attention(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, meta) -> torch.Tensor:
        """Every row's attention: the decode rows through the paged decode kernel, the prompt chunks through
        the prefill kernel (one launch each)."""
        out = torch.empty_like(q)
        n = meta.num_decode
        if n:
            width = meta.decode_tables.shape[1]
            out[:n] = self.decode_ops.attention(q[:n], k_pool, v_pool, meta.decode_tables, meta.decode_lens,
                                                width * k_pool.shape[1])
        plan = self.plan(meta)
        if plan is not None:
            paged_prefill_attention(q, k_pool, v_pool, plan, out, self.prefill_config, dot_f32=self.interpret)
        return out
