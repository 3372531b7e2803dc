"""Paged attention against the contiguous reference, and the block allocator."""

from __future__ import annotations

import pytest
import torch

from infscale.backends.torch.attention import (
    contiguous_attention,
    paged_decode_attention,
    paged_prefill_attention,
)
from infscale.backends.torch.kvcache import BlockAllocator, KVCacheError, PagedKVCache

pytestmark = pytest.mark.torch

BLOCK = 4
KV_HEADS, HEADS, DIM = 2, 8, 16


def _filled_cache(lengths: list[int], dtype: torch.dtype, seed: int = 0):
    """A cache holding random K/V for requests of the given lengths in scattered blocks, plus the same K/V
    contiguous per request."""
    gen = torch.Generator().manual_seed(seed)
    cache = PagedKVCache(1, 64, BLOCK, KV_HEADS, DIM, dtype, "cpu")
    cache.allocator._free.reverse()  # hand out high ids first, so tables are not just 0, 1, 2 …
    keys, values = [], []
    for request, length in enumerate(lengths):
        cache.allocator.ensure(request, length)
        k = torch.randn(length, KV_HEADS, DIM, generator=gen).to(dtype)
        v = torch.randn(length, KV_HEADS, DIM, generator=gen).to(dtype)
        cache.write(0, k, v, torch.as_tensor(cache.slots(request, 0, length)))
        keys.append(k)
        values.append(v)
    return cache, keys, values


def _table(cache: PagedKVCache, requests: list[int]) -> torch.Tensor:
    tables = [cache.table(r) for r in requests]
    width = max(map(len, tables))
    return torch.tensor([t + [0] * (width - len(t)) for t in tables])


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_paged_decode_matches_contiguous(dtype, tol):
    lengths = [1, 5, 12, 17]
    cache, keys, values = _filled_cache(lengths, dtype)
    q = torch.randn(len(lengths), HEADS, DIM, generator=torch.Generator().manual_seed(1)).to(dtype)
    out = paged_decode_attention(q, cache.k[0], cache.v[0], _table(cache, list(range(len(lengths)))),
                                 torch.tensor(lengths))
    for i, length in enumerate(lengths):
        # the reference in fp32 on the same (rounded) K/V: bf16 differs only by rounding of the output
        ref = contiguous_attention(q[i : i + 1].float(), keys[i].float(), values[i].float(), past=length - 1)
        torch.testing.assert_close(out[i].float(), ref[0], atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("past, chunk", [(0, 7), (5, 6), (8, 1)])
def test_paged_prefill_chunk_is_causal_and_matches_contiguous(dtype, tol, past, chunk):
    cache, keys, values = _filled_cache([past + chunk], dtype)
    q = torch.randn(chunk, HEADS, DIM, generator=torch.Generator().manual_seed(2)).to(dtype)
    out = paged_prefill_attention(q, cache.k[0], cache.v[0], torch.tensor(cache.table(0)), past)
    ref = contiguous_attention(q.float(), keys[0].float(), values[0].float(), past=past)
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    # causality: changing the last token's K/V leaves every earlier query's output alone
    if chunk > 1:
        slot = torch.as_tensor(cache.slots(0, past + chunk - 1, 1))
        cache.write(0, torch.full((1, KV_HEADS, DIM), 9.0, dtype=dtype), torch.zeros(1, KV_HEADS, DIM, dtype=dtype),
                    slot)
        again = paged_prefill_attention(q, cache.k[0], cache.v[0], torch.tensor(cache.table(0)), past)
        torch.testing.assert_close(again[:-1], out[:-1], atol=0, rtol=0)
        assert not torch.equal(again[-1], out[-1])


def test_paged_prefill_in_query_slices_gives_the_whole_result(monkeypatch):
    """A score budget of a few queries' rows: the chunk runs in slices, with the same output as in one piece."""
    from infscale.backends.torch import attention

    cache, keys, values = _filled_cache([5 + 11], torch.float32)
    q = torch.randn(11, HEADS, DIM, generator=torch.Generator().manual_seed(3))
    table = torch.tensor(cache.table(0))
    whole = paged_prefill_attention(q, cache.k[0], cache.v[0], table, 5)
    monkeypatch.setattr(attention, "SCORE_BYTES_PER_SLICE", 3 * 16 * HEADS * 4)  # 3 queries of 16 keys a slice
    sliced = paged_prefill_attention(q, cache.k[0], cache.v[0], table, 5)
    torch.testing.assert_close(sliced, whole, atol=1e-6, rtol=1e-6)


def test_gqa_query_heads_read_their_own_kv_head():
    """With K/V differing per KV head, query heads 0-3 must see head 0 and 4-7 head 1."""
    cache = PagedKVCache(1, 4, BLOCK, KV_HEADS, DIM, torch.float32, "cpu")
    cache.allocator.ensure(0, 3)
    v = torch.zeros(3, KV_HEADS, DIM)
    v[:, 1] = 1.0
    cache.write(0, torch.zeros(3, KV_HEADS, DIM), v, torch.as_tensor(cache.slots(0, 0, 3)))
    out = paged_decode_attention(torch.ones(1, HEADS, DIM), cache.k[0], cache.v[0], _table(cache, [0]),
                                 torch.tensor([3]))
    assert out[0, :4].abs().max() == 0 and torch.all(out[0, 4:] == 1)


def test_allocator_hands_out_ceil_blocks_and_reuses_freed_ones():
    alloc = BlockAllocator(num_blocks=5, block_size=4)
    assert len(alloc.ensure(0, 5)) == 2 and len(alloc.ensure(0, 8)) == 2 and len(alloc.ensure(0, 9)) == 3
    alloc.ensure(1, 8)
    assert alloc.free_blocks == 0
    with pytest.raises(KVCacheError, match="disagrees with the scheduler"):
        alloc.ensure(2, 1)
    alloc.trim(0, 4)  # a decode span that stopped early gives back what it did not use
    assert alloc.free_blocks == 2 and len(alloc.tables[0]) == 1
    alloc.release(1)
    assert alloc.free_blocks == 4
    assert sorted(alloc.ensure(2, 16)) == sorted(set(range(5)) - set(alloc.tables[0]))


def test_pool_size_arithmetic():
    per_block = PagedKVCache.bytes_per_block(num_layers=32, block_size=16, kv_heads=8, head_dim=128,
                                             dtype=torch.bfloat16)
    assert per_block == 2 * 32 * 16 * 8 * 128 * 2  # K and V, bf16
    assert PagedKVCache.blocks_that_fit(10 * per_block + 1, 32, 16, 8, 128, torch.bfloat16) == 10
