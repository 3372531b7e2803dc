"""The decoder: parameter counts, RoPE scaling, MoE routing, and the paged engine against a no-cache reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from infscale.backends.torch.executor import NonFiniteLogits, OutputCheckError, TorchExecutor
from infscale.backends.torch.model import DecoderModel, UnsupportedModel, rope_inv_freq
from infscale.backends.torch.routing import ExpertPopularity, _inclusion, systematic_topk, target_shares
from infscale.campaign.spec import Arrival
from infscale.catalog.models import get_model
from infscale.serving.cluster import ReplicaConfig, serve
from infscale.serving.workload import Requests

pytestmark = pytest.mark.torch


def _serve(model: DecoderModel, isl, osl, num_blocks=512, block_size=4, max_num_seqs=8, max_num_tokens=24,
           arrival: Arrival | None = None, seed: int = 3):
    isl, osl = np.asarray(isl), np.asarray(osl)
    requests = Requests(isl, osl, np.zeros(len(isl)))
    executor = TorchExecutor(model, num_blocks, block_size, isl, osl, seed=seed)
    config = ReplicaConfig(num_blocks, block_size, max_num_seqs, max_num_tokens)
    state, _ = serve(requests, 1, config, arrival or Arrival(), "round_robin", lambda _: executor)
    executor.check_outputs()
    return state, executor


def _reference_tokens(model: DecoderModel, prompt: np.ndarray, count: int, key: int) -> list[int]:
    """Greedy decoding recomputing the whole sequence each step, no KV cache."""
    tokens = list(prompt)
    for _ in range(count):
        tokens.append(int(model.reference_logits(torch.tensor(tokens), key=key)[-1].argmax()))
    return tokens[len(prompt):]


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "qwen3_moe"])
def test_parameter_count_matches_the_catalog_formula(arch, family):
    model = DecoderModel(arch(family), dtype=torch.float32)
    assert model.num_parameters() == arch(family).param_counts().total


def test_tied_embeddings_share_the_lm_head(arch):
    tied = arch(tie_word_embeddings=True)
    model = DecoderModel(tied, dtype=torch.float32)
    assert model.lm_head is model.embed and model.num_parameters() == tied.param_counts().total


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "qwen3_moe"])
def test_paged_chunked_batched_engine_matches_no_cache_reference(arch, family):
    """Chunked prefill (chunks of ≤ 24 tokens shared by several prompts), mixed decode+prefill iterations and
    multi-step decode spans give the greedy tokens of full recomputation without a KV cache."""
    model = DecoderModel(arch(family), dtype=torch.float32, seed=5)
    isl, osl = [9, 30, 17, 4], [12, 7, 10, 15]
    state, executor = _serve(model, isl, osl)
    assert (state.generated == osl).all()
    for request in range(len(isl)):
        expected = _reference_tokens(model, executor.prompt(request), osl[request], key=request)
        assert executor.generated_tokens(request).tolist() == expected, f"request {request}"


def test_family_features_change_the_model(arch):
    """qwen2's biases and qwen3's q/k norms are really applied (a qk-norm model is not the plain one)."""
    ids = torch.arange(20) % 256
    logits = {f: DecoderModel(arch(f), dtype=torch.float32, seed=1).reference_logits(ids)
              for f in ("llama", "qwen2", "qwen3")}
    assert not torch.allclose(logits["llama"], logits["qwen2"])
    assert not torch.allclose(logits["llama"], logits["qwen3"])
    assert all(torch.isfinite(v).all() for v in logits.values())


def test_llama3_rope_scaling_keeps_short_wavelengths_and_stretches_long_ones():
    llama = get_model("llama-3.1-8b")
    scaled = rope_inv_freq(llama, torch.device("cpu")).double()
    plain = 1.0 / (llama.rope_theta ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128))
    wavelen = 2 * math.pi / plain
    high = wavelen < 8192 / 4.0
    low = wavelen > 8192 / 1.0
    torch.testing.assert_close(scaled[high], plain[high], rtol=1e-6, atol=0)
    torch.testing.assert_close(scaled[low], plain[low] / 8.0, rtol=1e-6, atol=0)
    mid = ~high & ~low
    assert mid.any() and ((scaled[mid] < plain[mid]) & (scaled[mid] > plain[mid] / 8.0)).all()


def test_layer_sliced_proxy_keeps_the_layers_shapes(arch):
    """num_layers=k builds the first k layers of the model: the same tensors as the full model's layers."""
    full = DecoderModel(arch(num_layers=6), dtype=torch.float32, seed=2)
    proxy = DecoderModel(arch(num_layers=6), dtype=torch.float32, seed=2, num_layers=2)
    assert len(proxy.layers) == 2
    assert proxy.num_parameters() == arch(num_layers=2).param_counts().total
    for mine, theirs in zip(proxy.layers, full.layers):
        assert torch.equal(mine.attn.w_qkv, theirs.attn.w_qkv) and torch.equal(mine.mlp.w_down, theirs.mlp.w_down)


def test_mla_is_refused_with_a_clear_error():
    with pytest.raises(UnsupportedModel, match="MLA"):
        DecoderModel(get_model("deepseek-v3"), num_layers=1)


# ------------------------------------------------------------------------------------------------- MoE


