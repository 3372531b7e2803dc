"""The fast decode path: its Triton kernels (in the interpreter, on CPU tensors) against the plain-torch reference,
the CUDA-graph manager's bookkeeping (in its "record" mode: the step stored as a callable, the same buffers and
padding), and the executor on the fast path giving the eager path's greedy tokens.

Tests that run Triton kernels need the `triton` package; they are skipped where it is absent unless
INFSCALE_REQUIRE_TRITON=1, which makes its absence a failure (as INFSCALE_REQUIRE_TORCH does for torch). They
are kept small: the interpreter runs every program of a launch in Python.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton_attention (and its @triton.jit) is imported: CPU tensors

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from infscale.backends.torch import triton_attention as kernels  # noqa: E402  (imports without triton too)
from infscale.backends.torch.attention import contiguous_attention  # noqa: E402
from infscale.backends.torch.attention import paged_decode_attention as reference_attention  # noqa: E402
from infscale.backends.torch.executor import TorchExecutor  # noqa: E402
from infscale.backends.torch.graphs import DecodeGraphs, GraphError  # noqa: E402
from infscale.backends.torch.model import DecoderModel, TorchFastOps  # noqa: E402
from infscale.campaign.spec import Arrival  # noqa: E402
from infscale.serving.cluster import ReplicaConfig, serve  # noqa: E402
from infscale.serving.workload import Requests  # noqa: E402

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

REQUIRE_TRITON = os.environ.get("INFSCALE_REQUIRE_TRITON") == "1"
needs_triton = pytest.mark.skipif(not HAVE_TRITON and not REQUIRE_TRITON,
                                  reason="triton is not installed (INFSCALE_REQUIRE_TRITON=1 makes this a failure)")
pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def ta():
    """The kernels module, checked to be in interpreter mode (CPU tensors cannot reach a compiled kernel)."""
    assert kernels.available(), "triton is not importable"
    assert type(kernels._gemv_kernel).__name__ == "InterpretedFunction", (
        "triton_attention was imported before TRITON_INTERPRET=1 was set")
    return kernels


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _pools(blocks: int, block_size: int, kv_heads: int, dim: int, dtype: torch.dtype, gen: torch.Generator):
    shape = (blocks, block_size, kv_heads, dim)
    return torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype)


# ------------------------------------------------------------------------------------------------ attention


@needs_triton
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("partition", [0, 16], ids=["one-pass", "split"])
def test_triton_paged_attention_matches_reference(ta, dtype, tol, block_size, partition):
    """GQA (4 query heads per KV head), contexts ending mid-block and on block edges, scattered tables."""
    gen = torch.Generator().manual_seed(block_size + partition)
    heads, kv_heads, dim = 8, 2, 16
    lens = [1, 5, block_size, 2 * block_size + 3, 37]
    width = -(-max(lens) // block_size) + 1  # one padded column beyond the longest
    k_pool, v_pool = _pools(len(lens) * width + 2, block_size, kv_heads, dim, dtype, gen)
    tables = torch.randperm(len(lens) * width + 2, generator=gen)[: len(lens) * width].view(len(lens), width)
    q = torch.randn(len(lens), heads, dim, generator=gen).to(dtype)
    config = ta.AttnConfig(block_n=16, warps=4, stages=1, partition=partition)
    out = ta.paged_decode_attention(q, k_pool, v_pool, tables.to(torch.int32), torch.tensor(lens),
                                    width * block_size, config)
    assert out.dtype == dtype and out.shape == q.shape
    for row, length in enumerate(lens):
        keys = k_pool[tables[row]].reshape(-1, kv_heads, dim)[:length]
        values = v_pool[tables[row]].reshape(-1, kv_heads, dim)[:length]
        ref = contiguous_attention(q[row : row + 1].double(), keys.double(), values.double(), past=length - 1)
        assert _rel(out[row : row + 1], ref) < tol, f"row {row} (context {length})"


@needs_triton
@pytest.mark.parametrize("heads, kv_heads, dim", [(12, 2, 16), (4, 4, 32)], ids=["group6", "mha"])
def test_triton_paged_attention_head_layouts(ta, heads, kv_heads, dim):
    """A GQA group that is not a power of two (padded to 16 rows) and plain multi-head attention."""
    gen = torch.Generator().manual_seed(heads)
    block_size, lens = 8, [3, 17, 24]
    width = 3
    k_pool, v_pool = _pools(10, block_size, kv_heads, dim, torch.float32, gen)
    tables = torch.randperm(10, generator=gen)[:9].view(3, width)
    q = torch.randn(3, heads, dim, generator=gen)
    out = ta.paged_decode_attention(q, k_pool, v_pool, tables, torch.tensor(lens), 24,
                                    ta.AttnConfig(block_n=16, warps=4, stages=1, partition=16))
    ref = reference_attention(q.double(), k_pool.double(), v_pool.double(), tables, torch.tensor(lens))
    assert _rel(out, ref) < 1e-6


@needs_triton
def test_triton_paged_attention_reads_only_the_listed_tokens(ta):
    """Every block outside the tables, and the padded tail of each table (pointing at a NaN block), is poison:
    the output stays finite and equal to the clean run's."""
    gen = torch.Generator().manual_seed(3)
    block_size, kv_heads, dim = 4, 2, 16
    k_pool, v_pool = _pools(12, block_size, kv_heads, dim, torch.float32, gen)
    tables = torch.tensor([[5, 2, 11], [7, 0, 11]])  # block 11: the padding
    lens = torch.tensor([6, 5])  # the second block of each is partly used
    q = torch.randn(2, 8, dim, generator=gen)
    clean = ta.paged_decode_attention(q, k_pool, v_pool, tables, lens, 12, ta.AttnConfig(16, 4, 1, 0))
    used = {5: 4, 2: 2, 7: 4, 0: 1}  # block -> tokens in use
    for pool in (k_pool, v_pool):
        for block in range(12):
            pool[block, used.get(block, 0):] = float("nan")
    for partition in (0, 4):
        out = ta.paged_decode_attention(q, k_pool, v_pool, tables, lens, 12, ta.AttnConfig(16, 4, 1, partition))
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, clean, rtol=1e-6, atol=1e-6)


