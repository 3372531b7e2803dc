"""`trtllm-bench` outputs → infscale's cell-summary metrics (schema columns of `infscale.results.schemas`).

Three files come out of a run (key lists: the TensorRT-LLM brief, section 2.7):
- `--report_json`: the run's summary (`engine`, `world_info`, `request_info`, `performance`, and optional
  `streaming_metrics`, `machine`, `decoding_stats`, `dataset`); `parse_report` / `load_report`.
- `--iteration_log`: one Python-literal dict per executor iteration (running batch, KV blocks);
  `parse_iteration_log` / `load_iteration_log`.
- `--request_json`: one record per request, process-local ns timestamps; `parse_request_records` /
  `load_request_records`.
DP replicas are separate trtllm-bench processes, one report each; `aggregate_replicas` makes one cell of them.

Percentiles: trtllm-bench takes nearest-rank percentiles, `sorted(v)[int(n*q)]`, without interpolation, whereas
infscale's own engines (serving/metrics.py) interpolate (numpy's default). The report's numbers are kept as they
are, and percentiles recomputed here from request records use trtllm's rule too, so a trtllm cell reads the same
whether it came from one report or from records.

Nothing here imports tensorrt_llm. Missing or ill-typed keys raise `ReportError`, never a zero or a default.
"""

from __future__ import annotations

import ast
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

QUANTILES = {"p50": 0.50, "p90": 0.90, "p99": 0.99}


class ReportError(ValueError):
    """A trtllm-bench output lacks what the parser needs; the message names the file and the key or line."""


# ------------------------------------------------------------------------------------------ shared pieces


@dataclass(frozen=True)
class Percentiles:
    """p50/p90/p99 and the mean of one latency, in the unit of its source (the report's `average` is the mean)."""

    p50: float
    p90: float
    p99: float
    mean: float

    @classmethod
    def of(cls, values: list[float]) -> Percentiles:
        """trtllm-bench's statistics of `values`: nearest-rank percentiles, `sorted(v)[int(n*q)]`, and the mean."""
        ordered = sorted(values)
        n = len(ordered)
        if n == 0:
            raise ValueError("no values")
        return cls(*(ordered[int(n * q)] for q in QUANTILES.values()), mean=sum(ordered) / n)

    def scaled(self, factor: float) -> Percentiles:
        return Percentiles(self.p50 * factor, self.p90 * factor, self.p99 * factor, self.mean * factor)


def _latency_columns(name: str, stats: Percentiles | None) -> dict[str, float | None]:
    """`name_p50/_p90/_p99/_mean`; None for every one when the run did not measure it (e.g. TTFT without streaming)."""
    return {
        f"{name}_p50": None if stats is None else stats.p50,
        f"{name}_p90": None if stats is None else stats.p90,
        f"{name}_p99": None if stats is None else stats.p99,
        f"{name}_mean": None if stats is None else stats.mean,
    }


def _type_ok(value: object, kind: str) -> bool:
    # bool is an int in Python: a True where a count belongs is a broken file, not 1
    if kind == "str":
        return isinstance(value, str)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind == "object":
        return isinstance(value, dict)
    raise AssertionError(kind)


_KIND_TEXT = {"str": "a string", "int": "an integer", "number": "a finite number", "object": "an object"}


# ------------------------------------------------------------------------------------------ --report_json


class _ReportReader:
    """Typed look-ups by dotted key path; every failure names the file, the path and the TensorRT-LLM version."""

    def __init__(self, data: dict, source: str) -> None:
        self.data = data
        self.source = source
        engine = data.get("engine")
        version = engine.get("version") if isinstance(engine, dict) else None
        self.version = version if isinstance(version, str) else None

    def error(self, path: str, problem: str) -> ReportError:
        return ReportError(f"{self.source}: {path} {problem} (TensorRT-LLM version {self.version or 'unknown'})")

    def get(self, path: str, kind: str, nullable: bool = False) -> object:
        """The value at `path` (required key); None only where `nullable` and the report has null."""
        node: object = self.data
        walked: list[str] = []
        for part in path.split("."):
            if not isinstance(node, dict):
                raise self.error(".".join(walked), f"is {type(node).__name__}, expected an object")
            if part not in node:
                raise self.error(path, "is missing")
            node = node[part]
            walked.append(part)
        if node is None and nullable:
            return None
        if not _type_ok(node, kind):
            raise self.error(path, f"is {node!r}, expected {_KIND_TEXT[kind]}" + (" or null" if nullable else ""))
        return float(node) if kind == "number" else node

    def block(self, name: str) -> dict | None:
        """An optional top-level block: None when absent or null, an error when it is something else."""
        value = self.data.get(name)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self.error(name, f"is {type(value).__name__}, expected an object or null")
        return value

    def percentiles(self, path: str) -> Percentiles:
        return Percentiles(*(self.get(f"{path}.{key}", "number") for key in ("p50", "p90", "p99", "average")))


