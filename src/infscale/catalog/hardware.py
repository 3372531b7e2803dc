"""GPU hardware facts and the efficiency parameters of the analytical performance model.

The data lives in ``data/hardware.yaml``; every numeric field there has an entry in ``sources``
(a URL, a section of reference/reasoning-inference.md, or "assumption: ...").
"""

from __future__ import annotations

import functools

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from infscale.catalog.models import CatalogError, _data_text, _unknown
from infscale.yamlfile import parse_yaml


class Efficiency(BaseModel):
    """Fractions of peak and fixed costs that turn hardware peaks into predicted times."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Fraction of peak HBM bandwidth that decode kernels reach (weight and KV reads).
    hbm_bandwidth: float = Field(gt=0, le=1)
    # Fraction of dense peak FLOP/s that GEMMs reach; decode-sized GEMMs are well below large-GEMM numbers.
    matmul: float = Field(gt=0, le=1)
    # Fixed latency of one all-reduce within a node, seconds.
    allreduce_latency_s: float = Field(ge=0)
    # NCCL "bus bandwidth" of an intra-node all-reduce, bytes/s (T = alpha + 2(t-1)/t * S / busbw).
    allreduce_bus_bandwidth: float = Field(gt=0)
    # Fixed latency of one collective across nodes, seconds.
    internode_latency_s: float = Field(ge=0)
    # Fixed latency of a pipeline-stage hand-off (send/recv of activations), seconds.
    p2p_latency_s: float = Field(ge=0)
    # Fixed cost of one engine iteration (scheduling, sampling, launch), seconds.
    iteration_overhead_s: float = Field(ge=0)
    # Fixed cost of one MoE layer per iteration beyond reading its experts (router, top-k, sorting the routed
    # slots, the grouped-GEMM launches), seconds. 0 unless a profile measured it (the MoE block benchmark).
    moe_layer_latency_s: float = Field(default=0.0, ge=0)
    # Micro-batches a PP engine splits an iteration's batch into: 0 = one per stage, so the stages work at once
    # (TensorRT-LLM, vLLM); 1 = the whole batch goes through the stages in turn (the torch engine).
    pp_microbatches: int = Field(default=0, ge=0)
    # Device memory per GPU kept for activations and workspace, outside weights and KV cache, bytes.
    activation_reserve_bytes: int = Field(ge=0)


class Hardware(BaseModel):
    """One GPU type as deployed in an 8-GPU node."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str  # "h100-sxm", "h200-sxm"
    description: str
    hbm_bytes: int = Field(gt=0)  # device memory as reported by the driver
    hbm_bandwidth: float = Field(gt=0)  # bytes/s, peak
    dense_tflops: dict[str, float]  # dtype -> dense TFLOP/s (no sparsity)
    gpus_per_node: int = Field(gt=0)
    nvlink_bandwidth: float = Field(gt=0)  # bytes/s per GPU per direction
    internode_bandwidth: float = Field(gt=0)  # bytes/s per GPU (its own NIC)
    tdp_w: float = Field(gt=0)
    default_kv_memory_fraction: float = Field(0.9, gt=0, le=1)  # share of HBM the engine may fill (vLLM default)
    efficiency: Efficiency
    sources: dict[str, str]  # field name (efficiency fields as "efficiency.<field>") -> source

    @model_validator(mode="after")
    def _every_number_has_a_source(self) -> Hardware:
        missing = [f for f in self.numeric_fields() if f not in self.sources]
        if missing:
            raise ValueError(f"{self.name}: no sources entry for {', '.join(missing)}")
        return self

    @classmethod
    def numeric_fields(cls) -> list[str]:
        """Names that need a sources entry: numeric Hardware fields, then "efficiency.<field>"."""
        own = [name for name, f in cls.model_fields.items()
               if name not in ("name", "description", "efficiency", "sources")]
        return own + [f"efficiency.{name}" for name in Efficiency.model_fields]

    def flops(self, dtype: str = "bf16") -> float:
        """Dense peak FLOP/s for a dtype."""
        if dtype not in self.dense_tflops:
            raise CatalogError(f"{self.name}: no dense_tflops for dtype {dtype!r}; known: "
                               f"{', '.join(sorted(self.dense_tflops))}")
        return self.dense_tflops[dtype] * 1e12


@functools.cache
def _load_hardware() -> dict[str, Hardware]:
    data = parse_yaml(_data_text("hardware.yaml"), "hardware.yaml")
    hardware: dict[str, Hardware] = {}
    for name, fields in data["hardware"].items():
        try:
            hardware[name] = Hardware(name=name, **fields)
        except ValidationError as exc:
            raise CatalogError(f"hardware.yaml: entry {name!r} is invalid: {exc}") from exc
    return hardware


def load_hardware() -> dict[str, Hardware]:
    """All catalog GPUs by name. The result is a fresh dict; the entries are frozen."""
    return dict(_load_hardware())


def get_hardware(name: str) -> Hardware:
    hardware = _load_hardware()
    key = name.strip().lower()
    if key not in hardware:
        raise _unknown("hardware", name, list(hardware))
    return hardware[key]
