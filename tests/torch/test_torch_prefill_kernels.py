"""The packed iteration's Triton kernels (triton_prefill, in the interpreter on CPU tensors) against float64 /
plain-torch references, and the eager forward through them (`DecoderModel.packed_layers`) against the
plain-torch layers on mixed batches of prompt chunks and decodes.

Tests that run Triton kernels need the `triton` package; they are skipped where it is absent unless
INFSCALE_REQUIRE_TRITON=1, which makes its absence a failure.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before the kernels' modules (and their @triton.jit) are imported

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from infscale.backends.torch import triton_prefill as prefill  # noqa: E402  (imports without triton too)
from infscale.backends.torch.attention import contiguous_attention  # noqa: E402
from infscale.backends.torch.model import BatchMeta, DecoderModel, PrefillSeq, apply_rope  # noqa: E402

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

REQUIRE_TRITON = os.environ.get("INFSCALE_REQUIRE_TRITON") == "1"
needs_triton = pytest.mark.skipif(not HAVE_TRITON and not REQUIRE_TRITON,
                                  reason="triton is not installed (INFSCALE_REQUIRE_TRITON=1 makes this a failure)")
pytestmark = [pytest.mark.torch, needs_triton]


@pytest.fixture(scope="module", autouse=True)
def interpreted():
    assert prefill.triton is not None, "triton is not importable"
    assert type(prefill._paged_prefill_kernel).__name__ == "InterpretedFunction", (
        "triton_prefill was imported before TRITON_INTERPRET=1 was set")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _scattered_batch(seqs: list[tuple[int, int]], block_size: int, heads: int, kv_heads: int, dim: int,
                     dtype: torch.dtype, seed: int, lead_rows: int = 0):
    """Pools holding random K/V for sequences of (past, chunk) in randomly scattered blocks, their queries packed
    after `lead_rows` rows (the decodes of a mixed batch), and the plan's inputs."""
    gen = torch.Generator().manual_seed(seed)
    need = [-(-(past + chunk) // block_size) for past, chunk in seqs]
    num_blocks = sum(need) + 3
    shape = (num_blocks, block_size, kv_heads, dim)
    k_pool = torch.randn(shape, generator=gen).to(dtype)
    v_pool = torch.randn(shape, generator=gen).to(dtype)
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, rows, start = [], [], lead_rows
    for n in need:
        tables.append(perm[:n])
        perm = perm[n:]
    for _, chunk in seqs:
        rows.append(start)
        start += chunk
    q = torch.randn(start, heads, dim, generator=gen).to(dtype)
    return q, k_pool, v_pool, tables, rows


def _reference(q, k_pool, v_pool, tables, rows, seqs):
    """float64 contiguous causal attention per sequence (independent of the paged formulation)."""
    out = {}
    kv_heads, dim = k_pool.shape[2], k_pool.shape[3]
    for table, row, (past, chunk) in zip(tables, rows, seqs):
        keys = k_pool[table].reshape(-1, kv_heads, dim)[: past + chunk].double()
        values = v_pool[table].reshape(-1, kv_heads, dim)[: past + chunk].double()
        out[row] = contiguous_attention(q[row:row + chunk].double(), keys, values, past=past)
    return out


SEQS = [(0, 7), (5, 6), (16, 1), (3, 40), (0, 33), (37, 16)]  # mid-block and on-edge pasts/ends, 1-token chunks


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("heads, kv_heads", [(8, 2), (4, 4)], ids=["gqa4", "mha"])
def test_prefill_kernel_matches_float64(dtype, tol, block_size, heads, kv_heads):
    """Every sequence's chunk in one launch, from scattered blocks, against float64; the rows before the
    chunks (decodes) are left as they were (poisoned with NaN before the launch)."""
    dim = 16
    q, k_pool, v_pool, tables, rows = _scattered_batch(SEQS, block_size, heads, kv_heads, dim, dtype,
                                                       seed=block_size + heads, lead_rows=3)
    config = prefill.PrefillConfig(block_m=16, block_n=16, warps=4, stages=1)
    plan = prefill.plan_prefill(rows, [c for _, c in SEQS], [p for p, _ in SEQS], tables, "cpu", config.block_m)
    out = torch.full_like(q, float("nan"))
    prefill.paged_prefill_attention(q, k_pool, v_pool, plan, out, config)
    assert torch.isnan(out[:3]).all(), "the kernel wrote rows that are not the plan's"
    for row, ref in _reference(q, k_pool, v_pool, tables, rows, SEQS).items():
        got = out[row:row + ref.shape[0]]
        assert torch.isfinite(got).all(), f"sequence at row {row}: unwritten or non-finite rows"
        assert _rel(got, ref) < tol, f"sequence at row {row}"


@pytest.mark.parametrize("block_m, block_n", [(16, 32), (32, 16)])
def test_prefill_kernel_tiles_of_other_shapes(block_m, block_n):
    """Query tiles larger or smaller than the key tiles give the same result (diagonal handling)."""
    seqs = [(0, 45), (21, 19)]
    q, k_pool, v_pool, tables, rows = _scattered_batch(seqs, 8, 8, 2, 16, torch.float32, seed=block_m)
    config = prefill.PrefillConfig(block_m=block_m, block_n=block_n, warps=4, stages=1)
    plan = prefill.plan_prefill(rows, [c for _, c in seqs], [p for p, _ in seqs], tables, "cpu", block_m)
    out = prefill.paged_prefill_attention(q, k_pool, v_pool, plan, config=config)
    for row, ref in _reference(q, k_pool, v_pool, tables, rows, seqs).items():
        assert _rel(out[row:row + ref.shape[0]], ref) < 1e-5


def test_prefill_kernel_reads_only_the_sequences_tokens():
    """Every pool entry past a sequence's last token (the rest of its last block, blocks nobody owns, the
    table's padding) is NaN: the output stays finite and equal to the clean run's."""
    seqs = [(2, 5), (0, 9)]
    block_size = 4
    q, k_pool, v_pool, tables, rows = _scattered_batch(seqs, block_size, 8, 2, 16, torch.float32, seed=5)
    config = prefill.PrefillConfig(block_m=16, block_n=16, warps=4, stages=1)
    plan = prefill.plan_prefill(rows, [c for _, c in seqs], [p for p, _ in seqs], tables, "cpu", 16)
    clean = prefill.paged_prefill_attention(q, k_pool, v_pool, plan, config=config)
    used = {}
    for table, (past, chunk) in zip(tables, seqs):
        for i, block in enumerate(table):
            used[block] = min(block_size, past + chunk - i * block_size)
    for pool in (k_pool, v_pool):
        for block in range(pool.shape[0]):
            pool[block, used.get(block, 0):] = float("nan")
    out = prefill.paged_prefill_attention(q, k_pool, v_pool, plan, config=config)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, clean, rtol=0, atol=0)


def test_plan_covers_every_query_once_longest_first():
    plan = prefill.plan_prefill([0, 10, 40], [10, 30, 5], [0, 100, 7], [[1], [2, 3], [4]], "cpu", 8)
    tiles = list(zip(plan.tile_seq.tolist(), plan.tile_m.tolist()))
    expected = {(0, 0), (0, 8), (1, 0), (1, 8), (1, 16), (1, 24), (2, 0)}
    assert len(tiles) == len(expected) and set(tiles) == expected
    pasts = plan.pasts.tolist()
    work = [pasts[s] + m for s, m in tiles]
    assert work == sorted(work, reverse=True)
    assert plan.tables.shape == (3, 2) and plan.tables.dtype == torch.int32
    with pytest.raises(ValueError, match="positive"):
        prefill.plan_prefill([0], [0], [0], [[1]], "cpu", 8)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)], ids=["fp32", "bf16"])
