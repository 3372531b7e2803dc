"""Memory arithmetic: weights and KV bytes per GPU, KV capacity per replica, maximum concurrency.

The formulas are those of reference/reasoning-inference.md §4.1 (vLLM's own capacity formula):
free = fraction × HBM − weights/GPU − activation reserve; KV bytes/token/GPU = 2·(L/PP)·n_kv·d·b / min(TP, n_kv)
for GQA, (kv_lora + rope)·(L/PP)·b for MLA (the latent is replicated across TP ranks). The activation reserve is
the hardware's assumption, or an engine's own where it is known (the torch engine's: torch_engine_reserve_bytes).
"""

from __future__ import annotations

from dataclasses import dataclass

from infscale.catalog import Hardware, ModelArch
from infscale.layout import Layout

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp8": 1}
GIB = 1024**3


def layers_per_stage(model: ModelArch, pp: int, num_layers: int | None = None) -> int:
    """Layers on the fullest pipeline stage (stages are as even as possible); `num_layers`: a proxy's slice."""
    return -(-(num_layers or model.num_layers) // pp)


def weight_bytes_per_gpu(model: ModelArch, weight_dtype: str, tp: int, pp: int,
                         num_layers: int | None = None) -> float:
    """Weights held by the fullest GPU. Linear layers take `weight_dtype`; embeddings and norms stay 16-bit.

    Each pipeline stage holds its layers; the first holds the embedding and the last the LM head (with pp=1 one
    GPU holds both). Every tensor is split over TP (vocab-parallel embedding and head; experts split over the TP
    group whether by TP or EP, so the per-GPU share is the same). `num_layers`: only that many layers (a proxy).
    """
    counts = model.param_counts()
    linear_bytes = DTYPE_BYTES[weight_dtype]
    moe_layers = model.num_moe_layers
    dense_layers = model.num_layers - moe_layers
    per_layer_avg = (
        dense_layers * counts.dense_ffn_per_layer
        + moe_layers * (model.num_experts * counts.expert_params + counts.shared_expert_params_per_layer
                        + counts.router_per_layer)
    ) / model.num_layers
    layer_bytes = (counts.attention_per_layer + per_layer_avg) * linear_bytes + counts.norms_per_layer * 2
    stage_layers = layers_per_stage(model, pp, num_layers)
    edge_bytes = (counts.embedding + counts.lm_head) * 2 if pp == 1 else max(counts.embedding, counts.lm_head) * 2
    return (stage_layers * layer_bytes + edge_bytes + counts.final_norm * 2) / tp


def kv_bytes_per_token_per_gpu(model: ModelArch, kv_dtype: str, tp: int, pp: int,
                               num_layers: int | None = None) -> float:
    """KV-cache bytes one token costs on one GPU of a replica (its stage's layers, its share of KV heads)."""
    kv_bytes = DTYPE_BYTES[kv_dtype]
    layers = layers_per_stage(model, pp, num_layers)
    if model.attention == "mla":
        return (model.kv_lora_rank + model.qk_rope_head_dim) * layers * kv_bytes
    heads_per_gpu = model.num_kv_heads / min(tp, model.num_kv_heads)
    return 2 * layers * heads_per_gpu * model.head_dim * kv_bytes


def kv_bytes_per_token(model: ModelArch, kv_dtype: str) -> float:
    """KV bytes of one token for the whole model (no sharding): the reference table's 'KV/token'."""
    return kv_bytes_per_token_per_gpu(model, kv_dtype, tp=1, pp=1)


@dataclass(frozen=True)
class ProxySlice:
    """A layer-sliced proxy run: what its `layers` of the model need per GPU, with the full model's KV tokens."""

    layers: int
    weights_bytes_per_gpu: float
    kv_bytes_per_token_per_gpu: float
    kv_pool_bytes_per_gpu: float   # the full model's KV token capacity at the slice's bytes per token


@dataclass(frozen=True)
class MemoryPlan:
    """What one replica of a layout can hold. For a proxy the numbers are the full model's (the capacity the
    proxy stands for); `proxy` holds what the slice itself needs."""

    weights_bytes_per_gpu: float
    activation_reserve_bytes: float
    usable_bytes_per_gpu: float
    kv_pool_bytes_per_gpu: float
    kv_bytes_per_token_per_gpu: float
    kv_block_size: int
    kv_blocks_per_replica: int
    proxy: ProxySlice | None = None

    @property
    def kv_tokens_per_replica(self) -> int:
        return self.kv_blocks_per_replica * self.kv_block_size

    @property
    def fits(self) -> bool:
        return self.kv_blocks_per_replica > 0

    def max_seqs(self, context_tokens: int, max_num_seqs: int) -> int:
        """Sequences of `context_tokens` tokens one replica can hold at once (block-granular), capped by the engine."""
        blocks_per_seq = -(-context_tokens // self.kv_block_size)
        return min(max_num_seqs, self.kv_blocks_per_replica // blocks_per_seq)

    def problem(self, context_tokens: int, model: str, layout: Layout) -> str | None:
        """Why no request of `context_tokens` can run, or None."""
        if self.kv_pool_bytes_per_gpu <= 0:
            need = (self.weights_bytes_per_gpu + self.activation_reserve_bytes) / GIB
            return (
                f"weights {self.weights_bytes_per_gpu / GIB:.1f} GiB/GPU + reserve "
                f"{self.activation_reserve_bytes / GIB:.1f} GiB exceed the usable "
                f"{self.usable_bytes_per_gpu / GIB:.1f} "
                f"GiB/GPU of {model} at {layout} (need {need:.1f} GiB)"
                + (f"; a {self.proxy.layers}-layer proxy mimics the full model's KV budget, which is none here"
                   if self.proxy else "")
            )
        if self.proxy is not None:
            need = self.proxy.weights_bytes_per_gpu + self.activation_reserve_bytes + self.proxy.kv_pool_bytes_per_gpu
            if need > self.usable_bytes_per_gpu:
                return (f"the {self.proxy.layers}-layer proxy needs {need / GIB:.1f} GiB/GPU (weights + reserve + "
                        f"the full model's KV tokens) of the usable {self.usable_bytes_per_gpu / GIB:.1f} GiB/GPU "
                        f"({model} at {layout})")
        if self.max_seqs(context_tokens, 1) == 0:
            return (
                f"KV pool of {self.kv_tokens_per_replica} tokens per replica cannot hold one sequence of "
                f"{context_tokens} tokens ({model} at {layout})"
            )
        return None


# The torch engine's (backends/torch) own reserve: what one packed iteration of its fused path holds at its peak
# (torch_engine_activation_bytes) times an allowance for the caching allocator's rounding and fragmentation, plus
# a fixed workspace for the decode CUDA graphs' pool, cuBLAS/Triton/NCCL workspaces and the RoPE tables.
TORCH_ACTIVATION_SLACK = 1.25
TORCH_WORKSPACE_BYTES = 2 * GIB


def torch_engine_activation_bytes(model: ModelArch, tp: int, ep: int, max_num_tokens: int, max_num_seqs: int,
                                  act_bytes: int = 2) -> float:
    """Peak transient bytes of one iteration of the torch engine's packed forward (model.packed_layers) on one
    GPU: at most max(max_num_tokens, max_num_seqs) tokens (the scheduler's budget; decodes always run), and the
    logits of at most max_num_seqs sampled rows. Per token, the larger of the attention phase (residual, pending
    delta, normed input, QKV, queries, attention output, the new delta) and the MLP phase (the same residual
    tensors plus the fused gate/up output and its SwiGLU; for MoE, per routed slot: the gathered input, gate/up,
    SwiGLU, expert output and its weighted copies, with every slot on every rank as MoEBlock.partial computes
    them). No [tokens × tokens] term: the flash-style prefill kernel keeps no score matrix."""
    tokens = max(max_num_tokens, max_num_seqs)
    hidden = model.hidden_size
    heads = model.num_attention_heads // tp
    kv_heads = -(-model.num_kv_heads // tp)  # sharded over min(tp, kv_heads) ranks, replicated beyond
    d = model.head_dim
    residual = 4 * hidden  # hidden, the pending delta, the normed input, the new delta
    attention = residual + (heads + 2 * kv_heads) * d + 2 * heads * d
    mlp, mlp_extra = 0, 0
    if not model.is_moe or model.first_dense_layers:
        mlp = residual + 3 * (model.intermediate_size // tp)
    if model.is_moe:
        inter = model.moe_intermediate_size // max(1, tp // ep)
        slots = model.experts_per_token
        mlp = max(mlp, residual + slots * (4 * hidden + 4 * inter))
        mlp_extra = model.num_experts * 4 * 3 + slots * 8 * 4  # fp32 router logits/probabilities, int64 indices
    per_token = max(attention, mlp) * act_bytes + mlp_extra
    vocab = model.vocab_size
    per_sample = vocab * (2 * act_bytes + 4 + 1) + -(-vocab // tp) * act_bytes  # shard, gathered, fp32, isfinite
    return float(tokens * per_token + min(max_num_seqs, tokens) * per_sample)


def torch_engine_reserve_bytes(model: ModelArch, tp: int, ep: int, max_num_tokens: int, max_num_seqs: int,
                               act_bytes: int = 2) -> float:
    """What the torch engine keeps free beside weights and the KV pool on each GPU; the planner (backend torch)
    and the engine's ranks size the KV pool with it, so a cell the planner calls feasible has room for its
    largest iteration."""
    peak = torch_engine_activation_bytes(model, tp, ep, max_num_tokens, max_num_seqs, act_bytes)
    return TORCH_ACTIVATION_SLACK * peak + TORCH_WORKSPACE_BYTES


def device_kv_budget_bytes(free_bytes: float, total_bytes: float, fraction: float, reserve_bytes: float) -> float:
    """The KV pool an engine rank can take on a device that has `free_bytes` of `total_bytes` free (weights
    loaded): the planner's fraction × memory − weights − reserve, with what the device holds now (weights, the
    CUDA context, anything else) in place of the planned weights."""
    return free_bytes - (1 - fraction) * total_bytes - reserve_bytes


def engine_reserve_bytes(engine: str | None, model: ModelArch, tp: int, ep: int, max_num_tokens: int,
                         max_num_seqs: int) -> float | None:
    """The activation reserve of the engine a campaign measures or predicts, where the engine's own is known (torch);
    None: the hardware's assumption (plan_memory's default)."""
    if engine == "torch":
        return torch_engine_reserve_bytes(model, tp, ep, max_num_tokens, max_num_seqs)
    return None


def plan_memory(
    model: ModelArch,
    hardware: Hardware,
    layout: Layout,
    weight_dtype: str,
    kv_dtype: str,
    kv_memory_fraction: float | None,
    kv_block_size: int,
    proxy_layers: int | None = None,
    activation_reserve_bytes: float | None = None,
) -> MemoryPlan:
    """The replica's memory. With `proxy_layers` the KV capacity in tokens is still the full model's (so the
    scheduler sees a full run's concurrency limit); `proxy` says what the slice needs to hold it.
    `activation_reserve_bytes`: an engine's own reserve (torch_engine_reserve_bytes for the torch backend);
    None: the hardware's assumed one."""
    fraction = hardware.default_kv_memory_fraction if kv_memory_fraction is None else kv_memory_fraction
    usable = fraction * hardware.hbm_bytes
    weights = weight_bytes_per_gpu(model, weight_dtype, layout.tp, layout.pp)
    reserve = hardware.efficiency.activation_reserve_bytes if activation_reserve_bytes is None \
        else activation_reserve_bytes
    pool = usable - weights - reserve
    per_token = kv_bytes_per_token_per_gpu(model, kv_dtype, layout.tp, layout.pp)
    blocks = int(max(pool, 0) // (per_token * kv_block_size))
    proxy = None
    if proxy_layers is not None:
        slice_per_token = kv_bytes_per_token_per_gpu(model, kv_dtype, layout.tp, layout.pp, proxy_layers)
        proxy = ProxySlice(proxy_layers, weight_bytes_per_gpu(model, weight_dtype, layout.tp, layout.pp, proxy_layers),
                           slice_per_token, blocks * kv_block_size * slice_per_token)
    return MemoryPlan(weights, reserve, usable, pool, per_token, kv_block_size, blocks, proxy)
