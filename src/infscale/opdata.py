"""Measured TensorRT-LLM operator latencies, read from the `aiconfigurator-core` package as data.

NVIDIA's AIConfigurator ships operator latencies measured inside TensorRT-LLM (its PyTorch flow) on each GPU as
Parquet tables under `aiconfigurator_core/systems/data/<system>/<operator>/<framework>/<version>/`. This module
reads the few tables the `trtllm` engine model needs (GEMM, context and generation attention, custom all-reduce,
NCCL, MoE, the MLA modules) — only the columns it uses, once per process — and interpolates them in the shape
dimensions. Nothing here calls AIConfigurator's estimators: the composition of an iteration is
`infscale.trtllm_model`'s own.

Interpolation is linear in each dimension (m, n, k of a GEMM; batch and sequence length of attention; message
size; MoE tokens): the kernels' cost is close to affine in each of them, and multilinear interpolation reproduces
affine and bilinear costs exactly. Past the largest measured value a latency grows in proportion (a GEMM of 2n
columns is two of n; attention over twice the batch is two launches' worth of work); below the smallest it stays
at the smallest (a launch does not get cheaper). Holes in a grid (shapes the collection skipped) are filled the
same way from their smaller neighbour before any lookup.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PACKAGE = "aiconfigurator-core"
PINNED_VERSION = "0.12.0"                  # constraints.txt pins the same
INSTALL_HINT = f"pip install '{PACKAGE}=={PINNED_VERSION}' (scripts/setup-venv.sh installs it)"
TRTLLM_TABLES = "1.3.0rc20"                # TensorRT-LLM version of the GEMM / attention / MoE / all-reduce tables
SYSTEMS = {"h100-sxm": "h100_sxm", "h200-sxm": "h200_sxm"}  # infscale hardware -> aiconfigurator system name
HEAD_DIMS = (64, 128, 192, 256)            # head sizes the attention tables measure
MS = 1e-3


class OperatorDataError(RuntimeError):
    """The measured operator tables are missing, or do not cover what was asked."""


def package_dir() -> Path:
    """Where `aiconfigurator_core` is installed; a clear error naming the install command when it is not."""
    try:
        module = importlib.import_module("aiconfigurator_core")
    except ImportError:
        raise OperatorDataError(
            f"the TensorRT-LLM engine model needs the measured operator tables of the '{PACKAGE}' package, "
            f"which is not installed: {INSTALL_HINT}") from None
    return Path(module.__file__).parent


def data_version() -> str:
    """What every trtllm-engine prediction names as its data source."""
    package_dir()
    return f"{PACKAGE}=={importlib.metadata.version(PACKAGE)} (TensorRT-LLM {TRTLLM_TABLES} tables)"


def system_name(hardware: str) -> str:
    if hardware not in SYSTEMS:
        raise OperatorDataError(f"no measured TensorRT-LLM operator tables for hardware '{hardware}'; "
                                f"the trtllm engine model covers {', '.join(SYSTEMS)}")
    return SYSTEMS[hardware]


# ---------------------------------------------------------------------------------------------- grids


@dataclass(frozen=True)
class Grid:
    """Latencies (seconds) on a rectilinear grid: `axes[i]` are the sorted measured values of dimension i."""

    axes: tuple[tuple[float, ...], ...]
    values: np.ndarray

    def __call__(self, *point: float) -> float:
        """Multilinear interpolation; proportional growth above the grid, the edge value below it."""
        corners: list[tuple[int, int, float]] = []
        scale = 1.0
        for axis, x in zip(self.axes, point):
            if x >= axis[-1]:
                if len(axis) > 1 and x > axis[-1]:
                    scale *= x / axis[-1]
                corners.append((len(axis) - 1, len(axis) - 1, 0.0))
            elif x <= axis[0]:
                corners.append((0, 0, 0.0))
            else:
                hi = bisect_right(axis, x)
                lo = hi - 1
                corners.append((lo, hi, (x - axis[lo]) / (axis[hi] - axis[lo])))
        return scale * _blend(self.values, corners)

    def along_last(self, *leading: float) -> tuple[np.ndarray, np.ndarray]:
        """The curve over the last dimension at fixed leading coordinates: (measured x values, latencies), for
        vectorised lookups with `np.interp` (plus proportional growth past the end, see `curve_at`)."""
        xs = np.asarray(self.axes[-1], dtype=np.float64)
        ys = np.array([self(*leading, x) for x in xs])
        return xs, ys


def _blend(values: np.ndarray, corners: list[tuple[int, int, float]]) -> float:
    if not corners:
        return float(values)
    lo, hi, weight = corners[0]
    low = _blend(values[lo], corners[1:])
    if weight == 0.0:
        return low
    return (1 - weight) * low + weight * _blend(values[hi], corners[1:])


def curve_at(xs: np.ndarray, ys: np.ndarray, query: np.ndarray) -> np.ndarray:
    """`np.interp` with proportional growth past the last point (the same rule as `Grid`)."""
    out = np.interp(query, xs, ys)
    beyond = query > xs[-1]
    if beyond.any():
        out[beyond] = ys[-1] * query[beyond] / xs[-1]
    return out


def build_grid(columns: dict[str, np.ndarray], dims: list[str], latency: str = "latency") -> Grid:
    """A grid over `dims` from table columns (latency in ms); holes filled from the smaller neighbour, in
    proportion to the coordinate, one dimension after the other (the first — batch, or GEMM rows — first: the
    cost is linear in it, where it is not in a prompt length)."""
    axes = [np.unique(columns[d]).astype(np.float64) for d in dims]
    values = np.full([len(a) for a in axes], np.nan)
    index = tuple(np.searchsorted(a, columns[d]) for a, d in zip(axes, dims))
    values[index] = np.asarray(columns[latency], dtype=np.float64) * MS
    for dim in range(len(dims)):
        _fill_forward(values, axes[dim], dim)
    if np.isnan(values).any():
        for dim in range(len(dims)):  # holes at the small end of an axis: take the next measured value
            _fill_backward(values, dim)
    return Grid(tuple(tuple(a.tolist()) for a in axes), values)


def _fill_forward(values: np.ndarray, axis: np.ndarray, dim: int) -> None:
    moved = np.moveaxis(values, dim, 0)
    for i in range(1, len(axis)):
        here, before = moved[i:i + 1], moved[i - 1:i]  # slices: views, also for a 1-d grid
        hole = np.isnan(here) & ~np.isnan(before)
        here[hole] = before[hole] * axis[i] / axis[i - 1]


def _fill_backward(values: np.ndarray, dim: int) -> None:
    moved = np.moveaxis(values, dim, 0)
    for i in range(moved.shape[0] - 2, -1, -1):
        here, after = moved[i:i + 1], moved[i + 1:i + 2]
        hole = np.isnan(here) & ~np.isnan(after)
        here[hole] = after[hole]


# ---------------------------------------------------------------------------------------------- tables


def _table_path(system: str, operator: str, framework: str, version: str, filename: str) -> Path:
    path = package_dir() / "systems" / "data" / system / operator / framework / version / filename
    if not path.exists():
        raise OperatorDataError(f"{PACKAGE} has no {operator}/{framework}/{version}/{filename} for {system} "
                                f"(expected {path})")
    return path


@functools.cache
def _read(path: Path, columns: tuple[str, ...]) -> dict[str, np.ndarray]:
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=list(columns))
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in columns}


def _select(columns: dict[str, np.ndarray], **equal: object) -> dict[str, np.ndarray]:
    mask = np.ones(len(next(iter(columns.values()))), dtype=bool)
    for name, value in equal.items():
        mask &= columns[name] == value
    return {name: column[mask] for name, column in columns.items()}


@functools.cache
def gemm_grid(system: str, dtype: str) -> Grid:
    """GEMM latency over (m, n, k); `dtype` ∈ bfloat16, fp8 (per-tensor scales), fp8_block (128-blocks)."""
    columns = _read(_table_path(system, "gemm", "trtllm", TRTLLM_TABLES, "gemm_perf.parquet"),
                    ("gemm_dtype", "m", "n", "k", "latency"))
    rows = _select(columns, gemm_dtype=dtype)
    if not len(rows["m"]):
        raise OperatorDataError(f"no {dtype} GEMM rows for {system}")
    return build_grid(rows, ["m", "n", "k"])


_ATTENTION_COLUMNS = ("num_heads", "num_key_value_heads", "head_dim", "window_size", "attn_dtype", "kv_cache_dtype",
                      "batch_size", "isl", "step", "latency")


@functools.cache
def _attention_rows(system: str, phase: str) -> dict[str, np.ndarray]:
    return _read(_table_path(system, "attention", "trtllm", TRTLLM_TABLES, f"{phase}_attention_perf.parquet"),
                 _ATTENTION_COLUMNS)


@functools.cache
def attention_heads(system: str, phase: str, head_dim: int, attn_dtype: str, kv_dtype: str
                    ) -> tuple[tuple[int, int], ...]:
    """The (heads, KV heads) per GPU measured for one head size and dtype pair (full attention only)."""
    rows = _select(_attention_rows(system, phase), head_dim=head_dim, window_size=0, attn_dtype=attn_dtype,
                   kv_cache_dtype=kv_dtype)
    return tuple(sorted({(int(h), int(k)) for h, k in zip(rows["num_heads"], rows["num_key_value_heads"])}))


@functools.cache
def attention_grid(system: str, phase: str, heads: int, kv_heads: int, head_dim: int, attn_dtype: str,
                   kv_dtype: str) -> Grid:
    """Context attention over (batch, prompt length) or generation attention over (batch, cached tokens)."""
    rows = _select(_attention_rows(system, phase), num_heads=heads, num_key_value_heads=kv_heads,
                   head_dim=head_dim, window_size=0, attn_dtype=attn_dtype, kv_cache_dtype=kv_dtype)
    if not len(rows["batch_size"]):
        raise OperatorDataError(f"no {phase} attention rows for {heads}/{kv_heads} heads of {head_dim} on {system}")
    return build_grid(rows, ["batch_size", "isl" if phase == "context" else "step"])


@functools.cache
def allreduce_grid(system: str, gpus: int) -> Grid:
    """TensorRT-LLM's custom all-reduce (bf16) over the message size in **elements** (the tables count bf16
    elements: their collection notes say so, and the large-message bus bandwidth is NVLink's only if read so)."""
    columns = _read(_table_path(system, "comm", "trtllm", TRTLLM_TABLES, "custom_allreduce_perf.parquet"),
                    ("allreduce_dtype", "num_gpus", "message_size", "latency"))
    rows = _select(columns, allreduce_dtype="bfloat16", num_gpus=gpus)
    if not len(rows["message_size"]):
        raise OperatorDataError(f"no custom all-reduce rows for {gpus} GPUs on {system}")
    return build_grid(rows, ["message_size"])


