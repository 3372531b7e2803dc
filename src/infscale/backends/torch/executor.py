"""`TorchExecutor`: the serving core's executor that runs the model and measures each iteration.

It keeps, per request, the token history (random prompt tokens drawn from (seed, request id), then the greedy
tokens it generated) and the KV blocks in the paged cache. The scheduler says what to run; the executor turns
that into a packed batch, runs it, appends the sampled tokens and returns the measured duration.

Correctness is checked as it goes, never after the numbers are out: the executor's KV lengths must match the
contexts the scheduler states, every sampled logit must be finite (`NonFiniteLogits`), and `check_outputs`
verifies the token count per request equals its OSL.

Pipelined PP (`pp_microbatches` = pp): a pure-decode span is split into pp micro-batches (requests i, i+pp, …),
each with its own CUDA graphs, and the stages work as a ring: at every tick each stage runs one micro-batch's step
and passes its output on (hidden states to the next stage, the last stage's tokens back to the first), so while
stage 1 runs micro-batch 0, stage 0 already runs micro-batch 1. A scheduler step (every request one token longer)
is one round of pp ticks; its duration is measured on the first stage from the start of one round to the start of
the next (the span's last round up to the arrival of its last tokens). Prefill iterations, and spans the graphs do
not fit, run the whole batch through the stages in turn.

Multi-rank replicas (TP/PP): every rank runs the same scheduler on the same requests, so they ask for the same
batches. The only value that differs between ranks is the measured time, and the scheduler's decisions can depend
on it (Poisson arrivals, decode horizons), so the driver rank's durations are broadcast and every rank returns
those, with a fingerprint of the batch that followers compare to catch any divergence.
"""

from __future__ import annotations

import time
import zlib

import numpy as np
import torch

from infscale.backends.torch.graphs import DEFAULT_BATCH_SIZES, DecodeGraphs
from infscale.backends.torch.kvcache import KVCacheError
from infscale.backends.torch.model import BatchMeta, DecoderModel, PrefillSeq, TorchFastOps
from infscale.backends.torch.proxy import LayerScaling, without_layers
from infscale.serving.executor import IterationBatch


class NonFiniteLogits(RuntimeError):
    """The model produced NaN/inf logits: the run is invalid and no number from it may be reported."""


class OutputCheckError(RuntimeError):
    """A request did not get exactly its requested number of output tokens."""


class ReplicaDivergence(RuntimeError):
    """Ranks of one replica were asked to run different batches (their schedulers diverged)."""


