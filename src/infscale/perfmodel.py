"""The analytical iteration-time model of one replica (docs/perfmodel.md has the equations and sources).

An iteration of `T` tokens (decodes plus prompt chunks) on a replica of TP × PP GPUs takes

    t_iter = PP · (t_stage(T/m) + t_p2p(T/m)) + t_0          with m = min(PP, sequences) micro-batches
                                                            (m = 1 for an engine that does not micro-batch)
    t_stage = max(W_bytes(T)/BW, F_gemm(T)/F) + max(KV_bytes/BW, F_attn/F) + t_allreduce(T) + t_alltoall(T)
              + L_moe · t_moe

where BW and F are the efficiency-scaled HBM bandwidth and dense throughput of the GPU, W_bytes counts the
stage's weights on one GPU (for MoE: only the experts the batch actually touches), KV_bytes the cached tokens
read, the collectives follow the α + size/bandwidth form, and t_moe is a fixed cost per MoE layer (routing and
grouped-GEMM dispatch; 0 unless a hardware profile measured it). Pure-decode iterations are linear in the total
context, so a run of decode steps is evaluated in closed form.
"""

from __future__ import annotations

from dataclasses import dataclass

from infscale.catalog import Efficiency, Hardware, ModelArch
from infscale.layout import Layout
from infscale.memory import DTYPE_BYTES, kv_bytes_per_token_per_gpu, layers_per_stage

ACTIVATION_BYTES = 2  # activations travel in bf16


