"""The memory model against the reference notes (reference/reasoning-inference.md §2.2, §2.6, §4.1).

§2.6 assumes 140.4 GiB × 0.90 minus 6 GiB of activations per GPU and BF16 KV; the catalog's H200 (143771 MiB,
default fraction 0.9, 6 GiB reserve) is that GPU. Our weights count the embedding and LM head exactly (in 16
bit), so the capacities may differ from the reference's rounded estimates by a few percent.
"""

from __future__ import annotations

import pytest

from infscale.campaign.layout import Layout
from infscale.catalog import get_hardware, get_model
from infscale.memory import (
    GIB,
    MemoryPlan,
    kv_bytes_per_token,
    kv_bytes_per_token_per_gpu,
    plan_memory,
    weight_bytes_per_gpu,
)

H200 = get_hardware("h200-sxm")
H100 = get_hardware("h100-sxm")
KIB = 1024


def h200_plan(model: str, layout: str, weights: str = "bf16", kv: str = "bf16", fraction: float | None = None,
              block_size: int = 16) -> MemoryPlan:
    return plan_memory(get_model(model), H200, Layout.parse(layout), weights, kv, fraction, block_size)


def test_h200_is_the_reference_gpu():
    assert H200.hbm_bytes / GIB == pytest.approx(140.4, abs=0.01)
    assert H200.default_kv_memory_fraction == 0.9
    assert H200.efficiency.activation_reserve_bytes == 6 * GIB


@pytest.mark.parametrize(("model", "expected_bytes"), [
    ("llama-3.1-8b", 128 * KIB),
    ("qwen3-8b", 144 * KIB),
    ("qwen2.5-32b", 256 * KIB),
    ("qwen3-32b", 256 * KIB),
    ("llama-3.3-70b", 320 * KIB),
    ("llama-3.1-405b", 504 * KIB),
    ("deepseek-r1", 70_272),          # MLA latent: (512 + 64) · 61 · 2 B
])
def test_kv_bytes_per_token_matches_reference_table(model, expected_bytes):
    assert kv_bytes_per_token(get_model(model), "bf16") == expected_bytes


def test_fp8_kv_halves_the_bytes():
    assert kv_bytes_per_token(get_model("llama-3.1-405b"), "fp8") == 252 * KIB
    assert kv_bytes_per_token(get_model("deepseek-r1"), "fp8") == 70_272 // 2


# §2.6 "tokens per replica" column
@pytest.mark.parametrize(("model", "layout", "weights", "reference_tokens", "tolerance"), [
    ("llama-3.1-8b", "dp8", "bf16", 0.86e6, 0.03),
    ("llama-3.1-8b", "dp4tp2", "bf16", 1.85e6, 0.03),
    ("llama-3.1-8b", "tp8", "bf16", 7.77e6, 0.03),
    ("qwen2.5-32b", "dp8", "bf16", 0.24e6, 0.03),
    ("qwen2.5-32b", "dp4tp2", "bf16", 0.74e6, 0.03),
    ("qwen2.5-32b", "dp2tp4", "bf16", 1.72e6, 0.03),
    ("qwen2.5-32b", "tp8", "bf16", 3.69e6, 0.03),
    ("llama-3.3-70b", "dp4tp2", "bf16", 0.36e6, 0.03),
    ("llama-3.3-70b", "tp8", "bf16", 2.72e6, 0.03),
    ("llama-3.1-405b", "tp8", "fp8", 1.22e6, 0.03),
    ("llama-3.1-405b", "tp8", "bf16", 0.43e6, 0.03),
    ("llama-3.1-405b", "tp8pp2", "bf16", 2.44e6, 0.03),
    ("llama-3.1-405b", "tp16", "bf16", 1.22e6, 0.03),
    # The reference counts R1's FP8 weights as 684 GB *with* the multi-token-prediction layer, which the catalog
    # leaves out (engines do not load it by default): ~1.3 GiB/GPU more KV pool here, hence 4 %.
    ("deepseek-r1", "tp8", "fp8", 0.62e6, 0.04),
    ("deepseek-r1", "tp16", "fp8", 1.23e6, 0.03),
])
def test_tokens_per_replica_match_reference(model, layout, weights, reference_tokens, tolerance):
    plan = h200_plan(model, layout, weights)
    assert plan.kv_tokens_per_replica == pytest.approx(reference_tokens, rel=tolerance)


@pytest.mark.parametrize(("model", "layout", "weights", "reference_pool_gib"), [
    ("llama-3.1-405b", "tp8", "bf16", 26),      # "leaves only about 26 GiB/GPU for KV"
    ("deepseek-r1", "tp8", "fp8", 41),
    ("deepseek-r1", "tp16", "fp8", 81),
])
def test_kv_pool_per_gpu_matches_reference(model, layout, weights, reference_pool_gib):
    plan = h200_plan(model, layout, weights)
    assert plan.kv_pool_bytes_per_gpu / GIB == pytest.approx(reference_pool_gib, rel=0.03)


