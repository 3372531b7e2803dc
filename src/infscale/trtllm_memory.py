"""GPU memory as TensorRT-LLM accounts for it: the KV cache is a fraction of what is *free* after the weights and
the activation workspace, not a fraction of the whole device.

TensorRT-LLM (PyTorch flow) loads the weights, runs one forward pass of `max_num_tokens` tokens to find the peak
activation memory, and then gives the KV cache `kv_cache_free_gpu_mem_fraction` (trtllm-bench: 0.90) of the memory
still free; CUDA graphs and runtime buffers live in the rest. So per GPU:

    free    = HBM − weights − activation workspace(max_num_tokens) − runtime reserve
    KV pool = fraction · free                              (blocks of `tokens_per_block` tokens, default 32)

Weights and KV bytes per token are `infscale.memory`'s (the same shards; embeddings, LM head and norms 16-bit, as
ModelOpt's FP8 checkpoints keep them). The activation workspace is infscale's estimate of that forward pass's peak
(below); the runtime reserve (CUDA context, cuBLAS and NCCL workspaces) is an assumption, not a measurement.
"""

from __future__ import annotations

from dataclasses import dataclass

from infscale.catalog import Hardware, ModelArch
from infscale.layout import Layout
from infscale.memory import GIB, MemoryPlan, kv_bytes_per_token_per_gpu, weight_bytes_per_gpu

TRTLLM_FREE_FRACTION = 0.9      # trtllm-bench --kv_cache_free_gpu_mem_fraction default
TRTLLM_TOKENS_PER_BLOCK = 32    # TensorRT-LLM's tokens_per_block default
TRTLLM_MAX_BATCH_SIZE = 2048    # BuildConfig / trtllm-bench default max_batch_size
TRTLLM_MAX_NUM_TOKENS = 8192    # BuildConfig / trtllm-bench default max_num_tokens
RUNTIME_RESERVE_BYTES = GIB     # assumption: CUDA context + cuBLAS/NCCL workspaces per GPU
ACTIVATION_BYTES = 2
LOGIT_BYTES = 4                 # logits are computed in fp32


def activation_workspace_bytes(model: ModelArch, layout: Layout, max_num_tokens: int, max_batch_size: int) -> float:
    """Peak activations of one forward pass of `max_num_tokens` tokens on one GPU: the residual stream in and out,
    the qkv projection, the FFN's gate/up output and its activation (for MoE: every routed copy of a token), and
    the fp32 logits of up to `max_batch_size` sequences."""
    tp = layout.tp
    h = model.hidden_size
    heads = model.num_attention_heads // tp
    kv_heads = max(1, model.num_kv_heads // tp) if model.attention == "gqa" else heads
    qkv = (heads + 2 * kv_heads) * model.head_dim
    ffn = 3 * model.intermediate_size // tp if model.num_dense_layers else 0
    if model.is_moe:
        moe_tp = tp // layout.ep
        ffn = max(ffn, model.experts_per_token * (h + 3 * model.moe_intermediate_size // moe_tp))
    per_token = (2 * h + qkv + ffn) * ACTIVATION_BYTES
    sequences = min(max_num_tokens, max_batch_size)
    logits = sequences * -(-model.vocab_size // tp) * LOGIT_BYTES
    return max_num_tokens * per_token + logits


@dataclass(frozen=True)
class TrtllmMemoryPlan(MemoryPlan):
    """A replica's memory as TensorRT-LLM sizes it; `activation_reserve_bytes` is workspace + runtime reserve and
    `usable_bytes_per_gpu` the whole device."""

    free_fraction: float = TRTLLM_FREE_FRACTION
    workspace_bytes: float = 0.0

    def problem(self, context_tokens: int, model: str, layout: Layout) -> str | None:
        if self.kv_pool_bytes_per_gpu <= 0:
            need = self.weights_bytes_per_gpu + self.activation_reserve_bytes
            return (f"TensorRT-LLM: weights {self.weights_bytes_per_gpu / GIB:.1f} GiB/GPU + activation workspace "
                    f"{self.workspace_bytes / GIB:.1f} GiB + runtime {RUNTIME_RESERVE_BYTES / GIB:.1f} GiB = "
                    f"{need / GIB:.1f} GiB leave no free memory for the KV cache on the "
                    f"{self.usable_bytes_per_gpu / GIB:.1f} GiB GPU ({model} at {layout})")
        return super().problem(context_tokens, model, layout)


def plan_trtllm_memory(model: ModelArch, hardware: Hardware, layout: Layout, weight_dtype: str, kv_dtype: str,
                       free_fraction: float | None = None, tokens_per_block: int = TRTLLM_TOKENS_PER_BLOCK,
                       max_num_tokens: int = TRTLLM_MAX_NUM_TOKENS,
                       max_batch_size: int = TRTLLM_MAX_BATCH_SIZE) -> TrtllmMemoryPlan:
    """One replica's weights, workspace and KV blocks as TensorRT-LLM allocates them."""
    fraction = TRTLLM_FREE_FRACTION if free_fraction is None else free_fraction
    weights = weight_bytes_per_gpu(model, weight_dtype, layout.tp, layout.pp)
    workspace = activation_workspace_bytes(model, layout, max_num_tokens, max_batch_size)
    reserve = workspace + RUNTIME_RESERVE_BYTES
    free = hardware.hbm_bytes - weights - reserve
    pool = fraction * free
    per_token = kv_bytes_per_token_per_gpu(model, kv_dtype, layout.tp, layout.pp)
    blocks = int(max(pool, 0) // (per_token * tokens_per_block))
    return TrtllmMemoryPlan(weights, reserve, float(hardware.hbm_bytes), pool, per_token, tokens_per_block, blocks,
                            free_fraction=fraction, workspace_bytes=workspace)