@dataclass(frozen=True)
class StepModel:
    """Per-replica constants of the iteration-time model; all times in seconds."""

    pp: int
    tp: int
    ep: int
    hbm_bandwidth: float            # bytes/s, efficiency applied
    gemm_flops: float               # FLOP/s for the weight GEMMs (weight dtype), efficiency applied
    attention_flops: float          # FLOP/s for attention (bf16), efficiency applied
    dense_weight_bytes: float       # per GPU, the bottleneck stage, read every micro-batch
    expert_bytes: float             # one routed expert's share on one GPU
    moe_layers: float               # MoE layers on the bottleneck stage
    moe_layer_latency: float        # fixed cost per MoE layer per micro-batch
    num_experts: int
    experts_per_token: int
    gemm_flops_per_token: float     # per GPU, bottleneck stage, without the LM head
    head_flops_per_sequence: float  # per GPU: logits are computed for one position per sequence
    kv_bytes_per_token: float       # per GPU, bottleneck stage
    attention_flops_per_pair: float  # per GPU per (query token, cached token) pair, bottleneck stage
    allreduces_per_token_bytes: float  # bytes all-reduced per token per stage (sum over the stage's all-reduces)
    allreduces_per_stage: int
    allreduce_latency: float
    allreduce_bandwidth: float      # bus bandwidth
    alltoall_bytes_per_token: float
    alltoalls_per_stage: int
    alltoall_latency: float
    alltoall_bandwidth: float
    p2p_bytes_per_token: float
    p2p_latency: float
    p2p_bandwidth: float
    iteration_overhead: float
    pp_microbatches: int = 0        # 0: one micro-batch per stage; n: at most n (1: the stages in turn)
    prefill_microbatches: int = 0   # the same for iterations that carry prompt tokens

    # -------------------------------------------------------------------------------------------- parts

    def weight_bytes(self, tokens: float) -> float:
        if self.num_experts == 0:
            return self.dense_weight_bytes
        untouched = (1.0 - self.experts_per_token / self.num_experts) ** tokens
        touched = self.num_experts * (1.0 - untouched)
        return self.dense_weight_bytes + self.moe_layers * touched * self.expert_bytes

    def comm_time(self, tokens: float) -> float:
        time = 0.0
        if self.tp > 1 and self.allreduces_per_stage:
            size = tokens * self.allreduces_per_token_bytes / self.allreduces_per_stage
            per_call = self.allreduce_latency + 2 * (self.tp - 1) / self.tp * size / self.allreduce_bandwidth
            time += self.allreduces_per_stage * per_call
        if self.ep > 1 and self.alltoalls_per_stage:
            size = tokens * self.alltoall_bytes_per_token / self.alltoalls_per_stage
            per_call = self.alltoall_latency + (self.ep - 1) / self.ep * size / self.alltoall_bandwidth
            time += self.alltoalls_per_stage * per_call
        return time

    def stage_time(self, tokens: float, kv_tokens_read: float, attention_pairs: float,
                   sequences: float | None = None) -> float:
        sequences = tokens if sequences is None else sequences
        flops = tokens * self.gemm_flops_per_token + sequences * self.head_flops_per_sequence
        gemm = max(self.weight_bytes(tokens) / self.hbm_bandwidth, flops / self.gemm_flops)
        attention = max(kv_tokens_read * self.kv_bytes_per_token / self.hbm_bandwidth,
                        attention_pairs * self.attention_flops_per_pair / self.attention_flops)
        return gemm + attention + self.comm_time(tokens) + self.moe_layers * self.moe_layer_latency

    def p2p_time(self, tokens: float) -> float:
        if self.pp == 1:
            return 0.0
        return self.p2p_latency + tokens * self.p2p_bytes_per_token / self.p2p_bandwidth

    # -------------------------------------------------------------------------------------------- iterations

    def microbatches(self, sequences: float, prefill: bool = False) -> int:
        most = (self.prefill_microbatches if prefill else self.pp_microbatches) or self.pp
        return int(max(1, min(most, sequences)))

    def iteration_time(self, sequences: int, tokens: float, kv_tokens_read: float, attention_pairs: float,
                       prefill: bool = False) -> float:
        """One iteration; `prefill`: it carries prompt tokens (split by `prefill_microbatches`)."""
        microbatches = self.microbatches(sequences, prefill)
        per_mb = self.stage_time(tokens / microbatches, kv_tokens_read / microbatches, attention_pairs / microbatches,
                                 sequences / microbatches)
        return self.pp * (per_mb + self.p2p_time(tokens / microbatches)) + self.iteration_overhead

    def decode_line(self, sequences: int, total_context: float) -> tuple[float, float]:
        """(time of the first decode step, increase per further step) for a fixed batch of `sequences`."""
        first = self.iteration_time(sequences, sequences, total_context, total_context)
        microbatches = self.microbatches(sequences)
        per_token_of_context = max(self.kv_bytes_per_token / self.hbm_bandwidth,
                                   self.attention_flops_per_pair / self.attention_flops)
        # each step adds `sequences` tokens of context, split over the micro-batches, on each of pp stages
        slope = self.pp * (sequences / microbatches) * per_token_of_context
        return first, slope


