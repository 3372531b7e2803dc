"""The `trtllm` engine model: one TensorRT-LLM iteration composed from measured operator latencies.

An iteration of T tokens (decodes plus prompt chunks) on one replica of TP × PP GPUs runs, on its fullest
pipeline stage (L_s layers) and per micro-batch:

    per layer   qkv GEMM (T × (H/TP + 2·KV/TP)·d × h)   context attention of the prompt chunks
                o GEMM (T × h × H·d/TP)                   generation attention of the decodes (batch, context)
                all-reduce (T·h elements)                 FFN: gate/up GEMM (T × 2I/TP × h), down (T × h × I/TP)
                                                          or the fused MoE at T routed tokens (+ shared experts)
                all-reduce (T·h elements)
    per stage   LM head GEMM (sequences × V/TP × h, 16-bit) on the last stage; PP hand-off of T·h activations

Every latency comes from the `aiconfigurator-core` tables (`infscale.opdata`) at the layout's sharded shapes and
the cell's precision (bf16, fp8 per-tensor or fp8 block-scaled GEMMs; fp8 KV); DeepSeek's MLA block comes from the
MLA module tables. Interpolation is in the shape dimensions only. Not in the tables, and modelled from the catalog
as the `sim` roofline does: the PP hand-off (α + bytes/NVLink), all-reduces across nodes (TP > GPUs per node).
Not modelled: norms, RoPE and activation kernels outside the measured ops, sampling, host overheads.

`StagePart` lists make the composition inspectable: `step_parts` returns what one iteration is the sum of.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from infscale import opdata
from infscale.catalog import Hardware, ModelArch
from infscale.layout import Layout
from infscale.memory import layers_per_stage

TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "bfloat16", "fp8": "fp8"}
# the MoE tables' token distribution over experts (balanced, power_law_1.01, power_law_1.2): real routers are skewed
MOE_ROUTING = "power_law_1.01"
ACTIVATION_BYTES = 2   # activations travel in bf16


def cuda_graph_batch_sizes(max_batch_size: int) -> list[int]:
    """The decode batch sizes TensorRT-LLM's PyTorch flow captures as CUDA graphs with padding on (trtllm-bench
    turns padding on): 1, 2, 4, then multiples of 8 to 128, then powers of two up to `max_batch_size`."""
    sizes = [1, 2, 4] + [8 * i for i in range(1, 17)]
    power = 256
    while power <= max_batch_size:
        sizes.append(power)
        power *= 2
    return [s for s in sizes if s <= max_batch_size] or [max_batch_size]


def default_fp8_gemm(model: ModelArch) -> str:
    """The FP8 GEMM flavour of a model's FP8 checkpoint: the MoE families' own FP8 releases (DeepSeek-V3/R1,
    Qwen3-MoE …-FP8) are block-scaled (128×128); dense models' FP8 checkpoints (ModelOpt) scale per tensor."""
    return "fp8_block" if model.family in ("deepseek_v3", "qwen3_moe") else "fp8"


@dataclass(frozen=True)
class StagePart:
    """One term of an iteration's time: `count` calls of `name` at `seconds` each."""

    name: str
    count: float
    seconds: float

    @property
    def total(self) -> float:
        return self.count * self.seconds


