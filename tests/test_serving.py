"""Serving core: workload generation, the continuous-batching scheduler, DP routing and the cell metrics.

The scheduler is driven by two executors: a small fake one written here (1 ms per iteration + 1 µs per token,
constant decode steps) whose timings can be checked by hand, and the real `sim` SimExecutor for a tiny Llama.
A spying wrapper checks, at every call the scheduler makes, what a user relies on: the batch cap, the token
budget, KV blocks covering every sequence's context, and never decoding past a request's output length.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from infscale.backends.sim.stepmodel import SimExecutor
from infscale.campaign.layout import Layout
from infscale.campaign.spec import Arrival, LengthDist
from infscale.catalog import get_hardware, model_from_hf_config
from infscale.perfmodel import build_step_model
from infscale.serving.cluster import ReplicaConfig, serve
from infscale.serving.executor import IterationBatch
from infscale.serving.metrics import request_rows, series_rows, summarize
from infscale.serving.scheduler import Replica, RequestState, SchedulingError
from infscale.serving.workload import Requests, generate_requests

TINY_LLAMA = Path(__file__).parent / "data" / "hf" / "tiny-llama.json"

ITER_BASE = 1e-3     # fake executor: seconds per iteration
PER_TOKEN = 1e-6     # fake executor: seconds per token processed in the iteration


# ------------------------------------------------------------------------------------------- executors


class FakeExecutor:
    """1 ms + 1 µs per token per iteration; a decode step of B sequences costs 1 ms + B µs, every step alike."""

    deterministic = True

    def __init__(self) -> None:
        self.iterations = 0
        self.decode_calls = 0

    def iteration(self, batch: IterationBatch) -> float:
        self.iterations += 1
        return ITER_BASE + PER_TOKEN * batch.num_tokens

    def decode_steps(self, ids: np.ndarray, context: np.ndarray, steps: int, horizon: float | None) -> np.ndarray:
        self.decode_calls += 1
        durations = np.full(steps, ITER_BASE + PER_TOKEN * len(ids))
        if horizon is not None:
            ends = np.cumsum(durations)
            durations = durations[: int(np.searchsorted(ends, horizon, side="left")) + 1]
        return durations


class NonDeterministicFake(FakeExecutor):
    """Same timings, but claims to be a measurement: the cluster must then simulate every replica."""

    deterministic = False


class SpyExecutor:
    """Wraps an executor and checks the scheduler's invariants at every call. The replica checked is `.replica`
    when set, else the Replica that is calling (so spies also work inside `serve`)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.deterministic = inner.deterministic
        self.replica: Replica | None = None
        self.batches: list[IterationBatch] = []
        self.spans: list[tuple[int, int]] = []   # (batch size, steps run)
        self.chunked = False
        self.first_token_at: dict[int, float] = {}   # end of the iteration that completed a first prefill

    def _caller(self) -> Replica:
        if self.replica is not None:
            return self.replica
        caller = sys._getframe(2).f_locals.get("self")
        assert isinstance(caller, Replica), "executor called from outside a Replica"
        return caller

    def _check_pool(self, r: Replica) -> None:
        s = r.state
        mine = np.asarray(r.running + list(r.waiting), dtype=np.int64)
        assert 0 <= r.free_blocks <= r.num_blocks
        # blocks held by this replica's requests are exactly the pool minus the free blocks
        assert int(s.blocks[mine].sum()) == r.num_blocks - r.free_blocks
        assert len(r.running) <= r.max_num_seqs

    def iteration(self, batch: IterationBatch) -> float:
        r = self._caller()
        s = r.state
        self._check_pool(r)
        assert batch.num_tokens <= r.max_num_tokens
        assert int(batch.prefill_chunk.sum()) <= r.max_num_tokens
        assert len(batch.decode_ids) + len(batch.prefill_ids) <= r.max_num_seqs
        assert not set(batch.decode_ids.tolist()) & set(batch.prefill_ids.tolist())
        assert (batch.prefill_chunk > 0).all()
        # every sequence's KV after this iteration fits in the blocks it holds
        assert (s.blocks[batch.decode_ids] * r.block_size >= batch.decode_context).all()
        assert (s.blocks[batch.prefill_ids] * r.block_size >= batch.prefill_past + batch.prefill_chunk).all()
        # never past the prompt, never past the output length
        assert (batch.prefill_past + batch.prefill_chunk <= s.prompt_target[batch.prefill_ids]).all()
        assert (s.generated[batch.decode_ids] < s.osl[batch.decode_ids]).all()
        # the model sees the whole sequence: prompt plus every token generated so far (also after a recompute)
        np.testing.assert_array_equal(batch.decode_context, s.isl[batch.decode_ids] + s.generated[batch.decode_ids])
        np.testing.assert_array_equal(s.prompt_target[batch.prefill_ids],
                                      s.isl[batch.prefill_ids] + s.generated[batch.prefill_ids])
        if (batch.prefill_past + batch.prefill_chunk < s.prompt_target[batch.prefill_ids]).any():
            self.chunked = True
        self.batches.append(batch)
        duration = self.inner.iteration(batch)
        completes = batch.prefill_past + batch.prefill_chunk == s.prompt_target[batch.prefill_ids]
        for request in batch.prefill_ids[completes & (s.generated[batch.prefill_ids] == 0)].tolist():
            assert request not in self.first_token_at
            self.first_token_at[request] = r.clock + duration
        return duration

    def decode_steps(self, ids: np.ndarray, context: np.ndarray, steps: int, horizon: float | None) -> np.ndarray:
        r = self._caller()
        s = r.state
        self._check_pool(r)
        assert steps >= 1
        assert len(ids) <= r.max_num_seqs
        assert (s.generated[ids] + steps <= s.osl[ids]).all(), "asked to decode past a request's osl"
        assert (s.blocks[ids] * r.block_size >= context).all(), "first step's KV slot not reserved"
        np.testing.assert_array_equal(context, s.isl[ids] + s.generated[ids])
        # the span must fit in the free blocks: request i reaches context + steps - 1 tokens
        extra = -(-(context + steps - 1) // r.block_size) - s.blocks[ids]
        assert int(np.maximum(extra, 0).sum()) <= r.free_blocks, "decode span overcommits the KV pool"
        durations = self.inner.decode_steps(ids, context, steps, horizon)
        self.spans.append((len(ids), len(durations)))
        return durations


class OneStepAtATime:
    """Runs a decode span one step per call: the scheduler then cannot fast-forward (the reference)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.deterministic = inner.deterministic

    def iteration(self, batch: IterationBatch) -> float:
        return self.inner.iteration(batch)

    def decode_steps(self, ids: np.ndarray, context: np.ndarray, steps: int, horizon: float | None) -> np.ndarray:
        return self.inner.decode_steps(ids, context, 1, horizon)


def tiny_sim_executor(dp: int = 1) -> SimExecutor:
    model = model_from_hf_config(TINY_LLAMA)
    return SimExecutor(build_step_model(model, get_hardware("h100-sxm"), Layout(dp=dp), "bf16", "bf16"))


# --------------------------------------------------------------------------------------------- helpers


def fixed(n: int) -> LengthDist:
    return LengthDist(dist="fixed", value=n)


OFFLINE = Arrival(mode="offline")


def make_requests(isl, osl, arrival=None) -> Requests:
    isl = np.asarray(isl, dtype=np.int64)
    osl = np.asarray(osl, dtype=np.int64)
    times = np.zeros(len(isl)) if arrival is None else np.asarray(arrival, dtype=np.float64)
    return Requests(isl, osl, times)


def run_replica(requests: Requests, executor, *, num_blocks=1024, block_size=16, max_num_seqs=64,
                max_num_tokens=512) -> tuple[RequestState, Replica, SpyExecutor]:
    """One replica, every request submitted at t=0 (offline), run to completion under the spy."""
    state = RequestState(requests.isl.copy(), requests.osl.copy(), requests.arrival.copy())
    spy = SpyExecutor(executor)
    replica = Replica(0, state, spy, num_blocks, block_size, max_num_seqs, max_num_tokens)
    spy.replica = replica
    for request in range(len(requests)):
        replica.submit_chain([request], 0.0)
    replica.run()
    return state, replica, spy


def assert_all_complete(state: RequestState, replicas: list[Replica]) -> None:
    """What every finished run must satisfy, whatever the scheduler did on the way."""
    assert not np.isnan(state.finish).any(), "some requests never finished"
    assert not np.isnan(state.first_token).any()
    np.testing.assert_array_equal(state.generated, state.osl)
    assert (state.first_token <= state.finish).all()
    assert (state.first_token >= state.arrival).all(), "a request produced a token before it arrived"
    assert (state.first_token - state.arrival >= 0).all()
    assert (state.replica >= 0).all()
    assert (state.blocks == 0).all()
    for replica in replicas:
        assert replica.idle
        assert replica.free_blocks == replica.num_blocks, "KV blocks leaked"
        log = replica.log
        assert max(log.running, default=0) <= replica.max_num_seqs
        assert max(log.kv_blocks_used, default=0) <= replica.num_blocks
        assert min(log.kv_blocks_used, default=0) >= 0
        assert max(log.prefill_tokens, default=0) <= replica.max_num_tokens
    finished = sorted(r for replica in replicas for r in replica.finished)
    assert finished == list(range(len(state.isl))), "each request finishes exactly once"


def in_flight_max(arrival: np.ndarray, finish: np.ndarray) -> int:
    """Largest number of requests with arrival <= t < finish, over all t."""
    events = sorted([(t, 1) for t in arrival] + [(t, -1) for t in finish], key=lambda e: (e[0], e[1]))
    level = peak = 0
    for _, delta in events:   # at equal times, finishes (-1) are processed before arrivals (+1)
        level += delta
        peak = max(peak, level)
    return peak


def replica_token_load(state: RequestState, dp: int) -> np.ndarray:
    work = (state.isl + state.osl).astype(np.int64)
    return np.bincount(state.replica, weights=work, minlength=dp)


# -------------------------------------------------------------------------------------------- workload


def test_workload_is_seeded_and_reproducible():
    dist = LengthDist(dist="lognormal", median=300, sigma=0.8, cap=4000)
    arrival = Arrival(mode="poisson", rate=5.0)
    a = generate_requests(dist, dist, 200, arrival, seed=7)
    b = generate_requests(dist, dist, 200, arrival, seed=7)
    c = generate_requests(dist, dist, 200, arrival, seed=8)
    for name in ("isl", "osl", "arrival"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.isl, c.isl)
    assert not np.array_equal(a.osl, c.osl)
    assert not np.array_equal(a.isl, a.osl), "isl and osl must be drawn independently"
    for values in (a.isl, a.osl):
        assert values.dtype == np.int64
        assert values.min() >= 1 and values.max() <= 4000


def test_workload_lengths_respect_min_and_cap():
    dist = LengthDist(dist="normal", mean=100, std=80, min=20, cap=150)
    requests = generate_requests(dist, fixed(10), 500, OFFLINE, seed=1)
    assert requests.isl.min() == 20 and requests.isl.max() == 150   # clipping actually happens at both ends
    assert (requests.osl == 10).all()
    assert (requests.arrival == 0).all()


def test_workload_arrival_modes():
    poisson = generate_requests(fixed(8), fixed(8), 300, Arrival(mode="poisson", rate=10.0), seed=3)
    assert poisson.arrival[0] == 0.0
    assert (np.diff(poisson.arrival) >= 0).all()
    # mean gap ≈ 1/rate
    assert np.diff(poisson.arrival).mean() == pytest.approx(0.1, rel=0.2)
    closed = generate_requests(fixed(8), fixed(8), 5, Arrival(mode="concurrency", concurrency=2), seed=3)
    assert np.isnan(closed.arrival).all()


# ----------------------------------------------------------------------------------------- one replica


@pytest.mark.parametrize("executor_factory", [FakeExecutor, tiny_sim_executor], ids=["fake", "sim"])
def test_offline_run_completes_with_invariants(executor_factory):
    dist = LengthDist(dist="lognormal", median=120, sigma=0.7, cap=600)
    requests = generate_requests(dist, dist, 40, OFFLINE, seed=11)
    state, replica, spy = run_replica(requests, executor_factory(), num_blocks=300, block_size=16,
                                      max_num_seqs=8, max_num_tokens=256)
    assert_all_complete(state, [replica])
    assert max(replica.log.running) == 8, "the batch cap should be reached with 40 requests offered"
    assert spy.chunked, "prompts longer than the token budget must be prefilled in chunks"
    assert spy.spans, "pure-decode spans should be fast-forwarded"
    # each request's prompt is prefilled exactly once per (re)computation
    prefilled = np.zeros(len(requests), dtype=np.int64)
    for batch in spy.batches:
        np.add.at(prefilled, batch.prefill_ids, batch.prefill_chunk)
    expected = state.isl.copy()
    if state.preemptions.any():
        assert prefilled.sum() > expected.sum()
    else:
        np.testing.assert_array_equal(prefilled, expected)


def test_timeline_log_is_contiguous_and_matches_the_clock():
    requests = make_requests([40] * 6, [30] * 6)
    state, replica, _ = run_replica(requests, FakeExecutor(), max_num_seqs=4, max_num_tokens=64)
    log = replica.log
    time, duration = np.asarray(log.time), np.asarray(log.duration)
    assert time[0] == 0.0
    np.testing.assert_allclose(time[1:], time[:-1] + duration[:-1], rtol=0, atol=1e-12)
    assert replica.clock == pytest.approx(time[-1] + duration[-1])
    assert replica.clock == pytest.approx(state.finish.max())
    assert replica.busy_time == pytest.approx(duration.sum())
    # total steps = iterations the engine ran; every step costs at least the base time
    assert (duration >= np.asarray(log.steps) * ITER_BASE - 1e-12).all()


def test_hand_computed_timeline_with_fake_executor():
    """4 requests, isl 100, osl 5, 200 tokens per iteration (decodes included), by hand."""
    requests = make_requests([100] * 4, [5] * 4)
    state, replica, spy = run_replica(requests, FakeExecutor(), max_num_seqs=4, max_num_tokens=200)
    t1 = ITER_BASE + 200 * PER_TOKEN              # prefill of 0 and 1 (one token each)
    t2 = t1 + ITER_BASE + (2 + 198) * PER_TOKEN   # decode 0, 1; prefill 2 and the first 98 of 3
    t3 = t2 + ITER_BASE + (3 + 2) * PER_TOKEN     # decode 0, 1, 2; last 2 prompt tokens of 3
    np.testing.assert_allclose(state.first_token, [t1, t1, t2, t3], rtol=1e-12)
    # then pure decode: 2 steps of 4 sequences finish 0 and 1 (5 tokens), 1 step of 2 finishes 2,
    # 1 step of 1 finishes 3
    t4 = t3 + 2 * (ITER_BASE + 4 * PER_TOKEN)
    t5 = t4 + ITER_BASE + 2 * PER_TOKEN
    t6 = t5 + ITER_BASE + 1 * PER_TOKEN
    np.testing.assert_allclose(state.finish, [t4, t4, t5, t6], rtol=1e-12)
    assert spy.spans == [(4, 2), (2, 1), (1, 1)]
    assert [len(b.prefill_ids) for b in spy.batches] == [2, 2, 1]
    assert replica.log.prefill_tokens == [200, 198, 2, 0, 0, 0]


def test_requests_with_one_output_token_finish_at_prefill():
    requests = make_requests([50, 70, 30], [1, 1, 1])
    state, replica, spy = run_replica(requests, FakeExecutor())
    assert_all_complete(state, [replica])
    np.testing.assert_array_equal(state.first_token, state.finish)
    assert not spy.spans


def test_tiny_kv_pool_preempts_and_still_completes():
    # 32 + 96 = 128 tokens = 8 blocks of 16 per sequence; the pool holds exactly 2 full sequences.
    requests = make_requests([32] * 8, [96] * 8)
    for executor in (FakeExecutor(), tiny_sim_executor()):
        state, replica, spy = run_replica(requests, executor, num_blocks=16, block_size=16, max_num_seqs=8,
                                          max_num_tokens=512)
        assert_all_complete(state, [replica])
        assert state.preemptions.sum() > 0
        assert max(replica.log.kv_blocks_used) == 16
        # TTFT is when the user saw the first token, not when a recompute after preemption ended
        # (some preempted requests had generated tokens and recomputed them with their prompt)
        assert any((b.prefill_past + b.prefill_chunk > state.isl[b.prefill_ids]).any() for b in spy.batches)
        np.testing.assert_array_equal(state.first_token, [spy.first_token_at[r] for r in range(8)])
        # the oldest request is never the victim
        assert state.preemptions[0] == 0
        summary = summarize(state, [replica], gpus=1)
        assert summary["preemptions"] == int(state.preemptions.sum())


def test_preemption_with_chunked_prefill_and_uneven_lengths():
    dist = LengthDist(dist="lognormal", median=60, sigma=0.9, cap=200)
    requests = generate_requests(dist, dist, 30, OFFLINE, seed=5)
    state, replica, _ = run_replica(requests, FakeExecutor(), num_blocks=30, block_size=16, max_num_seqs=16,
                                    max_num_tokens=48)
    assert_all_complete(state, [replica])
    assert state.preemptions.sum() > 0


def test_prompt_larger_than_the_pool_raises():
    requests = make_requests([200], [4])   # 13 blocks of 16 needed, 8 in the pool
    with pytest.raises(SchedulingError, match="KV blocks"):
        run_replica(requests, FakeExecutor(), num_blocks=8, block_size=16)


def test_sequence_outgrowing_the_pool_raises():
    # the prompt fits (2 blocks) but prompt + output (32 + 200) needs 15 blocks of a 4-block pool
    requests = make_requests([32, 32], [200, 200])
    with pytest.raises(SchedulingError, match="KV blocks"):
        run_replica(requests, FakeExecutor(), num_blocks=4, block_size=16)


def test_little_law_tpot_matches_steady_decode_step():
    """Offline, fixed lengths, everything fits: TPOT p50 ≈ the mean decode step of the steady phase."""
    requests = make_requests([64] * 16, [256] * 16)
    for executor in (FakeExecutor(), tiny_sim_executor()):
        state, replica, _ = run_replica(requests, executor, num_blocks=2048, max_num_seqs=16,
                                        max_num_tokens=256)
        assert_all_complete(state, [replica])
        log = replica.log
        decode_only = np.asarray(log.prefill_tokens) == 0
        steady_step = np.asarray(log.duration)[decode_only].sum() / np.asarray(log.steps)[decode_only].sum()
        summary = summarize(state, [replica], gpus=1)
        assert summary["tpot_ms_p50"] == pytest.approx(steady_step * 1e3, rel=0.05)
        # and the throughput is, per Little, batch / step time in the steady phase (ramp-up costs a little)
        assert summary["output_tok_s"] == pytest.approx(16 / steady_step, rel=0.15)
        assert summary["output_tok_s"] < 16 / steady_step


@pytest.mark.parametrize("arrival", [OFFLINE, Arrival(mode="concurrency", concurrency=9),
                                     Arrival(mode="poisson", rate=300.0)], ids=["offline", "c9", "poisson"])
def test_fast_forward_matches_stepping_one_decode_at_a_time(arrival):
    """The pure-decode fast-forward is an optimisation only: same timelines as running every step."""
    dist = LengthDist(dist="lognormal", median=50, sigma=0.7, cap=300)
    requests = generate_requests(dist, dist, 40, arrival, seed=23)
    cfg = ReplicaConfig(num_blocks=45, block_size=16, max_num_seqs=8, max_num_tokens=64)
    results = []
    for wrap in (lambda e: e, OneStepAtATime):
        state, replicas = serve(requests, 2, cfg, arrival, "least_loaded",
                                lambda _, wrap=wrap: wrap(tiny_sim_executor(2)))
        assert_all_complete(state, replicas)
        results.append(state)
    fast, stepped = results
    assert fast.preemptions.sum() > 0, "the comparison should cover preemption"
    np.testing.assert_array_equal(fast.replica, stepped.replica)
    np.testing.assert_array_equal(fast.preemptions, stepped.preemptions)
    for name in ("arrival", "first_token", "finish"):
        np.testing.assert_allclose(getattr(fast, name), getattr(stepped, name), rtol=1e-9, err_msg=name)


@pytest.mark.parametrize("model,layout", [("tiny", "tp1"), ("llama-3.1-8b", "tp2pp2"),
                                          ("qwen3-30b-a3b", "tp4ep4")])
def test_sim_decode_span_equals_single_iterations(model, layout):
    from infscale.catalog import get_model
    arch = model_from_hf_config(TINY_LLAMA) if model == "tiny" else get_model(model)
    step_model = build_step_model(arch, get_hardware("h100-sxm"), Layout.parse(layout), "bf16", "bf16")
    executor = SimExecutor(step_model)
    ids = np.arange(5)
    context = np.array([10, 200, 3000, 45, 7])
    span = executor.decode_steps(ids, context, 6, None)
    empty = np.zeros(0, dtype=np.int64)
    single = [executor.iteration(IterationBatch(ids, context + k, empty, empty, empty)) for k in range(6)]
    np.testing.assert_allclose(span, single, rtol=1e-9)
    assert (np.diff(span) >= 0).all(), "longer context never makes a decode step faster"
    # the horizon cuts the span after the step that passes it
    ends = np.cumsum(span)
    cut = executor.decode_steps(ids, context, 6, horizon=float(ends[2]) - 1e-9)
    assert len(cut) == 3
    assert len(executor.decode_steps(ids, context, 6, horizon=float(ends[-1]) * 10)) == 6


# --------------------------------------------------------------------------------------------- cluster


def config(num_blocks=4096, block_size=16, max_num_seqs=32, max_num_tokens=512) -> ReplicaConfig:
    return ReplicaConfig(num_blocks, block_size, max_num_seqs, max_num_tokens)


def test_identical_seeds_give_identical_timelines_different_seeds_differ():
    dist = LengthDist(dist="lognormal", median=100, sigma=0.8, cap=800)
    arrival = Arrival(mode="poisson", rate=200.0)
    runs = []
    for seed in (21, 21, 22):
        requests = generate_requests(dist, dist, 60, arrival, seed=seed)
        state, replicas = serve(requests, 2, config(num_blocks=200), arrival, "least_loaded",
                                lambda _: tiny_sim_executor(dp=2))
        assert_all_complete(state, replicas)
        runs.append(state)
    a, b, c = runs
    for name in ("isl", "osl", "arrival", "first_token", "finish", "replica", "preemptions"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.isl, c.isl) and not np.array_equal(a.osl, c.osl)


def test_round_robin_splits_offline_requests_evenly():
    requests = generate_requests(fixed(32), fixed(16), 10, OFFLINE, seed=0)
    state, replicas = serve(requests, 4, config(), OFFLINE, "round_robin", lambda _: FakeExecutor())
    assert_all_complete(state, replicas)
    np.testing.assert_array_equal(np.bincount(state.replica, minlength=4), [3, 3, 2, 2])
    np.testing.assert_array_equal(state.replica, np.arange(10) % 4)


def test_unknown_router_is_rejected():
    requests = generate_requests(fixed(8), fixed(8), 4, OFFLINE, seed=0)
    with pytest.raises(ValueError, match="round_robin, least_loaded"):
        serve(requests, 2, config(), OFFLINE, "random", lambda _: FakeExecutor())


def test_least_loaded_balances_skewed_lengths_better_than_round_robin():
    # long and short requests alternate: round robin puts every long one on replica 0
    requests = make_requests([512, 16] * 8, [512, 16] * 8)
    loads = {}
    for router in ("round_robin", "least_loaded"):
        state, replicas = serve(requests, 2, config(), OFFLINE, router, lambda _: FakeExecutor())
        assert_all_complete(state, replicas)
        loads[router] = replica_token_load(state, 2)
    assert loads["least_loaded"].max() < loads["round_robin"].max()
    assert loads["least_loaded"].max() - loads["least_loaded"].min() <= 1024   # within one long request
    # and on random heavy-tailed lengths, across seeds
    dist = LengthDist(dist="lognormal", median=200, sigma=1.2, cap=8000)
    for seed in range(5):
        requests = generate_requests(dist, dist, 64, OFFLINE, seed=seed)
        worst = {}
        for router in ("round_robin", "least_loaded"):
            state, replicas = serve(requests, 4, config(num_blocks=8192), OFFLINE, router,
                                    lambda _: FakeExecutor())
            worst[router] = replica_token_load(state, 4).max()
        assert worst["least_loaded"] <= worst["round_robin"]


@pytest.mark.parametrize("dp,concurrency", [(1, 3), (2, 5), (3, 4)])
def test_closed_loop_keeps_at_most_concurrency_in_flight(dp, concurrency):
    dist = LengthDist(dist="lognormal", median=40, sigma=0.6, cap=300)
    arrival = Arrival(mode="concurrency", concurrency=concurrency)
    requests = generate_requests(dist, dist, 40, arrival, seed=4)
    state, replicas = serve(requests, dp, config(max_num_seqs=64), arrival, "round_robin",
                            lambda _: FakeExecutor())
    assert_all_complete(state, replicas)
    assert not np.isnan(state.arrival).any()
    assert in_flight_max(state.arrival, state.finish) == concurrency
    # each client's next request arrives exactly when its previous one finishes, on the same replica
    for request in range(concurrency, len(requests)):
        before = request - concurrency
        assert state.arrival[request] == state.finish[before]
        assert state.replica[request] == state.replica[before]


def test_poisson_arrivals_are_served_after_they_arrive():
    dist = LengthDist(dist="lognormal", median=80, sigma=0.7, cap=500)
    arrival = Arrival(mode="poisson", rate=300.0)
    requests = generate_requests(dist, dist, 80, arrival, seed=9)
    assert (np.diff(requests.arrival) >= 0).all()
    for router in ("round_robin", "least_loaded"):
        for factory in (lambda _: FakeExecutor(), lambda _: tiny_sim_executor(dp=2)):
            state, replicas = serve(requests, 2, config(num_blocks=120, max_num_seqs=8), arrival, router,
                                    factory)
            assert_all_complete(state, replicas)
            np.testing.assert_array_equal(state.arrival, requests.arrival)   # arrival times are kept as drawn
            assert (state.first_token >= state.arrival).all()
            assert set(state.replica.tolist()) == {0, 1}


def test_poisson_requests_arriving_after_idle_gaps_start_at_arrival():
    # far-apart arrivals: each request meets an idle replica, so TTFT is exactly one prefill iteration
    requests = make_requests([100] * 4, [10] * 4, arrival=[0.0, 1.0, 2.0, 3.0])
    arrival = Arrival(mode="poisson", rate=1.0)
    state, replicas = serve(requests, 1, config(), arrival, "round_robin", lambda _: FakeExecutor())
    assert_all_complete(state, replicas)
    np.testing.assert_allclose(state.first_token - state.arrival, ITER_BASE + 100 * PER_TOKEN)


@pytest.mark.parametrize("arrival", [OFFLINE, Arrival(mode="concurrency", concurrency=6)],
                         ids=["offline", "c6"])
def test_dp_symmetry_shortcut_matches_simulating_every_replica(arrival):
    requests = generate_requests(fixed(48), fixed(40), 24, arrival, seed=2)
    cfg = config(num_blocks=40, max_num_seqs=4, max_num_tokens=96)   # small pool: preemptions happen too
    fast_executors: list[FakeExecutor] = []
    slow_executors: list[FakeExecutor] = []

    def fast(_):
        fast_executors.append(FakeExecutor())
        return fast_executors[-1]

    def slow(_):
        slow_executors.append(NonDeterministicFake())
        return slow_executors[-1]

    fast_state, fast_replicas = serve(requests, 3, cfg, arrival, "round_robin", fast)
    slow_state, slow_replicas = serve(requests, 3, cfg, arrival, "round_robin", slow)
    # the shortcut really was taken (only replica 0 ran) and really was not in the reference
    assert [e.iterations > 0 for e in fast_executors] == [True, False, False]
    assert all(e.iterations > 0 for e in slow_executors)
    assert_all_complete(fast_state, fast_replicas)
    assert_all_complete(slow_state, slow_replicas)
    for name in ("replica", "arrival", "first_token", "finish", "preemptions", "generated"):
        np.testing.assert_array_equal(getattr(fast_state, name), getattr(slow_state, name), err_msg=name)
    for fast_r, slow_r in zip(fast_replicas, slow_replicas):
        assert sorted(fast_r.finished) == sorted(slow_r.finished)
        assert fast_r.clock == slow_r.clock
        assert fast_r.busy_time == slow_r.busy_time
    assert summarize(fast_state, fast_replicas, 3) == summarize(slow_state, slow_replicas, 3)


def test_dp_shortcut_not_taken_for_different_work():
    # lognormal lengths: replicas get different requests, so each must run
    dist = LengthDist(dist="lognormal", median=50, sigma=0.8, cap=300)
    requests = generate_requests(dist, dist, 12, OFFLINE, seed=1)
    executors: list[FakeExecutor] = []

    def make(_):
        executors.append(FakeExecutor())
        return executors[-1]

    state, replicas = serve(requests, 3, config(), OFFLINE, "round_robin", make)
    assert_all_complete(state, replicas)
    assert all(e.iterations > 0 for e in executors)


STRESS = [
    # block_size, num_blocks, max_num_seqs, max_num_tokens, arrival, dp, router
    (16, 60, 8, 64, OFFLINE, 1, "round_robin"),
    (1, 700, 6, 50, OFFLINE, 2, "least_loaded"),            # one token per block
    (7, 90, 16, 40, OFFLINE, 2, "round_robin"),             # block size that divides nothing
    (16, 200, 32, 8, OFFLINE, 1, "round_robin"),            # token budget below the batch cap
    (8, 80, 5, 33, Arrival(mode="concurrency", concurrency=7), 2, "least_loaded"),
    (16, 70, 12, 100, Arrival(mode="poisson", rate=400.0), 3, "least_loaded"),
    (4, 150, 64, 4096, Arrival(mode="poisson", rate=50.0), 2, "round_robin"),
]


@pytest.mark.parametrize("block_size,num_blocks,max_num_seqs,max_num_tokens,arrival,dp,router", STRESS)
@pytest.mark.parametrize("executor_factory", [FakeExecutor, tiny_sim_executor], ids=["fake", "sim"])
def test_invariants_hold_under_stress(executor_factory, block_size, num_blocks, max_num_seqs, max_num_tokens,
                                      arrival, dp, router):
    dist = LengthDist(dist="lognormal", median=60, sigma=0.8, cap=250)
    requests = generate_requests(dist, dist, 60, arrival, seed=17)
    spies: list[SpyExecutor] = []

    def make(_):
        spies.append(SpyExecutor(executor_factory()))
        return spies[-1]

    state, replicas = serve(requests, dp, ReplicaConfig(num_blocks, block_size, max_num_seqs, max_num_tokens),
                            arrival, router, make)
    assert_all_complete(state, replicas)
    assert sum(len(spy.batches) for spy in spies) > 0
    if arrival.mode == "concurrency":
        assert in_flight_max(state.arrival, state.finish) <= arrival.concurrency


# --------------------------------------------------------------------------------------------- metrics


def test_summary_throughput_and_latencies_follow_the_timelines():
    dist = LengthDist(dist="lognormal", median=60, sigma=0.6, cap=400)
    arrival = Arrival(mode="poisson", rate=100.0)
    requests = generate_requests(dist, dist, 50, arrival, seed=13)
    requests.arrival += 2.0   # a trace that does not start at zero: the makespan starts at the first arrival
    state, replicas = serve(requests, 2, config(num_blocks=150, max_num_seqs=8), arrival, "least_loaded",
                            lambda _: FakeExecutor())
    summary = summarize(state, replicas, gpus=4)
    makespan = state.finish.max() - state.arrival.min()
    assert summary["duration_s"] == pytest.approx(makespan)
    assert summary["output_tokens"] == int(state.osl.sum())
    assert summary["input_tokens"] == int(state.isl.sum())
    assert summary["output_tok_s"] == pytest.approx(state.osl.sum() / makespan)
    assert summary["output_tok_s_per_gpu"] == pytest.approx(state.osl.sum() / makespan / 4)
    assert summary["total_tok_s"] == pytest.approx((state.osl.sum() + state.isl.sum()) / makespan)
    assert summary["requests_per_s"] == pytest.approx(50 / makespan)
    ttft_ms = (state.first_token - state.arrival) * 1e3
    e2e = state.finish - state.arrival
    assert summary["ttft_ms_p50"] == pytest.approx(np.percentile(ttft_ms, 50))
    assert summary["ttft_ms_p99"] == pytest.approx(np.percentile(ttft_ms, 99))
    assert summary["e2e_s_mean"] == pytest.approx(e2e.mean())
    assert summary["ttft_ms_p50"] <= summary["ttft_ms_p90"] <= summary["ttft_ms_p99"]
    assert summary["tpot_ms_p50"] <= summary["tpot_ms_p90"] <= summary["tpot_ms_p99"]
    assert 0 < summary["mean_running_batch"] <= summary["max_running_batch"] <= 8
    assert 0 < summary["mean_kv_occupancy"] <= summary["max_kv_occupancy"] <= 1
    assert 0 < summary["prefill_time_share"] < 1


def test_summarize_refuses_unfinished_requests():
    requests = make_requests([10, 10], [5, 5])
    state = RequestState(requests.isl, requests.osl, requests.arrival)
    with pytest.raises(ValueError, match="never finished"):
        summarize(state, [], gpus=1)


def test_request_and_series_rows():
    requests = generate_requests(fixed(64), fixed(32), 12, OFFLINE, seed=0)
    state, replicas = serve(requests, 2, config(num_blocks=30, max_num_seqs=4), OFFLINE, "round_robin",
                            lambda _: FakeExecutor())
    rows = request_rows(state)
    assert {len(v) for v in rows.values()} == {12}
    np.testing.assert_array_equal(rows["request"], np.arange(12))
    np.testing.assert_array_equal(rows["finish_s"], state.finish)
    series = series_rows(replicas)
    lengths = {len(v) for v in series.values()}
    assert len(lengths) == 1 and lengths.pop() == sum(len(r.log.time) for r in replicas)
    assert set(series["replica"].tolist()) == {0, 1}
    assert ((series["kv_occupancy"] >= 0) & (series["kv_occupancy"] <= 1)).all()
    assert (series["running"] <= 4).all()


# --------------------------------------------------------------------------------------------- capacity policies


def test_guaranteed_no_evict_admits_only_what_can_finish_and_never_preempts():
    """A pool of 20 blocks of 16 tokens holds one request of 128 + 64 tokens to its end (12 blocks): guaranteed_no_evict
    runs one at a time and preempts none; max_utilization admits two prompts (8 blocks each), which then outgrow
    the pool, and preempts."""
    fixed = LengthDist.fixed
    requests = generate_requests(fixed(128), fixed(64), 6, OFFLINE, seed=0)
    runs = {}
    for policy in ("guaranteed_no_evict", "max_utilization"):
        cfg = ReplicaConfig(num_blocks=20, block_size=16, max_num_seqs=8, max_num_tokens=512, capacity_policy=policy)
        state, replicas = serve(requests, 1, cfg, OFFLINE, "round_robin", lambda _: tiny_sim_executor())
        assert_all_complete(state, replicas)
        runs[policy] = (state, summarize(state, replicas, 1))
    no_evict, greedy = runs["guaranteed_no_evict"], runs["max_utilization"]
    assert no_evict[0].preemptions.sum() == 0 and no_evict[1]["max_running_batch"] == 1
    assert greedy[0].preemptions.sum() > 0 and greedy[1]["max_running_batch"] == 2


def test_unknown_capacity_policy_is_refused():
    state = RequestState(np.array([8]), np.array([8]), np.zeros(1))
    with pytest.raises(ValueError, match="guaranteed_no_evict"):
        Replica(0, state, tiny_sim_executor(), 8, 16, 4, 64, capacity_policy="fcfs")


def test_staggered_clients_start_spread_over_one_request_latency():
    fixed = LengthDist.fixed
    together = Arrival(mode="concurrency", concurrency=8)
    staggered = Arrival(mode="concurrency", concurrency=8, stagger=True)
    requests = generate_requests(fixed(512), fixed(64), 32, together, seed=0)
    cfg = config(num_blocks=4096, max_num_tokens=8192)
    results = {}
    for arrival in (together, staggered):
        state, replicas = serve(requests, 2, cfg, arrival, "round_robin", lambda _: tiny_sim_executor(2))
        assert_all_complete(state, replicas)
        results[arrival.stagger] = state
    first = np.arange(8)                              # each client's first request
    assert (results[False].arrival[first] == 0).all()
    starts = np.sort(results[True].arrival[first])
    assert starts[0] == 0 and len(set(starts.tolist())) == 4 and starts[-1] > 0   # 4 clients per replica, spread
    latency = np.nanmean(results[False].finish - results[False].arrival)
    assert starts[-1] < latency