def test_silu_mul_matches_torch(dtype, tol):
    x = torch.randn(5, 2 * 40, generator=torch.Generator().manual_seed(2)).to(dtype)
    gate, up = x.chunk(2, dim=-1)
    assert _rel(prefill.silu_mul(x), torch.nn.functional.silu(gate) * up) < tol


@pytest.mark.parametrize("family, tokens", [("llama", 7), ("qwen2", 7), ("qwen3", 7), ("qwen3", 300)])
def test_rope_kv_slots_matches_torch(arch, family, tokens):
    """Bias, QK-norm, RoPE at each token's own position and the K/V write at its own slot (300 tokens: the
    launch with more heads per program, and a tile of heads past the last one, masked)."""
    model = DecoderModel(arch(family, num_attention_heads=8, hidden_size=128) if tokens > 100 else arch(family),
                         dtype=torch.float32, seed=4)
    attn = model.layers[0].attn
    gen = torch.Generator().manual_seed(6)
    block_size, blocks = 4, 80
    qkv = torch.randn(tokens, (attn.heads + 2 * attn.kv_heads) * attn.head_dim, generator=gen)
    positions = torch.randint(0, 32, (tokens,), generator=gen)
    slots = torch.randperm(blocks * block_size, generator=gen)[:tokens]
    shape = (blocks, block_size, attn.kv_heads, attn.head_dim)
    k_pool, v_pool = torch.zeros(shape), torch.zeros(shape)
    cos, sin = model._cos_sin(32)
    ops = prefill.PackedOps()
    q = ops.rope_kv_slots(qkv, positions, slots, cos, sin, k_pool, v_pool, attn.heads, attn.kv_heads,
                          attn.head_dim, attn.b_qkv, attn.q_norm, attn.k_norm, model.eps)
    ref = qkv + (attn.b_qkv if attn.b_qkv is not None else 0)
    d = attn.head_dim
    rq, rk, rv = ref.split([attn.heads * d, attn.kv_heads * d, attn.kv_heads * d], dim=-1)
    rq, rk, rv = rq.view(tokens, -1, d), rk.view(tokens, -1, d), rv.view(tokens, -1, d)
    if attn.q_norm is not None:
        from infscale.backends.torch.model import rms_norm

        rq, rk = rms_norm(rq, attn.q_norm, model.eps), rms_norm(rk, attn.k_norm, model.eps)
    torch.testing.assert_close(q, apply_rope(rq, positions, model.inv_freq), rtol=1e-5, atol=1e-5)
    flat_k, flat_v = k_pool.view(-1, attn.kv_heads, d), v_pool.view(-1, attn.kv_heads, d)
    torch.testing.assert_close(flat_k[slots], apply_rope(rk, positions, model.inv_freq), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(flat_v[slots], rv, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ the forward


def _mixed_batch(model: DecoderModel, block_size: int, seed: int):
    """Two decodes (contexts 6 and 13, their earlier K/V random) and two prompt chunks (a fresh 9-token prompt
    and a 5-token chunk after 7 cached tokens) on one cache; returns (ids, meta, cache)."""
    rng = np.random.default_rng(seed)
    cache = model.new_cache(64, block_size)
    gen = torch.Generator().manual_seed(seed)
    for pool in cache.k + cache.v:
        pool.copy_(torch.randn(pool.shape, generator=gen).to(pool.dtype))
    decodes, prefills = [6, 13], [(0, 9), (7, 5)]
    rows, positions, slots, pre = 0, [], [], []
    tables = []
    for request, ctx in enumerate(decodes):
        tables.append(cache.allocator.ensure(request, ctx))
        positions.append([ctx - 1])
        slots.append(cache.slots(request, ctx - 1, 1).tolist())
        rows += 1
    for i, (past, chunk) in enumerate(prefills):
        request = len(decodes) + i
        table = cache.allocator.ensure(request, past + chunk)
        positions.append(list(range(past, past + chunk)))
        slots.append(cache.slots(request, past, chunk).tolist())
        pre.append(PrefillSeq(rows, chunk, past, list(table)))
        rows += chunk
    width = max(map(len, tables))
    flat_positions = torch.tensor(sum(positions, []))
    meta = BatchMeta(positions=flat_positions, slots=torch.tensor(sum(slots, [])),
                     keys=torch.tensor(sum(([r] * len(p) for r, p in enumerate(positions)), [])),
                     sample_index=torch.tensor([0, 1, 2 + 9 - 1, rows - 1]), num_decode=len(decodes),
                     decode_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
                     decode_lens=torch.tensor(decodes), prefills=pre, rope_positions=int(flat_positions.max()) + 1)
    ids = torch.as_tensor(rng.integers(0, model.arch.vocab_size, rows))
    return ids, meta, cache


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "qwen3_moe"])
def test_packed_forward_matches_the_plain_torch_layers(arch, family):
    """A mixed batch through packed_layers (the fused kernels) and through the plain-torch layers, each on
    its own copy of the cache: the same logits (fp32: within rounding), the same K/V written."""
    model = DecoderModel(arch(family), dtype=torch.float32, seed=21)
    ids, meta, cache = _mixed_batch(model, 4, seed=3)
    _, meta2, cache2 = _mixed_batch(model, 4, seed=3)
    reference = model.forward_logits(ids, meta, cache)
    meta2.kernels = prefill.PackedOps(prefill_config=prefill.PrefillConfig(16, 16, 4, 1))
    hidden = model.packed_layers(model.embed_tokens(ids), meta2, cache2, meta2.kernels)
    fused = model.logits(hidden[meta2.sample_index])
    assert _rel(fused, reference) < 1e-4
    for a, b in zip(cache.k + cache.v, cache2.k + cache2.v):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert meta2.prefill_plan is not None and meta2.prefill_plan.num_tiles == 2