@dataclass(frozen=True)
class TrtllmReport:
    """What infscale uses of one `--report_json` (one replica). `raw` keeps the whole file for anything else."""

    source: str
    model: str
    backend: str                      # "TRT" or "Pytorch" as the report writes it
    version: str | None               # engine.version; None when the report has none
    dtype: str | None
    kv_cache_dtype: str | None
    quantization: str | None
    tp_size: int
    pp_size: int
    ep_size: int | None               # null in reports without expert parallelism
    world_size: int
    max_batch_size: int
    max_num_tokens: int
    kv_cache_percentage: float        # a fraction of free GPU memory, e.g. 0.9
    num_requests: int
    avg_num_concurrent_requests: float
    avg_input_length: float
    avg_output_length: float
    total_latency_ms: float
    request_throughput_req_s: float
    system_output_throughput_tok_s: float
    system_total_throughput_tok_s: float
    output_throughput_per_gpu_tok_s: float
    request_latency_ms: Percentiles
    ttft_ms: Percentiles | None       # streaming_metrics only (throughput --streaming, or latency)
    tpot_ms: Percentiles | None
    machine: dict | None = None       # newer versions only
    decoding_stats: dict | None = None  # speculative decoding only
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def duration_s(self) -> float:
        """First request's start to the last request's end (warmup excluded)."""
        return self.total_latency_ms / 1e3

    @property
    def output_tokens(self) -> int:
        # the report has only averages: requests × average length, rounded to an integer (exact for fixed lengths,
        # within rounding of the printed average otherwise). Output counts include each request's first token.
        return round(self.num_requests * self.avg_output_length)

    @property
    def input_tokens(self) -> int:
        return round(self.num_requests * self.avg_input_length)

    def summary(self) -> dict[str, float | int | None]:
        """The report's numbers under the cell schema's metric names.

        - throughputs are the report's own (`system_*`, `output_throughput_per_gpu_tok_s` = system ÷ world_size);
        - e2e_s_* come from `request_latency_percentiles_ms` (ms → s), ttft_ms_*/tpot_ms_* from streaming_metrics
          (None without streaming, never 0); percentiles are trtllm's nearest-rank ones (see the module doc);
        - mean_running_batch is `avg_num_concurrent_requests` = Σ request latencies ÷ total latency: requests in
          flight, counted from submission, so requests waiting inside the executor count too. The iteration log's
          running batch (IterationStats.mean_running_batch) is the scheduler's own figure.
        """
        summary: dict[str, float | int | None] = {
            "duration_s": self.duration_s,
            "output_tokens": self.output_tokens,
            "input_tokens": self.input_tokens,
            "output_tok_s": self.system_output_throughput_tok_s,
            "output_tok_s_per_gpu": self.output_throughput_per_gpu_tok_s,
            "total_tok_s": self.system_total_throughput_tok_s,
            "requests_per_s": self.request_throughput_req_s,
            "mean_running_batch": self.avg_num_concurrent_requests,
        }
        summary.update(_latency_columns("ttft_ms", self.ttft_ms))
        summary.update(_latency_columns("tpot_ms", self.tpot_ms))
        summary.update(_latency_columns("e2e_s", self.request_latency_ms.scaled(1e-3)))
        return summary

    def engine_info(self) -> dict[str, object]:
        """Provenance: what ran. kv_cache_percentage is the cell's kv_memory_fraction as trtllm-bench applied it."""
        return {
            "model": self.model,
            "backend": self.backend,
            "version": self.version,
            "dtype": self.dtype,
            "kv_cache_dtype": self.kv_cache_dtype,
            "quantization": self.quantization,
            "tp": self.tp_size,
            "pp": self.pp_size,
            "ep": self.ep_size,
            "world_size": self.world_size,
            "max_batch_size": self.max_batch_size,
            "max_num_tokens": self.max_num_tokens,
            "kv_cache_percentage": self.kv_cache_percentage,
        }


