"""From request timelines and scheduler logs to the numbers a cell reports."""

from __future__ import annotations

import numpy as np

from infscale.serving.scheduler import Replica, RequestState

PERCENTILES = (50, 90, 99)
MAX_SERIES_POINTS = 2000  # per replica; longer logs are thinned evenly (first and last kept)


def summarize(state: RequestState, replicas: list[Replica], gpus: int) -> dict[str, float | int]:
    """Throughput, latency percentiles, batch and KV occupancy of one cell (time-weighted where it matters)."""
    if np.isnan(state.finish).any():
        raise ValueError(f"{int(np.isnan(state.finish).sum())} requests never finished")
    start = float(np.min(state.arrival))
    makespan = float(np.max(state.finish)) - start
    output_tokens = int(state.osl.sum())
    input_tokens = int(state.isl.sum())
    ttft = state.first_token - state.arrival
    e2e = state.finish - state.arrival
    decode_tokens = np.maximum(state.osl - 1, 1)
    tpot = np.where(state.osl > 1, (state.finish - state.first_token) / decode_tokens, np.nan)

    summary: dict[str, float | int] = {
        "duration_s": makespan,
        "output_tokens": output_tokens,
        "input_tokens": input_tokens,
        "output_tok_s": output_tokens / makespan,
        "output_tok_s_per_gpu": output_tokens / makespan / gpus,
        "total_tok_s": (output_tokens + input_tokens) / makespan,
        "requests_per_s": len(state.isl) / makespan,
        "preemptions": int(state.preemptions.sum()),
    }
    for name, values, scale in (("ttft_ms", ttft, 1e3), ("tpot_ms", tpot, 1e3), ("e2e_s", e2e, 1.0)):
        finite = values[np.isfinite(values)]
        for p in PERCENTILES:
            summary[f"{name}_p{p}"] = float(np.percentile(finite, p) * scale) if len(finite) else float("nan")
        summary[f"{name}_mean"] = float(finite.mean() * scale) if len(finite) else float("nan")

    running, kv, kv_peak, weight, prefill_time, busy = [], [], [], [], 0.0, 0.0
    for replica in replicas:
        log = replica.log
        durations = np.asarray(log.duration)
        running.append(np.asarray(log.running, dtype=np.float64))
        # KV grows during a decode span: average its start and end (weights the span's steps equally; later
        # steps last a little longer, so this reads slightly low for long spans)
        used = (np.asarray(log.kv_blocks_used, dtype=np.float64) + np.asarray(log.kv_blocks_end, dtype=np.float64)) / 2
        kv.append(used / max(replica.num_blocks, 1))
        kv_peak.append(max(log.kv_blocks_end, default=0) / max(replica.num_blocks, 1))
        weight.append(durations)
        prefill_time += replica.prefill_time
        busy += replica.busy_time
    weights = np.concatenate(weight) if weight else np.zeros(0)
    if weights.sum() > 0:
        summary["mean_running_batch"] = float(np.average(np.concatenate(running), weights=weights))
        summary["mean_kv_occupancy"] = float(np.average(np.concatenate(kv), weights=weights))
    else:
        summary["mean_running_batch"] = summary["mean_kv_occupancy"] = 0.0
    summary["max_running_batch"] = int(max((max(r.log.running, default=0) for r in replicas), default=0))
    summary["max_kv_occupancy"] = float(max(kv_peak, default=0.0))
    summary["prefill_time_share"] = prefill_time / busy if busy > 0 else 0.0
    occupancy = [float(np.average(k, weights=w)) if w.sum() > 0 else 0.0 for k, w in zip(kv, weight)]
    mean_occupancy = float(np.mean(occupancy)) if occupancy else 0.0
    summary["replica_kv_occupancy_cv"] = float(np.std(occupancy)) / mean_occupancy if mean_occupancy > 0 else 0.0
    return summary


def request_rows(state: RequestState) -> dict[str, np.ndarray]:
    """One row per request: lengths, replica, timeline (seconds from the cell's start), preemptions."""
    return {
        "request": np.arange(len(state.isl), dtype=np.int64),
        "replica": state.replica.astype(np.int32),
        "isl": state.isl.astype(np.int32),
        "osl": state.osl.astype(np.int32),
        "arrival_s": state.arrival,
        "first_token_s": state.first_token,
        "finish_s": state.finish,
        "preemptions": state.preemptions.astype(np.int32),
    }


def series_rows(replicas: list[Replica]) -> dict[str, np.ndarray]:
    """Running batch and KV occupancy over time, per replica, thinned to at most MAX_SERIES_POINTS each."""
    columns: dict[str, list[np.ndarray]] = {k: [] for k in
                                            ("replica", "time_s", "running", "waiting", "kv_occupancy",
                                             "prefill_tokens")}
    for replica in replicas:
        log = replica.log
        n = len(log.time)
        keep = np.unique(np.linspace(0, n - 1, min(n, MAX_SERIES_POINTS)).astype(np.int64)) if n else np.zeros(0, int)
        columns["replica"].append(np.full(len(keep), replica.index, dtype=np.int32))
        columns["time_s"].append(np.asarray(log.time)[keep])
        columns["running"].append(np.asarray(log.running, dtype=np.int32)[keep])
        columns["waiting"].append(np.asarray(log.waiting, dtype=np.int32)[keep])
        used = np.asarray(log.kv_blocks_used, dtype=np.float64)[keep]
        columns["kv_occupancy"].append(used / max(replica.num_blocks, 1))
        columns["prefill_tokens"].append(np.asarray(log.prefill_tokens, dtype=np.int32)[keep])
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in columns.items()}