def build_step_model(model: ModelArch, hardware: Hardware, layout: Layout, weight_dtype: str, kv_dtype: str,
                     efficiency: Efficiency | None = None, pp_microbatches: int | None = None) -> StepModel:
    """`pp_microbatches`: the cell's own engine setting, over the efficiency's (None: the efficiency's) for
    decode steps; iterations with prompt tokens take the fewer of the two: an engine pipelines prefill no further
    than its own schedule does (the torch engine, 1 in its profiles, runs prefill in turn when it pipelines decode)."""
    eff = efficiency or hardware.efficiency
    counts = model.param_counts()
    tp, pp, ep = layout.tp, layout.pp, layout.ep
    wbytes = DTYPE_BYTES[weight_dtype]
    stage_layers = layers_per_stage(model, pp)
    share = stage_layers / model.num_layers              # fraction of the model's layers on the fullest stage
    moe_layers = model.num_moe_layers * share
    dense_layers = (model.num_layers - model.num_moe_layers) * share
    head_params = counts.lm_head if counts.lm_head else counts.embedding  # tied head reads the embedding
    per_moe_layer_fixed = counts.shared_expert_params_per_layer + counts.router_per_layer

    layer_params = (stage_layers * counts.attention_per_layer + dense_layers * counts.dense_ffn_per_layer
                    + moe_layers * per_moe_layer_fixed)
    # the LM head stays 16-bit (as in the memory model) and is on the last stage, the bottleneck one
    dense_weight_bytes = (layer_params * wbytes + head_params * 2 + stage_layers * counts.norms_per_layer * 2) / tp
    expert_bytes = counts.expert_params * wbytes / tp
    active_params = layer_params + moe_layers * model.experts_per_token * counts.expert_params
    gemm_flops_per_token = 2 * active_params / tp

    if model.attention == "mla":
        # absorbed MLA decode: scores over (kv_lora + rope) dims, values over kv_lora dims, per head
        per_head = model.kv_lora_rank * 2 + model.qk_rope_head_dim
    else:
        per_head = 2 * model.head_dim
    attention_flops_per_pair = 2 * per_head * (model.num_attention_heads / tp) * stage_layers

    spans_nodes = layout.gpus_per_replica > hardware.gpus_per_node
    tp_crosses_nodes = tp > hardware.gpus_per_node
    allreduces = 2 * stage_layers if tp > 1 else 0
    alltoalls = 0
    if ep > 1:
        allreduces = 2 * stage_layers - round(moe_layers)  # MoE layers combine through all-to-all instead
        alltoalls = 2 * round(moe_layers)
    hidden_bytes = model.hidden_size * ACTIVATION_BYTES
    return StepModel(
        pp=pp, tp=tp, ep=ep,
        hbm_bandwidth=hardware.hbm_bandwidth * eff.hbm_bandwidth,
        gemm_flops=hardware.dense_tflops[weight_dtype] * 1e12 * eff.matmul,
        attention_flops=hardware.dense_tflops["bf16"] * 1e12 * eff.matmul,
        dense_weight_bytes=dense_weight_bytes,
        expert_bytes=expert_bytes,
        moe_layers=moe_layers,
        moe_layer_latency=eff.moe_layer_latency_s,
        num_experts=model.num_experts,
        experts_per_token=model.experts_per_token,
        gemm_flops_per_token=gemm_flops_per_token,
        head_flops_per_sequence=2 * head_params / tp,
        kv_bytes_per_token=kv_bytes_per_token_per_gpu(model, kv_dtype, tp, pp),
        attention_flops_per_pair=attention_flops_per_pair,
        allreduces_per_token_bytes=allreduces * hidden_bytes,
        allreduces_per_stage=allreduces,
        allreduce_latency=eff.internode_latency_s if tp_crosses_nodes else eff.allreduce_latency_s,
        allreduce_bandwidth=hardware.internode_bandwidth if tp_crosses_nodes else eff.allreduce_bus_bandwidth,
        alltoall_bytes_per_token=alltoalls * hidden_bytes * max(model.experts_per_token, 1),
        alltoalls_per_stage=alltoalls,
        alltoall_latency=eff.internode_latency_s if tp_crosses_nodes else eff.allreduce_latency_s,
        alltoall_bandwidth=hardware.internode_bandwidth if tp_crosses_nodes else eff.allreduce_bus_bandwidth,
        p2p_bytes_per_token=hidden_bytes,
        p2p_latency=eff.internode_latency_s if spans_nodes else eff.p2p_latency_s,
        p2p_bandwidth=hardware.internode_bandwidth if spans_nodes else hardware.nvlink_bandwidth,
        iteration_overhead=eff.iteration_overhead_s,
        pp_microbatches=eff.pp_microbatches if pp_microbatches is None else pp_microbatches,
        prefill_microbatches=_fewer_microbatches(eff.pp_microbatches, pp_microbatches, pp),
    )


def _fewer_microbatches(engine: int, cell: int | None, pp: int) -> int:
    """The smaller of two micro-batch caps, where 0 means one per stage (pp); None: the engine's alone."""
    if cell is None:
        return engine
    return min(engine or pp, cell or pp)