def parse_report(data: dict, source: str) -> TrtllmReport:
    """The `--report_json` content of one trtllm-bench run (throughput or latency); `source` names it in errors.

    Required: engine.{model, backend}, world_info.{tp_size, pp_size, world_size, max_batch_size, max_num_tokens,
    kv_cache_percentage}, request_info.*, performance.{total_latency_ms, request_throughput_req_s,
    system_output_throughput_tok_s, system_total_throughput_tok_s, output_throughput_per_gpu_tok_s,
    request_latency_percentiles_ms.{p50, p90, p99, average}}. engine.{version, dtype, kv_cache_dtype,
    quantization} and world_info.ep_size must be present but may be null. Optional blocks: streaming_metrics
    (then ttft_percentiles and tpot_percentiles are required in it), machine, decoding_stats.
    world_info.issue_rate is ignored: it is not a meaningful rate.
    """
    if not isinstance(data, dict):
        raise ReportError(f"{source}: the report is {type(data).__name__}, expected a JSON object")
    r = _ReportReader(data, source)
    streaming = r.block("streaming_metrics")
    return TrtllmReport(
        source=source,
        model=r.get("engine.model", "str"),
        backend=r.get("engine.backend", "str"),
        version=r.get("engine.version", "str", nullable=True),
        dtype=r.get("engine.dtype", "str", nullable=True),
        kv_cache_dtype=r.get("engine.kv_cache_dtype", "str", nullable=True),
        quantization=r.get("engine.quantization", "str", nullable=True),
        tp_size=r.get("world_info.tp_size", "int"),
        pp_size=r.get("world_info.pp_size", "int"),
        ep_size=r.get("world_info.ep_size", "int", nullable=True),
        world_size=r.get("world_info.world_size", "int"),
        max_batch_size=r.get("world_info.max_batch_size", "int"),
        max_num_tokens=r.get("world_info.max_num_tokens", "int"),
        kv_cache_percentage=r.get("world_info.kv_cache_percentage", "number"),
        num_requests=r.get("request_info.num_requests", "int"),
        avg_num_concurrent_requests=r.get("request_info.avg_num_concurrent_requests", "number"),
        avg_input_length=r.get("request_info.avg_input_length", "number"),
        avg_output_length=r.get("request_info.avg_output_length", "number"),
        total_latency_ms=r.get("performance.total_latency_ms", "number"),
        request_throughput_req_s=r.get("performance.request_throughput_req_s", "number"),
        system_output_throughput_tok_s=r.get("performance.system_output_throughput_tok_s", "number"),
        system_total_throughput_tok_s=r.get("performance.system_total_throughput_tok_s", "number"),
        output_throughput_per_gpu_tok_s=r.get("performance.output_throughput_per_gpu_tok_s", "number"),
        request_latency_ms=r.percentiles("performance.request_latency_percentiles_ms"),
        ttft_ms=None if streaming is None else r.percentiles("streaming_metrics.ttft_percentiles"),
        tpot_ms=None if streaming is None else r.percentiles("streaming_metrics.tpot_percentiles"),
        machine=r.block("machine"),
        decoding_stats=r.block("decoding_stats"),
        raw=data,
    )


