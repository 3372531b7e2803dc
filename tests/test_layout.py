"""Parallel layouts: parsing, the structural rules against a model and a target, and enumeration."""

from __future__ import annotations

import itertools

import pytest

from infscale.campaign.layout import Layout, enumerate_layouts, layout_problem
from infscale.catalog import get_hardware, get_model

H200 = get_hardware("h200-sxm")
LLAMA_8B = get_model("llama-3.1-8b")
QWEN_32B = get_model("qwen2.5-32b")        # 40 heads, 8 KV heads
QWEN_MOE = get_model("qwen3-30b-a3b")      # 32 heads, 4 KV heads, 128 experts
R1 = get_model("deepseek-r1")              # 128 heads, MLA, 256 experts


# ------------------------------------------------------------------------------------------- parse


@pytest.mark.parametrize(("text", "expected", "canonical"), [
    ("dp8", Layout(dp=8), "dp8tp1pp1"),
    ("tp8", Layout(tp=8), "dp1tp8pp1"),
    ("pp4", Layout(pp=4), "dp1tp1pp4"),
    ("dp2tp4", Layout(dp=2, tp=4), "dp2tp4pp1"),
    ("tp4pp2", Layout(tp=4, pp=2), "dp1tp4pp2"),
    ("dp2tp2pp2", Layout(dp=2, tp=2, pp=2), "dp2tp2pp2"),
    ("tp8ep8", Layout(tp=8, ep=8), "dp1tp8pp1ep8"),
    ("dp2tp8pp1ep4", Layout(dp=2, tp=8, ep=4), "dp2tp8pp1ep4"),
    (" DP2TP4 ", Layout(dp=2, tp=4), "dp2tp4pp1"),
    ("dp16", Layout(dp=16), "dp16tp1pp1"),
])
def test_parse(text, expected, canonical):
    layout = Layout.parse(text)
    assert layout == expected
    assert str(layout) == canonical
    assert Layout.parse(str(layout)) == layout


def test_round_trip_over_many_layouts():
    for dp, tp, pp, ep in itertools.product([1, 2, 3, 16], [1, 2, 8], [1, 4], [1, 2]):
        layout = Layout(dp, tp, pp, ep)
        assert Layout.parse(str(layout)) == layout


@pytest.mark.parametrize("text", ["", "dp", "8", "tp2dp4", "pp2tp2", "ep2tp2", "dp-2", "dp2x", "tp 2", "dp2,tp2",
                                  "mp4", "tp2.5"])
def test_parse_rejects_non_layouts(text):
    with pytest.raises(ValueError, match="is not a layout; write e.g. 'dp8', 'dp2tp4'"):
        Layout.parse(text)


@pytest.mark.parametrize("text", ["dp0", "tp0", "tp4pp0", "tp2ep0"])
def test_parse_rejects_zero_degrees(text):
    with pytest.raises(ValueError, match=f"'{text}': every degree must be at least 1"):
        Layout.parse(text)


def test_gpu_counts_and_nodes():
    layout = Layout(dp=2, tp=8, pp=2)
    assert layout.gpus == 32 and layout.gpus_per_replica == 16
    assert layout.nodes(8) == 4
    assert Layout(dp=3).nodes(8) == 1 and Layout(dp=9).nodes(8) == 2
    assert Layout(tp=8, ep=8).gpus == 8            # EP lives inside the TP group: no extra GPUs


# ------------------------------------------------------------------------------------------- enumerate


def test_enumerate_llama_8b_single_node():
    # By hand: every (dp, tp, pp) with dp·tp·pp ∈ {1, 2, 4, 8}; tp ∈ {1, 2, 4, 8} all divide 32 heads and are ≤ 8.
    expected = {
        (1, 1, 1),
        (2, 1, 1), (1, 2, 1), (1, 1, 2),
        (4, 1, 1), (2, 2, 1), (2, 1, 2), (1, 4, 1), (1, 2, 2), (1, 1, 4),
        (8, 1, 1), (4, 2, 1), (4, 1, 2), (2, 4, 1), (2, 2, 2), (2, 1, 4),
        (1, 8, 1), (1, 4, 2), (1, 2, 4), (1, 1, 8),
    }
    layouts = enumerate_layouts(LLAMA_8B, H200, [1, 2, 4, 8], max_nodes=1)
    assert len(layouts) == len(set(layouts)) == 20
    assert {(lay.dp, lay.tp, lay.pp) for lay in layouts} == expected
    assert all(lay.ep == 1 for lay in layouts)