@pytest.mark.parametrize(("model", "reference_gb"), [
    ("llama-3.1-8b", 16), ("qwen2.5-32b", 65.5), ("llama-3.3-70b", 141),
])
def test_bf16_weight_bytes_match_reference(model, reference_gb):
    total = weight_bytes_per_gpu(get_model(model), "bf16", tp=1, pp=1)
    assert total / 1e9 == pytest.approx(reference_gb, rel=0.02)


def test_max_concurrency_matches_reference_at_16k():
    # §2.6 "max concurrent seqs per replica @ 16K": 8B DP8 52, 8B TP8 473, 32B TP4×DP2 105
    assert h200_plan("llama-3.1-8b", "dp8").max_seqs(16384, 10_000) == pytest.approx(52, abs=1)
    assert h200_plan("llama-3.1-8b", "tp8").max_seqs(16384, 10_000) == pytest.approx(473, abs=2)
    assert h200_plan("qwen2.5-32b", "dp2tp4").max_seqs(16384, 10_000) == pytest.approx(105, abs=2)


# ------------------------------------------------------------------------------------------- sharding rules


def test_gqa_kv_is_sharded_by_tp_up_to_the_kv_heads():
    model = get_model("llama-3.1-405b")     # 8 KV heads
    full = kv_bytes_per_token_per_gpu(model, "bf16", tp=1, pp=1)
    assert kv_bytes_per_token_per_gpu(model, "bf16", tp=2, pp=1) == full / 2
    assert kv_bytes_per_token_per_gpu(model, "bf16", tp=8, pp=1) == full / 8
    # tp=16 > 8 KV heads: each head is duplicated on two GPUs, so per-GPU KV bytes stay those of tp=8
    assert kv_bytes_per_token_per_gpu(model, "bf16", tp=16, pp=1) == full / 8


def test_tp16_doubles_weights_sharding_but_not_kv_capacity():
    tp8pp2 = h200_plan("llama-3.1-405b", "tp8pp2")
    tp16 = h200_plan("llama-3.1-405b", "tp16")
    assert tp16.kv_bytes_per_token_per_gpu == 2 * tp8pp2.kv_bytes_per_token_per_gpu
    assert tp8pp2.kv_tokens_per_replica == pytest.approx(2 * tp16.kv_tokens_per_replica, rel=0.01)


def test_mla_latent_is_not_divided_by_tp():
    r1 = get_model("deepseek-r1")
    per_gpu = {tp: kv_bytes_per_token_per_gpu(r1, "bf16", tp=tp, pp=1) for tp in (1, 2, 8, 16)}
    assert set(per_gpu.values()) == {70_272}


def test_pipeline_stages_split_the_layers():
    llama = get_model("llama-3.1-8b")       # 32 layers
    full = kv_bytes_per_token_per_gpu(llama, "bf16", tp=1, pp=1)
    assert kv_bytes_per_token_per_gpu(llama, "bf16", tp=1, pp=2) == full / 2
    assert kv_bytes_per_token_per_gpu(llama, "bf16", tp=2, pp=4) == full / 8
    r1 = get_model("deepseek-r1")           # 61 layers: the fullest of 2 stages holds 31
    assert kv_bytes_per_token_per_gpu(r1, "bf16", tp=8, pp=2) == (512 + 64) * 31 * 2


def test_weights_shard_over_tp_and_pp():
    llama = get_model("llama-3.3-70b")
    one = weight_bytes_per_gpu(llama, "bf16", tp=1, pp=1)
    assert weight_bytes_per_gpu(llama, "bf16", tp=8, pp=1) == pytest.approx(one / 8)
    assert weight_bytes_per_gpu(llama, "bf16", tp=1, pp=2) == pytest.approx(one / 2, rel=0.02)
    assert weight_bytes_per_gpu(llama, "fp8", tp=1, pp=1) == pytest.approx(one / 2, rel=0.05)


def test_fraction_and_block_size_are_used():
    default = h200_plan("llama-3.1-8b", "dp1")
    assert default.usable_bytes_per_gpu == pytest.approx(0.9 * H200.hbm_bytes)
    lower = h200_plan("llama-3.1-8b", "dp1", fraction=0.5)
    assert lower.usable_bytes_per_gpu == pytest.approx(0.5 * H200.hbm_bytes)
    assert lower.kv_tokens_per_replica < default.kv_tokens_per_replica
    assert default.kv_tokens_per_replica % 16 == 0
    assert h200_plan("llama-3.1-8b", "dp1", block_size=64).kv_tokens_per_replica % 64 == 0


# ------------------------------------------------------------------------------------------- verdicts


def test_weights_that_do_not_fit_are_a_problem_naming_the_weights():
    plan = h200_plan("llama-3.1-405b", "dp1")
    assert not plan.fits and plan.kv_tokens_per_replica == 0
    problem = plan.problem(2048, "llama-3.1-405b", Layout())
    assert problem is not None
    assert problem.startswith("weights ") and "GiB/GPU" in problem
    assert "llama-3.1-405b at dp1tp1pp1" in problem
    assert plan.max_seqs(2048, 256) == 0


