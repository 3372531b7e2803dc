"""TP and PP on 2 gloo processes give the same model as one process: the same greedy tokens for the same seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from infscale.backends.torch.executor import TorchExecutor
from infscale.backends.torch.model import DecoderModel
from infscale.backends.torch.parallel import ParallelContext, ParallelError, kv_head_start, kv_heads_local
from infscale.backends.torch.routing import ExpertPopularity
from infscale.backends.torch.spawn import ServeSpec, serve_on_ranks
from infscale.campaign.spec import Arrival
from infscale.serving.cluster import ReplicaConfig
from infscale.serving.workload import Requests

pytestmark = pytest.mark.torch

ISL = np.array([19, 7, 26, 12, 22])
OSL = np.array([14, 20, 9, 17, 11])


def _spec(arch, tp: int = 1, pp: int = 1, num_blocks: int = 20, **extra) -> ServeSpec:
    requests = Requests(ISL, OSL, np.zeros(len(ISL)))
    arrival = extra.pop("arrival", Arrival())
    if arrival.mode == "poisson":
        requests.arrival = np.arange(len(ISL)) * 5e-3
    # 20 blocks of 4 tokens: a request needs up to 9, so the tiny pool preempts; chunks of ≤ 16 tokens
    config = ReplicaConfig(num_blocks=num_blocks, block_size=4, max_num_seqs=5, max_num_tokens=16)
    return ServeSpec(arch, requests, config, tp=tp, pp=pp, dtype="float32", seed=9, arrival=arrival, **extra)


def test_stage_layers_and_kv_head_sharding():
    assert [ParallelContext(pp=3, pp_rank=r).stage_layers(8) for r in range(3)] == [range(0, 3), range(3, 6),
                                                                                      range(6, 8)]
    assert kv_heads_local(8, 4) == 2 and kv_head_start(8, 4, 3) == 6
    # TP beyond the KV heads replicates them: ranks 0-1 hold head 0, ranks 2-3 head 1
    assert kv_heads_local(2, 4) == 1 and [kv_head_start(2, 4, r) for r in range(4)] == [0, 0, 1, 1]
    with pytest.raises(ParallelError):
        kv_heads_local(4, 3)


def test_tp2_and_pp2_generate_the_tp1_tokens(arch):
    moe = ExpertPopularity("zipf", 1.2, seed=1)
    cases = {
        "llama tp2": (arch(), 2, 1, {}),
        "llama pp2": (arch(), 1, 2, {}),
        "1 kv head tp2 (replicated)": (arch(num_kv_heads=1), 2, 1, {}),
        "qwen2 odd vocab tp2 (padded shard)": (arch("qwen2", vocab_size=255), 2, 1, {}),
        "qwen3_moe tp2": (arch("qwen3_moe"), 2, 1, {"popularity": moe}),
        "qwen3 pp2 poisson": (arch("qwen3"), 1, 2, {"arrival": Arrival(mode="poisson", rate=200.0)}),
    }
    singles = serve_on_ranks([_spec(a, **extra) for a, _, _, extra in cases.values()])
    multis = serve_on_ranks([_spec(a, tp, pp, **extra) for a, tp, pp, extra in cases.values()])
    for name, single, multi in zip(cases, singles, multis):
        assert (multi.state.generated == OSL).all(), name
        if "poisson" not in name:
            assert multi.state.preemptions.sum() > 0, name  # the tiny pool preempts on every layout
        for request in range(len(ISL)):
            assert multi.tokens[request].tolist() == single.tokens[request].tolist(), f"{name}: request {request}"
    moe_single, moe_multi = singles[4], multis[4]
    for layer, counts in moe_single.expert_counts.items():  # the same routing on one rank and on two
        np.testing.assert_array_equal(moe_multi.expert_counts[layer], counts)


def test_fast_path_on_tp_pp_and_moe_gives_the_tp1_tokens(arch):
    """The graphed decode step (record mode, plain-torch ops) on 2 gloo ranks: PP hand-offs and the sampled tokens
    broadcast inside the step, TP collectives, and the sync-free MoE experts give the single-rank eager tokens."""
    moe = ExpertPopularity("zipf", 1.2, seed=1)
    cases = {
        "llama pp2": (arch(), 1, 2, {}),
        "qwen3 pp2 poisson": (arch("qwen3"), 1, 2, {"arrival": Arrival(mode="poisson", rate=200.0)}),
        "qwen3_moe tp2": (arch("qwen3_moe"), 2, 1, {"popularity": moe}),
        "qwen3_moe pp2": (arch("qwen3_moe"), 1, 2, {"popularity": moe}),
    }
    fast = {"fast": True, "fast_ops": "torch", "num_blocks": 64}
    singles = serve_on_ranks([_spec(a, num_blocks=64, **extra) for a, _, _, extra in cases.values()])
    multis = serve_on_ranks([_spec(a, tp, pp, **fast, **extra) for a, tp, pp, extra in cases.values()])
    for name, single, multi in zip(cases, singles, multis):
        assert (multi.state.generated == OSL).all(), name
        assert multi.fast_steps > 0 and single.fast_steps == 0, name
        for request in range(len(ISL)):
            assert multi.tokens[request].tolist() == single.tokens[request].tolist(), f"{name}: request {request}"


def test_expert_parallel_gives_the_tp1_tokens(arch):
    """tp2ep2 on 2 gloo ranks (each rank 4 of the 8 experts at full width), eager and on the graphed path, and
    tp2 (every rank a half of every expert): the single-rank tokens and the same routing."""
    moe = ExpertPopularity("zipf", 1.2, seed=1)
    model = arch("qwen3_moe")
    (single,) = serve_on_ranks([_spec(model, num_blocks=64, popularity=moe)])
    eager, graphed = serve_on_ranks([
        _spec(model, 2, 1, num_blocks=64, popularity=moe, ep=2),
        _spec(model, 2, 1, num_blocks=64, popularity=moe, ep=2, fast=True, fast_ops="torch"),
    ])
    assert graphed.fast_steps > 0 and eager.fast_steps == 0
    for name, multi in (("eager", eager), ("graphed", graphed)):
        assert (multi.state.generated == OSL).all(), name
        for request in range(len(ISL)):
            assert multi.tokens[request].tolist() == single.tokens[request].tolist(), f"{name}: request {request}"
        for layer, counts in single.expert_counts.items():
            np.testing.assert_array_equal(multi.expert_counts[layer], counts)


def test_pipelined_pp_gives_the_tp1_tokens(arch):
    """pp2 with two micro-batches (the stages a ring: stage 1 runs one micro-batch while stage 0 runs the other)
    on 2 gloo ranks: the single-rank tokens, offline (long spans), with arrivals (a horizon: round by round) and
    for MoE; a tiny pool still preempts and resumes."""
    moe = ExpertPopularity("zipf", 1.2, seed=1)
    cases = {
        "llama pp2": (arch(), {}),
        "llama pp2 tiny pool": (arch(), {"num_blocks": 20}),
        "qwen3 pp2 poisson": (arch("qwen3"), {"arrival": Arrival(mode="poisson", rate=200.0)}),
        "qwen3_moe pp2": (arch("qwen3_moe"), {"popularity": moe}),
    }
    options = {"num_blocks": 64}
    singles = serve_on_ranks([_spec(a, **{**options, **extra}) for a, extra in cases.values()])
    pipelined = serve_on_ranks([_spec(a, 1, 2, pp_microbatches=2, fast_ops="torch", **{**options, **extra})
                                for a, extra in cases.values()])
    for name, single, multi in zip(cases, singles, pipelined):
        assert (multi.state.generated == OSL).all(), name
        assert multi.fast_steps > 0, name
        if "tiny" in name:
            assert multi.state.preemptions.sum() > 0, name
        for request in range(len(ISL)):
            assert multi.tokens[request].tolist() == single.tokens[request].tolist(), f"{name}: request {request}"


def test_pipelined_tp2pp2_and_pp4_give_the_tp1_tokens(arch):
    """The ring with a TP group per stage (each TP rank its own ring) and with middle stages (pp4: hidden states
    handed on twice before the tokens go back), on 4 gloo ranks."""
    deep = arch(num_layers=4)
    cases = {"tp2pp2": (deep, 2, 2), "pp4": (deep, 1, 4)}
    singles = serve_on_ranks([_spec(a, num_blocks=64) for a, _, _ in cases.values()])
    pipelined = serve_on_ranks([_spec(a, tp, pp, num_blocks=64, pp_microbatches=pp, fast_ops="torch")
                                for a, tp, pp in cases.values()])
    for name, single, multi in zip(cases, singles, pipelined):
        assert (multi.state.generated == OSL).all() and multi.fast_steps > 0, name
        for request in range(len(ISL)):
            assert multi.tokens[request].tolist() == single.tokens[request].tolist(), f"{name}: request {request}"


def test_pipelined_pp_needs_one_microbatch_per_stage(arch):
    stage = DecoderModel(arch(), ParallelContext(pp=2), torch.float32)  # stage 0 of 2 (no process group needed)
    with pytest.raises(ValueError, match="pp_microbatches=3: the torch engine runs the stages in turn"):
        TorchExecutor(stage, 8, 4, ISL, OSL, pp_microbatches=3)
    with pytest.raises(ValueError, match="runs on the fast decode path"):
        TorchExecutor(stage, 8, 4, ISL, OSL, fast=False, pp_microbatches=2)
