"""Attention over the paged KV cache, in plain torch (the reference the GPU kernels must match).

Layouts: a pool is [num_blocks, block_size, kv_heads, head_dim]; a block table row lists a request's blocks in
order, so token t of the request sits at pool[table[t // block_size], t % block_size]. Queries are
[tokens, heads, head_dim] with heads = kv_heads * group (GQA: query head h reads KV head h // group).

These functions read only the blocks a request uses (gathered through its table). Scores and softmax are in fp32
whatever the storage dtype, as the fused kernels do. `contiguous_attention` is an independent implementation over
unpaged K/V (repeat the KV heads, one masked matmul) that the tests compare against.
"""

from __future__ import annotations

import math

import torch


def _gqa_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q [B, Tq, H, D], k/v [B, Tk, KV, D], mask [B, Tq, Tk] (True = may attend) -> [B, Tq, H, D] in q's dtype."""
    batch, tq, heads, dim = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    qg = q.float().view(batch, tq, kv_heads, group, dim)
    scores = torch.einsum("bqkgd,bskd->bkgqs", qg, k.float()) * (1.0 / math.sqrt(dim))
    scores = scores.masked_fill(~mask[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bkgqs,bskd->bqkgd", probs, v.float())
    return out.reshape(batch, tq, heads, dim).to(q.dtype)


def gather_blocks(pool: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """pool [N, bs, KV, D], tables [B, M] -> the requests' tokens [B, M * bs, KV, D] (only the listed blocks)."""
    batch, blocks = tables.shape
    _, block_size, kv_heads, dim = pool.shape
    return pool[tables].reshape(batch, blocks * block_size, kv_heads, dim)


def paged_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, tables: torch.Tensor,
                           context_lens: torch.Tensor) -> torch.Tensor:
    """One new token per request, its K/V already written. q [B, H, D]; tables [B, M] (rows padded with any
    valid block id); context_lens [B] counts the tokens to attend to, the new one included. Returns [B, H, D]."""
    keys = gather_blocks(k_pool, tables)
    values = gather_blocks(v_pool, tables)
    positions = torch.arange(keys.shape[1], device=q.device)
    mask = (positions[None, :] < context_lens[:, None])[:, None, :]  # [B, 1, Tk]
    return _gqa_attend(q[:, None], keys, values, mask)[:, 0]


SCORE_BYTES_PER_SLICE = 256 * 1024**2  # the reference's fp32 score block per slice of queries (its memory bound)


def paged_prefill_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, table: torch.Tensor,
                            past: int) -> torch.Tensor:
    """A prompt chunk of one request: q [C, H, D] at positions past … past+C-1, their K/V already written.
    Causal: query i sees keys 0 … past+i. `table` lists the request's blocks (at least ceil((past+C)/bs)).
    The queries go in slices whose fp32 scores stay under SCORE_BYTES_PER_SLICE, so a long chunk never holds
    its whole [C, past + C] score matrix (the result is the same: each query's softmax is its own)."""
    chunk, heads = q.shape[0], q.shape[1]
    total = past + chunk
    keys = gather_blocks(k_pool, table[None])[:, :total]
    values = gather_blocks(v_pool, table[None])[:, :total]
    key_pos = torch.arange(total, device=q.device)
    step = max(1, SCORE_BYTES_PER_SLICE // (total * heads * 4))
    out = torch.empty_like(q)
    for lo in range(0, chunk, step):
        hi = min(chunk, lo + step)
        query_pos = torch.arange(past + lo, past + hi, device=q.device)
        mask = (key_pos[None, :] <= query_pos[:, None])[None]  # [1, hi - lo, total]
        out[lo:hi] = _gqa_attend(q[None, lo:hi], keys, values, mask)[0]
    return out


def contiguous_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int = 0) -> torch.Tensor:
    """Reference over unpaged K/V of one sequence: q [C, H, D] at positions past … past+C-1, k/v [past+C, KV, D].
    Deliberately a different formulation from the paged path (heads repeated, [H, C, T] matmuls)."""
    heads, kv_heads = q.shape[1], k.shape[1]
    k_full = k.float().repeat_interleave(heads // kv_heads, dim=1).transpose(0, 1)  # [H, T, D]
    v_full = v.float().repeat_interleave(heads // kv_heads, dim=1).transpose(0, 1)
    qh = q.float().transpose(0, 1)                                                  # [H, C, D]
    scores = qh @ k_full.transpose(1, 2) / math.sqrt(q.shape[-1])
    total = k.shape[0]
    allowed = torch.arange(total, device=q.device)[None, :] <= torch.arange(past, past + q.shape[0],
                                                                            device=q.device)[:, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v_full).transpose(0, 1).to(q.dtype)
