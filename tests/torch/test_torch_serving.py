"""The serving core driving a TorchExecutor: preemption and recompute, arrival modes, DP replicas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from infscale.backends.torch.executor import TorchExecutor
from infscale.backends.torch.model import DecoderModel
from infscale.campaign.spec import Arrival
from infscale.serving.cluster import ReplicaConfig, serve
from infscale.serving.executor import IterationBatch
from infscale.serving.workload import Requests

pytestmark = pytest.mark.torch

ISL = np.array([21, 9, 33, 14, 27, 6, 18, 25])
OSL = np.array([30, 41, 12, 36, 20, 44, 27, 33])


@pytest.fixture(scope="module")
def model(arch):
    return DecoderModel(arch(), dtype=torch.float32, seed=11)


def _run(model, num_blocks: int, arrival: Arrival | None = None, dp: int = 1, max_num_seqs: int = 8):
    requests = Requests(ISL, OSL, np.zeros(len(ISL)))
    if arrival is not None and arrival.mode == "poisson":
        requests.arrival = np.arange(len(ISL)) * 5e-3  # a few decode steps apart
    executors = [TorchExecutor(model, num_blocks, 4, ISL, OSL, seed=7) for _ in range(dp)]
    config = ReplicaConfig(num_blocks=num_blocks, block_size=4, max_num_seqs=max_num_seqs, max_num_tokens=32)
    state, replicas = serve(requests, dp, config, arrival or Arrival(), "round_robin", lambda i: executors[i])
    tokens = {}
    for index, executor in enumerate(executors):
        mine = np.flatnonzero(state.replica == index)
        executor.check_outputs(mine)
        assert executor.cache.allocator.used_blocks == 0  # every finished request gave its blocks back
        tokens.update({int(r): executor.generated_tokens(int(r)).tolist() for r in mine})
    return state, tokens


@pytest.fixture(scope="module")
def roomy(model):
    return _run(model, num_blocks=1024)


def test_tiny_pool_preempts_and_recomputes_the_same_tokens(model, roomy):
    roomy_state, roomy_tokens = roomy
    assert roomy_state.preemptions.sum() == 0
    # one request needs at most ceil((33 + 12) / 4) = 12 blocks; 24 blocks hold only a few at a time
    state, tokens = _run(model, num_blocks=24)
    assert state.preemptions.sum() > 0
    assert (state.generated == OSL).all()
    assert all(len(tokens[r]) == OSL[r] for r in range(len(ISL)))
    assert tokens == roomy_tokens  # greedy decoding and recompute are deterministic
    assert np.isfinite(state.finish).all() and (state.finish > 0).all()


@pytest.mark.parametrize("arrival", [Arrival(mode="poisson", rate=1000.0), Arrival(mode="concurrency", concurrency=3)],
                         ids=["poisson", "c3"])
def test_other_arrival_modes_give_the_same_tokens(model, roomy, arrival):
    """Poisson arrivals drive decode spans with a horizon (the scheduler stops a span at the next arrival)."""
    state, tokens = _run(model, num_blocks=40, arrival=arrival)
    assert (state.generated == OSL).all()
    assert tokens == roomy[1]


def test_dp_replicas_in_one_process_share_the_weights(model, roomy):
    state, tokens = _run(model, num_blocks=1024, dp=2)
    assert set(state.replica.tolist()) == {0, 1}
    assert tokens == roomy[1]


def test_decode_span_stops_at_the_horizon_and_returns_unused_blocks(model):
    executor = TorchExecutor(model, 64, 4, ISL, OSL, seed=7)
    empty = np.zeros(0, dtype=np.int64)
    executor.iteration(IterationBatch(empty, empty, np.array([0]), np.array([21]), np.array([0])))
    durations = executor.decode_steps(np.array([0]), np.array([22]), steps=20, horizon=1e-9)
    assert len(durations) == 1 and durations[0] > 0
    assert len(executor.generated_tokens(0)) == 2
    assert executor.cache.lengths[0] == 22 and len(executor.cache.table(0)) == 6  # ceil(22 / 4)
    assert len(executor.decode_steps(np.array([0]), np.array([23]), steps=5, horizon=None)) == 5
    assert executor.cache.lengths[0] == 27 and len(executor.generated_tokens(0)) == 7


def test_warmup_leaves_no_trace(model, roomy):
    """A warm-up request before the run changes neither the tokens nor the KV or iteration counts."""
    executor = TorchExecutor(model, 1024, 4, ISL, OSL, seed=7)
    executor.warmup()
    assert executor.cache.allocator.used_blocks == 0 and executor.iterations == 0 and not executor.generated
    config = ReplicaConfig(num_blocks=1024, block_size=4, max_num_seqs=8, max_num_tokens=32)
    serve(Requests(ISL, OSL, np.zeros(len(ISL))), 1, config, Arrival(), "round_robin", lambda _: executor)
    executor.check_outputs()
    assert {r: executor.generated_tokens(r).tolist() for r in range(len(ISL))} == roomy[1]
