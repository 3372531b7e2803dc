"""A compact decoder built from a `ModelArch`: Llama, Qwen2 (QKV bias), Qwen3 (QK-norm) and Qwen3-MoE.

Weights are random (std 0.02, norms 1), generated directly on the target device in the target dtype. Every tensor
is drawn from its own generator seeded by (seed, Hugging Face parameter name) at its FULL shape and then sliced to
this rank's shard, so TP1, TP2, PP2 … of one seed are the same model (one full tensor at a time is the only
transient memory). Tensor parallelism is Megatron-style: column-parallel q/k/v and gate/up, row-parallel o and
down followed by an all-reduce, vocab-parallel embedding (masked lookup + all-reduce) and LM head (all-gather).
KV heads are sharded over min(tp, kv_heads) ranks and replicated beyond.

One forward runs a packed batch: the single-token decodes first, then prompt chunks, each with its position and
KV slot (see `BatchMeta`). The last PP stage samples greedily and the tokens are broadcast to every stage.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from infscale.backends.torch.attention import (
    contiguous_attention,
    paged_decode_attention,
    paged_prefill_attention,
)
from infscale.backends.torch.kvcache import BlockAllocator, PagedKVCache
from infscale.backends.torch.parallel import ParallelContext, ParallelError, kv_head_start, kv_heads_local
from infscale.backends.torch.routing import ExpertPopularity, systematic_topk, target_shares, token_uniforms
from infscale.catalog.models import ModelArch

WEIGHT_STD = 0.02


class UnsupportedModel(NotImplementedError):
    """An architecture feature the torch backend does not implement (yet)."""


# ------------------------------------------------------------------------------------------------ batch


@dataclass
class PrefillSeq:
    """A prompt chunk in the packed batch: rows start … start+chunk-1, positions past … past+chunk-1."""

    start: int
    chunk: int
    past: int
    blocks: list[int]  # the request's block ids (at least ceil((past + chunk) / block_size) of them)


@dataclass
class BatchMeta:
    """Where each token of a packed batch goes. Built once per iteration and shared by all layers."""

    positions: torch.Tensor        # [T] int64
    slots: torch.Tensor            # [T] int64 flat KV slot (block * block_size + offset)
    keys: torch.Tensor             # [T] int64 request id (MoE routing hash)
    sample_index: torch.Tensor     # [S] rows whose logits are sampled
    num_decode: int = 0            # rows 0 … num_decode-1 are single-token decodes
    decode_tables: torch.Tensor | None = None  # [num_decode, M] block tables (padded)
    decode_lens: torch.Tensor | None = None    # [num_decode] context including the new token
    prefills: list[PrefillSeq] = field(default_factory=list)
    # the fused kernels the batch runs through (triton_prefill.PackedOps), None: the plain-torch reference path
    kernels: object | None = None
    rope_positions: int = 0        # every position is below this (the size of the fused path's RoPE tables)
    prefill_plan: object | None = None  # the kernels' prefill plan, built on the first layer for all of them

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])


# ------------------------------------------------------------------------------------------------ weights


def _name_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class WeightFactory:
    """Random weights by name: the full tensor from a generator seeded by (seed, name), then this rank's slice."""

    def __init__(self, seed: int, dtype: torch.dtype, device: torch.device):
        self.seed = seed
        self.dtype = dtype
        self.device = device

    def full(self, name: str, shape: tuple[int, ...], std: float = WEIGHT_STD) -> torch.Tensor:
        generator = torch.Generator(device=self.device)
        generator.manual_seed(_name_seed(self.seed, name))
        tensor = torch.empty(shape, dtype=self.dtype, device=self.device)
        return tensor.normal_(0.0, std, generator=generator)

    def rows(self, name: str, shape: tuple[int, ...], start: int, stop: int, dim: int = 0) -> torch.Tensor:
        """Rows start … stop-1 along `dim` of the full tensor, as a tensor of their own (frees the full one)."""
        full = self.full(name, shape)
        if start == 0 and stop == shape[dim]:
            return full  # TP1: no copy
        return full.narrow(dim, start, stop - start).clone()

    def ones(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.ones(shape, dtype=self.dtype, device=self.device)


def _split(total: int, tp: int, rank: int, what: str) -> tuple[int, int]:
    if total % tp:
        raise ParallelError(f"tp={tp} does not divide {what} ({total})")
    size = total // tp
    return rank * size, (rank + 1) * size


# ------------------------------------------------------------------------------------------------ pieces


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """As Hugging Face's LlamaRMSNorm: normalise in fp32, cast back, then scale."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope_inv_freq(arch: ModelArch, device: torch.device) -> torch.Tensor:
    """Inverse frequencies for the rotary embedding, with the model's rope_scaling (default, linear, llama3)."""
    dim = arch.head_dim
    inv_freq = 1.0 / (arch.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim))
    scaling = arch.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        pass
    elif kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        # transformers' _compute_llama3_parameters: long wavelengths slowed by `factor`, short ones kept,
        # a smooth blend in between
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
        inv_freq = torch.where(medium, blended, scaled)
    else:
        raise UnsupportedModel(f"{arch.name}: rope_scaling type {kind!r} is not implemented "
                               "(supported: default, linear, llama3)")
    return inv_freq.float()


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] rotated by its position (the half-split convention of Hugging Face Llama/Qwen)."""
    freqs = positions.float()[:, None] * inv_freq[None, :]          # [T, D/2]
    cos, sin = freqs.cos()[:, None, :], freqs.sin()[:, None, :]
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class Attention:
    def __init__(self, arch: ModelArch, layer: int, ctx: ParallelContext, weights: WeightFactory, eps: float):
        self.layer = layer
        self.ctx = ctx
        self.eps = eps
        self.head_dim = d = arch.head_dim
        heads, kv_heads = arch.num_attention_heads, arch.num_kv_heads
        if heads % ctx.tp:
            raise ParallelError(f"tp={ctx.tp} does not divide the {heads} attention heads")
        self.heads = heads // ctx.tp
        self.kv_heads = kv_heads_local(kv_heads, ctx.tp)
        q0 = ctx.tp_rank * self.heads
        k0 = kv_head_start(kv_heads, ctx.tp, ctx.tp_rank)
        prefix = f"model.layers.{layer}.self_attn."
        hidden = arch.hidden_size
        q_rows, kv_rows = (q0 * d, (q0 + self.heads) * d), (k0 * d, (k0 + self.kv_heads) * d)
        # column-parallel q/k/v fused into one GEMM (one weight read per step)
        self.w_qkv = torch.cat([
            weights.rows(prefix + "q_proj.weight", (heads * d, hidden), *q_rows),
            weights.rows(prefix + "k_proj.weight", (kv_heads * d, hidden), *kv_rows),
            weights.rows(prefix + "v_proj.weight", (kv_heads * d, hidden), *kv_rows),
        ])
        self.b_qkv = None
        if arch.qkv_bias:
            self.b_qkv = torch.cat([
                weights.rows(prefix + "q_proj.bias", (heads * d,), *q_rows),
                weights.rows(prefix + "k_proj.bias", (kv_heads * d,), *kv_rows),
                weights.rows(prefix + "v_proj.bias", (kv_heads * d,), *kv_rows),
            ])
        self.q_norm = weights.ones((d,)) if arch.qk_norm else None
        self.k_norm = weights.ones((d,)) if arch.qk_norm else None
        # row-parallel o: this rank's heads are its input columns
        self.w_o = weights.rows(prefix + "o_proj.weight", (hidden, heads * d), *q_rows, dim=1)

    def __call__(self, x: torch.Tensor, meta: BatchMeta, cache: PagedKVCache | None, local: int,
                 inv_freq: torch.Tensor) -> torch.Tensor:
        tokens = x.shape[0]
        d = self.head_dim
        qkv = F.linear(x, self.w_qkv, self.b_qkv)
        q, k, v = qkv.split([self.heads * d, self.kv_heads * d, self.kv_heads * d], dim=-1)
        q = q.view(tokens, self.heads, d)
        k = k.view(tokens, self.kv_heads, d)
        v = v.view(tokens, self.kv_heads, d)
        if self.q_norm is not None:
            q = rms_norm(q, self.q_norm, self.eps)
            k = rms_norm(k, self.k_norm, self.eps)
        q = apply_rope(q, meta.positions, inv_freq)
        k = apply_rope(k, meta.positions, inv_freq)
        if cache is None:  # reference path: one sequence, no cache
            out = contiguous_attention(q, k, v)
        else:
            cache.write(local, k, v, meta.slots)
            out = torch.empty_like(q)
            n = meta.num_decode
            if n:
                out[:n] = paged_decode_attention(q[:n], cache.k[local], cache.v[local], meta.decode_tables,
                                                 meta.decode_lens)
            for seq in meta.prefills:
                rows = slice(seq.start, seq.start + seq.chunk)
                table = torch.as_tensor(seq.blocks, dtype=torch.int64, device=q.device)
                out[rows] = paged_prefill_attention(q[rows], cache.k[local], cache.v[local], table, seq.past)
        return self.ctx.all_reduce(F.linear(out.reshape(tokens, self.heads * d), self.w_o))


class DenseMLP:
    def __init__(self, arch: ModelArch, layer: int, ctx: ParallelContext, weights: WeightFactory):
        self.ctx = ctx
        hidden, inter = arch.hidden_size, arch.intermediate_size
        rows = _split(inter, ctx.tp, ctx.tp_rank, "intermediate_size")
        prefix = f"model.layers.{layer}.mlp."
        self.w_gate_up = torch.cat([weights.rows(prefix + "gate_proj.weight", (inter, hidden), *rows),
                                    weights.rows(prefix + "up_proj.weight", (inter, hidden), *rows)])
        self.w_down = weights.rows(prefix + "down_proj.weight", (hidden, inter), *rows, dim=1)

    def __call__(self, x: torch.Tensor, meta: BatchMeta) -> torch.Tensor:
        gate, up = F.linear(x, self.w_gate_up).chunk(2, dim=-1)
        return self.ctx.all_reduce(F.linear(F.silu(gate) * up, self.w_down))


class MoEBlock:
    """Qwen3-MoE sparse block: router softmax → top-k → renormalise; experts computed grouped by expert.

    Experts are TP-sharded along their FFN width (every rank holds a slice of every expert); with EP (ep > 1) the
    TP ranks form ep groups, each holding E/ep whole experts split over its tp/ep ranks. Every TP rank sees every
    token (activations are replicated across TP), so a rank computes its experts' share of the routed slots and the
    TP all-reduce that follows sums the shares: EP changes how many experts a rank reads and how wide their GEMMs
    are, not the collectives (as an engine that runs EP inside its TP group does; no all-to-all).
    The expert GEMMs run as two grouped GEMMs (`grouped_experts`: `torch._grouped_mm`; in the fast decode step the
    Triton grouped kernel of triton_moe.py) over the routed slots sorted by expert, with the group offsets computed
    on the device: no host synchronisation, so the block runs inside a CUDA graph and reads each routed expert's
    weights once per step, as a production engine's grouped-GEMM MoE does. `experts_loop` is the per-expert
    reference they are tested against."""

    def __init__(self, arch: ModelArch, layer: int, ctx: ParallelContext, weights: WeightFactory,
                 popularity: ExpertPopularity):
        if arch.num_shared_experts:
            raise UnsupportedModel(f"{arch.name}: shared experts are not implemented")
        self.ctx = ctx
        self.layer = layer
        self.top_k = arch.experts_per_token
        self.num_experts = e = arch.num_experts
        self.popularity = popularity
        hidden, inter = arch.hidden_size, arch.moe_intermediate_size
        if e % ctx.ep:
            raise ParallelError(f"ep={ctx.ep} does not divide {arch.name}'s {e} experts")
        shard, shards = ctx.expert_shard
        rows = _split(inter, shards, shard, "moe_intermediate_size")
        self.local_experts = e // ctx.ep
        self.first_expert = ctx.expert_group * self.local_experts
        local = slice(self.first_expert, self.first_expert + self.local_experts)
        prefix = f"model.layers.{layer}.mlp."
        self.w_router = weights.full(prefix + "gate.weight", (e, hidden))  # replicated: every rank routes alike

        def experts(name: str, shape: tuple[int, int, int], dim: int) -> torch.Tensor:
            # one generator per stacked tensor [E, …] (the same model for every TP/EP), then this rank's part
            tensor = weights.rows(prefix + name, shape, *rows, dim=dim)
            return tensor if self.local_experts == e else tensor[local].clone()

        self.w_gate_up = torch.cat([experts("experts.gate_proj.weight", (e, inter, hidden), 1),
                                    experts("experts.up_proj.weight", (e, inter, hidden), 1)], dim=1)
        self.w_down = experts("experts.down_proj.weight", (e, hidden, inter), 2)
        device = weights.device
        self.shares = None
        if popularity.mode != "router":
            self.shares = torch.tensor(target_shares(popularity, e, self.top_k, layer), device=device)
        self.counts = torch.zeros(e, dtype=torch.int64, device=device)  # routed slots per expert (recorded)

    def route(self, x: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor,
              valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, experts) [T, k] per token; `valid` False rows (CUDA-graph padding) are not counted."""
        probs = torch.softmax(F.linear(x, self.w_router).float(), dim=-1)
        if self.shares is None:
            weights, experts = torch.topk(probs, self.top_k, dim=-1)
        else:
            uniforms = token_uniforms(keys, positions, self.popularity.seed, self.layer)
            experts = systematic_topk(uniforms, self.shares, self.top_k)
            weights = probs.gather(1, experts)
        weights = weights / weights.sum(dim=-1, keepdim=True)  # norm_topk_prob
        counted = torch.ones_like(experts) if valid is None else valid[:, None].expand_as(experts).long()
        self.counts.index_add_(0, experts.reshape(-1), counted.reshape(-1))  # bincount would sync with the host
        return weights, experts

    def partial(self, x: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor,
                valid: torch.Tensor | None = None, experts_fn=None) -> torch.Tensor:
        """This rank's share of the block's output (before the TP all-reduce); no host synchronisation.
        `experts_fn(gathered, w_gate_up, w_down, ends)` runs the experts (default `grouped_experts`; the fast
        decode path passes its ops' `moe_experts`)."""
        token, offsets, mine = self.sorted_slots(x, keys, positions, valid)
        out = (experts_fn or grouped_experts)(x[token], self.w_gate_up, self.w_down, offsets)
        # rows past the last offset are not written by the grouped GEMM: select, never multiply, them away
        scaled = torch.where(mine > 0, out * mine.to(x.dtype), torch.zeros((), dtype=x.dtype, device=x.device))
        return torch.zeros_like(x).index_add_(0, token, scaled)

    def sorted_slots(self, x: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor,
                     valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Route, then sort the routed slots by this rank's expert: (each sorted slot's token [T·k], the group
        ends [local_experts] int32 cumulative, each sorted slot's routing weight [T·k, 1] (0: another rank's))."""
        weights, experts = self.route(x, keys, positions, valid)
        flat, slot_weights = self._local_slots(experts, weights)
        order = torch.argsort(flat, stable=True)
        # slots of other ranks' experts carry index local_experts: counted in a bin past the last group, so they
        # sort to the end, lie beyond the last offset and get weight 0
        per_expert = torch.zeros(self.local_experts + 1, dtype=torch.int32, device=x.device)
        per_expert.index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
        ends = torch.cumsum(per_expert[:-1], 0, dtype=torch.int32)
        return order // self.top_k, ends, slot_weights[order, None]

    def _local_slots(self, experts: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each routed slot's expert as an index into this rank's experts (local_experts when it is another
        rank's), and its routing weight (0 when it is another rank's); flattened [T·k]."""
        flat = experts.reshape(-1)
        slot_weights = weights.reshape(-1)
        if self.local_experts == self.num_experts:
            return flat, slot_weights
        local = flat - self.first_expert
        mine = (local >= 0) & (local < self.local_experts)
        return torch.where(mine, local, self.local_experts), torch.where(mine, slot_weights, 0.0)

    def experts_loop(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """The reference: one pair of GEMMs per expert over its tokens (synchronises with the host); with EP only
        this rank's experts, as `partial`."""
        flat, slot_weights = self._local_slots(experts, weights)
        order = torch.argsort(flat, stable=True)
        token = order // self.top_k
        per_expert = torch.bincount(flat, minlength=self.local_experts + 1).tolist()[:self.local_experts]
        gathered = x[token]
        out = torch.zeros_like(gathered)
        offset = 0
        for expert, count in enumerate(per_expert):
            if count:
                rows = slice(offset, offset + count)
                gate, up = F.linear(gathered[rows], self.w_gate_up[expert]).chunk(2, dim=-1)
                out[rows] = F.linear(F.silu(gate) * up, self.w_down[expert])
                offset += count
        scaled = out * slot_weights[order, None].to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token, scaled)

    def __call__(self, x: torch.Tensor, meta: BatchMeta) -> torch.Tensor:
        return self.ctx.all_reduce(self.partial(x, meta.keys, meta.positions))