def test_attention_partition_heuristic():
    ta = kernels
    assert ta.default_attn_config(1, 8, 1100).partition == 64  # 8 programs alone would leave the chip idle
    assert ta.default_attn_config(128, 8, 1100).partition == 0  # 1024 programs: one pass
    assert ta.default_attn_config(4, 8, 100).partition == 0  # short contexts: no split


# ------------------------------------------------------------------------------------------------ small ops


@needs_triton
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_triton_linear_variants(ta, dtype, tol):
    """GEMV (one row) and tl.dot GEMM, plain and SwiGLU-dual, whole and split over K (uneven last split)."""
    gen = torch.Generator().manual_seed(4)
    n, k = 40, 96
    w = (torch.randn(2 * n, k, generator=gen) * 0.1).to(dtype)
    ops = ta.TritonOps()
    configs = [ta.LinearConfig("gemv", 1, 8, 32, 1, 4, 1), ta.LinearConfig("gemv", 1, 16, 32, 2, 4, 1),
               ta.LinearConfig("gemm", 16, 32, 32, 1, 4, 2), ta.LinearConfig("gemm", 16, 16, 32, 2, 4, 2)]
    for m in (1, 5):
        x = torch.randn(m, k, generator=gen).to(dtype)
        ref = x.double() @ w[:n].double().T
        gate, up = (x.double() @ w.double().T).chunk(2, dim=-1)
        ref_dual = torch.nn.functional.silu(gate) * up
        for cfg in configs:
            if cfg.kind == "gemv" and m != 1:
                continue
            out = ops.linear(x, w[:n], partial_ok=True, config=cfg)
            if cfg.split > 1:
                assert out.shape == (cfg.split, m, n) and out.dtype == torch.float32
                out = out.sum(0)
            assert out.shape == (m, n) and _rel(out, ref) < tol, cfg
            dual = ops.gate_up(x, w, config=cfg)  # never split: silu is not linear
            assert dual.shape == (m, n) and dual.dtype == dtype and _rel(dual, ref_dual) < 2 * tol, cfg
    assert ops.linear(x, w[:n], config=ta.LinearConfig("torch")).shape == (5, n)


@needs_triton
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_triton_add_rmsnorm_matches_torch(ta, dtype, tol):
    gen = torch.Generator().manual_seed(5)
    residual = torch.randn(3, 96, generator=gen).to(dtype)
    weight = torch.randn(96, generator=gen).to(dtype)
    for delta in (None, torch.randn(3, 96, generator=gen).to(dtype), torch.randn(2, 3, 96, generator=gen)):
        mine, theirs = residual.clone(), residual.clone()
        out = ta.TritonOps().add_rmsnorm(mine, delta, weight, 1e-5)
        ref = TorchFastOps().add_rmsnorm(theirs, delta, weight, 1e-5)
        assert _rel(out, ref) < tol and (delta is None or _rel(mine, theirs) < tol)
        assert delta is not None or torch.equal(mine, residual)