class TrtllmStepModel:
    """Iteration times of one replica from the measured operator tables (seconds)."""

    def __init__(self, model: ModelArch, hardware: Hardware, layout: Layout, weight_dtype: str, kv_dtype: str,
                 fp8_gemm: str | None = None, moe_distribution: str | None = None, max_batch_size: int = 2048):
        self.model = model
        self.hardware = hardware
        self.layout = layout
        self.system = opdata.system_name(hardware.name)
        self.data_version = opdata.data_version()
        tp, pp = layout.tp, layout.pp
        self.tp, self.pp, self.ep = tp, pp, layout.ep
        self.stage_layers = layers_per_stage(model, pp)
        share = self.stage_layers / model.num_layers
        self.moe_layers = model.num_moe_layers * share
        self.dense_layers = (model.num_layers - model.num_moe_layers) * share
        self.gemm_dtype = TORCH_DTYPES[weight_dtype] if weight_dtype != "fp8" else (fp8_gemm or default_fp8_gemm(model))
        self.kv_dtype = TORCH_DTYPES[kv_dtype]
        self.moe_distribution = moe_distribution or MOE_ROUTING
        self.graph_sizes = cuda_graph_batch_sizes(max_batch_size)
        h = model.hidden_size
        self.heads = model.num_attention_heads // tp
        self.kv_heads = max(1, model.num_kv_heads // tp) if model.attention == "gqa" else self.heads
        d = model.head_dim
        # GEMM shapes (n, k) per layer on one GPU
        self.qkv = ((self.heads + 2 * self.kv_heads) * d, h)
        self.o_proj = (h, self.heads * d)
        self.gate_up = (2 * model.intermediate_size // tp, h)
        self.down = (h, model.intermediate_size // tp)
        self.lm_head = (-(-model.vocab_size // tp), h)
        self.shared_up = (2 * model.num_shared_experts * model.moe_intermediate_size // tp, h)
        self.shared_down = (h, model.num_shared_experts * model.moe_intermediate_size // tp)
        self.router = (model.num_experts, h)
        self.internode_tp = tp > hardware.gpus_per_node
        self.spans_nodes = layout.gpus_per_replica > hardware.gpus_per_node
        self._context_attention = self._attention("context") if model.attention == "gqa" else None
        self._generation_attention = self._attention("generation") if model.attention == "gqa" else None
        self._moe = self._moe_grid() if model.is_moe else None
        if model.attention == "mla":  # the module tables measure DeepSeek's block-scaled FP8 projections
            heads = model.num_attention_heads // tp
            module_gemm = "fp8_block" if self.gemm_dtype.startswith("fp8") else "bfloat16"
            self._mla_context = opdata.mla_module_grid(self.system, "context", heads, self.kv_dtype, module_gemm)
            self._mla_generation = opdata.mla_module_grid(self.system, "generation", heads, self.kv_dtype,
                                                         module_gemm)
            if self._mla_context is None or self._mla_generation is None:
                raise opdata.OperatorDataError(
                    f"no MLA module tables for {heads} heads per GPU ({model.name} at tp{tp}) on {self.system}")

    # ------------------------------------------------------------------------------------------ lookups

    def gemm(self, m: float, shape: tuple[int, int], dtype: str | None = None) -> float:
        if m <= 0 or shape[0] <= 0 or shape[1] <= 0:
            return 0.0
        return opdata.gemm_grid(self.system, dtype or self.gemm_dtype)(m, shape[0], shape[1])

    def allreduce(self, tokens: float) -> float:
        """One all-reduce of `tokens` hidden vectors over the TP group."""
        if self.tp == 1 or tokens <= 0:
            return 0.0
        elements = tokens * self.model.hidden_size
        if self.internode_tp:  # not in the tables: the catalog's inter-node α + ring transfer
            eff = self.hardware.efficiency
            return eff.internode_latency_s + 2 * (self.tp - 1) / self.tp * elements * ACTIVATION_BYTES \
                / self.hardware.internode_bandwidth
        return _allreduce_time(self.system, self.tp, elements)

    def _attention(self, phase: str) -> tuple[opdata.Grid, float]:
        """The attention grid for this layout's heads per GPU, and a factor for a head count not measured."""
        attn_dtype = "fp8" if phase == "context" and self.kv_dtype == "fp8" else "bfloat16"
        # a head size not measured takes the nearest measured one, scaled by the size (the work is linear in it)
        d = min(opdata.HEAD_DIMS, key=lambda size: abs(math.log(size / self.model.head_dim)))
        size_factor = self.model.head_dim / d
        measured = opdata.attention_heads(self.system, phase, d, attn_dtype, self.kv_dtype)
        if not measured:
            raise opdata.OperatorDataError(f"no {phase} attention tables for head_dim {d} on {self.system}")
        want = (self.heads, self.kv_heads)
        if want in measured:
            heads, kv = want
            factor = 1.0
        else:  # same grouping (heads per KV head) if measured, nearest head count; scale by the work
            ratio = self.heads / self.kv_heads
            same = [p for p in measured if p[0] / p[1] == ratio] or list(measured)
            heads, kv = min(same, key=lambda p: (abs(math.log(p[0] / self.heads)), abs(math.log(p[1] / self.kv_heads))))
            factor = self.heads / heads if phase == "context" else self.kv_heads / kv
        return opdata.attention_grid(self.system, phase, heads, kv, d, attn_dtype, self.kv_dtype), factor * size_factor

    def _moe_grid(self) -> opdata.Grid | None:
        model = self.model
        dtype = self.gemm_dtype
        return opdata.moe_grid(self.system, dtype, model.hidden_size, model.moe_intermediate_size,
                               model.experts_per_token, model.num_experts, self.tp // self.ep, self.ep,
                               self.moe_distribution)

    def moe(self, tokens: float) -> float:
        """The routed experts of one MoE layer for `tokens` tokens (every TP rank sees every token)."""
        if tokens <= 0:
            return 0.0
        if self._moe is not None:
            return self._moe(tokens)
        # shape not measured: the experts as GEMMs on this GPU, tokens spread evenly over the experts
        model = self.model
        local_experts = model.num_experts / self.ep
        moe_tp = self.tp // self.ep
        per_expert = tokens * model.experts_per_token / model.num_experts
        inter = model.moe_intermediate_size // moe_tp
        return local_experts * (self.gemm(max(per_expert, 1), (2 * inter, model.hidden_size))
                                + self.gemm(max(per_expert, 1), (model.hidden_size, inter)))

    def context_attention(self, chunks: np.ndarray, past: np.ndarray) -> float:
        """One layer's attention for prompt chunks of `chunks` tokens after `past` cached tokens each: the
        table's batch at the prompt length with the same causal work (c·(2p + c) = x²)."""
        if not len(chunks):
            return 0.0
        equivalent = np.sqrt(chunks * (2.0 * past + chunks))
        length = float(np.sqrt(np.mean(equivalent ** 2)))
        if self.model.attention == "mla":
            return self._mla_context(len(chunks), length)
        grid, factor = self._context_attention
        return factor * grid(len(chunks), length)

    def generation_attention(self, batch: float, mean_context: float) -> float:
        if batch <= 0:
            return 0.0
        if self.model.attention == "mla":
            return self._mla_generation(batch, mean_context)
        grid, factor = self._generation_attention
        return factor * grid(batch, mean_context)

    @functools.lru_cache(maxsize=None)  # noqa: B019 (one model per cell; keyed by token count)
    def token_parts(self, tokens: int, sequences: int) -> tuple[StagePart, ...]:
        """The parts of one stage that depend only on the tokens and sequences of a micro-batch."""
        parts = []
        if self.model.attention == "gqa":
            parts += [StagePart("qkv_gemm", self.stage_layers, self.gemm(tokens, self.qkv)),
                      StagePart("o_gemm", self.stage_layers, self.gemm(tokens, self.o_proj))]
        if self.dense_layers:
            parts += [StagePart("gate_up_gemm", self.dense_layers, self.gemm(tokens, self.gate_up)),
                      StagePart("down_gemm", self.dense_layers, self.gemm(tokens, self.down))]
        if self.moe_layers:
            parts += [StagePart("router_gemm", self.moe_layers, self.gemm(tokens, self.router, "bfloat16")),
                      StagePart("moe", self.moe_layers, self.moe(tokens))]
            if self.model.num_shared_experts:
                parts += [StagePart("shared_up_gemm", self.moe_layers, self.gemm(tokens, self.shared_up)),
                          StagePart("shared_down_gemm", self.moe_layers, self.gemm(tokens, self.shared_down))]
        parts.append(StagePart("allreduce", 2 * self.stage_layers, self.allreduce(tokens)))
        parts.append(StagePart("lm_head_gemm", 1, self.gemm(sequences, self.lm_head, "bfloat16")))
        if self.pp > 1:
            parts.append(StagePart("pp_handoff", 1, self.p2p(tokens)))
        return tuple(p for p in parts if p.seconds)

    def p2p(self, tokens: float) -> float:
        eff = self.hardware.efficiency
        latency = eff.internode_latency_s if self.spans_nodes else eff.p2p_latency_s
        bandwidth = self.hardware.internode_bandwidth if self.spans_nodes else self.hardware.nvlink_bandwidth
        return latency + tokens * self.model.hidden_size * ACTIVATION_BYTES / bandwidth

    def padded(self, decodes: int) -> int:
        """A pure-decode batch runs as the smallest captured CUDA graph that holds it."""
        for size in self.graph_sizes:
            if size >= decodes:
                return size
        return decodes

    # ------------------------------------------------------------------------------------------ iterations

    def microbatches(self, sequences: int) -> int:
        """TensorRT-LLM's PP executor keeps one micro-batch per stage in flight."""
        return max(1, min(self.pp, sequences))

    def step_parts(self, decode_context: np.ndarray, prefill_chunk: np.ndarray,
                   prefill_past: np.ndarray) -> list[StagePart]:
        """What one iteration's time is the sum of: every stage part × PP (stages of equal time, m micro-batches
        in flight), per micro-batch of the batch's share."""
        decodes, prefills = len(decode_context), len(prefill_chunk)
        sequences = decodes + prefills
        m = self.microbatches(sequences)
        tokens = decodes + int(prefill_chunk.sum())
        if not prefills:
            tokens = self.padded(decodes)
        per_mb_tokens = max(1, round(tokens / m))
        per_mb_sequences = max(1, round(sequences / m))
        parts = list(self.token_parts(per_mb_tokens, per_mb_sequences))
        if prefills:
            parts.append(StagePart("context_attention", self.stage_layers,
                                   self.context_attention(prefill_chunk[::m].astype(float),
                                                          prefill_past[::m].astype(float))))
        if decodes:
            parts.append(StagePart("generation_attention", self.stage_layers,
                                   self.generation_attention(decodes / m, float(decode_context.mean()))))
        factor = self.pp  # every micro-batch passes all PP stages; m in flight share them
        return [StagePart(p.name, p.count * factor, p.seconds) for p in parts]

    def batch_time(self, decode_context: np.ndarray, prefill_chunk: np.ndarray, prefill_past: np.ndarray) -> float:
        """One iteration: decodes at `decode_context` tokens each, prompt chunks with their cached past."""
        return sum(p.total for p in self.step_parts(decode_context, prefill_chunk, prefill_past))

    # the roofline StepModel's interface, for the planner's steady-state estimate (uniform batches)

    def iteration_time(self, sequences: int, tokens: float, kv_tokens_read: float, attention_pairs: float,
                       prefill: bool = False) -> float:
        """`prefill`: `sequences` fresh prompts of tokens/sequences each; else `sequences` decodes at the mean
        context kv_tokens_read/sequences."""
        sequences = max(1, int(sequences))
        if prefill:
            chunk = np.full(sequences, max(1, round(tokens / sequences)))
            return self.batch_time(np.zeros(0), chunk, np.zeros(sequences))
        return self.batch_time(np.full(sequences, kv_tokens_read / sequences), np.zeros(0), np.zeros(0))

    def decode_line(self, sequences: int, total_context: float) -> tuple[float, float]:
        """(first decode step, growth per further step) of a fixed batch, as the roofline model gives it."""
        first, second = self.decode_span(np.full(max(1, sequences), total_context / max(1, sequences)), 2)
        return float(first), float(second - first)

    def decode_span(self, context: np.ndarray, steps: int) -> np.ndarray:
        """Durations of `steps` decode iterations of a fixed batch whose contexts start at `context`."""
        decodes = len(context)
        m = self.microbatches(decodes)
        fixed = self.pp * sum(p.total for p in self.token_parts(max(1, round(self.padded(decodes) / m)),
                                                                 max(1, round(decodes / m))))
        means = float(context.mean()) + np.arange(steps, dtype=np.float64)
        attention = self._generation_curve(decodes / m, means)
        return fixed + self.pp * self.stage_layers * attention

    def _generation_curve(self, batch: float, contexts: np.ndarray) -> np.ndarray:
        xs, ys = self._curve(batch)
        return opdata.curve_at(xs, ys, contexts)

    @functools.lru_cache(maxsize=None)  # noqa: B019
    def _curve(self, batch: float) -> tuple[np.ndarray, np.ndarray]:
        if self.model.attention == "mla":
            return self._mla_generation.along_last(batch)
        grid, factor = self._generation_attention
        xs, ys = grid.along_last(batch)
        return xs, ys * factor


@functools.lru_cache(maxsize=None)
def _allreduce_time(system: str, gpus: int, elements: float) -> float:
    """TensorRT-LLM's AUTO all-reduce: the faster of its custom kernels and NCCL at this size (GPU counts not
    measured take the next measured one)."""
    counts = opdata.allreduce_gpu_counts(system)
    measured = next((c for c in counts if c >= gpus), counts[-1])
    best = opdata.allreduce_grid(system, measured)(elements)
    nccl = opdata.nccl_allreduce_grid(system, measured)
    return min(best, nccl(elements)) if nccl is not None else best


_MODELS: dict[tuple, TrtllmStepModel] = {}


def trtllm_step_model(model: ModelArch, hardware: Hardware, layout: Layout, weight_dtype: str, kv_dtype: str,
                      fp8_gemm: str | None = None, moe_distribution: str | None = None,
                      max_batch_size: int = 2048) -> TrtllmStepModel:
    """Cached per model, hardware, layout and precision (catalog entries hold dicts, so keyed by their names)."""
    moe_distribution = moe_distribution or MOE_ROUTING
    key = (model.name, model.source, hardware.name, hardware.efficiency, layout, weight_dtype, kv_dtype, fp8_gemm,
           moe_distribution, max_batch_size)
    if key not in _MODELS:
        _MODELS[key] = TrtllmStepModel(model, hardware, layout, weight_dtype, kv_dtype, fp8_gemm, moe_distribution,
                                       max_batch_size)
    return _MODELS[key]