def test_enumerate_expert_parallel_is_ignored_for_dense_models():
    plain = enumerate_layouts(LLAMA_8B, H200, [1, 2, 4, 8], max_nodes=1)
    assert enumerate_layouts(LLAMA_8B, H200, [1, 2, 4, 8], max_nodes=1, expert_parallel=True) == plain


def test_enumerate_expert_parallel_adds_ep_equal_tp_for_moe():
    plain = enumerate_layouts(QWEN_MOE, H200, [1, 2, 4, 8], max_nodes=1)
    with_ep = enumerate_layouts(QWEN_MOE, H200, [1, 2, 4, 8], max_nodes=1, expert_parallel=True)
    assert len(plain) == 20
    added = set(with_ep) - set(plain)
    assert set(plain) <= set(with_ep)
    # one ep=tp variant for every layout with tp > 1: 1 (2 GPUs) + 3 (4 GPUs) + 6 (8 GPUs)
    assert added == {Layout(lay.dp, lay.tp, lay.pp, ep=lay.tp) for lay in plain if lay.tp > 1}
    assert len(added) == 10


def test_enumerate_skips_tp_not_dividing_heads():
    layouts = enumerate_layouts(QWEN_32B, H200, [1, 2, 4, 8], max_nodes=1)
    assert {lay.tp for lay in layouts} == {1, 2, 4, 8}     # 40 heads: every power of two up to 8 divides
    multi = enumerate_layouts(QWEN_32B, H200, [16], max_nodes=2)
    assert {lay.tp for lay in multi} == {1, 2, 4, 8}       # tp16 does not divide 40 heads
    assert all(lay.gpus == 16 for lay in multi)


def test_enumerate_keeps_tp_within_a_node_unless_asked():
    within = enumerate_layouts(LLAMA_8B, H200, [16], max_nodes=2)
    assert max(lay.tp for lay in within) == 8
    across = enumerate_layouts(LLAMA_8B, H200, [16], max_nodes=2, tp_within_node=False)
    assert Layout(tp=16) in across


def test_enumerate_respects_max_pp_and_max_nodes():
    layouts = enumerate_layouts(LLAMA_8B, H200, [8], max_nodes=1, max_pp=2)
    assert {lay.pp for lay in layouts} == {1, 2}
    assert enumerate_layouts(LLAMA_8B, H200, [16], max_nodes=1) == []


# ------------------------------------------------------------------------------------------- layout_problem


def test_valid_layouts_have_no_problem():
    assert layout_problem(Layout(dp=8), LLAMA_8B, H200, 1) is None
    assert layout_problem(Layout(tp=8, ep=8), R1, H200, 1) is None
    assert layout_problem(Layout(tp=16), get_model("llama-3.1-405b"), H200, 2) is None  # 16 = 2 × 8 KV heads


def test_problem_tp_not_dividing_heads_lists_allowed_tp():
    problem = layout_problem(Layout(tp=3), QWEN_32B, H200, 1)
    assert problem == ("tp=3 does not divide qwen2.5-32b's 40 attention heads "
                       "(allowed tp: 1, 2, 4, 5, 8, 10, 20, 40)")


def test_problem_tp_above_kv_heads_and_not_a_multiple():
    problem = layout_problem(Layout(tp=10), QWEN_32B, H200, 2)
    assert problem == "tp=10 exceeds qwen2.5-32b's 8 KV heads and is not a multiple of it"


def test_problem_pp_beyond_layers():
    problem = layout_problem(Layout(pp=64), LLAMA_8B, H200, 8)
    assert problem == "pp=64 exceeds llama-3.1-8b's 32 layers"


def test_problem_ep_on_dense_model():
    problem = layout_problem(Layout(tp=2, ep=2), LLAMA_8B, H200, 1)
    assert problem == "ep=2 needs a mixture-of-experts model; llama-3.1-8b is dense"


def test_problem_ep_must_divide_tp():
    problem = layout_problem(Layout(tp=4, ep=8), QWEN_MOE, H200, 1)
    assert problem == "ep=8 must divide tp=4 (experts are split inside the TP group)"


def test_problem_ep_must_divide_experts():
    sixty = QWEN_MOE.model_copy(update={"name": "moe-60", "num_experts": 60})
    problem = layout_problem(Layout(tp=8, ep=8), sixty, H200, 1)
    assert problem == "ep=8 does not divide moe-60's 60 experts"


def test_problem_more_gpus_than_target():
    problem = layout_problem(Layout(dp=2, tp=8), LLAMA_8B, H200, 1)
    assert problem == "dp2tp8pp1 needs 16 GPUs but the target has 8 (1 node(s) × 8 h200-sxm)"
    assert layout_problem(Layout(dp=2, tp=8), LLAMA_8B, H200, 2) is None