@needs_triton
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_triton_rope_kv_write_matches_torch(ta, arch, family):
    """Bias (qwen2), QK-norm (qwen3), RoPE from the tables, and the new tokens' K/V at their slots only."""
    model = DecoderModel(arch(family), dtype=torch.float32, seed=6)
    attn = model.layers[0].attn
    gen = torch.Generator().manual_seed(6)
    heads, kv_heads, dim, block_size = attn.heads, attn.kv_heads, attn.head_dim, 4
    qkv = torch.randn(3, (heads + 2 * kv_heads) * dim, generator=gen)
    lens = torch.tensor([1, 6, 13])
    tables = torch.tensor([[4, 9, 9, 9], [2, 7, 9, 9], [0, 1, 3, 5]])
    cos, sin = model.rope_tables(32)
    pools = [torch.zeros(10, block_size, kv_heads, dim) for _ in range(4)]
    q_mine = ta.TritonOps().rope_kv(qkv, lens, tables, cos, sin, pools[0], pools[1], heads, kv_heads, dim,
                                    attn.b_qkv, attn.q_norm, attn.k_norm, model.eps)
    q_ref = TorchFastOps().rope_kv(qkv, lens, tables, cos, sin, pools[2], pools[3], heads, kv_heads, dim,
                                   attn.b_qkv, attn.q_norm, attn.k_norm, model.eps)
    torch.testing.assert_close(q_mine, q_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pools[0], pools[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pools[1], pools[3], rtol=1e-5, atol=1e-5)
    written = (pools[0] != 0).any(-1).any(-1).nonzero().tolist()  # (block, offset) of each write
    assert sorted(map(tuple, written)) == [(4, 0), (5, 0), (7, 1)]


@needs_triton
def test_triton_finish_takes_the_first_maximum_and_flags_non_finite_rows(ta):
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(7))
    logits[0, 17] = logits[0, 250] = 50.0  # a tie: the first index wins, as torch.argmax
    logits[2, 5] = float("nan")
    logits[3, 9] = float("inf")  # a padding row: its inf does not count
    valid = torch.tensor([True, True, True, False])
    result = torch.full((2, 4), -1, dtype=torch.int64)
    ids = torch.zeros(4, dtype=torch.int64)
    lens = torch.tensor([5, 6, 7, 1])
    ta.TritonOps().finish(logits, valid, result, ids, lens)
    assert result[0, 0] == 17 and result[0, 1] == int(logits[1].argmax()) and result[0, 3] == 9
    assert result[1].tolist() == [1, 1, 0, 1]
    assert torch.equal(ids, result[0]) and lens.tolist() == [6, 7, 8, 1]


def test_linear_candidates_fit_the_shapes():
    ta = kernels
    for m, n, k, dual, partial in ((1, 6144, 4096, False, False), (1, 4096, 14336, False, True),
                                   (128, 14336, 4096, True, False), (8, 4096, 4096, False, True)):
        candidates = ta.linear_candidates(m, n, k, dual, partial)
        assert candidates[0].kind == "torch" and len(candidates) == len(set(candidates)) > 3
        for cfg in candidates[1:]:
            assert k % (cfg.split * cfg.block_k) == 0 and (cfg.split == 1 or partial)
            assert cfg.kind == "gemm" or m == 1


# ------------------------------------------------------------------------------------------------ graphs


def _prefilled(model: DecoderModel, lengths: list[int], num_blocks: int = 48, block_size: int = 4, seed: int = 0):
    """A cache with the prompts of `lengths` prefilled through the eager path (scratch block = num_blocks)."""
    executor = TorchExecutor(model, num_blocks, block_size, np.array(lengths), seed=seed, fast=False)
    cache = model.new_cache(num_blocks, block_size, extra_blocks=1)
    executor.cache = cache
    from infscale.serving.executor import IterationBatch

    empty = np.zeros(0, dtype=np.int64)
    for request, length in enumerate(lengths):
        executor.iteration(IterationBatch(empty, empty, np.array([request]), np.array([length]), np.array([0])))
    return executor, cache