def load_report(path: str | Path) -> TrtllmReport:
    """`parse_report` of a `--report_json` file."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path}: not valid JSON ({exc})") from exc
    return parse_report(data, str(path))


# ------------------------------------------------------------------------------------------ --iteration_log

# Key layouts accepted, per line (the exact keys are to be confirmed on a real log; the brief names these):
# - nested, as the executor's IterationStats serialise: {'inflightBatchingStats': {'numScheduledRequests': …,
#   'numContextRequests': …, 'numGenRequests': …}, 'kvCacheStats': {'maxNumBlocks': …, 'freeNumBlocks': …,
#   'usedNumBlocks': …, 'tokensPerBlock': …}};
# - flat: the same camelCase keys at the top level of the line.
# A nested key, when present, wins over flat ones. Its value may be None (that iteration reported no such stats).
_BATCH_KEYS = ("numScheduledRequests", "numContextRequests", "numGenRequests")
_KV_KEYS = ("maxNumBlocks", "freeNumBlocks", "usedNumBlocks", "tokensPerBlock")


@dataclass(frozen=True)
class Iteration:
    """One executor iteration of the log; None where the line had no such stats."""

    line: int
    running: int | None            # requests scheduled this iteration: context + generation
    context: int | None
    generation: int | None
    kv_used_blocks: int | None
    kv_max_blocks: int | None
    kv_free_blocks: int | None
    tokens_per_block: int | None

    @property
    def kv_occupancy(self) -> float | None:
        return None if self.kv_used_blocks is None else self.kv_used_blocks / self.kv_max_blocks


@dataclass(frozen=True)
class IterationStats:
    """Per-iteration running batch and KV usage of one replica (the log of its rank 0).

    Averages are over iterations, not time-weighted as infscale's own engines weight them (the log's iteration
    durations are not a documented key); in steady decode iterations last about alike.
    """

    source: str
    iterations: list[Iteration]

    def _values(self, attr: str) -> list:
        return [getattr(it, attr) for it in self.iterations if getattr(it, attr) is not None]

    @property
    def mean_kv_occupancy(self) -> float | None:
        values = self._values("kv_occupancy")
        return sum(values) / len(values) if values else None

    @property
    def max_kv_occupancy(self) -> float | None:
        return max(self._values("kv_occupancy"), default=None)

    @property
    def mean_running_batch(self) -> float | None:
        values = self._values("running")
        return sum(values) / len(values) if values else None

    @property
    def max_running_batch(self) -> int | None:
        return max(self._values("running"), default=None)

    @property
    def kv_pool_blocks(self) -> int | None:
        """maxNumBlocks: the KV pool the replica had (constant over a run; the largest one seen)."""
        return max(self._values("kv_max_blocks"), default=None)

    def summary(self) -> dict[str, float | int | None]:
        """Schema columns the report lacks. mean_running_batch stays the report's (see TrtllmReport.summary)."""
        return {
            "mean_kv_occupancy": self.mean_kv_occupancy,
            "max_kv_occupancy": self.max_kv_occupancy,
            "max_running_batch": self.max_running_batch,
            "kv_pool_blocks": self.kv_pool_blocks,
        }


def _stats_block(record: dict, nested_key: str, flat_keys: tuple[str, ...], where: str) -> dict | None:
    """The nested block, or the flat keys present at the top level; None when the line has neither."""
    if nested_key in record:
        block = record[nested_key]
        if block is not None and not isinstance(block, dict):
            raise ReportError(f"{where}: {nested_key} is {type(block).__name__}, expected a dict or None")
        return block
    flat = {k: record[k] for k in flat_keys if k in record}
    return flat or None


def _int_field(block: dict, key: str, where: str, prefix: str, required: bool) -> int | None:
    if key not in block:
        if required:
            raise ReportError(f"{where}: {prefix}{key} is missing")
        return None
    value = block[key]
    if not _type_ok(value, "int") or value < 0:
        raise ReportError(f"{where}: {prefix}{key} is {value!r}, expected a non-negative integer")
    return value


def _parse_iteration(record: dict, line: int, where: str) -> Iteration:
    running = context = generation = None
    batch = _stats_block(record, "inflightBatchingStats", _BATCH_KEYS, where)
    if batch is not None:
        prefix = "inflightBatchingStats." if "inflightBatchingStats" in record else ""
        scheduled = _int_field(batch, "numScheduledRequests", where, prefix, required=False)
        context = _int_field(batch, "numContextRequests", where, prefix, required=False)
        generation = _int_field(batch, "numGenRequests", where, prefix, required=False)
        if scheduled is not None:
            running = scheduled
        elif context is not None and generation is not None:
            running = context + generation
        else:
            raise ReportError(f"{where}: {prefix or 'the line'} needs numScheduledRequests, or numContextRequests "
                              "and numGenRequests")
    used = max_blocks = free = per_block = None
    kv = _stats_block(record, "kvCacheStats", _KV_KEYS, where)
    if kv is not None:
        prefix = "kvCacheStats." if "kvCacheStats" in record else ""
        max_blocks = _int_field(kv, "maxNumBlocks", where, prefix, required=True)
        used = _int_field(kv, "usedNumBlocks", where, prefix, required=True)
        free = _int_field(kv, "freeNumBlocks", where, prefix, required=False)
        per_block = _int_field(kv, "tokensPerBlock", where, prefix, required=False)
        if max_blocks == 0 or used > max_blocks:
            raise ReportError(f"{where}: {prefix}usedNumBlocks={used} with maxNumBlocks={max_blocks}")
    if running is None and used is None:
        raise ReportError(f"{where}: no running-batch stats (inflightBatchingStats or {', '.join(_BATCH_KEYS)}) "
                          f"and no KV stats (kvCacheStats or {', '.join(_KV_KEYS)})")
    return Iteration(line=line, running=running, context=context, generation=generation,
                     kv_used_blocks=used, kv_max_blocks=max_blocks, kv_free_blocks=free, tokens_per_block=per_block)