@functools.cache
def allreduce_gpu_counts(system: str) -> tuple[int, ...]:
    columns = _read(_table_path(system, "comm", "trtllm", TRTLLM_TABLES, "custom_allreduce_perf.parquet"),
                    ("allreduce_dtype", "num_gpus", "message_size", "latency"))
    return tuple(sorted({int(g) for g in columns["num_gpus"]}))


MOE_KERNELS = ("moe_torch_flow_cutlass", "moe_torch_flow")  # H100/H200 FP8 and BF16 run the CUTLASS MoE


@functools.cache
def _moe_rows(system: str) -> dict[str, np.ndarray]:
    return _read(_table_path(system, "moe", "trtllm", TRTLLM_TABLES, "moe_perf.parquet"),
                 ("moe_dtype", "kernel_source", "num_tokens", "hidden_size", "inter_size", "topk", "num_experts",
                  "moe_tp_size", "moe_ep_size", "distribution", "latency"))


@functools.cache
def moe_grid(system: str, dtype: str, hidden: int, inter: int, topk: int, experts: int, moe_tp: int, moe_ep: int,
             distribution: str) -> Grid | None:
    """The fused MoE layer (routed experts) over the tokens entering it; None when that shape was not measured."""
    for kernel in MOE_KERNELS:
        rows = _select(_moe_rows(system), moe_dtype=dtype, kernel_source=kernel, hidden_size=hidden,
                       inter_size=inter, topk=topk, num_experts=experts, moe_tp_size=moe_tp, moe_ep_size=moe_ep,
                       distribution=distribution)
        if len(rows["num_tokens"]):
            return build_grid(rows, ["num_tokens"])
    return None