class StepTimer:
    """Boundaries between consecutive steps: CUDA events on GPU (read once, at the end), perf_counter on CPU.

    Events recorded back to back make the steps tile the GPU timeline, so host overhead that leaves the GPU idle
    is counted in the step that waited for it, as a wall clock would."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def start(self) -> None:
        self.marks = []
        self.mark()

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def durations(self) -> np.ndarray:
        if self.cuda:
            self.marks[-1].synchronize()
            return np.array([a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])])
        return np.diff(np.asarray(self.marks, dtype=np.float64))

    def last(self) -> float:
        if self.cuda:
            self.marks[-1].synchronize()
            return self.marks[-2].elapsed_time(self.marks[-1]) / 1e3
        return self.marks[-1] - self.marks[-2]


def _fingerprint(*arrays: np.ndarray) -> float:
    """A 32-bit checksum of the batch description, exact in a float64 broadcast."""
    crc = 0
    for array in arrays:
        crc = zlib.crc32(np.ascontiguousarray(array, dtype=np.int64).tobytes(), crc)
    return float(crc)


def pipeline_microbatches(knob: int | None, pp: int) -> int:
    """The micro-batches the torch engine splits a decode step into for the engine knob `pp_microbatches`: unset or
    1, the stages in turn (1); 0 or pp, one per stage (pp); anything else is refused by name."""
    count = 1 if knob is None else (knob or pp)
    if count not in (1, pp):
        raise ValueError(f"pp_microbatches={knob}: the torch engine runs the stages in turn (1) or pipelines one "
                         f"micro-batch per stage (0 or {pp})")
    return count


def make_fast_ops(kind: str | None, device: torch.device):
    """The fast path's operations: "triton" (the kernels of triton_attention), "torch" (the same fused step in
    plain torch), or None: triton on CUDA where it is installed, else torch."""
    if kind is None:
        from infscale.backends.torch import triton_attention

        kind = "triton" if device.type == "cuda" and triton_attention.available() else "torch"
    if kind == "torch":
        return TorchFastOps()
    if kind == "triton":
        from infscale.backends.torch.triton_attention import TritonOps

        return TritonOps()
    raise ValueError(f"fast_ops must be 'triton', 'torch' or None, not {kind!r}")


class TorchExecutor:
    """One replica's engine: a (stage of a) `DecoderModel`, its paged KV cache and the requests' tokens.

    Fast path (`fast`; default: on for a CUDA device when the model supports it): pure-decode spans run as CUDA
    graphs of `DecoderModel.fast_decode` (see graphs.py), one per batch size in `graph_sizes` up to the number
    of requests, with the fused kernels of triton_attention (`fast_ops`). Spans larger than the largest size,
    spans whose contexts outgrow the graphs' block tables, prefill iterations and models the path does not
    support run eagerly. With Triton ops, the eager prefill and mixed iterations run through the fused kernels
    of triton_prefill (flash-style paged prefill attention for all prompt chunks in one launch, fused RoPE/KV
    write, add+RMSNorm, SwiGLU); otherwise through the plain-torch layers. `warmup()` tunes the kernels (CUDA),
    captures every graph, then warms the path up with a throw-away request; without it graphs are captured when
    first needed. On CPU, fast=True records the step instead of capturing it (`graph_mode` "record"): the same
    buffers and padding, for tests."""

    deterministic = False

    def __init__(self, model: DecoderModel, num_blocks: int, block_size: int, isl: np.ndarray,
                 osl: np.ndarray | None = None, seed: int = 0, fast: bool | None = None,
                 fast_ops: str | None = None, graph_sizes: tuple[int, ...] | None = None,
                 graph_mode: str | None = None, max_context: int | None = None, tune: bool | None = None,
                 pp_microbatches: int = 1):
        self.model = model
        self.ctx = model.ctx
        self.device = model.device
        self.block_size = block_size
        self.isl = np.asarray(isl, dtype=np.int64)
        self.osl = None if osl is None else np.asarray(osl, dtype=np.int64)
        self.seed = seed
        self.timer = StepTimer(self.device)
        self._prompts: dict[int, np.ndarray] = {}
        self.generated: dict[int, list[int]] = {}
        self.iterations = 0
        self.decode_iterations = 0
        self.fast_steps = 0
        self.scaling: LayerScaling | None = None  # a proxy's step-time scaling (calibrate_proxy)
        pp_microbatches = pipeline_microbatches(pp_microbatches, self.ctx.pp)
        pipelined = pp_microbatches > 1
        unsupported = model.fast_decode_unsupported()
        if pipelined and (fast is False or unsupported is not None):
            raise ValueError(f"pipelined PP (pp_microbatches={pp_microbatches}) runs on the fast decode path, "
                             f"which {model.arch.name} cannot take: {unsupported or 'fast=False given'}")
        if fast is None:  # pipelined PP takes the fast path on CPU too (recorded steps, plain-torch ops)
            fast = (self.device.type == "cuda" or pipelined) and unsupported is None
        elif fast and unsupported is not None:
            raise ValueError(f"the fast decode path does not support {model.arch.name}: {unsupported}")
        self.graphs: DecodeGraphs | None = None
        self.pipeline: list[DecodeGraphs] | None = None  # one set of graphs per micro-batch (pipelined PP)
        self.packed_ops = None  # the fused kernels of prefill and mixed iterations (with the Triton fast path)
        if not fast:
            self.cache = model.new_cache(num_blocks, block_size)
            return
        # one block more than the scheduler's pool: the scratch block padded rows of a captured batch use
        self.cache = model.new_cache(num_blocks, block_size, extra_blocks=1)
        if max_context is None:
            longest = int((self.isl + (self.osl if self.osl is not None else 0)).max()) if len(self.isl) else 0
            max_context = longest + 16 if self.osl is not None else model.arch.max_context
        sizes = tuple(graph_sizes or DEFAULT_BATCH_SIZES)
        # graphs up to the most requests one step can hold: all of them, or a micro-batch's share when pipelined
        most = -(-max(1, len(self.isl)) // pp_microbatches)
        cap = next((b for b in sorted(sizes) if b >= most), max(sizes))
        sizes = tuple(b for b in sizes if b <= cap)
        self.ops = make_fast_ops(fast_ops, self.device)
        if self.ops.name == "triton":
            from infscale.backends.torch.triton_prefill import PackedOps

            self.packed_ops = PackedOps(self.ops)
        self.tune = self.device.type == "cuda" and self.ops.name == "triton" if tune is None else tune
        graphs = [DecodeGraphs(model, self.cache, self.ops, max_context, scratch_block=num_blocks,
                               batch_sizes=sizes, mode=graph_mode, pipelined=pipelined)
                  for _ in range(pp_microbatches)]
        self.graphs = graphs[0]
        self.pipeline = graphs if pipelined else None

    # -------------------------------------------------------------------------------------------- tokens

    def prompt(self, request: int) -> np.ndarray:
        """The request's prompt tokens: deterministic per (seed, request id), the same on every rank and run."""
        tokens = self._prompts.get(request)
        if tokens is None:
            rng = np.random.default_rng([self.seed, request])
            tokens = rng.integers(0, self.model.arch.vocab_size, int(self.isl[request]), dtype=np.int64)
            self._prompts[request] = tokens
        return tokens

    def history_length(self, request: int) -> int:
        return int(self.isl[request]) + len(self.generated.get(request, ()))

    def history(self, request: int, start: int, stop: int) -> np.ndarray:
        """Tokens start … stop-1 of prompt + generated (a recomputed prompt includes the generated tokens)."""
        prompt = self.prompt(request)
        generated = np.asarray(self.generated.get(request, ()), dtype=np.int64)
        return np.concatenate([prompt, generated])[start:stop]

    def generated_tokens(self, request: int) -> np.ndarray:
        return np.asarray(self.generated.get(request, ()), dtype=np.int64)

    def check_outputs(self, requests: np.ndarray | None = None) -> None:
        """Raise unless every request (default: all with an OSL) generated exactly its OSL tokens."""
        if self.osl is None:
            raise OutputCheckError("this executor was built without the requests' OSL")
        ids = np.arange(len(self.osl)) if requests is None else np.asarray(requests, dtype=np.int64)
        counts = np.array([len(self.generated.get(int(r), ())) for r in ids])
        wrong = ids[counts != self.osl[ids]]
        if len(wrong):
            r = int(wrong[0])
            raise OutputCheckError(f"{len(wrong)} request(s) have the wrong token count, e.g. request {r}: "
                                   f"{len(self.generated.get(r, ()))} generated, OSL {int(self.osl[r])}")

    # -------------------------------------------------------------------------------------------- protocol

    @torch.inference_mode()
    def iteration(self, batch: IterationBatch) -> float:
        self.timer.start()
        meta, ids, samplers = self._prepare(batch)
        tokens, finite = self.model.forward(ids, meta, self.cache)
        sampled = tokens.tolist()
        ok = bool(finite)
        self.timer.mark()
        if not ok:
            raise NonFiniteLogits(f"non-finite logits in iteration {self.iterations} "
                                  f"({len(batch.decode_ids)} decodes, {len(batch.prefill_ids)} prefill chunks)")
        for request, token in zip(samplers, sampled):
            self.generated.setdefault(request, []).append(int(token))
        for request, context in zip(batch.decode_ids.tolist(), batch.decode_context.tolist()):
            self.cache.lengths[request] = context
        for request, chunk, past in zip(batch.prefill_ids.tolist(), batch.prefill_chunk.tolist(),
                                        batch.prefill_past.tolist()):
            self.cache.lengths[request] = past + chunk
        self.iterations += 1
        fingerprint = _fingerprint(batch.decode_ids, batch.decode_context, batch.prefill_ids,
                                   batch.prefill_chunk, batch.prefill_past)
        durations = self._scaled(self.timer.durations(), len(batch.decode_ids) + len(batch.prefill_ids), "iteration")
        return float(self._agree(durations, fingerprint)[0])

    @torch.inference_mode()
    def decode_steps(self, ids: np.ndarray, context: np.ndarray, steps: int, horizon: float | None) -> np.ndarray:
        self.timer.start()  # the span's set-up below counts in its first step, as prep does in iteration()
        ids = np.asarray(ids, dtype=np.int64)
        context = np.asarray(context, dtype=np.int64)
        requests = ids.tolist()
        for request, ctx in zip(requests, context.tolist()):
            self._check_decode(request, ctx)
        # all blocks of the span up front (the scheduler sized `steps` to fit), so the table is fixed on device
        # and each step's slots come from it without host work; unused blocks are trimmed if the span stops early
        tables = [self.cache.allocator.ensure(r, ctx + steps - 1) for r, ctx in zip(requests, context.tolist())]
        if self.pipeline is not None:
            if self.graphs.fits(-(-len(requests) // len(self.pipeline)), max(map(len, tables))):
                return self._pipelined_span(ids, context, steps, horizon, tables)
        elif self.graphs is not None and self.graphs.fits(len(requests), max(map(len, tables))):
            return self._graph_span(ids, context, steps, horizon, tables)
        table = self._table_tensor(tables)
        lens = torch.as_tensor(context, device=self.device)
        keys = torch.as_tensor(ids, device=self.device)
        current = torch.as_tensor([self.generated[r][-1] for r in requests], dtype=torch.int64, device=self.device)
        rows = torch.arange(len(requests), device=self.device)
        out = torch.empty((steps, len(requests)), dtype=torch.int64, device=self.device)
        finite = torch.empty(steps, dtype=torch.int64, device=self.device)
        shared: list[float] = []
        done = 0
        while done < steps:
            positions = lens - 1
            slots = table.gather(1, (positions // self.block_size)[:, None])[:, 0] * self.block_size \
                + positions % self.block_size
            meta = BatchMeta(positions=positions, slots=slots, keys=keys, sample_index=rows,
                             num_decode=len(requests), decode_tables=table, decode_lens=lens)
            current, finite[done] = self.model.forward(current, meta, self.cache)
            out[done] = current
            lens = lens + 1
            done += 1
            if self._step_done(done, horizon, shared, len(requests)):
                break
        flags = finite[:done].cpu().numpy()
        if not flags.all():
            raise NonFiniteLogits(f"non-finite logits at decode step {int(np.argmin(flags))} of a span of "
                                  f"{len(requests)} requests (contexts {int(context.min())}-{int(context.max())})")
        return self._finish_span(ids, context, steps, done, out[:done].T.tolist(), horizon, shared)

    def _graph_span(self, ids: np.ndarray, context: np.ndarray, steps: int, horizon: float | None,
                    tables: list[list[int]]) -> np.ndarray:
        """decode_steps through the captured graphs: one load, one replay per step, one read-back."""
        requests = ids.tolist()
        n = len(requests)
        graphs = self.graphs
        last = np.asarray([self.generated[r][-1] for r in requests], dtype=np.int64)
        b = graphs.load(last, context, tables, keys=ids)
        history = torch.empty((steps, 2, n), dtype=torch.int64, device=self.device)  # (tokens, finite flags)
        shared: list[float] = []
        done = 0
        while done < steps:
            history[done].copy_(graphs.replay(b)[:, :n])
            done += 1
            if self._step_done(done, horizon, shared, n):
                break
        host = history[:done].cpu().numpy()
        flags = host[:, 1].all(axis=1)
        if not flags.all():
            raise NonFiniteLogits(f"non-finite logits at decode step {int(np.argmin(flags))} of a span of "
                                  f"{n} requests (contexts {int(context.min())}-{int(context.max())}, CUDA-graph "
                                  f"batch {b})")
        self.fast_steps += done
        return self._finish_span(ids, context, steps, done, host[:, 0].T.tolist(), horizon, shared)

    def _pipelined_span(self, ids: np.ndarray, context: np.ndarray, steps: int, horizon: float | None,
                        tables: list[list[int]]) -> np.ndarray:
        """decode_steps as pp micro-batches pipelined over the stages (see the module's docstring). With a
        horizon the ranks must agree after every step, so each round then fills and drains the pipeline."""
        slots = self.pipeline
        count = len(slots)
        n = len(ids)
        rows = [np.arange(m, n, count) for m in range(count)]
        loads: list[tuple[int, int] | None] = []  # per micro-batch: (captured size, requests), None when empty
        history: list[torch.Tensor | None] = []   # first stage: per micro-batch [steps, 2, requests]
        for graphs, part in zip(slots, rows):
            if not len(part):
                loads.append(None)
                history.append(None)
                continue
            requests = ids[part]
            last = np.asarray([self.generated[r][-1] for r in requests.tolist()], dtype=np.int64)
            b = graphs.load(last, context[part], [tables[i] for i in part.tolist()], keys=requests)
            loads.append((b, len(part)))
            history.append(torch.empty((steps, 2, len(part)), dtype=torch.int64, device=self.device)
                           if self.ctx.is_first_stage else None)
        shared: list[float] = []
        done = 0
        while done < steps:
            rounds = 1 if horizon is not None else steps
            self._pipeline_rounds(loads, history, done, rounds)
            done += rounds
            if horizon is not None:
                shared.append(float(self._agree(self._scaled(np.array([self.timer.last()]), n), float(done))[0]))
                if sum(shared) >= horizon:
                    break
        # the tokens live on the first stage: check them there and give every rank of the replica its copy
        tokens = torch.empty((done, 2, n), dtype=torch.int64, device=self.device)
        if self.ctx.is_first_stage:
            for part, record in zip(rows, history):
                if record is not None:
                    tokens[:, :, torch.as_tensor(part, device=self.device)] = record[:done]
        self.ctx.broadcast_from_driver(tokens)
        host = tokens.cpu().numpy()
        flags = host[:, 1].all(axis=1)
        if not flags.all():
            raise NonFiniteLogits(f"non-finite logits at decode step {int(np.argmin(flags))} of a pipelined span "
                                  f"of {n} requests (contexts {int(context.min())}-{int(context.max())})")
        self.fast_steps += done
        return self._finish_span(ids, context, steps, done, host[:, 0].T.tolist(), horizon, shared)

    def _pipeline_rounds(self, loads: list[tuple[int, int] | None], history: list[torch.Tensor | None],
                         first: int, rounds: int) -> None:
        """Run steps first … first+rounds-1 of every micro-batch through the ring of stages. Tick t: stage s runs
        micro-batch step j = t - s (micro-batch j mod pp, step first + j div pp), then the ring exchange. Every rank
        marks the timer at the start of each round after the first and once at the end."""
        ctx = self.ctx
        slots = self.pipeline
        count = len(slots)
        total = rounds * count
        stage = ctx.pp_rank

        def active(j: int) -> bool:
            return 0 <= j < total and loads[j % count] is not None

        for tick in range(total + ctx.pp - 1):
            if tick and tick % count == 0 and tick < total:
                self.timer.mark()  # a new round starts (on the first stage: micro-batch 0 of the next step)
            j = tick - stage
            output = None
            if active(j):
                graphs = slots[j % count]
                b, width = loads[j % count]
                result = graphs.replay(b)
                if ctx.is_last_stage:
                    output = result[:, :width].contiguous()  # the tokens and finite flags, back to stage 0
                else:
                    output = graphs.logits[b]                 # this stage's output hidden states
            incoming = None
            following = tick + 1 - (count if ctx.is_first_stage else stage)
            if active(following):
                m = following % count
                if ctx.is_first_stage:  # the tokens of micro-batch m's step `following // count`, from the last stage
                    incoming = history[m][first + following // count]
                else:
                    incoming = slots[m].hidden[: loads[m][0]]
            ctx.ring_exchange(output, incoming)
            if ctx.is_first_stage and incoming is not None:
                m = following % count
                slots[m].ids[: loads[m][1]].copy_(incoming[0])  # micro-batch m's next step embeds them
        self.timer.mark()

    def _scaled(self, durations: np.ndarray, rows: int, kind: str = "decode") -> np.ndarray:
        """Step durations as the full model's (a proxy) or as measured; `kind` "decode" or "iteration"."""
        return durations if self.scaling is None else self.scaling.scale(durations, rows, kind)

    def _step_done(self, done: int, horizon: float | None, shared: list[float], rows: int) -> bool:
        """Mark a decode step's end; with a horizon, every rank must stop at the same step, so the driver's
        (scaled) step time is shared and summed. True when the span must stop here."""
        self.timer.mark()
        if horizon is None:
            return False
        shared.append(float(self._agree(self._scaled(np.array([self.timer.last()]), rows), float(done))[0]))
        return sum(shared) >= horizon

    def _finish_span(self, ids: np.ndarray, context: np.ndarray, steps: int, done: int,
                     tokens_per_request: list[list[int]], horizon: float | None, shared: list[float]) -> np.ndarray:
        """Record a span's tokens, set the KV lengths (returning blocks a shortened span did not use), and
        return its per-step durations (agreed across ranks)."""
        for request, tokens in zip(ids.tolist(), tokens_per_request):
            self.generated[request].extend(tokens)
        for request, ctx in zip(ids.tolist(), context.tolist()):
            self.cache.lengths[request] = ctx + done - 1
            if done < steps:
                self.cache.allocator.trim(request, ctx + done - 1)
        self.decode_iterations += done
        if horizon is not None:
            return np.asarray(shared)
        durations = self._scaled(self.timer.durations(), len(ids))
        return self._agree(durations, _fingerprint(ids, context, np.array([steps])))

    def prepare_fast_path(self) -> None:
        """Tune the kernels for the graphs' batch sizes (CUDA, triton) and capture every graph. Every rank of
        the replica must call it (the captured steps hold the TP collectives)."""
        if self.graphs is None:
            return
        if self.tune and not getattr(self, "_tuned", False):
            from infscale.backends.torch.triton_attention import tune_linear

            tune_linear(self.ops, self.model.fast_linear_sites(), self.graphs.sizes)
            moe = list(self.model.moe_blocks().values())
            if moe:
                from infscale.backends.torch.triton_moe import tune_moe

                tune_moe(self.ops, moe, self.graphs.sizes)
            self._tuned = True
        for graphs in self.pipeline or [self.graphs]:
            graphs.capture()

    def release(self, ids: np.ndarray) -> None:
        """Free the KV blocks of finished or preempted requests (their tokens are kept: a preempted request is
        recomputed from them, a finished one is checked against its OSL)."""
        for request in np.asarray(ids).tolist():
            self.cache.release(int(request))

    # -------------------------------------------------------------------------------------------- helpers

    def _check_decode(self, request: int, context: int) -> None:
        held = self.cache.lengths.get(request, 0)
        if held != context - 1 or self.history_length(request) != context:
            raise KVCacheError(f"request {request}: decode to context {context} but the executor holds {held} "
                               f"tokens of KV and {self.history_length(request)} tokens of history")

    def _table_tensor(self, tables: list[list[int]]) -> torch.Tensor:
        width = max(len(t) for t in tables)
        padded = np.zeros((len(tables), width), dtype=np.int64)  # padding points at block 0, masked out
        for row, t in enumerate(tables):
            padded[row, : len(t)] = t
        return torch.as_tensor(padded, device=self.device)

    def _prepare(self, batch: IterationBatch) -> tuple[BatchMeta, torch.Tensor, list[int]]:
        """Allocate blocks and lay out the packed batch: decodes first, then prompt chunks."""
        allocator = self.cache.allocator
        tokens: list[np.ndarray] = []
        positions: list[np.ndarray] = []
        slots: list[np.ndarray] = []
        samplers: list[int] = []
        sample_rows: list[int] = []
        decode_ids = batch.decode_ids.tolist()
        decode_context = batch.decode_context.tolist()
        tables = []
        for request, ctx in zip(decode_ids, decode_context):
            self._check_decode(request, ctx)
            tables.append(allocator.ensure(request, ctx))
            tokens.append(np.array([self.generated[request][-1]], dtype=np.int64))
            positions.append(np.array([ctx - 1], dtype=np.int64))
            slots.append(self.cache.slots(request, ctx - 1, 1))
        samplers += decode_ids
        sample_rows += list(range(len(decode_ids)))
        row = len(decode_ids)
        prefills: list[PrefillSeq] = []
        for request, chunk, past in zip(batch.prefill_ids.tolist(), batch.prefill_chunk.tolist(),
                                        batch.prefill_past.tolist()):
            held = self.cache.lengths.get(request, 0)
            total = self.history_length(request)
            if held != past or past + chunk > total:
                raise KVCacheError(f"request {request}: prefill chunk {past}..{past + chunk} but the executor holds "
                                   f"{held} tokens of KV and {total} tokens of history")
            table = allocator.ensure(request, past + chunk)
            tokens.append(self.history(request, past, past + chunk))
            positions.append(np.arange(past, past + chunk, dtype=np.int64))
            slots.append(self.cache.slots(request, past, chunk))
            prefills.append(PrefillSeq(row, chunk, past, list(table)))
            if past + chunk == total:  # the prompt (or recomputed prompt + output) is complete: it samples
                samplers.append(request)
                sample_rows.append(row + chunk - 1)
            row += chunk
        owners = decode_ids + batch.prefill_ids.tolist()
        keys = [np.full(len(p), r, dtype=np.int64) for r, p in zip(owners, positions)]
        all_positions = np.concatenate(positions)
        device = self.device
        meta = BatchMeta(
            positions=torch.as_tensor(all_positions, device=device),
            slots=torch.as_tensor(np.concatenate(slots), device=device),
            keys=torch.as_tensor(np.concatenate(keys), device=device),
            sample_index=torch.as_tensor(np.asarray(sample_rows, dtype=np.int64), device=device),
            num_decode=len(decode_ids),
            decode_tables=self._table_tensor(tables) if tables else None,
            decode_lens=torch.as_tensor(np.asarray(decode_context, dtype=np.int64), device=device) if tables else None,
            prefills=prefills,
            kernels=self.packed_ops,
            rope_positions=int(all_positions.max()) + 1,
        )
        return meta, torch.as_tensor(np.concatenate(tokens), device=device), samplers

    def _agree(self, durations: np.ndarray, fingerprint: float) -> np.ndarray:
        """Every rank returns the driver's durations; followers check that they ran the same batch."""
        if self.ctx.size == 1:
            return durations
        payload = torch.as_tensor(np.append(durations, fingerprint), dtype=torch.float64, device=self.device)
        self.ctx.broadcast_from_driver(payload)
        values = payload.cpu().numpy()
        if values[-1] != fingerprint:
            raise ReplicaDivergence(f"rank {self.ctx.rank} ran a different batch from the driver rank "
                                    "(the replicated schedulers diverged)")
        return values[:-1]

    # -------------------------------------------------------------------------------------------- warm-up

    @torch.inference_mode()
    def warmup(self, prompt_tokens: int = 16, decode: int = 4) -> None:
        """One prefill and a few decode steps of a throw-away request (first-call costs out of the measurement).
        Every rank of the replica must call it. Needs ceil((prompt_tokens + decode) / block_size) free blocks.
        With the fast path, first tunes its kernels and captures its CUDA graphs (prepare_fast_path)."""
        self.prepare_fast_path()
        request = -1
        rng = np.random.default_rng([self.seed, 2**32])
        self._prompts[request] = rng.integers(0, self.model.arch.vocab_size, prompt_tokens, dtype=np.int64)
        isl = self.isl
        self.isl = np.append(isl, prompt_tokens)  # index -1 is the warm-up request's ISL
        try:
            empty = np.zeros(0, dtype=np.int64)
            self.iteration(IterationBatch(empty, empty, np.array([request]), np.array([prompt_tokens]),
                                          np.array([0])))
            self.decode_steps(np.array([request]), np.array([prompt_tokens + 1]), decode, None)
        finally:
            self._forget(np.array([request]))
            self.isl = isl
            self.model.reset_expert_counts()
            self.iterations = self.decode_iterations = self.fast_steps = 0

    # -------------------------------------------------------------------------------------------- proxy runs

    @torch.inference_mode()
    def calibrate_proxy(self, full_layers: int, repeats: int = 10, warm: int = 2,
                        sizes: list[int] | None = None) -> LayerScaling:
        """Measure the fixed part of a step (see proxy.py) and scale every later step of this layer-sliced
        model to `full_layers`. For each batch size n: `repeats` prefill iterations of n one-token throw-away
        requests, then one decode span of them (`warm` + `repeats` steps), all with the layers removed, through
        the same path as the measurement (CUDA graphs of the layer-less step where the executor has graphs).
        Every rank of the replica must call it, after warmup(). Sizes default to the graphs' batch sizes (else
        the powers of two up to the requests' count), as many as the free KV blocks allow."""
        if self.pipeline is not None:
            raise ValueError("layer-sliced proxy runs of pipelined PP (pp_microbatches > 1) are not supported: "
                             "their fixed part is measured per step of the whole batch")
        scaling = LayerScaling(self.model.num_layers, full_layers)
        steps = warm + repeats
        blocks_each = self.cache.allocator.blocks_for(2 + steps)
        if sizes is None:
            cap = max(1, len(self.isl))
            candidates = self.graphs.sizes if self.graphs is not None else \
                [b for b in DEFAULT_BATCH_SIZES if b < 2 * cap]
            sizes = [b for b in candidates if b * blocks_each <= self.cache.allocator.free_blocks]
        if not sizes:
            raise KVCacheError(f"no KV blocks free to calibrate the proxy's fixed part ({blocks_each} per request)")
        self.scaling = None  # calibration steps are measured as they are
        graphs = self.graphs
        try:
            with without_layers(self.model):
                if graphs is not None:  # the layer-less step's own graphs, on the same cache and buffers' shapes
                    self.graphs = DecodeGraphs(self.model, self.cache, self.ops, graphs.max_context,
                                               scratch_block=graphs.scratch_block, batch_sizes=graphs.sizes,
                                               mode=graphs.mode)
                    self.graphs.capture()
                for n in sizes:
                    iteration, decode = self._fixed_part(n, repeats, warm)
                    scaling.iteration_sizes.append(n)
                    scaling.iteration_fixed_s.append(iteration)
                    scaling.decode_sizes.append(n)
                    scaling.decode_fixed_s.append(decode)
        finally:
            self.graphs = graphs
            self.iterations = self.decode_iterations = self.fast_steps = 0
        self.scaling = scaling
        return scaling

    def _fixed_part(self, n: int, repeats: int, warm: int) -> tuple[float, float]:
        """Median (prefill iteration, decode step) time of n throw-away one-token requests (ids -1 … -n)."""
        ids = -1 - np.arange(n)
        isl = self.isl
        self.isl = np.concatenate([isl, np.ones(n, dtype=np.int64)])  # indices -1 … -n are theirs
        rng = np.random.default_rng([self.seed, 2**32 + n])
        empty = np.zeros(0, dtype=np.int64)
        prefill = IterationBatch(empty, empty, ids, np.ones(n, dtype=np.int64), np.zeros(n, dtype=np.int64))
        iterations: list[float] = []
        try:
            for _ in range(warm + repeats):
                self._forget(ids)
                for request in ids.tolist():
                    self._prompts[request] = rng.integers(0, self.model.arch.vocab_size, 1, dtype=np.int64)
                iterations.append(self.iteration(prefill))
            decode = self.decode_steps(ids, np.full(n, 2), warm + repeats, None)
        finally:
            self._forget(ids)
            self.isl = isl
        return float(np.median(iterations[warm:])), float(np.median(decode[warm:]))

    def _forget(self, ids: np.ndarray) -> None:
        """Drop throw-away requests (warm-up, proxy calibration): their KV blocks, prompts and tokens."""
        self.release(ids)
        for request in np.asarray(ids).tolist():
            self._prompts.pop(request, None)
            self.generated.pop(request, None)