def grouped_experts(gathered: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                    ends: torch.Tensor) -> torch.Tensor:
    """The experts of routed slots sorted by expert, as two grouped GEMMs (torch._grouped_mm): gathered [S, H]
    with expert e's rows ends[e-1] … ends[e]-1; w_gate_up [E, 2I, H]; w_down [E, H, I]. Rows past ends[-1] are
    not written."""
    gate, up = torch._grouped_mm(gathered, w_gate_up.transpose(-2, -1), offs=ends).chunk(2, dim=-1)
    return torch._grouped_mm(F.silu(gate) * up, w_down.transpose(-2, -1), offs=ends)


class DecoderLayer:
    def __init__(self, arch: ModelArch, layer: int, ctx: ParallelContext, weights: WeightFactory, eps: float,
                 popularity: ExpertPopularity):
        self.eps = eps
        self.input_norm = weights.ones((arch.hidden_size,))
        self.post_norm = weights.ones((arch.hidden_size,))
        self.attn = Attention(arch, layer, ctx, weights, eps)
        moe = arch.is_moe and layer >= arch.first_dense_layers
        self.mlp = MoEBlock(arch, layer, ctx, weights, popularity) if moe else DenseMLP(arch, layer, ctx, weights)

    def __call__(self, x: torch.Tensor, meta: BatchMeta, cache: PagedKVCache | None, local: int,
                 inv_freq: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(rms_norm(x, self.input_norm, self.eps), meta, cache, local, inv_freq)
        return x + self.mlp(rms_norm(x, self.post_norm, self.eps), meta)


# ------------------------------------------------------------------------------------------------ model


def default_eps(arch: ModelArch) -> float:
    """rms_norm_eps is not in ModelArch: Llama 3 uses 1e-5, Qwen2/Qwen3 1e-6 (their config.json files)."""
    return 1e-5 if arch.family == "llama" else 1e-6


class DecoderModel:
    """The layers of one PP stage on one TP rank, plus embedding (first stage) and norm + LM head (last)."""

    def __init__(self, arch: ModelArch, ctx: ParallelContext | None = None, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str = "cpu", seed: int = 0, num_layers: int | None = None,
                 popularity: ExpertPopularity | None = None):
        if arch.attention != "gqa":
            raise UnsupportedModel(f"{arch.name}: MLA attention (deepseek_v3) is not implemented in the torch backend")
        self.arch = arch
        self.ctx = ctx = ctx or ParallelContext.single()
        self.dtype = dtype
        self.device = torch.device(device)
        self.seed = seed
        self.num_layers = num_layers or arch.num_layers  # fewer for a layer-sliced proxy run
        self.popularity = popularity or ExpertPopularity()
        self.eps = default_eps(arch)
        weights = WeightFactory(seed, dtype, self.device)
        self.layer_ids = ctx.stage_layers(self.num_layers)
        self.layers = [DecoderLayer(arch, i, ctx, weights, self.eps, self.popularity) for i in self.layer_ids]
        self.inv_freq = rope_inv_freq(arch, self.device)
        vocab, hidden = arch.vocab_size, arch.hidden_size
        # vocab-parallel: rank r holds rows r*shard … (padded with zero rows so all shards have one size)
        self.vocab_shard = -(-vocab // ctx.tp)
        self.vocab_start = ctx.tp_rank * self.vocab_shard
        vocab_stop = min(vocab, self.vocab_start + self.vocab_shard)

        def shard(name: str) -> torch.Tensor:
            rows = weights.rows(name, (vocab, hidden), self.vocab_start, vocab_stop)
            return F.pad(rows, (0, 0, 0, self.vocab_shard - rows.shape[0]))

        need_embedding = ctx.is_first_stage or (ctx.is_last_stage and arch.tie_word_embeddings)
        self.embed = shard("model.embed_tokens.weight") if need_embedding else None
        self.final_norm = weights.ones((hidden,)) if ctx.is_last_stage else None
        self.lm_head = None
        if ctx.is_last_stage:
            self.lm_head = self.embed if arch.tie_word_embeddings else shard("lm_head.weight")

    # -------------------------------------------------------------------------------------------- info

    @property
    def kv_heads(self) -> int:
        return kv_heads_local(self.arch.num_kv_heads, self.ctx.tp)

    def tensors(self) -> list[torch.Tensor]:
        """Every weight tensor held by this rank (shards; padding rows included)."""
        out: list[torch.Tensor] = []
        for layer in self.layers:
            out += [layer.input_norm, layer.post_norm, layer.attn.w_qkv, layer.attn.w_o]
            out += [t for t in (layer.attn.b_qkv, layer.attn.q_norm, layer.attn.k_norm) if t is not None]
            mlp = layer.mlp
            out += [mlp.w_gate_up, mlp.w_down] + ([mlp.w_router] if isinstance(mlp, MoEBlock) else [])
        if self.embed is not None:
            out.append(self.embed)
        if self.lm_head is not None and self.lm_head is not self.embed:
            out.append(self.lm_head)
        if self.final_norm is not None:
            out.append(self.final_norm)
        return out

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors())

    def moe_blocks(self) -> dict[int, MoEBlock]:
        return {i: layer.mlp for i, layer in zip(self.layer_ids, self.layers) if isinstance(layer.mlp, MoEBlock)}

    def expert_counts(self) -> dict[int, np.ndarray]:
        """Routed slots per expert for each MoE layer of this stage, since construction or the last reset."""
        return {i: block.counts.cpu().numpy() for i, block in self.moe_blocks().items()}

    def expert_targets(self) -> dict[int, np.ndarray]:
        """The requested share of routed slots per expert (absent for the `router` mode)."""
        return {i: block.shares.cpu().numpy() for i, block in self.moe_blocks().items() if block.shares is not None}

    def reset_expert_counts(self) -> None:
        for block in self.moe_blocks().values():
            block.counts.zero_()

    def new_cache(self, num_blocks: int, block_size: int, extra_blocks: int = 0) -> PagedKVCache:
        """A KV cache of `num_blocks` allocatable blocks; `extra_blocks` more exist in the pools beyond the
        allocator's reach (ids num_blocks …): the fast path's scratch block, where padded rows of a captured
        batch write and read."""
        cache = PagedKVCache(len(self.layers), num_blocks + extra_blocks, block_size, self.kv_heads,
                             self.arch.head_dim, self.dtype, self.device)
        if extra_blocks:
            cache.allocator = BlockAllocator(num_blocks, block_size)
        return cache

    # -------------------------------------------------------------------------------------------- forward

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        if self.ctx.tp == 1:
            return F.embedding(ids, self.embed)
        local = ids - self.vocab_start
        inside = (local >= 0) & (local < self.vocab_shard)
        out = F.embedding(local.clamp(0, self.vocab_shard - 1), self.embed) * inside[:, None].to(self.dtype)
        return self.ctx.all_reduce(out)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary fp32 logits of the given (last-stage) hidden rows."""
        local = F.linear(rms_norm(hidden, self.final_norm, self.eps), self.lm_head)
        return self.ctx.all_gather_last_dim(local)[:, : self.arch.vocab_size].float()

    def forward_logits(self, ids: torch.Tensor, meta: BatchMeta, cache: PagedKVCache) -> torch.Tensor:
        """The eager path's fp32 logits of the sampled rows (single stage only): what the fast path is checked
        against."""
        if self.ctx.pp != 1:
            raise ParallelError("forward_logits needs the whole model on this rank (pp = 1)")
        hidden = self.embed_tokens(ids)
        for local, layer in enumerate(self.layers):
            hidden = layer(hidden, meta, cache, local, self.inv_freq)
        return self.logits(hidden[meta.sample_index])

    def forward(self, ids: torch.Tensor, meta: BatchMeta, cache: PagedKVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the packed batch through this stage. Returns, on every rank, the greedy tokens of the sampled rows
        [S] and a 0-dim flag, 1 when all of their logits were finite (checked on the last stage)."""
        ctx = self.ctx
        if ctx.is_first_stage:
            hidden = self.embed_tokens(ids)
        else:
            hidden = ctx.recv_prev((meta.num_tokens, self.arch.hidden_size), self.dtype, self.device)
        if meta.kernels is not None:
            hidden = self.packed_layers(hidden, meta, cache, meta.kernels)
        else:
            for local, layer in enumerate(self.layers):
                hidden = layer(hidden, meta, cache, local, self.inv_freq)
        samples = int(meta.sample_index.shape[0])
        if not ctx.is_last_stage:
            ctx.send_next(hidden)
            out = torch.empty(samples + 1, dtype=torch.int64, device=self.device)
        else:
            logits = self.logits(hidden[meta.sample_index])
            finite = torch.isfinite(logits).all().to(torch.int64)
            out = torch.cat([logits.argmax(dim=-1), finite[None]])
        ctx.broadcast_from_last_stage(out)
        return out[:samples], out[samples]

    # -------------------------------------------------------------------------------------------- packed, fused

    def packed_layers(self, hidden: torch.Tensor, meta: BatchMeta, cache: PagedKVCache, ops) -> torch.Tensor:
        """This stage's layers over a packed batch (prompt chunks and decodes) through the fused kernels of
        `ops` (triton_prefill.PackedOps): the eager layers' arithmetic and rounding in a few large kernels per
        layer (add + RMSNorm, one QKV GEMM for every token, RoPE + K/V write by slot, one attention launch for
        all prompt chunks and one for the decodes, SwiGLU on the fused gate/up output). `hidden` is updated in
        place and returned."""
        cos, sin = self._packed_rope(meta.rope_positions)
        reduce = self.ctx.all_reduce
        delta = None
        for local, layer in enumerate(self.layers):
            attn, mlp = layer.attn, layer.mlp
            x = ops.add_rmsnorm(hidden, delta, layer.input_norm, self.eps)
            qkv = F.linear(x, attn.w_qkv)
            q = ops.rope_kv_slots(qkv, meta.positions, meta.slots, cos, sin, cache.k[local], cache.v[local],
                                  attn.heads, attn.kv_heads, attn.head_dim, attn.b_qkv, attn.q_norm, attn.k_norm,
                                  self.eps)
            out = ops.attention(q, cache.k[local], cache.v[local], meta)
            delta = reduce(F.linear(out.reshape(out.shape[0], -1), attn.w_o))
            x = ops.add_rmsnorm(hidden, delta, layer.post_norm, self.eps)
            if isinstance(mlp, MoEBlock):
                delta = reduce(mlp.partial(x, meta.keys, meta.positions))
            else:
                delta = reduce(F.linear(ops.silu_mul(F.linear(x, mlp.w_gate_up)), mlp.w_down))
        return _residual_add(hidden, delta)

    def _packed_rope(self, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for the packed path (its own tables: the decode graphs hold the addresses of theirs, which
        must never be freed), grown to a power of two when a batch reaches further."""
        if positions <= 0:
            raise ValueError("a packed batch on the fused path needs meta.rope_positions (its largest position + 1)")
        cached = getattr(self, "_packed_rope_tables", None)
        if cached is None or cached[0].shape[0] < positions:
            cached = self._packed_rope_tables = self._cos_sin(1 << max(10, (positions - 1).bit_length()))
        return cached

    def _cos_sin(self, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [positions, head_dim / 2] in fp32, computed exactly as apply_rope computes them."""
        freqs = torch.arange(positions, device=self.device).float()[:, None] * self.inv_freq[None, :]
        return freqs.cos().contiguous(), freqs.sin().contiguous()

    # -------------------------------------------------------------------------------------------- fast decode

    def fast_decode_unsupported(self) -> str | None:
        """Why this model (stage) cannot take the fast decode path, or None when it can. The fast path is one
        pure-decode step of this PP stage, hand-offs included, with no host synchronisation (capturable)."""
        d = self.arch.head_dim
        if d < 16 or d & (d - 1):
            return f"head_dim {d} (the kernels need a power of two >= 16)"
        return None

    def fast_linear_sites(self) -> dict[str, tuple[list[torch.Tensor], bool, bool]]:
        """The fast path's projections for kernel tuning: site -> (its weight in every layer, dual (the SwiGLU
        gate/up pair), partial_ok (its consumer sums split-K partials: o and down at TP1))."""
        partial_ok = self.ctx.tp == 1
        dense = [layer.mlp for layer in self.layers if isinstance(layer.mlp, DenseMLP)]  # MoE: grouped GEMMs
        sites = {
            "qkv": ([layer.attn.w_qkv for layer in self.layers], False, False),
            "o": ([layer.attn.w_o for layer in self.layers], False, partial_ok),
        }
        if dense:
            sites["gate_up"] = ([mlp.w_gate_up for mlp in dense], True, False)
            sites["down"] = ([mlp.w_down for mlp in dense], False, partial_ok)
        if self.lm_head is not None:
            sites["lm_head"] = ([self.lm_head], False, False)
        return sites

    def rope_tables(self, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [positions, head_dim / 2] in fp32, computed exactly as apply_rope computes them."""
        cached = getattr(self, "_rope_tables", None)
        if cached is not None and cached[0].shape[0] >= positions:
            return cached
        self._rope_tables = self._cos_sin(positions)
        return self._rope_tables

    def fast_decode(self, ids: torch.Tensor, lens: torch.Tensor, tables: torch.Tensor, valid: torch.Tensor,
                    cache: PagedKVCache, ops, max_context: int, result: torch.Tensor,
                    keys: torch.Tensor | None = None, layer_collectives: bool = True,
                    hidden_in: torch.Tensor | None = None, pipelined: bool = False) -> torch.Tensor:
        """One decode step of B requests without host synchronisation (what a CUDA graph captures).

        ids [B] the last token of each request; lens [B] its context including that token; tables [B, M] its
        blocks (padded rows of the batch point at a scratch block, with lens 1 and valid False); `ops` supplies
        the fused operations (TritonOps, or TorchFastOps: the same step in plain torch). `max_context` bounds
        lens (it fixes the attention's partitions). In place: result[0] = the greedy tokens, result[1] = 1 where
        the row's logits are all finite (or the row is padding), ids = the tokens, lens += valid, on every
        stage. Returns the logits [B, vocab] in the model dtype (an earlier PP stage: its output hidden states).
        `keys` [B] are the request ids MoE routing hashes (default: zeros). `layer_collectives=False` leaves out
        the per-layer TP all-reduces (wrong results: only to time their share of the step).

        `pipelined=True` (PP micro-batches, see executor.py): the step is this stage's compute only, with no
        hand-off and no broadcast; a later stage reads its input from `hidden_in` [B, hidden], an earlier stage
        returns its output hidden states for the caller to pass on, and only the last stage knows the tokens
        (in `result`); every stage advances its own lengths."""
        ctx = self.ctx
        cos, sin = self.rope_tables(max_context)
        partial_ok = ctx.tp == 1
        reduce = ctx.all_reduce if layer_collectives else (lambda t: t)
        if ctx.is_first_stage:
            hidden = self.embed_tokens(ids)
        elif pipelined:
            hidden = hidden_in
        else:
            hidden = ctx.take_from_prev(torch.empty((ids.shape[0], self.arch.hidden_size), dtype=self.dtype,
                                                    device=ids.device))
        positions = lens - 1
        keys = torch.zeros_like(ids) if keys is None else keys
        delta = None
        for local, layer in enumerate(self.layers):
            attn, mlp = layer.attn, layer.mlp
            x = ops.add_rmsnorm(hidden, delta, layer.input_norm, self.eps)
            qkv = ops.linear(x, attn.w_qkv, "qkv")
            q = ops.rope_kv(qkv, lens, tables, cos, sin, cache.k[local], cache.v[local], attn.heads,
                            attn.kv_heads, attn.head_dim, attn.b_qkv, attn.q_norm, attn.k_norm, self.eps)
            out = ops.attention(q, cache.k[local], cache.v[local], tables, lens, max_context)
            delta = reduce(ops.linear(out.reshape(out.shape[0], -1), attn.w_o, "o", partial_ok))
            x = ops.add_rmsnorm(hidden, delta, layer.post_norm, self.eps)
            if isinstance(mlp, MoEBlock):
                delta = reduce(mlp.partial(x, keys, positions, valid, experts_fn=ops.moe_experts))
            else:
                delta = reduce(ops.linear(ops.gate_up(x, mlp.w_gate_up), mlp.w_down, "down", partial_ok))
        if not ctx.is_last_stage and pipelined:
            lens.add_(valid.to(lens.dtype))
            return _residual_add(hidden, delta)
        if not ctx.is_last_stage:
            ctx.hand_to_next(_residual_add(hidden, delta))
            # the last stage samples; every stage then advances its own copies of the tokens and lengths
            tokens = ctx.broadcast_from_last_stage(result.contiguous())
            result.copy_(tokens)
            ids.copy_(tokens[0])
            lens.add_(valid.to(lens.dtype))
            return hidden
        x = ops.add_rmsnorm(hidden, delta, self.final_norm, self.eps)
        logits = ctx.all_gather_last_dim(ops.linear(x, self.lm_head, "lm_head"))[:, : self.arch.vocab_size]
        ops.finish(logits, valid, result, ids, lens)
        if ctx.pp > 1 and not pipelined:
            ctx.broadcast_from_last_stage(result.contiguous())
        return logits

    @torch.inference_mode()
    def reference_logits(self, ids: torch.Tensor, key: int = 0) -> torch.Tensor:
        """Logits at every position of one sequence, with no KV cache (contiguous causal attention); `key` is
        the request id the MoE routing hash sees. Single rank only: the reference the paged, batched, chunked
        path is tested against."""
        if self.ctx.size != 1:
            raise ParallelError("reference_logits runs on a single rank")
        count = ids.shape[0]
        positions = torch.arange(count, device=self.device)
        meta = BatchMeta(positions=positions, slots=positions, keys=torch.full_like(positions, key),
                         sample_index=positions)
        hidden = self.embed_tokens(ids)
        for local, layer in enumerate(self.layers):
            hidden = layer(hidden, meta, None, local, self.inv_freq)
        return self.logits(hidden)


# ------------------------------------------------------------------------------------------------ fast-path ops


def _residual_add(residual: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
    """residual += delta as `add_rmsnorm` applies it (delta may be fp32 split-K partials [S, T, H])."""
    if delta is not None:
        residual.add_(delta.sum(0).to(residual.dtype) if delta.dim() == 3 else delta)
    return residual


class TorchFastOps:
    """The fast decode path's fused operations in plain torch: the reference `TritonOps` is tested against, and
    the path's implementation where triton is absent (CPU; CUDA graphs of plain torch ops on a GPU). Same
    signatures and the same rounding as TritonOps."""

    name = "torch"
    moe_experts = staticmethod(grouped_experts)

    def linear(self, x: torch.Tensor, w: torch.Tensor, site: str = "", partial_ok: bool = False,
               config=None) -> torch.Tensor:
        return F.linear(x, w)

    def gate_up(self, x: torch.Tensor, w_gate_up: torch.Tensor, site: str = "gate_up", config=None) -> torch.Tensor:
        gate, up = F.linear(x, w_gate_up).chunk(2, dim=-1)
        return F.silu(gate) * up

    def add_rmsnorm(self, residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                    eps: float) -> torch.Tensor:
        return rms_norm(_residual_add(residual, delta), weight, eps)

    def rope_kv(self, qkv: torch.Tensor, lens: torch.Tensor, tables: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, heads: int, kv_heads: int,
                head_dim: int, bias: torch.Tensor | None, q_norm: torch.Tensor | None,
                k_norm: torch.Tensor | None, eps: float) -> torch.Tensor:
        tokens = qkv.shape[0]
        block_size = k_pool.shape[1]
        positions = lens - 1
        blocks = tables.gather(1, (positions // block_size)[:, None])[:, 0].to(torch.int64)
        slots = blocks * block_size + positions % block_size
        if bias is not None:
            qkv = qkv + bias
        q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        q = q.reshape(tokens, heads, head_dim)
        k = k.reshape(tokens, kv_heads, head_dim)
        v = v.reshape(tokens, kv_heads, head_dim)
        if q_norm is not None:
            q = rms_norm(q, q_norm, eps)
            k = rms_norm(k, k_norm, eps)
        c, s = cos[positions][:, None, :], sin[positions][:, None, :]

        def rotate(x: torch.Tensor) -> torch.Tensor:
            x1, x2 = x.float().chunk(2, dim=-1)
            return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)

        q, k = rotate(q), rotate(k)
        k_pool.view(-1, kv_heads, head_dim).index_copy_(0, slots, k)
        v_pool.view(-1, kv_heads, head_dim).index_copy_(0, slots, v)
        return q

    def attention(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, tables: torch.Tensor,
                  lens: torch.Tensor, max_context: int, config=None) -> torch.Tensor:
        return paged_decode_attention(q, k_pool, v_pool, tables.to(torch.int64), lens)

    def finish(self, logits: torch.Tensor, valid: torch.Tensor, result: torch.Tensor, ids: torch.Tensor,
               lens: torch.Tensor) -> None:
        tokens = logits.argmax(dim=-1)
        result[0].copy_(tokens)
        result[1].copy_(torch.isfinite(logits.sum(dim=-1, dtype=torch.float32)) | ~valid)
        ids.copy_(tokens)
        lens.add_(valid.to(lens.dtype))
