"""Continuous batching for one replica: paged-KV admission, a running-batch cap, a per-iteration token budget
(chunked prefill) and preemption by recompute when KV blocks run out.

The policy follows vLLM's V1 scheduler: running requests are served first (decodes, then unfinished prompt
chunks), then waiting requests are admitted while the batch cap, the token budget and free blocks allow; when a
running request needs a block and none is free, the most recently admitted request is preempted and re-queued at
the front, to recompute its prompt plus the tokens it had generated.

With `capacity_policy="guaranteed_no_evict"` (TensorRT-LLM's default capacity scheduler) a request is admitted only
when the KV blocks of its whole sequence (prompt + every output token) fit beside what the running requests will
still need, so no running request is ever preempted; blocks are still allocated as tokens arrive, so the KV
occupancy the log reports is what is in use.

Between events (a request finishing, KV running out, an arrival) the batch is pure decode and fixed, so the
scheduler asks the executor for many decode steps at once: that is what lets the simulator run a 32K-token
campaign in seconds, and the torch executor still runs (and times) every step.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from infscale.serving.executor import Executor, IterationBatch


class SchedulingError(RuntimeError):
    """The replica cannot make progress (e.g. one request needs more KV than the whole pool)."""


CAPACITY_POLICIES = ("max_utilization", "guaranteed_no_evict")


@dataclass
class RequestState:
    """Per-request state and timeline, shared by all replicas (indexed by global request id)."""

    isl: np.ndarray
    osl: np.ndarray
    arrival: np.ndarray
    replica: np.ndarray = field(init=False)
    first_token: np.ndarray = field(init=False)
    finish: np.ndarray = field(init=False)
    preemptions: np.ndarray = field(init=False)
    prompt_target: np.ndarray = field(init=False)  # tokens to (re)compute before decoding
    prefilled: np.ndarray = field(init=False)
    seq: np.ndarray = field(init=False)            # tokens held in KV
    generated: np.ndarray = field(init=False)
    blocks: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        n = len(self.isl)
        self.replica = np.full(n, -1, dtype=np.int64)
        self.first_token = np.full(n, np.nan)
        self.finish = np.full(n, np.nan)
        for name in ("preemptions", "prefilled", "seq", "generated", "blocks"):
            setattr(self, name, np.zeros(n, dtype=np.int64))
        self.prompt_target = self.isl.astype(np.int64).copy()


@dataclass
class SeriesLog:
    """One row per scheduler event: state at the start of a span of `steps` iterations lasting `duration`."""

    time: list[float] = field(default_factory=list)
    duration: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    running: list[int] = field(default_factory=list)
    waiting: list[int] = field(default_factory=list)
    kv_blocks_used: list[int] = field(default_factory=list)      # at the start of the span
    kv_blocks_end: list[int] = field(default_factory=list)       # at its end (KV grows during a decode span)
    prefill_tokens: list[int] = field(default_factory=list)


class Replica:
    def __init__(self, index: int, state: RequestState, executor: Executor, num_blocks: int, block_size: int,
                 max_num_seqs: int, max_num_tokens: int, capacity_policy: str = "max_utilization"):
        if capacity_policy not in CAPACITY_POLICIES:
            raise ValueError(f"unknown capacity policy '{capacity_policy}'; allowed: {', '.join(CAPACITY_POLICIES)}")
        self.index = index
        self.no_evict = capacity_policy == "guaranteed_no_evict"
        self.committed_blocks = 0   # guaranteed_no_evict: blocks the running requests hold or will need
        self._commitments: dict[int, int] = {}
        self.state = state
        self.executor = executor
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_tokens = max_num_tokens
        self.free_blocks = num_blocks
        self.clock = 0.0
        self.waiting: deque[int] = deque()
        self._running: list[int] = []           # in admission order (last = first to preempt)
        self._running_array: np.ndarray | None = None  # cached np.array(self._running)
        self.finished: list[int] = []
        self.next_of: dict[int, int] = {}       # closed loop: request -> the client's next request
        self._late_chains: list[tuple[float, list[int]]] = []  # closed-loop clients that start later, by time
        self.planned: list[int] = []             # every request routed here, chain by chain, in order
        self.chain_lengths: list[int] = []       # one entry per chain (a closed-loop client; offline: 1 each)
        self.log = SeriesLog()
        self.prefill_time = 0.0
        self.busy_time = 0.0

    # ------------------------------------------------------------------------------------------ intake

    def submit(self, request: int, at: float) -> None:
        """Queue `request`, arrived at time `at` (an idle replica's clock jumps to the arrival)."""
        if self.idle:
            self.clock = max(self.clock, at)
        self.state.replica[request] = self.index
        self.state.arrival[request] = at
        self.waiting.append(request)

    def submit_chain(self, chain: list[int], at: float) -> None:
        """Queue the first request of `chain` at time `at` (now, or when the run reaches it); each next one
        arrives when the one before it finishes."""
        self.planned.extend(chain)
        self.chain_lengths.append(len(chain))
        for request, follow in zip(chain, chain[1:]):
            self.next_of[request] = follow
        if at > self.clock:
            self._late_chains.append((at, chain))
            self._late_chains.sort(key=lambda item: item[0])
        else:
            self.submit(chain[0], at)

    def submit_all(self, requests: np.ndarray, at: float) -> None:
        """Queue independent requests, all arrived at `at` (offline)."""
        if self.idle:
            self.clock = max(self.clock, at)
        self.state.replica[requests] = self.index
        self.state.arrival[requests] = at
        listed = requests.tolist()
        self.planned.extend(listed)
        self.chain_lengths.extend([1] * len(listed))
        self.waiting.extend(listed)

    def copy_timeline_from(self, twin: "Replica") -> None:
        """Take the results of `twin`, which ran the same work with the same (deterministic) executor."""
        s = self.state
        mine = np.asarray(self.planned, dtype=np.int64)
        theirs = np.asarray(twin.planned, dtype=np.int64)
        for name in ("arrival", "first_token", "finish", "preemptions", "prompt_target", "prefilled", "seq",
                     "generated", "blocks"):
            column = getattr(s, name)
            column[mine] = column[theirs]
        s.replica[mine] = self.index
        position = dict(zip(theirs.tolist(), mine.tolist()))
        self.finished = [position[r] for r in twin.finished]
        self.waiting.clear()
        self.running = []
        self.next_of.clear()
        self.clock, self.free_blocks = twin.clock, twin.free_blocks
        self.prefill_time, self.busy_time = twin.prefill_time, twin.busy_time
        self.log = twin.log

    def outstanding_tokens(self) -> int:
        """Tokens still to be processed here (for least-loaded routing)."""
        s = self.state
        ids = np.fromiter(self.running + list(self.waiting), dtype=np.int64)
        if len(ids) == 0:
            return 0
        return int((s.prompt_target[ids] - s.prefilled[ids]).sum() + (s.osl[ids] - s.generated[ids]).sum())

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting

    # ------------------------------------------------------------------------------------------ running

    def run(self, until: float = np.inf) -> None:
        """Advance until the clock passes `until` or no work is left (clients that start later included)."""
        while True:
            while self._late_chains and (self._late_chains[0][0] <= self.clock or self.idle):
                at, chain = self._late_chains.pop(0)
                if at >= until:
                    self._late_chains.insert(0, (at, chain))
                    break
                self.submit(chain[0], at)
            if self.idle or self.clock >= until:
                return
            stop = min(until, self._late_chains[0][0]) if self._late_chains else until
            self._advance(None if stop == np.inf else stop - self.clock)

    def _advance(self, horizon: float | None) -> None:
        s = self.state
        decoding = self._decoding_ids()
        preempted = False
        if len(decoding):
            decoding, preempted = self._reserve_decode_blocks(decoding)
        budget = self.max_num_tokens - len(decoding)
        # as in vLLM's scheduler, a step that had to preempt admits nobody new
        prefill_ids, chunks, past = self._schedule_prefills(budget, len(decoding) < len(self.running),
                                                            admit=not preempted)
        if not prefill_ids and len(decoding):
            self._decode_until_event(decoding, horizon)
            return
        if not prefill_ids:
            request = self.waiting[0] if self.waiting else self.running[0]
            raise SchedulingError(
                f"request {request} cannot be scheduled: it needs more KV blocks than the replica's "
                f"{self.free_blocks} free of {self.num_blocks}"
            )
        prefill = np.asarray(prefill_ids, dtype=np.int64)
        chunk_array = np.asarray(chunks, dtype=np.int64)
        batch = IterationBatch(
            decode_ids=decoding,
            decode_context=s.seq[decoding] + 1,
            prefill_ids=prefill,
            prefill_chunk=chunk_array,
            prefill_past=np.asarray(past, dtype=np.int64),
        )
        duration = self.executor.iteration(batch)
        self._record(duration, 1, int(chunk_array.sum()))
        self.log.kv_blocks_end.append(self.num_blocks - self.free_blocks)  # all allocated before it ran
        self.clock += duration
        self.busy_time += duration
        self.prefill_time += duration
        s.seq[decoding] += 1
        s.generated[decoding] += 1
        s.prefilled[prefill] += chunk_array
        s.seq[prefill] += chunk_array
        completed = prefill[s.prefilled[prefill] == s.prompt_target[prefill]]
        s.generated[completed] += 1
        first = completed[np.isnan(s.first_token[completed])]
        s.first_token[first] = self.clock
        self._retire_finished()

    @property
    def running(self) -> list[int]:
        return self._running

    @running.setter
    def running(self, value: list[int]) -> None:
        self._running = value
        self._running_array = None

    def _running_ids(self) -> np.ndarray:
        if self._running_array is None:
            self._running_array = np.fromiter(self._running, dtype=np.int64, count=len(self._running))
        return self._running_array

    def _decoding_ids(self) -> np.ndarray:
        s = self.state
        ids = self._running_ids()
        return ids[s.prefilled[ids] == s.prompt_target[ids]]

    def _blocks_for(self, tokens: np.ndarray | int) -> np.ndarray | int:
        return -(-tokens // self.block_size)

    def _final_blocks(self, request: int) -> int:
        """Blocks a request holds when it ends: its prompt (with any recomputed output) plus what it still writes."""
        s = self.state
        return int(self._blocks_for(int(s.prompt_target[request] + s.osl[request] - s.generated[request])))

    def _reserve_decode_blocks(self, decoding: np.ndarray) -> tuple[np.ndarray, bool]:
        """Give every decoding request room for one more token, preempting the newest requests if needed.
        Returns the decoding requests that remain, and whether any request was preempted."""
        s = self.state
        need = self._blocks_for(s.seq[decoding] + 1) - s.blocks[decoding]
        preempted = False
        while int(need.sum()) > self.free_blocks:
            preempted = True
            victim = self.running[-1]
            if len(self.running) == 1:
                raise SchedulingError(
                    f"request {victim} needs more than the replica's {self.num_blocks} KV blocks "
                    f"at {int(s.seq[victim]) + 1} tokens"
                )
            self._preempt(victim)
            keep = decoding != victim
            decoding, need = decoding[keep], need[keep]
        s.blocks[decoding] += need
        self.free_blocks -= int(need.sum())
        return decoding, preempted

    def _preempt(self, request: int) -> None:
        s = self.state
        self._running.pop() if self._running[-1] == request else self._running.remove(request)
        self._running_array = None
        self.free_blocks += int(s.blocks[request])
        s.blocks[request] = 0
        s.seq[request] = 0
        s.prefilled[request] = 0
        s.prompt_target[request] = s.isl[request] + s.generated[request]
        s.preemptions[request] += 1
        self.committed_blocks -= self._commitments.pop(request, 0)
        self.waiting.appendleft(request)
        self._release(np.array([request], dtype=np.int64))

    def _schedule_prefills(self, budget: int, partial_running: bool,
                           admit: bool = True) -> tuple[list[int], list[int], list[int]]:
        """Prompt chunks for this iteration: unfinished prompts of running requests first, then admissions."""
        s = self.state
        ids: list[int] = []
        chunks: list[int] = []
        past: list[int] = []

        admitting = False

        def take(request: int) -> bool:
            nonlocal budget
            remaining = int(s.prompt_target[request] - s.prefilled[request])
            chunk = min(remaining, budget)
            if chunk <= 0:
                return False
            need = self._blocks_for(int(s.seq[request]) + chunk) - int(s.blocks[request])
            if need > self.free_blocks:
                return False
            if admitting and self.no_evict:
                final = self._final_blocks(request)
                if self.committed_blocks + final > self.num_blocks:
                    return False
                self.committed_blocks += final
                self._commitments[request] = final
            s.blocks[request] += need
            self.free_blocks -= need
            ids.append(request)
            chunks.append(chunk)
            past.append(int(s.prefilled[request]))
            budget -= chunk
            return True

        if partial_running:
            running = self._running_ids()
            for request in running[s.prefilled[running] < s.prompt_target[running]].tolist():
                if not take(request):
                    return ids, chunks, past
        admitting = True
        while admit and self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            if not take(self.waiting[0]):
                break
            self._running.append(self.waiting.popleft())
            self._running_array = None
        return ids, chunks, past

    def _steps_until_event(self, decoding: np.ndarray) -> int:
        """Decode steps possible before a request finishes or the free blocks run out (the first step's block
        is already reserved)."""
        s = self.state
        steps = int((s.osl[decoding] - s.generated[decoding]).min())
        # After the first step request r has `room_r` free slots (0 ≤ room_r < block_size) in its last block.
        # Over x further steps it needs ceil((x - room_r)/bs)⁺ blocks; writing x = q·bs + ρ this totals
        # B·q + #{r: room_r < ρ}, so the largest x within the free blocks follows from the sorted rooms.
        room = np.sort(s.blocks[decoding] * self.block_size - (s.seq[decoding] + 1))
        batch = len(decoding)
        q, remainder = divmod(self.free_blocks, batch)
        rho = self.block_size - 1 if remainder >= batch else min(self.block_size - 1, int(room[remainder]))
        return max(1, min(steps, q * self.block_size + rho + 1))

    def _decode_until_event(self, decoding: np.ndarray, horizon: float | None) -> None:
        """Pure-decode spans until a request finishes, the horizon passes, or a waiting request could start.

        While only decodes run, nothing new can be admitted (the batch cap and token budget are fixed and free
        blocks only shrink), so each span runs many steps in one executor call. When the blocks run out, the
        newest requests are preempted; that step admits nobody (as in vLLM), and decoding goes on in this loop
        unless the blocks freed would let the first waiting request start.
        """
        s = self.state
        steps = self._steps_until_event(decoding)
        while True:
            start = self.clock
            self._decode_span(decoding, steps, horizon)
            if horizon is not None:
                horizon -= self.clock - start
                if horizon <= 0:
                    return
            if not len(self._running) or int((s.osl[decoding] - s.generated[decoding]).min()) == 0:
                return  # someone finished (and was retired): admissions may be possible
            decoding, preempted = self._reserve_decode_blocks(decoding)
            if len(decoding) < len(self._running) or not len(decoding):
                return  # a request is mid-prompt: the full scheduling step handles it
            if not preempted:
                steps = self._steps_until_event(decoding)
            elif self._front_admissible(len(decoding)):
                steps = 1  # the preempting step itself, then a full scheduling step may admit
                self._decode_span(decoding, steps, horizon)
                return
            else:
                steps = self._steps_until_event(decoding)

    def _front_admissible(self, decodes: int) -> bool:
        """Could the first waiting request get its first prompt chunk after `decodes` decode tokens?"""
        if not self.waiting or len(self._running) >= self.max_num_seqs:
            return False
        budget = self.max_num_tokens - decodes
        request = self.waiting[0]
        s = self.state
        chunk = min(int(s.prompt_target[request] - s.prefilled[request]), budget)
        if self.no_evict and self.committed_blocks + self._final_blocks(request) > self.num_blocks:
            return False
        return chunk > 0 and self._blocks_for(int(s.seq[request]) + chunk) - int(s.blocks[request]) <= self.free_blocks

    def _decode_span(self, decoding: np.ndarray, steps: int, horizon: float | None) -> None:
        s = self.state
        durations = self.executor.decode_steps(decoding, s.seq[decoding] + 1, steps, horizon)
        done = len(durations)
        span = float(durations.sum())
        self._record(span, done, 0)
        self.clock += span
        self.busy_time += span
        seq = s.seq[decoding] + done
        s.seq[decoding] = seq
        s.generated[decoding] += done
        new_blocks = np.maximum(self._blocks_for(seq) - s.blocks[decoding], 0)
        s.blocks[decoding] += new_blocks
        self.free_blocks -= int(new_blocks.sum())
        self.log.kv_blocks_end.append(self.num_blocks - self.free_blocks)
        if done == steps:  # the span ends at a finish or when blocks run out; only the former retires anyone
            self._retire_finished()

    def _retire_finished(self) -> None:
        s = self.state
        ids = self._running_ids()
        done = ids[s.generated[ids] >= s.osl[ids]]
        if not len(done):
            return
        s.finish[done] = self.clock
        if self.no_evict:
            self.committed_blocks -= sum(self._commitments.pop(r) for r in done.tolist())
        self.free_blocks += int(s.blocks[done].sum())
        s.blocks[done] = 0
        self._release(done)
        finished = set(done.tolist())
        self.finished.extend(done.tolist())
        self.running = [r for r in self.running if r not in finished]
        for request in done.tolist():
            follow = self.next_of.pop(request, None)
            if follow is not None:
                self.submit(follow, self.clock)

    def _release(self, requests: np.ndarray) -> None:
        """Tell an executor that keeps real KV blocks (torch) that these requests' blocks are free again."""
        release = getattr(self.executor, "release", None)
        if release is not None:
            release(requests)

    def _record(self, duration: float, steps: int, prefill_tokens: int) -> None:
        log = self.log
        log.time.append(self.clock)
        log.duration.append(duration)
        log.steps.append(steps)
        log.running.append(len(self.running))
        log.waiting.append(len(self.waiting))
        log.kv_blocks_used.append(self.num_blocks - self.free_blocks)
        log.prefill_tokens.append(prefill_tokens)

