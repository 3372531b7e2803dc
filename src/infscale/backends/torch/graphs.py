"""CUDA graphs of the pure-decode step: one graph per batch size, replayed for every step of a decode span.

`DecodeGraphs` owns static input buffers sized for the largest batch (token ids, context lengths, block tables
padded to the most blocks a request can hold, a validity mask) and captures `DecoderModel.fast_decode` on views
of their first b rows, for each b in `batch_sizes` (largest first, sharing one memory pool). A span of n requests
runs in the smallest captured size b ≥ n: rows n … b-1 are padding (token 0, context 1, every table entry the
scratch block, valid False), so they write and read only the scratch block and never count in the finite check.

Everything a step needs to advance happens inside the graph: positions and KV slots come from the lengths and
tables, the new token's K/V is written into the pools by slot, the greedy token replaces the input id, the
lengths of the valid rows grow by one, and `result` [2, b] = (the tokens; 1 where a row's logits are all finite
or the row is padding) is filled. So a
span is `load` (one host-to-device copy of its ids, lengths and tables) followed by `replay` per step, and the
executor reads the tokens back once per span.

Pipelined PP (`pipelined=True`, one `DecodeGraphs` per micro-batch): the captured step is the stage's compute
only; a later stage's graph reads its input hidden states from the static `hidden` buffer, which the executor
fills by receiving from the previous stage between replays (see executor.py).

Modes: "cuda" captures real graphs; "record" (CPU, or to debug) stores the step as a callable that `replay`
calls, so the padding, bucketing and static-buffer logic is the same code path without a GPU.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class GraphError(RuntimeError):
    """The static buffers cannot hold what was asked (a bug in the caller: check `fits` first)."""


class DecodeGraphs:
    def __init__(self, model, cache, ops, max_context: int, scratch_block: int,
                 batch_sizes: tuple[int, ...] | list[int] = DEFAULT_BATCH_SIZES, mode: str | None = None,
                 warmup_steps: int = 2, pipelined: bool = False, **step_options):
        self.model = model
        self.cache = cache
        self.ops = ops
        self.device = cache.device
        self.mode = mode or ("cuda" if self.device.type == "cuda" else "record")
        if self.mode not in ("cuda", "record"):
            raise ValueError(f"mode must be 'cuda' or 'record', not {self.mode!r}")
        if self.mode == "cuda" and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.block_size = cache.block_size
        self.max_blocks = -(-int(max_context) // self.block_size)
        self.max_context = self.max_blocks * self.block_size
        self.scratch_block = int(scratch_block)
        if not 0 <= self.scratch_block < cache.k[0].shape[0]:
            raise ValueError(f"scratch block {scratch_block} is not in the pools ({cache.k[0].shape[0]} blocks)")
        self.sizes = sorted({int(b) for b in batch_sizes if int(b) > 0})
        if not self.sizes:
            raise ValueError("no batch size to capture")
        self.warmup_steps = warmup_steps
        self.step_options = step_options  # passed to fast_decode (layer_collectives=False to time TP without)
        bmax = self.sizes[-1]
        device = self.device
        self.ids = torch.zeros(bmax, dtype=torch.int64, device=device)
        self.keys = torch.zeros(bmax, dtype=torch.int64, device=device)  # request ids (MoE routing hashes them)
        self.lens = torch.ones(bmax, dtype=torch.int64, device=device)
        self.tables = torch.full((bmax, self.max_blocks), self.scratch_block, dtype=torch.int32, device=device)
        self.valid = torch.zeros(bmax, dtype=torch.bool, device=device)
        self.result = torch.zeros((2, bmax), dtype=torch.int64, device=device)
        self.pipelined = pipelined
        self.hidden = None  # a pipelined later stage's input hidden states
        if pipelined and not model.ctx.is_first_stage:
            self.hidden = torch.zeros((bmax, model.arch.hidden_size), dtype=model.dtype, device=device)
        self.graphs: dict[int, object] = {}
        self.logits: dict[int, torch.Tensor] = {}  # each graph's logits output (static, overwritten per replay)
        self.pool = None
        self.replays = 0

    # -------------------------------------------------------------------------------------------- sizes

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def bucket(self, n: int) -> int | None:
        """The captured batch size a batch of n requests runs in (None: larger than every size: run eager)."""
        for b in self.sizes:
            if b >= n:
                return b
        return None

    def fits(self, n: int, blocks: int) -> bool:
        """Can a span of n requests, each holding at most `blocks` blocks by its last step, run here?"""
        return 0 < n and self.bucket(n) is not None and blocks <= self.max_blocks

    # -------------------------------------------------------------------------------------------- capture

    def _step(self, b: int) -> torch.Tensor:
        pipelined = {"pipelined": True, "hidden_in": None if self.hidden is None else self.hidden[:b]} \
            if self.pipelined else {}
        return self.model.fast_decode(self.ids[:b], self.lens[:b], self.tables[:b], self.valid[:b], self.cache,
                                      self.ops, self.max_context, self.result[:, :b], keys=self.keys[:b],
                                      **pipelined, **self.step_options)

    def _pad_all(self) -> None:
        if self.hidden is not None:
            self.hidden.zero_()
        self.ids.zero_()
        self.keys.zero_()
        self.lens.fill_(1)
        self.tables.fill_(self.scratch_block)
        self.valid.zero_()

    @torch.inference_mode()
    def capture(self, sizes: list[int] | None = None) -> None:
        """Capture (or record) the step for the given sizes (default: every size not yet captured), largest
        first. Warm-up steps run before each capture on padded buffers: they compile the kernels and touch only
        the scratch block."""
        todo = sorted({int(b) for b in (sizes or self.sizes) if int(b) not in self.graphs}, reverse=True)
        unknown = [b for b in todo if b not in self.sizes]
        if unknown:
            raise GraphError(f"batch sizes {unknown} are not among the configured sizes {self.sizes}")
        self._pad_all()
        for b in todo:
            if self.mode == "record":
                self._step(b)  # the same warm-up as on the GPU: a broken step fails here, not mid-span
                self.graphs[b] = functools.partial(self._step, b)
                continue
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            stream = torch.cuda.Stream(device=self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(self.warmup_steps):
                    self._step(b)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            # thread_local: the NCCL watchdog thread's event queries must not invalidate the capture (TP)
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                self.logits[b] = self._step(b)
            torch.cuda.synchronize(self.device)
            self.graphs[b] = graph
        self._pad_all()

    # -------------------------------------------------------------------------------------------- running

    def load(self, tokens: np.ndarray, lens: np.ndarray, tables: list[list[int]],
             keys: np.ndarray | None = None) -> int:
        """Put a span's n requests into the static buffers (rows n … b-1 padded); returns b, the size to replay.
        tokens: each request's last token; lens: its context including that token; tables: its blocks (enough
        for the whole span); keys: the request ids (default 0 … n-1)."""
        n = len(tokens)
        b = self.bucket(n)
        width = max((len(t) for t in tables), default=0)
        if b is None or width > self.max_blocks or len(lens) != n or len(tables) != n:
            raise GraphError(f"a span of {n} requests with up to {width} blocks does not fit the captured sizes "
                             f"{self.sizes} and {self.max_blocks} blocks per request")
        if b not in self.graphs:
            self.capture([b])
        ids = np.zeros(b, dtype=np.int64)
        ids[:n] = tokens
        ctx = np.ones(b, dtype=np.int64)
        ctx[:n] = lens
        if n and (ctx[:n].min() < 1 or ctx[:n].max() > self.max_context):
            raise GraphError(f"context lengths {int(ctx[:n].min())}-{int(ctx[:n].max())} outside 1 … "
                             f"{self.max_context}")
        table = np.full((b, self.max_blocks), self.scratch_block, dtype=np.int32)
        for row, t in enumerate(tables):
            table[row, : len(t)] = t
        valid = np.zeros(b, dtype=bool)
        valid[:n] = True
        key = np.zeros(b, dtype=np.int64)
        key[:n] = np.arange(n) if keys is None else keys
        self.ids[:b].copy_(torch.from_numpy(ids))
        self.keys[:b].copy_(torch.from_numpy(key))
        self.lens[:b].copy_(torch.from_numpy(ctx))
        self.tables[:b].copy_(torch.from_numpy(table))
        self.valid[:b].copy_(torch.from_numpy(valid))
        return b

    def replay(self, b: int) -> torch.Tensor:
        """Run one step of the loaded batch; returns the static `result` [2, max batch] (tokens; finite flags),
        valid until the next replay."""
        graph = self.graphs[b]
        if self.mode == "record":
            self.logits[b] = graph()
        else:
            graph.replay()
        self.replays += 1
        return self.result