def test_70b_bf16_does_not_fit_one_h100():
    plan = plan_memory(get_model("llama-3.3-70b"), H100, Layout(), "bf16", "bf16", None, 16)
    assert "weights" in plan.problem(1024, "llama-3.3-70b", Layout())


def test_context_beyond_the_pool_is_a_problem_naming_the_pool():
    plan = plan_memory(get_model("qwen2.5-32b"), H100, Layout(), "bf16", "bf16", None, 16)
    assert plan.fits
    assert plan.problem(2048, "qwen2.5-32b", Layout()) is None
    problem = plan.problem(33_792, "qwen2.5-32b", Layout())
    assert problem == (f"KV pool of {plan.kv_tokens_per_replica} tokens per replica cannot hold one sequence of "
                       "33792 tokens (qwen2.5-32b at dp1tp1pp1)")


def make_plan(blocks: int, block_size: int = 16) -> MemoryPlan:
    return MemoryPlan(weights_bytes_per_gpu=0, activation_reserve_bytes=0, usable_bytes_per_gpu=1,
                      kv_pool_bytes_per_gpu=1, kv_bytes_per_token_per_gpu=1, kv_block_size=block_size,
                      kv_blocks_per_replica=blocks)


def test_max_seqs_is_block_granular():
    plan = make_plan(blocks=100)
    assert plan.kv_tokens_per_replica == 1600
    assert plan.max_seqs(16, 1000) == 100       # exactly one block each
    assert plan.max_seqs(17, 1000) == 50        # 17 tokens need 2 blocks
    assert plan.max_seqs(32, 1000) == 50
    assert plan.max_seqs(33, 1000) == 33        # 3 blocks each: 100 // 3
    assert plan.max_seqs(1601, 1000) == 0


def test_max_seqs_is_capped_by_max_num_seqs():
    plan = make_plan(blocks=10_000)
    assert plan.max_seqs(16, 256) == 256
    assert plan.max_seqs(16, 20_000) == 10_000
    assert h200_plan("llama-3.1-8b", "tp8").max_seqs(2048, 256) == 256


# ------------------------------------------------------------------------------------------------ torch engine


def test_torch_engine_reserve_is_linear_in_the_token_budget():
    """No [tokens × tokens] term (the flash prefill keeps no score matrix): doubling max_num_tokens doubles the
    per-token part, and the reserve covers Llama-3.1-8B's 8192-token iteration (its SwiGLU activations alone are
    8192 × 3 × 14336 × 2 bytes = 0.66 GiB) with the fixed workspace."""
    from infscale.memory import TORCH_WORKSPACE_BYTES, torch_engine_activation_bytes, torch_engine_reserve_bytes

    llama = get_model("llama-3.1-8b")
    logits = torch_engine_activation_bytes(llama, 1, 1, 0, 256)  # only the sampled rows' logits (256 tokens)
    a = torch_engine_activation_bytes(llama, 1, 1, 8192, 256) - logits
    b = torch_engine_activation_bytes(llama, 1, 1, 16384, 256) - logits
    assert b == pytest.approx(2 * a, rel=0.05)
    assert a > 8192 * 3 * 14336 * 2
    reserve = torch_engine_reserve_bytes(llama, 1, 1, 8192, 256)
    assert TORCH_WORKSPACE_BYTES + a < reserve < 6 * GIB  # well under the 8.6 GB one score matrix would need
    # TP shards the per-token widths; MoE counts every routed slot
    assert torch_engine_activation_bytes(llama, 2, 1, 8192, 256) < torch_engine_activation_bytes(llama, 1, 1, 8192,
                                                                                                  256)
    moe = get_model("qwen3-30b-a3b")
    assert torch_engine_activation_bytes(moe, 1, 1, 8192, 1) > 8192 * moe.experts_per_token * 4 * moe.hidden_size * 2


def test_planner_and_torch_engine_size_the_same_pool():
    """The engine rank's budget on a device holding exactly the planned weights is the plan's KV pool; the plan
    with the torch reserve keeps that reserve free beside weights and pool."""
    from infscale.memory import device_kv_budget_bytes, torch_engine_reserve_bytes

    model = get_model("llama-3.1-8b")
    reserve = torch_engine_reserve_bytes(model, 1, 1, 8192, 256)
    memory = plan_memory(model, H200, Layout.parse("tp1"), "bf16", "bf16", 0.9, 16,
                         activation_reserve_bytes=reserve)
    assert memory.activation_reserve_bytes == reserve
    free = H200.hbm_bytes - memory.weights_bytes_per_gpu
    budget = device_kv_budget_bytes(free, H200.hbm_bytes, 0.9, reserve)
    assert budget == pytest.approx(memory.kv_pool_bytes_per_gpu)
    left = H200.hbm_bytes - memory.weights_bytes_per_gpu - memory.kv_pool_bytes_per_gpu
    assert left >= reserve + 0.1 * H200.hbm_bytes - 1
    # the default stays the hardware's assumption (the sim and trtllm plans)
    assert h200_plan("llama-3.1-8b", "tp1").activation_reserve_bytes == 6 * GIB
