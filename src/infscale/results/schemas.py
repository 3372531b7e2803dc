"""Versioned Arrow schemas of infscale's result files.

A cell file holds one row: the cell's identity, its status, the summary metrics, and two nested lists — one
entry per request and one per scheduler sample (the time series). Readers that want only the summary select
the scalar columns, which Parquet reads without touching the nested ones.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "1.1"  # 1.1: GPU telemetry columns and the `telemetry` list (1.0 files read with them null)
STATUSES = ("ok", "infeasible", "failed", "cancelled", "pending")
# The merged table's status of a planned cell whose file is gone though measured, unreadable, or holds another
# cell (results/integrity.py); never written into a cell file.
FILE_PROBLEMS = ("missing", "damaged", "misnamed")
MERGED_STATUSES = ("ok", "infeasible", "failed", "pending", *FILE_PROBLEMS)   # in the order summaries list them

IDENTITY_FIELDS: list[pa.Field] = [
    pa.field("cell_id", pa.string(), nullable=False),
    pa.field("spec_hash", pa.string(), nullable=False),
    pa.field("model", pa.string()),
    pa.field("hardware", pa.string()),
    pa.field("backend", pa.string()),
    pa.field("weight_dtype", pa.string()),
    pa.field("kv_dtype", pa.string()),
    pa.field("layout", pa.string()),
    pa.field("dp", pa.int32()),
    pa.field("tp", pa.int32()),
    pa.field("pp", pa.int32()),
    pa.field("ep", pa.int32()),
    pa.field("gpus", pa.int32()),
    pa.field("nodes", pa.int32()),
    pa.field("workload", pa.string()),
    pa.field("isl", pa.string()),          # a length label: '1024', or 'LN6000s0.9c32768' for a distribution
    pa.field("osl", pa.string()),
    pa.field("isl_max", pa.int64()),
    pa.field("osl_max", pa.int64()),
    pa.field("requests", pa.int64()),
    pa.field("arrival", pa.string()),      # 'off', 'c256', 'r4'
    pa.field("max_num_seqs", pa.int64()),
    pa.field("max_num_tokens", pa.int64()),
    pa.field("kv_memory_fraction", pa.float64()),
    pa.field("kv_block_size", pa.int64()),
    pa.field("router", pa.string()),
    pa.field("seed", pa.int64()),
    pa.field("cell_json", pa.string()),
]

STATUS_FIELDS: list[pa.Field] = [
    pa.field("status", pa.string(), nullable=False),
    pa.field("reason", pa.string()),
    pa.field("predicted", pa.bool_()),     # True when the numbers come from a model (sim), not a measurement
    pa.field("proxy_layers", pa.int32()),  # layer-sliced proxy runs: layers actually run; null for full runs
    pa.field("started_at", pa.string()),
    pa.field("ended_at", pa.string()),
]

CAPACITY_FIELDS: list[pa.Field] = [
    pa.field("weights_gib_per_gpu", pa.float64()),
    pa.field("kv_bytes_per_token_per_gpu", pa.float64()),
    pa.field("kv_capacity_tokens", pa.int64()),   # per replica
    pa.field("max_concurrency", pa.int64()),      # whole layout, at isl_max + osl_max per sequence
]

_FLOAT_METRICS = [
    "duration_s", "output_tok_s", "output_tok_s_per_gpu", "total_tok_s", "requests_per_s",
    *(f"{m}_{s}" for m in ("ttft_ms", "tpot_ms", "e2e_s") for s in ("p50", "p90", "p99", "mean")),
    "mean_running_batch", "mean_kv_occupancy", "max_kv_occupancy", "prefill_time_share",
    "replica_kv_occupancy_cv", "energy_j", "energy_per_output_token_j", "mean_power_w",
    # NVML telemetry over the measured phase (telemetry.py): max of the GPUs, or mean over GPUs and samples
    "gpu_power_max_w", "gpu_sm_util_mean", "gpu_mem_util_mean", "gpu_sm_clock_mhz_mean", "gpu_mem_used_gib_max",
]
# engine_path: how the torch backend ran decode steps: cuda_graphs (fused kernels) or eager (per-op dispatch)
_STRING_METRICS = ["gpu_throttle_reasons", "telemetry_error", "gpu_name", "engine_path"]
# kv_pool_blocks: KV blocks a replica had (measured backends: the plan's, lowered to what the device held)
_INT_METRICS = ["output_tokens", "input_tokens", "preemptions", "max_running_batch", "kv_pool_blocks"]
METRIC_FIELDS: list[pa.Field] = (
    [pa.field(n, pa.float64()) for n in _FLOAT_METRICS]
    + [pa.field(n, pa.int64()) for n in _INT_METRICS]
    + [pa.field(n, pa.string()) for n in _STRING_METRICS]
)

REQUEST_STRUCT = pa.struct([
    pa.field("request", pa.int64()),
    pa.field("replica", pa.int32()),
    pa.field("isl", pa.int32()),
    pa.field("osl", pa.int32()),
    pa.field("arrival_s", pa.float64()),
    pa.field("first_token_s", pa.float64()),
    pa.field("finish_s", pa.float64()),
    pa.field("preemptions", pa.int32()),
])

SERIES_STRUCT = pa.struct([
    pa.field("replica", pa.int32()),
    pa.field("time_s", pa.float64()),
    pa.field("running", pa.int32()),
    pa.field("waiting", pa.int32()),
    pa.field("kv_occupancy", pa.float64()),
    pa.field("prefill_tokens", pa.int32()),
])

TELEMETRY_STRUCT = pa.struct([
    pa.field("gpu", pa.int32()),           # the cell's GPU (rank order), not the node's NVML index
    pa.field("time_s", pa.float64()),      # since the measured phase started
    pa.field("power_w", pa.float64()),
    pa.field("sm_util", pa.float64()),
    pa.field("mem_util", pa.float64()),
    pa.field("sm_clock_mhz", pa.float64()),
    pa.field("mem_used_gib", pa.float64()),
    pa.field("throttle", pa.int64()),      # NVML clock-event reason bitmask
])

SUMMARY_FIELDS = IDENTITY_FIELDS + STATUS_FIELDS + CAPACITY_FIELDS + METRIC_FIELDS
SUMMARY_SCHEMA = pa.schema(SUMMARY_FIELDS)
CELL_SCHEMA = pa.schema(SUMMARY_FIELDS + [
    pa.field("requests_detail", pa.list_(REQUEST_STRUCT)),
    pa.field("series", pa.list_(SERIES_STRUCT)),
    pa.field("telemetry", pa.list_(TELEMETRY_STRUCT)),
])
SUMMARY_COLUMNS = [f.name for f in SUMMARY_FIELDS]