def test_packed_forward_bf16_tokens_agree(arch):
    """In bf16 the fused path rounds as the eager layers do: logits within bf16 noise."""
    model = DecoderModel(arch("qwen3"), dtype=torch.bfloat16, seed=22)
    ids, meta, cache = _mixed_batch(model, 4, seed=4)
    _, meta2, cache2 = _mixed_batch(model, 4, seed=4)
    reference = model.forward_logits(ids, meta, cache)
    meta2.kernels = prefill.PackedOps(prefill_config=prefill.PrefillConfig(16, 16, 4, 1))
    fused = model.logits(model.packed_layers(model.embed_tokens(ids), meta2, cache2, meta2.kernels)[
        meta2.sample_index])
    assert _rel(fused, reference) < 3e-2


# ------------------------------------------------------------------------------------------------ MoE experts


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_grouped_moe_kernel_matches_grouped_mm(arch, dtype, tol):
    """The Triton grouped expert kernel on routed slots (some experts empty, one with more rows than an M
    tile) gives model.grouped_experts' rows; rows past the last group are left alone."""
    from infscale.backends.torch.model import grouped_experts
    from infscale.backends.torch.triton_moe import MoEConfig, moe_experts

    model = DecoderModel(arch("qwen3_moe", num_experts=8, experts_per_token=2), dtype=dtype, seed=5)
    block = model.layers[0].mlp
    counts = torch.tensor([0, 21, 3, 0, 1, 5, 0, 2], dtype=torch.int32)  # expert 1: two M tiles of 16
    ends = torch.cumsum(counts, 0, dtype=torch.int32)
    gathered = torch.randn(int(ends[-1]) + 3, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    rows = int(ends[-1])  # the 3 rows past it stand for another rank's slots
    reference = grouped_experts(gathered, block.w_gate_up, block.w_down, ends)[:rows]
    for config in (MoEConfig(16, 16, 32, 4, 1), MoEConfig(16, 32, 64, 4, 1)):
        out = moe_experts(gathered, block.w_gate_up, block.w_down, ends, config)
        assert _rel(out[:rows], reference) < tol


def test_moe_fast_path_with_the_triton_kernels_gives_the_eager_tokens(arch):
    """Qwen3-MoE through the executor with the Triton ops (interpreter): the grouped expert kernel in the decode
    step and the packed prefill path give the plain-torch eager run's greedy tokens."""
    from infscale.backends.torch.executor import TorchExecutor
    from infscale.campaign.spec import Arrival
    from infscale.serving.cluster import ReplicaConfig, serve
    from infscale.serving.workload import Requests

    model = DecoderModel(arch("qwen3_moe"), dtype=torch.float32, seed=14)
    isl, osl = np.array([7, 5, 10]), np.array([3, 5, 4])
    tokens = {}
    for fast in (False, True):
        executor = TorchExecutor(model, 64, 4, isl, osl, seed=2, fast=fast, fast_ops="triton", graph_sizes=(1, 2, 4))
        config = ReplicaConfig(num_blocks=64, block_size=4, max_num_seqs=3, max_num_tokens=32)
        serve(Requests(isl, osl, np.zeros(3)), 1, config, Arrival(), "round_robin", lambda _: executor)
        executor.check_outputs()
        tokens[fast] = {r: executor.generated_tokens(r).tolist() for r in range(3)}
        if fast:
            assert executor.fast_steps > 0
    assert tokens[True] == tokens[False]


def test_tune_moe_checks_and_chooses_a_launch(arch):
    from infscale.backends.torch.triton_attention import TritonOps
    from infscale.backends.torch.triton_moe import moe_candidates, tune_moe

    model = DecoderModel(arch("qwen3_moe"), dtype=torch.float32, seed=6)
    ops = TritonOps()
    log = tune_moe(ops, list(model.moe_blocks().values()), [2], reps=1)
    chosen = [r for r in log if "chosen" in r]
    assert len(chosen) == 1 and chosen[0]["chosen"] in {str(c) for c in moe_candidates()}
    assert all(r.get("rel_err", 0) < 2e-2 for r in log if "config" in r and "rejected" not in r)
    assert set(ops.moe_configs) == {2 * model.arch.experts_per_token}
    assert int(model.layers[0].mlp.counts.sum()) == 0  # tuning routes nothing that counts


def test_tuning_reference_in_row_slices_gives_the_whole_product(monkeypatch):
    """The float64 reference of tune_linear, computed over slices of the weight's rows (its memory bound), is
    the whole product, SwiGLU pairs included."""
    from infscale.backends.torch import triton_attention

    gen = torch.Generator().manual_seed(7)
    x, w = torch.randn(3, 32, generator=gen), torch.randn(40, 32, generator=gen)
    whole = triton_attention._linear_reference(x, w, dual=True)
    monkeypatch.setattr(triton_attention, "REFERENCE_ROWS", 7)
    torch.testing.assert_close(triton_attention._linear_reference(x, w, dual=True), whole, rtol=0, atol=1e-12)
    gate, up = (x.double() @ w.double().T).chunk(2, dim=-1)
    torch.testing.assert_close(whole, torch.nn.functional.silu(gate) * up)