def test_graph_manager_pads_buckets_and_advances_in_place(arch):
    model = DecoderModel(arch(), dtype=torch.float32, seed=8)
    executor, cache = _prefilled(model, [5, 9, 3])
    graphs = DecodeGraphs(model, cache, TorchFastOps(), max_context=24, scratch_block=48, batch_sizes=(1, 2, 4),
                          mode="record")
    assert graphs.bucket(1) == 1 and graphs.bucket(3) == 4 and graphs.bucket(5) is None
    assert graphs.fits(4, 6) and not graphs.fits(4, 7) and not graphs.fits(5, 1)
    graphs.capture()
    assert sorted(graphs.graphs) == [1, 2, 4]
    tables = [cache.allocator.ensure(r, length + 3) for r, length in enumerate([5, 9, 3])]
    before = [pool.clone() for pool in cache.k]
    last = np.array([executor.generated[r][-1] for r in range(3)])
    b = graphs.load(last, np.array([6, 10, 4]), tables)
    assert b == 4
    assert graphs.valid[:4].tolist() == [True, True, True, False]
    assert graphs.lens[:4].tolist() == [6, 10, 4, 1] and graphs.ids[3] == 0
    assert graphs.tables[3].tolist() == [48] * graphs.max_blocks  # the padding row: only the scratch block
    assert graphs.tables[0, len(tables[0]):].eq(48).all()
    for step in range(3):
        result = graphs.replay(b)
        assert graphs.lens[:4].tolist() == [6 + step + 1, 10 + step + 1, 4 + step + 1, 1]
        assert torch.equal(graphs.ids[:3], result[0, :3]) and result[1].all()
    # only the three requests' new slots and the scratch block were written
    for layer, pool in enumerate(cache.k):
        changed = (pool != before[layer]).any(-1).any(-1).nonzero().tolist()
        expect = {(tables[r][p // 4], p % 4) for r, ctx in enumerate([6, 10, 4]) for p in range(ctx - 1, ctx + 2)}
        assert {tuple(c) for c in changed if c[0] != 48} == expect
    with pytest.raises(GraphError):
        graphs.load(np.zeros(5, dtype=np.int64), np.ones(5, dtype=np.int64), [[0]] * 5)


def test_graph_step_matches_the_eager_step(arch):
    """The recorded fast step and the eager forward give the same tokens (fp32) over several steps."""
    model = DecoderModel(arch("qwen3"), dtype=torch.float32, seed=9)
    lengths = [7, 4]
    eager_exec, _ = _prefilled(model, lengths)
    fast_exec, cache = _prefilled(model, lengths)
    graphs = DecodeGraphs(model, cache, TorchFastOps(), max_context=32, scratch_block=48, batch_sizes=(2,),
                          mode="record")
    tables = [cache.allocator.ensure(r, n + 4) for r, n in enumerate(lengths)]
    last = np.array([fast_exec.generated[r][-1] for r in range(2)])
    b = graphs.load(last, np.array(lengths) + 1, tables)
    fast = np.stack([graphs.replay(b)[0, :2].clone().numpy() for _ in range(4)], axis=1)
    eager_exec.decode_steps(np.array([0, 1]), np.array(lengths) + 1, 4, None)
    assert fast.tolist() == [eager_exec.generated[r][-4:] for r in range(2)]


# ------------------------------------------------------------------------------------------------ executor

ISL = np.array([21, 9, 33, 14, 27, 6])
OSL = np.array([17, 25, 8, 21, 12, 30])


def _serve(model, arrival: Arrival | None = None, num_blocks: int = 1024, **fast):
    requests = Requests(ISL, OSL, np.zeros(len(ISL)))
    if arrival is not None and arrival.mode == "poisson":
        requests.arrival = np.arange(len(ISL)) * 5e-3
    executor = TorchExecutor(model, num_blocks, 4, ISL, OSL, seed=7, **fast)
    config = ReplicaConfig(num_blocks=num_blocks, block_size=4, max_num_seqs=6, max_num_tokens=32)
    state, _ = serve(requests, 1, config, arrival or Arrival(), "round_robin", lambda _: executor)
    executor.check_outputs()
    assert executor.cache.allocator.used_blocks == 0
    return state, executor, {r: executor.generated_tokens(r).tolist() for r in range(len(ISL))}


@pytest.fixture(scope="module")
def llama(arch):
    return DecoderModel(arch(), dtype=torch.float32, seed=11)


@pytest.fixture(scope="module")
def eager_tokens(llama):
    return _serve(llama)[2]


@pytest.mark.parametrize("case", ["roomy", "tiny-pool", "poisson", "small-graphs"])
def test_fast_path_gives_the_eager_tokens(llama, eager_tokens, case):
    """Record-mode graphs of the plain-torch fast step: the eager path's tokens, with preemption (tiny pool),
    horizons (Poisson arrivals), and spans larger than the largest graph (eager fallback)."""
    options = {"fast": True, "fast_ops": "torch"}
    kwargs = {}
    if case == "tiny-pool":
        kwargs["num_blocks"] = 30
    if case == "poisson":
        kwargs["arrival"] = Arrival(mode="poisson", rate=1000.0)
    if case == "small-graphs":
        options["graph_sizes"] = (1, 2)
    state, executor, tokens = _serve(llama, **kwargs, **options)
    assert tokens == eager_tokens
    assert executor.graphs.mode == "record" and executor.fast_steps > 0
    if case == "tiny-pool":
        assert state.preemptions.sum() > 0
    if case == "small-graphs":
        assert executor.fast_steps < executor.decode_iterations  # some spans ran eagerly


@needs_triton
def test_fast_path_with_triton_kernels_gives_the_eager_tokens(ta, arch):
    """The Triton kernels (interpreter) in the executor: the eager tokens of a small qwen2 run (bias, GQA)."""
    model = DecoderModel(arch("qwen2"), dtype=torch.float32, seed=12)
    isl, osl = np.array([9, 5, 12]), np.array([4, 6, 3])
    tokens = {}
    for fast in (False, True):
        executor = TorchExecutor(model, 64, 4, isl, osl, seed=1, fast=fast, fast_ops="triton",
                                 graph_sizes=(1, 2, 4))
        config = ReplicaConfig(num_blocks=64, block_size=4, max_num_seqs=3, max_num_tokens=32)
        serve(Requests(isl, osl, np.zeros(3)), 1, config, Arrival(), "round_robin", lambda _: executor)
        executor.check_outputs()
        tokens[fast] = {r: executor.generated_tokens(r).tolist() for r in range(3)}
        if fast:
            assert executor.fast_steps > 0
    assert tokens[True] == tokens[False]


def test_fast_path_refuses_what_it_cannot_capture(arch):
    odd = DecoderModel(arch(head_dim=12, hidden_size=48), dtype=torch.float32)
    assert "head_dim 12" in odd.fast_decode_unsupported()
    assert TorchExecutor(odd, 16, 4, np.array([4]), np.array([2])).graphs is None  # CPU default: eager
    with pytest.raises(ValueError, match="fast decode path"):
        TorchExecutor(odd, 16, 4, np.array([4]), np.array([2]), fast=True)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_grouped_moe_matches_the_per_expert_loop(arch, dtype, tol):
    """The sync-free grouped-GEMM experts give the per-expert loop's output, with some experts left empty."""
    model = DecoderModel(arch("qwen3_moe", num_experts=16, experts_per_token=4), dtype=dtype, seed=3)
    block = model.layers[0].mlp
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=gen).to(dtype)
    keys, positions = torch.arange(5), torch.arange(5) + 40
    weights, experts = block.route(x, keys, positions)
    assert len(set(experts.reshape(-1).tolist())) < 16  # 20 slots over 16 experts: some get no token
    assert _rel(block.partial(x, keys, positions), block.experts_loop(x, weights, experts)) < tol


def test_moe_routing_counts_only_valid_rows(arch):
    model = DecoderModel(arch("qwen3_moe"), dtype=torch.float32, seed=3)
    block = model.layers[0].mlp
    x = torch.randn(4, 64)
    block.route(x, torch.arange(4), torch.arange(4), valid=torch.tensor([True, True, False, False]))
    assert int(block.counts.sum()) == 2 * block.top_k


def test_moe_fast_path_gives_the_eager_tokens(arch):
    """Qwen3-MoE through record-mode graphs: the eager path's greedy tokens (routing keyed by request id)."""
    model = DecoderModel(arch("qwen3_moe"), dtype=torch.float32, seed=13)
    assert model.fast_decode_unsupported() is None
    state, eager, eager_tokens = _serve(model)
    eager_counts = model.expert_counts()
    model.reset_expert_counts()
    _, fast, fast_tokens = _serve(model, fast=True, fast_ops="torch")
    assert fast.fast_steps > 0 and fast_tokens == eager_tokens
    # padded graph rows route but are not counted: the same routed slots as the eager run
    assert all((fast_counts == eager_counts[layer]).all() for layer, fast_counts in model.expert_counts().items())


def test_warmup_captures_every_graph_and_leaves_no_trace(llama, eager_tokens):
    executor = TorchExecutor(llama, 1024, 4, ISL, OSL, seed=7, fast=True, fast_ops="torch")
    executor.warmup()
    assert sorted(executor.graphs.graphs) == [1, 2, 4, 8]  # up to the first size >= the 6 requests
    assert executor.cache.allocator.used_blocks == 0 and not executor.generated and executor.fast_steps == 0
    config = ReplicaConfig(num_blocks=1024, block_size=4, max_num_seqs=6, max_num_tokens=32)
    serve(Requests(ISL, OSL, np.zeros(len(ISL))), 1, config, Arrival(), "round_robin", lambda _: executor)
    assert {r: executor.generated_tokens(r).tolist() for r in range(len(ISL))} == eager_tokens
