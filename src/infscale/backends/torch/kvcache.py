"""Paged KV cache: per layer a K and a V pool of fixed-size blocks, a free list, and per-request block tables.

The serving core's scheduler accounts blocks by count and never lets the requests of a replica need more than
`num_blocks`; this allocator hands out the actual block ids with the same rule (a request holding t tokens owns
ceil(t / block_size) blocks), so it can run out only if the two disagree, which is a bug and raises.

Every rank of a replica runs the same sequence of allocations (they see the same batches), so block tables agree
across TP ranks and PP stages without being communicated.
"""

from __future__ import annotations

import numpy as np
import torch


class KVCacheError(RuntimeError):
    """The executor's KV bookkeeping disagrees with the scheduler's (a bug, never a normal condition)."""


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # a stack: low ids are handed out first
        self.tables: dict[int, list[int]] = {}

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def ensure(self, request: int, tokens: int) -> list[int]:
        """Give `request` room for `tokens` tokens in total; return its block table."""
        table = self.tables.setdefault(request, [])
        need = self.blocks_for(tokens) - len(table)
        if need > len(self._free):
            raise KVCacheError(f"request {request} needs {need} more KV blocks for {tokens} tokens but only "
                               f"{len(self._free)} of {self.num_blocks} are free: the executor's block use "
                               "disagrees with the scheduler's accounting")
        for _ in range(need):
            table.append(self._free.pop())
        return table

    def trim(self, request: int, tokens: int) -> None:
        """Return the blocks beyond what `tokens` tokens need (after a decode span stopped early)."""
        table = self.tables.get(request)
        if table is None:
            return
        keep = self.blocks_for(tokens)
        while len(table) > keep:
            self._free.append(table.pop())

    def release(self, request: int) -> None:
        for block in reversed(self.tables.pop(request, [])):
            self._free.append(block)


class PagedKVCache:
    """K and V pools for the layers of one PP stage, on one TP rank (its local KV heads)."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (num_blocks, block_size, kv_heads, head_dim)
        # zeros, not empty: padded table entries point at real blocks whose values are masked out, and a masked
        # score times a NaN from uninitialised memory would still be NaN
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.allocator = BlockAllocator(num_blocks, block_size)
        self.lengths: dict[int, int] = {}  # tokens whose K/V are written, per request
        self.block_size = block_size
        self.device = torch.device(device)

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()

    @classmethod
    def blocks_that_fit(cls, free_bytes: int, num_layers: int, block_size: int, kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        """Blocks a budget of `free_bytes` holds (what is left after weights and workspace)."""
        return free_bytes // cls.bytes_per_block(num_layers, block_size, kv_heads, head_dim, dtype)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """Store k/v [T, KV, D] at flat slots [T] (slot = block * block_size + offset)."""
        kv_heads, dim = k.shape[1], k.shape[2]
        self.k[layer].view(-1, kv_heads, dim).index_copy_(0, slots, k)
        self.v[layer].view(-1, kv_heads, dim).index_copy_(0, slots, v)

    def slots(self, request: int, start: int, count: int) -> np.ndarray:
        """Flat slots of tokens start … start+count-1 of `request` (its blocks must exist)."""
        table = np.asarray(self.allocator.tables[request], dtype=np.int64)
        positions = np.arange(start, start + count, dtype=np.int64)
        return table[positions // self.block_size] * self.block_size + positions % self.block_size

    def table(self, request: int) -> list[int]:
        return self.allocator.tables.get(request, [])

    def release(self, request: int) -> None:
        self.allocator.release(request)
        self.lengths.pop(request, None)