def test_inclusion_probabilities_sum_to_k_and_cap_at_one():
    share = np.array([0.7, 0.1, 0.1, 0.05, 0.05])
    pi = _inclusion(share, 2)
    assert pi.sum() == pytest.approx(2) and pi[0] == 1.0
    np.testing.assert_allclose(pi[1:] / pi[1:].sum(), share[1:] / share[1:].sum())


def test_systematic_topk_picks_distinct_experts():
    shares = torch.tensor(target_shares(ExpertPopularity("zipf", 2.0), 8, 3, layer=0))
    experts = systematic_topk(torch.rand(4000, dtype=torch.float64), shares, 3)
    assert (experts.sort(dim=1).values.diff(dim=1) > 0).all()
    np.testing.assert_allclose(torch.bincount(experts.reshape(-1), minlength=8).numpy() / 12000,
                               shares.numpy(), atol=0.01)


@pytest.mark.parametrize("popularity", [ExpertPopularity("uniform"), ExpertPopularity("zipf", 1.2, seed=4)],
                         ids=["uniform", "zipf1.2"])
def test_moe_expert_popularity_follows_the_requested_distribution(arch, popularity):
    moe = arch("qwen3_moe")
    model = DecoderModel(moe, dtype=torch.float32, popularity=popularity)
    _serve(model, [48] * 8, [40] * 8, block_size=16, max_num_tokens=128)
    counts, targets = model.expert_counts(), model.expert_targets()
    assert sorted(counts) == [0, 1]
    for layer, count in counts.items():
        assert count.sum() == 8 * (48 + 39) * moe.experts_per_token  # every token routed to k experts
        np.testing.assert_allclose(count / count.sum(), targets[layer], atol=0.02)
    if popularity.mode == "zipf":  # the ranking is a seeded permutation, different per layer
        assert targets[0].max() > 2 * targets[0].min()
        assert not np.array_equal(np.argsort(targets[0]), np.argsort(targets[1]))


# --------------------------------------------------------------------------------------------- checks


def test_nan_logits_stop_the_run(arch):
    model = DecoderModel(arch(), dtype=torch.float32)
    model.layers[1].mlp.w_down[0, 0] = float("nan")
    with pytest.raises(NonFiniteLogits, match="non-finite logits"):
        _serve(model, [8], [4])


def test_token_count_check(arch):
    model = DecoderModel(arch(), dtype=torch.float32)
    _, executor = _serve(model, [8, 8], [3, 5])
    executor.generated[1].pop()
    with pytest.raises(OutputCheckError, match="request 1: 4 generated, OSL 5"):
        executor.check_outputs()


@pytest.mark.parametrize("tp, ep", [(2, 2), (4, 2), (4, 4)])
def test_expert_parallel_ranks_add_up_to_the_whole_block(arch, tp, ep):
    """EP inside the TP group: each rank's share (its experts, its slice of their width) sums over the TP ranks to
    the one-rank block, grouped GEMMs and the per-expert loop alike; the routing is every rank's."""
    from infscale.backends.torch.model import MoEBlock, WeightFactory
    from infscale.backends.torch.parallel import ParallelContext

    moe = arch("qwen3_moe")
    popularity = ExpertPopularity("zipf", 1.2, seed=3)

    def block(ctx: ParallelContext) -> MoEBlock:
        return MoEBlock(moe, 0, ctx, WeightFactory(5, torch.float32, torch.device("cpu")), popularity)

    x = torch.randn(13, moe.hidden_size)
    keys, positions = torch.arange(13), torch.arange(13) + 7
    whole = block(ParallelContext())
    expected = whole.partial(x, keys, positions)
    ranks = [block(ParallelContext(tp=tp, ep=ep, tp_rank=r)) for r in range(tp)]
    assert [r.local_experts for r in ranks] == [moe.num_experts // ep] * tp
    assert sorted({r.first_expert for r in ranks}) == list(range(0, moe.num_experts, moe.num_experts // ep))
    assert ranks[0].w_down.shape == (moe.num_experts // ep, moe.hidden_size, moe.moe_intermediate_size * ep // tp)
    shares = [r.partial(x, keys, positions) for r in ranks]
    torch.testing.assert_close(sum(shares), expected, rtol=1e-5, atol=1e-6)
    for rank, share in zip(ranks, shares):
        weights, experts = rank.route(x, keys, positions)
        torch.testing.assert_close(rank.experts_loop(x, weights, experts), share, rtol=1e-5, atol=1e-6)
        assert share.abs().sum() > 0  # every rank's experts got tokens here: no rank's share is trivially zero


def test_expert_parallel_must_divide_tp_and_the_experts(arch):
    from infscale.backends.torch.model import MoEBlock, WeightFactory
    from infscale.backends.torch.parallel import ParallelContext, ParallelError

    with pytest.raises(ParallelError, match="ep=3 must divide tp=4"):
        ParallelContext.create(4, 1, ep=3)
    with pytest.raises(ParallelError, match="ep=4 does not divide tiny-qwen3_moe's 6 experts"):
        MoEBlock(arch("qwen3_moe", num_experts=6), 0, ParallelContext(tp=4, ep=4),
                 WeightFactory(0, torch.float32, torch.device("cpu")), ExpertPopularity())