@functools.cache
def mla_module_grid(system: str, phase: str, heads: int, kv_dtype: str, gemm_dtype: str) -> Grid | None:
    """DeepSeek's whole MLA attention block on one GPU (its projections and the attention kernel) over
    (batch, prompt length) for context or (batch, cached tokens) for generation; None when not measured."""
    path = _table_path(system, "mla", "trtllm", TRTLLM_TABLES, f"mla_{phase}_module_perf.parquet")
    columns = _read(path, ("num_heads", "kv_cache_dtype", "gemm_type", "batch_size", "isl", "step", "latency"))
    rows = _select(columns, num_heads=heads, kv_cache_dtype=kv_dtype, gemm_type=gemm_dtype)
    if not len(rows["batch_size"]):
        return None
    return build_grid(rows, ["batch_size", "isl" if phase == "context" else "step"])


@functools.cache
def nccl_version(system: str) -> str:
    """The NCCL version whose tables the package's system description names."""
    import yaml

    spec = yaml.safe_load((package_dir() / "systems" / f"{system}.yaml").read_text())
    return str(spec["misc"]["nccl_version"])


@functools.cache
def nccl_allreduce_grid(system: str, gpus: int) -> Grid | None:
    """NCCL's all-reduce (fp16) over the message size in elements; None when that GPU count was not measured."""
    path = _table_path(system, "comm", "nccl", nccl_version(system), "nccl_perf.parquet")
    columns = _read(path, ("op_name", "nccl_dtype", "num_gpus", "message_size", "latency"))
    rows = _select(columns, op_name="all_reduce", nccl_dtype="half", num_gpus=gpus)
    return build_grid(rows, ["message_size"]) if len(rows["message_size"]) else None