def parse_iteration_log(text: str, source: str) -> IterationStats:
    """A `--iteration_log`: one Python-literal dict per line (single quotes, True/None), read with
    `ast.literal_eval` (never eval: the file is data). Blank lines are skipped, unknown keys ignored; a line that
    does not parse, is not a dict or carries neither batch nor KV stats raises ReportError naming `source:line`."""
    iterations = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{source}:{number}"
        try:
            record = ast.literal_eval(line.strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as exc:
            raise ReportError(f"{where}: not a Python literal ({type(exc).__name__}: {exc})") from exc
        if not isinstance(record, dict):
            raise ReportError(f"{where}: is {type(record).__name__}, expected a dict")
        iterations.append(_parse_iteration(record, number, where))
    if not iterations:
        raise ReportError(f"{source}: the iteration log has no records (empty; was the run stopped before its "
                          "first iteration, or --iteration_log not given?)")
    return IterationStats(source=source, iterations=iterations)


def load_iteration_log(path: str | Path) -> IterationStats:
    """`parse_iteration_log` of a file."""
    return parse_iteration_log(Path(path).read_text(), str(path))


# ------------------------------------------------------------------------------------------ --request_json


@dataclass(frozen=True)
class RequestRecord:
    """One request of `--request_json`. Timestamps are ns of the replica's own clock: compare within a replica."""

    start_ns: int
    first_token_ns: int
    end_ns: int
    input_tokens: int
    output_tokens: int   # num_total_output_tokens: includes the first token

    @property
    def e2e_s(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9

    @property
    def ttft_ms(self) -> float:
        return (self.first_token_ns - self.start_ns) / 1e6

    @property
    def tpot_ms(self) -> float | None:
        """(end − first token) ÷ (OSL − 1), as trtllm-bench defines it; None for one-token outputs."""
        if self.output_tokens < 2:
            return None
        return (self.end_ns - self.first_token_ns) / (self.output_tokens - 1) / 1e6


_RECORD_KEYS = {"start_timestamp": "start_ns", "first_token_timestamp": "first_token_ns",
                "end_timestamp": "end_ns", "num_input_tokens": "input_tokens",
                "num_total_output_tokens": "output_tokens"}


def parse_request_records(data: list, source: str) -> list[RequestRecord]:
    """The `--request_json` content: a list of RequestRecord dumps. Uses start/first_token/end_timestamp (ns),
    num_input_tokens and num_total_output_tokens (all integers, required); other keys are ignored."""
    if not isinstance(data, list):
        raise ReportError(f"{source}: request records are {type(data).__name__}, expected a list")
    records = []
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise ReportError(f"{source}: [{i}] is {type(item).__name__}, expected an object")
        values = {}
        for key, name in _RECORD_KEYS.items():
            if key not in item:
                raise ReportError(f"{source}: [{i}].{key} is missing")
            if not _type_ok(item[key], "int"):
                raise ReportError(f"{source}: [{i}].{key} is {item[key]!r}, expected an integer")
            values[name] = item[key]
        record = RequestRecord(**values)
        if not record.start_ns <= record.first_token_ns <= record.end_ns:
            raise ReportError(f"{source}: [{i}] timestamps out of order (start {record.start_ns}, first token "
                              f"{record.first_token_ns}, end {record.end_ns})")
        records.append(record)
    return records


def load_request_records(path: str | Path) -> list[RequestRecord]:
    """`parse_request_records` of a `--request_json` file."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path}: not valid JSON ({exc})") from exc
    return parse_request_records(data, str(path))


# ------------------------------------------------------------------------------------------ DP replicas


def _same_config(reports: list[TrtllmReport]) -> None:
    """DP replicas are copies of one engine; a mix means the wrong files were put together."""
    def key(r: TrtllmReport) -> tuple:
        return (r.model, r.backend, r.version, r.tp_size, r.pp_size, r.ep_size, r.world_size)
    for report in reports[1:]:
        if key(report) != key(reports[0]):
            raise ReportError(f"replicas differ: {reports[0].source} has {key(reports[0])}, {report.source} has "
                              f"{key(report)} (model, backend, version, tp, pp, ep, world_size)")


def aggregate_replicas(reports: list[TrtllmReport], records: list[list[RequestRecord]] | None = None,
                       gpus: int | None = None) -> dict[str, float | int | str | None]:
    """One cell's summary from its DP replicas: separate trtllm-bench processes on disjoint GPUs, started together.

    - duration_s = the longest replica's total latency (they start together; the union wall window);
    - output/input tokens and request counts are summed; throughputs = those sums ÷ duration_s;
      output_tok_s_per_gpu = output_tok_s ÷ Σ world_size (`gpus`, the cell's GPU count, must agree if given);
    - mean_running_batch = duration-weighted mean of the replicas' avg_num_concurrent_requests
      (Σ request latencies ÷ Σ replica durations), a per-replica figure like infscale's own;
    - latencies: percentiles of percentiles cannot be pooled exactly. With `records` (one list per replica, in
      the order of `reports`, each as long as its report's num_requests) they are recomputed over all requests
      with trtllm's nearest-rank rule: latency_from='request_records'. Without, each latency column is the
      largest value among the replicas (latency_from='worst_replica'), an upper bound of the pooled value: a
      mixture's quantile never exceeds its components' largest. TTFT/TPOT are None unless every replica streamed
      (without streaming a record's first-token time is not a first token).
    `latency_from` is not a schema column; drop it before writing a cell.
    """
    if not reports:
        raise ReportError("aggregate_replicas: no replica reports")
    _same_config(reports)
    duration = max(r.duration_s for r in reports)
    if duration <= 0:
        raise ReportError(f"replicas {[r.source for r in reports]}: total_latency_ms is 0")
    output_tokens = sum(r.output_tokens for r in reports)
    input_tokens = sum(r.input_tokens for r in reports)
    world = sum(r.world_size for r in reports)
    if gpus is not None and gpus != world:
        raise ReportError(f"the cell has {gpus} GPUs but its replica reports' world_size add up to {world} "
                          f"({[r.source for r in reports]})")
    total_duration = sum(r.duration_s for r in reports)
    summary: dict[str, float | int | str | None] = {
        "duration_s": duration,
        "output_tokens": output_tokens,
        "input_tokens": input_tokens,
        "output_tok_s": output_tokens / duration,
        "output_tok_s_per_gpu": output_tokens / duration / world,
        "total_tok_s": (output_tokens + input_tokens) / duration,
        "requests_per_s": sum(r.num_requests for r in reports) / duration,
        "mean_running_batch": sum(r.avg_num_concurrent_requests * r.duration_s for r in reports) / total_duration,
    }
    streamed = all(r.ttft_ms is not None for r in reports)
    if records is not None:
        if len(records) != len(reports):
            raise ReportError(f"{len(records)} request-record lists for {len(reports)} replica reports")
        for report, replica_records in zip(reports, records):
            if len(replica_records) != report.num_requests:
                raise ReportError(f"{report.source}: num_requests is {report.num_requests} but its request records "
                                  f"hold {len(replica_records)}")
        pooled = [rec for replica_records in records for rec in replica_records]
        e2e = Percentiles.of([rec.e2e_s for rec in pooled])
        ttft = tpot = None
        if streamed:
            ttft = Percentiles.of([rec.ttft_ms for rec in pooled])
            tpots = [rec.tpot_ms for rec in pooled if rec.tpot_ms is not None]
            tpot = Percentiles.of(tpots) if tpots else None
        latency_from = "request_records"
    else:
        e2e = _worst([r.request_latency_ms.scaled(1e-3) for r in reports])
        ttft = _worst([r.ttft_ms for r in reports]) if streamed else None
        tpot = _worst([r.tpot_ms for r in reports]) if streamed else None
        latency_from = "worst_replica"
    summary.update(_latency_columns("ttft_ms", ttft))
    summary.update(_latency_columns("tpot_ms", tpot))
    summary.update(_latency_columns("e2e_s", e2e))
    summary["latency_from"] = latency_from
    return summary


def _worst(stats: list[Percentiles]) -> Percentiles:
    """Each statistic's largest value over the replicas (the worst replica for that statistic)."""
    return Percentiles(p50=max(s.p50 for s in stats), p90=max(s.p90 for s in stats), p99=max(s.p99 for s in stats),
                       mean=max(s.mean for s in stats))
