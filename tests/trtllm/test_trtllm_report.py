"""trtllm-bench outputs → cell metrics, on hand-written fixtures (tests/data/trtllm/README.md says how they were made).

Expected numbers are the fixtures' values converted by hand (ms → s, requests × average length); the DP cases
are worked out in the comments from the per-request timelines of dp_replica{0,1}_requests.json.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from infscale.backends.trtllm.report import (
    Percentiles,
    ReportError,
    aggregate_replicas,
    load_iteration_log,
    load_report,
    load_request_records,
    parse_iteration_log,
    parse_report,
    parse_request_records,
)
from infscale.results.schemas import _FLOAT_METRICS, _INT_METRICS

DATA = Path(__file__).parent.parent / "data" / "trtllm"
TP4 = DATA / "report_pytorch_tp4_streaming.json"
TRT = DATA / "report_trt_tp2_nostream.json"
LATENCY = DATA / "report_latency_pytorch.json"


def _load(name: str) -> dict:
    return json.loads((DATA / name).read_text())


def _assert_summary(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected)
    for key, value in expected.items():
        if value is None:
            assert actual[key] is None, key
        elif isinstance(value, int):
            assert actual[key] == value and isinstance(actual[key], int), key
        else:
            assert actual[key] == pytest.approx(value, rel=1e-12), key


# ------------------------------------------------------------------------------------------ --report_json


def test_throughput_streaming_pytorch_tp4_every_field():
    report = load_report(TP4)
    _assert_summary(report.summary(), {
        "duration_s": 262.144,                   # total_latency_ms 262144.0
        "output_tokens": 512 * 4096,             # num_requests × avg_output_length
        "input_tokens": 512 * 1024,
        "output_tok_s": 8000.0,
        "output_tok_s_per_gpu": 2000.0,
        "total_tok_s": 10000.0,
        "requests_per_s": 1.953125,
        "mean_running_batch": 247.3,
        "ttft_ms_p50": 640.25, "ttft_ms_p90": 1500.5, "ttft_ms_p99": 2406.75, "ttft_ms_mean": 812.5,
        "tpot_ms_p50": 30.75, "tpot_ms_p90": 32.5, "tpot_ms_p99": 34.125, "tpot_ms_mean": 30.72,
        "e2e_s_p50": 125.0, "e2e_s_p90": 131.50025, "e2e_s_p99": 140.2505, "e2e_s_mean": 126.6176,
    })
    assert report.engine_info() == {
        "model": "meta-llama/Llama-3.1-70B-Instruct", "backend": "Pytorch", "version": "1.2.1", "dtype": "bfloat16",
        "kv_cache_dtype": "fp8", "quantization": "FP8", "tp": 4, "pp": 1, "ep": None, "world_size": 4,
        "max_batch_size": 256, "max_num_tokens": 8192, "kv_cache_percentage": 0.9,
    }
    assert report.machine == {"name": "NVIDIA H100 80GB HBM3", "memory.total": 79.65, "clocks.mem": 2619}
    assert report.decoding_stats is None
    assert report.source == str(TP4)


def test_throughput_trt_without_streaming_has_no_ttft_tpot():
    report = load_report(TRT)
    _assert_summary(report.summary(), {
        "duration_s": 40.0,
        "output_tokens": 307037,                 # 300 × 1023.4567 = 307037.01, rounded
        "input_tokens": 38400,
        "output_tok_s": 7675.9253,
        "output_tok_s_per_gpu": 3837.9626,
        "total_tok_s": 8635.9253,
        "requests_per_s": 7.5,
        "mean_running_batch": 187.25,
        "ttft_ms_p50": None, "ttft_ms_p90": None, "ttft_ms_p99": None, "ttft_ms_mean": None,
        "tpot_ms_p50": None, "tpot_ms_p90": None, "tpot_ms_p99": None, "tpot_ms_mean": None,
        "e2e_s_p50": 25.1, "e2e_s_p90": 31.2505, "e2e_s_p99": 35.99025, "e2e_s_mean": 24.9666667,
    })
    assert report.ttft_ms is None and report.tpot_ms is None
    assert report.engine_info() == {
        "model": "meta-llama/Llama-3.1-8B-Instruct", "backend": "TRT", "version": "1.0.0", "dtype": "bfloat16",
        "kv_cache_dtype": "bfloat16", "quantization": None, "tp": 2, "pp": 1, "ep": 1, "world_size": 2,
        "max_batch_size": 2048, "max_num_tokens": 8192, "kv_cache_percentage": 0.85,
    }
    assert report.machine is None


def test_latency_report():
    report = load_report(LATENCY)
    _assert_summary(report.summary(), {
        "duration_s": 204.8,
        "output_tokens": 20480,
        "input_tokens": 1280,
        "output_tok_s": 100.0,
        "output_tok_s_per_gpu": 100.0,
        "total_tok_s": 106.25,
        "requests_per_s": 0.048828125,
        "mean_running_batch": 0.9985,
        "ttft_ms_p50": 12.5, "ttft_ms_p90": 13.75, "ttft_ms_p99": 14.0, "ttft_ms_mean": 12.6,
        "tpot_ms_p50": 9.9875, "tpot_ms_p90": 9.9944, "tpot_ms_p99": 9.9951, "tpot_ms_mean": 9.9876,
        "e2e_s_p50": 20.4485, "e2e_s_p90": 20.46225, "e2e_s_p99": 20.47, "e2e_s_mean": 20.44928,
    })
    assert report.engine_info()["max_batch_size"] == 1


@pytest.mark.parametrize("path", [TP4, TRT, LATENCY])
def test_summary_names_are_schema_columns(path):
    summary = load_report(path).summary()
    assert set(summary) <= set(_FLOAT_METRICS) | set(_INT_METRICS)
    for name in _INT_METRICS:
        if name in summary:
            assert isinstance(summary[name], int), name


def test_missing_key_names_file_key_path_and_version():
    path = DATA / "report_malformed_missing_output_throughput.json"
    with pytest.raises(ReportError) as err:
        load_report(path)
    message = str(err.value)
    assert str(path) in message
    assert "performance.system_output_throughput_tok_s" in message
    assert "missing" in message
    assert "1.2.1" in message


def test_missing_block_and_unknown_version():
    data = _load("report_trt_tp2_nostream.json")
    data["engine"]["version"] = None
    del data["request_info"]
    with pytest.raises(ReportError, match=r"r\.json: request_info\.num_requests is missing .*version unknown"):
        parse_report(data, "r.json")
    del data["engine"]["version"]   # documented in every version read: present, even if null
    with pytest.raises(ReportError, match=r"r\.json: engine\.version is missing .*version unknown"):
        parse_report(data, "r.json")


@pytest.mark.parametrize("path, value", [
    ("world_info.tp_size", "4"),
    ("world_info.tp_size", None),
    ("request_info.num_requests", True),         # a bool is not a count
    ("request_info.num_requests", 512.0),
    ("performance.total_latency_ms", "262144"),
    ("performance.total_latency_ms", float("nan")),
    ("streaming_metrics.ttft_percentiles.p99", None),
    ("engine.model", None),
])
def test_ill_typed_key_names_key_path(path, value):
    data = _load("report_pytorch_tp4_streaming.json")
    node = data
    *parents, last = path.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    with pytest.raises(ReportError) as err:
        parse_report(data, "x.json")
    assert f"x.json: {path} is {value!r}" in str(err.value)
    assert "version 1.2.1" in str(err.value)


def test_streaming_block_without_percentiles_is_an_error_not_none():
    data = _load("report_pytorch_tp4_streaming.json")
    del data["streaming_metrics"]["tpot_percentiles"]
    with pytest.raises(ReportError, match="streaming_metrics.tpot_percentiles.p50 is missing"):
        parse_report(data, "x.json")


def test_null_optional_blocks_and_issue_rate_ignored():
    data = _load("report_pytorch_tp4_streaming.json")
    data["streaming_metrics"] = None
    data["machine"] = None
    data["world_info"]["issue_rate"] = "not a rate"
    del data["dataset"]
    report = parse_report(data, "x.json")
    assert report.ttft_ms is None and report.machine is None
    assert report.summary()["ttft_ms_p50"] is None
    assert report.summary()["output_tok_s"] == 8000.0


def test_bad_json_and_not_an_object(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{'engine': 1}")
    with pytest.raises(ReportError, match="bad.json: not valid JSON"):
        load_report(bad)
    with pytest.raises(ReportError, match="a.json: the report is list"):
        parse_report([], "a.json")


# ------------------------------------------------------------------------------------------ --iteration_log


def test_iteration_log_nested_layout_with_true_and_none():
    stats = load_iteration_log(DATA / "iteration_log.txt")
    assert [it.running for it in stats.iterations] == [4, 6, 8, 8, 6]
    assert [it.context for it in stats.iterations] == [4, 2, 0, 0, 0]
    assert [it.generation for it in stats.iterations] == [0, 4, 8, 8, 6]
    assert [it.kv_used_blocks for it in stats.iterations] == [100, 300, 500, 700, 400]
    assert [it.kv_free_blocks for it in stats.iterations] == [900, 700, 500, 300, 600]
    assert {it.tokens_per_block for it in stats.iterations} == {32}
    assert [it.line for it in stats.iterations] == [1, 2, 3, 4, 5]
    assert stats.mean_running_batch == pytest.approx(32 / 5)
    summary = stats.summary()
    assert summary["mean_kv_occupancy"] == pytest.approx((0.1 + 0.3 + 0.5 + 0.7 + 0.4) / 5)
    assert summary["max_kv_occupancy"] == pytest.approx(0.7)
    assert summary["max_running_batch"] == 8
    assert summary["kv_pool_blocks"] == 1000
    assert set(summary) <= set(_FLOAT_METRICS) | set(_INT_METRICS)


def test_iteration_log_flat_layout():
    text = (
        "{'iter': 0, 'numScheduledRequests': 3, 'numContextRequests': 1, 'numGenRequests': 2, 'maxNumBlocks': 64,"
        " 'freeNumBlocks': 48, 'usedNumBlocks': 16, 'tokensPerBlock': 64, 'someFlag': True, 'other': None}\n"
        "\n"
        # no numScheduledRequests: context + generation
        "{'iter': 1, 'numContextRequests': 1, 'numGenRequests': 4, 'maxNumBlocks': 64, 'usedNumBlocks': 48}\n"
    )
    stats = parse_iteration_log(text, "flat.log")
    assert [it.running for it in stats.iterations] == [3, 5]
    assert [it.line for it in stats.iterations] == [1, 3]
    assert stats.iterations[1].kv_free_blocks is None and stats.iterations[1].tokens_per_block is None
    assert stats.summary() == {"mean_kv_occupancy": pytest.approx((0.25 + 0.75) / 2), "max_kv_occupancy": 0.75,
                               "max_running_batch": 5, "kv_pool_blocks": 64}


def test_iteration_log_none_blocks_leave_gaps_not_zeros():
    text = (
        "{'inflightBatchingStats': {'numScheduledRequests': 2}, 'kvCacheStats': None}\n"
        "{'inflightBatchingStats': None, 'kvCacheStats': {'maxNumBlocks': 10, 'usedNumBlocks': 5}}\n"
    )
    stats = parse_iteration_log(text, "gaps.log")
    assert stats.mean_kv_occupancy == 0.5          # one KV sample, not (0 + 0.5) / 2
    assert stats.mean_running_batch == 2.0
    only_batch = parse_iteration_log("{'inflightBatchingStats': {'numScheduledRequests': 2}}", "b.log")
    assert only_batch.summary() == {"mean_kv_occupancy": None, "max_kv_occupancy": None, "max_running_batch": 2,
                                    "kv_pool_blocks": None}


def test_malformed_iteration_log_names_line():
    path = DATA / "iteration_log_malformed.txt"
    with pytest.raises(ReportError, match=rf"^{path}:3: not a Python literal"):
        load_iteration_log(path)


@pytest.mark.parametrize("text, line, message", [
    ("", None, "no records"),
    ("\n  \n", None, "no records"),
    ("{'kvCacheStats': {'maxNumBlocks': 10, 'usedNumBlocks': 1}}\n[1, 2]\n", 2, "expected a dict"),
    ("{'iter': 0, 'numQueuedRequests': 4}", 1, "no running-batch stats"),
    ("{'kvCacheStats': {'maxNumBlocks': 10}}", 1, "kvCacheStats.usedNumBlocks is missing"),
    ("{'kvCacheStats': {'maxNumBlocks': 10, 'usedNumBlocks': 11}}", 1, "usedNumBlocks=11 with maxNumBlocks=10"),
    ("{'kvCacheStats': {'maxNumBlocks': 0, 'usedNumBlocks': 0}}", 1, "maxNumBlocks=0"),
    ("{'inflightBatchingStats': {'numContextRequests': 1}}", 1, "needs numScheduledRequests"),
    ("{'numScheduledRequests': -1}", 1, "numScheduledRequests is -1"),
    ("{'inflightBatchingStats': [1]}", 1, "inflightBatchingStats is list"),
    ("print('evaluated')", 1, "not a Python literal"),   # literal_eval, never eval
])
def test_iteration_log_errors(text, line, message):
    with pytest.raises(ReportError) as err:
        parse_iteration_log(text, "it.log")
    prefix = "it.log:" if line is None else f"it.log:{line}: "
    assert str(err.value).startswith(prefix)
    assert message in str(err.value)


# ------------------------------------------------------------------------------------------ DP replicas

# Replica timelines (s from the replica's first start; in = input tokens, out = output tokens incl. the first):
#   replica 0 (TP2, total latency 10 s):  start first  end   in  out   e2e   ttft  tpot
#                                          0.00  0.25  4.25  100  41   4.25  0.25  4.0/40 = 0.100
#                                          0.00  0.50  5.50  100  51   5.50  0.50  5.0/50 = 0.100
#                                          4.25  4.50 10.00  100  56   5.75  0.25  5.5/55 = 0.100
#                                          5.50  5.90 10.00  100  42   4.50  0.40  4.1/41 = 0.100
#   replica 1 (TP2, total latency 12.5 s): 0.00  0.50  6.50  200  51   6.50  0.50  6.0/50 = 0.120
#                                          0.00  1.00  7.00  200  51   7.00  1.00  6.0/50 = 0.120
#                                          6.50  7.00 12.50  200  51   6.00  0.50  5.5/50 = 0.110
#                                          6.50  7.50 12.50  200  41   6.00  1.00  5.0/40 = 0.125
# Replica reports: avg_output_length 47.5 / 48.5, avg_num_concurrent_requests 20/10 = 2.0 / 25.5/12.5 = 2.04.
DP_THROUGHPUT = {
    "duration_s": 12.5,                      # the longer replica
    "output_tokens": 190 + 194,
    "input_tokens": 400 + 800,
    "output_tok_s": 384 / 12.5,              # 30.72
    "output_tok_s_per_gpu": 384 / 12.5 / 4,  # 7.68
    "total_tok_s": 1584 / 12.5,              # 126.72
    "requests_per_s": 8 / 12.5,              # 0.64
    "mean_running_batch": (2.0 * 10 + 2.04 * 12.5) / (10 + 12.5),   # Σ e2e / Σ durations = 45.5 / 22.5
}


def _dp_reports():
    return [load_report(DATA / f"dp_replica{i}_report.json") for i in (0, 1)]


def _dp_records():
    return [load_request_records(DATA / f"dp_replica{i}_requests.json") for i in (0, 1)]


def test_dp_aggregate_without_records_takes_worst_replica():
    summary = aggregate_replicas(_dp_reports())
    assert summary.pop("latency_from") == "worst_replica"
    _assert_summary(summary, {
        **DP_THROUGHPUT,
        # each statistic's larger replica value: replica 1 everywhere (its report: e2e 6500/7000/7000/6375 ms,
        # TTFT 1000/1000/1000/750 ms, TPOT 120/125/125/118.75 ms; replica 0: 5500/5750/5750/5000, 400/500/500/350,
        # 100 throughout)
        "e2e_s_p50": 6.5, "e2e_s_p90": 7.0, "e2e_s_p99": 7.0, "e2e_s_mean": 6.375,
        "ttft_ms_p50": 1000.0, "ttft_ms_p90": 1000.0, "ttft_ms_p99": 1000.0, "ttft_ms_mean": 750.0,
        "tpot_ms_p50": 120.0, "tpot_ms_p90": 125.0, "tpot_ms_p99": 125.0, "tpot_ms_mean": 118.75,
    })


def test_dp_aggregate_with_records_pools_requests():
    summary = aggregate_replicas(_dp_reports(), _dp_records(), gpus=4)
    assert summary.pop("latency_from") == "request_records"
    # 8 pooled values, nearest rank: p50 = sorted[int(8*0.5)] = sorted[4], p90 = sorted[7], p99 = sorted[7]
    #   e2e  sorted 4.25 4.5 5.5 5.75 6.0 6.0 6.5 7.0     mean 45.5/8
    #   ttft sorted 250 250 400 500 500 500 1000 1000     mean 4400/8
    #   tpot sorted 100 100 100 100 110 120 120 125       mean 875/8
    _assert_summary(summary, {
        **DP_THROUGHPUT,
        "e2e_s_p50": 6.0, "e2e_s_p90": 7.0, "e2e_s_p99": 7.0, "e2e_s_mean": 45.5 / 8,
        "ttft_ms_p50": 500.0, "ttft_ms_p90": 1000.0, "ttft_ms_p99": 1000.0, "ttft_ms_mean": 550.0,
        "tpot_ms_p50": 110.0, "tpot_ms_p90": 125.0, "tpot_ms_p99": 125.0, "tpot_ms_mean": 109.375,
    })


def test_one_replica_with_records_reproduces_its_report():
    report = _dp_reports()[0]
    summary = aggregate_replicas([report], [_dp_records()[0]])
    assert summary.pop("latency_from") == "request_records"
    expected = report.summary()
    for key, value in expected.items():
        assert summary[key] == pytest.approx(value, rel=1e-9), key


def test_dp_without_streaming_has_no_ttft():
    reports = _dp_reports()
    no_stream = _load("dp_replica1_report.json")
    del no_stream["streaming_metrics"]
    reports[1] = parse_report(no_stream, "r1.json")
    for records in (None, _dp_records()):
        summary = aggregate_replicas(reports, records)
        assert summary["ttft_ms_p50"] is None and summary["tpot_ms_mean"] is None
        assert summary["e2e_s_p90"] == pytest.approx(7.0)


def test_dp_mismatches_are_errors():
    reports = _dp_reports()
    records = _dp_records()
    with pytest.raises(ReportError, match="num_requests is 4 but its request records hold 3"):
        aggregate_replicas(reports, [records[0], records[1][:3]])
    with pytest.raises(ReportError, match="1 request-record lists for 2 replica reports"):
        aggregate_replicas(reports, [records[0]])
    other = copy.deepcopy(_load("dp_replica1_report.json"))
    other["world_info"]["tp_size"] = 1
    with pytest.raises(ReportError, match="replicas differ"):
        aggregate_replicas([reports[0], parse_report(other, "other.json")])
    with pytest.raises(ReportError, match="no replica reports"):
        aggregate_replicas([])
    with pytest.raises(ReportError, match="the cell has 8 GPUs but its replica reports' world_size add up to 4"):
        aggregate_replicas(reports, gpus=8)


def test_request_records_fields_and_errors():
    records = load_request_records(DATA / "dp_replica0_requests.json")
    assert [r.output_tokens for r in records] == [41, 51, 56, 42]
    assert [r.input_tokens for r in records] == [100] * 4
    assert records[3].e2e_s == pytest.approx(4.5)
    assert records[3].ttft_ms == pytest.approx(400.0)
    assert records[3].tpot_ms == pytest.approx(100.0)
    one_token = parse_request_records([{"start_timestamp": 0, "first_token_timestamp": 5, "end_timestamp": 5,
                                        "num_input_tokens": 1, "num_total_output_tokens": 1}], "q.json")
    assert one_token[0].tpot_ms is None

    data = _load("dp_replica0_requests.json")
    del data[1]["end_timestamp"]
    with pytest.raises(ReportError, match=r"q\.json: \[1\]\.end_timestamp is missing"):
        parse_request_records(data, "q.json")
    data = _load("dp_replica0_requests.json")
    data[2]["num_total_output_tokens"] = 56.0
    with pytest.raises(ReportError, match=r"\[2\]\.num_total_output_tokens is 56\.0, expected an integer"):
        parse_request_records(data, "q.json")
    data = _load("dp_replica0_requests.json")
    data[0]["first_token_timestamp"] = data[0]["end_timestamp"] + 1
    with pytest.raises(ReportError, match=r"\[0\] timestamps out of order"):
        parse_request_records(data, "q.json")
    with pytest.raises(ReportError, match="expected a list"):
        parse_request_records({}, "q.json")


def test_nearest_rank_percentiles():
    # trtllm-bench's rule sorted(v)[int(n*q)], not interpolation: 10 values → p50 = v[5], p90 = v[9], p99 = v[9]
    stats = Percentiles.of([float(v) for v in range(10, 0, -1)])
    assert (stats.p50, stats.p90, stats.p99, stats.mean) == (6.0, 10.0, 10.0, 5.5)
    # 7 values: int(3.5) = 3 and int(6.3) = 6 (truncation; rounding would give v[4]; numpy would give 4.0 and 6.4)
    stats = Percentiles.of([7.0, 1.0, 6.0, 2.0, 5.0, 3.0, 4.0])
    assert (stats.p50, stats.p90, stats.p99, stats.mean) == (4.0, 7.0, 7.0, 4.0)
    stats = Percentiles.of([1.0, 2.0, 3.0, 10.0])
    assert (stats.p50, stats.p90, stats.p99) == (3.0, 10.0, 10.0)


def test_token_counts_are_rounded_not_truncated():
    data = _load("report_trt_tp2_nostream.json")
    data["request_info"].update(num_requests=3, avg_output_length=341.3333333, avg_input_length=128.6666667)
    summary = parse_report(data, "x.json").summary()
    assert summary["output_tokens"] == 1024     # 3 × 341.3333333 = 1023.9999999
    assert summary["input_tokens"] == 386       # 3 × 128.6666667 = 386.0000001
