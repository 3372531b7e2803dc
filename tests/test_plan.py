"""The plan: every cell of a campaign, with a feasibility verdict, request counts, jobs and a cost estimate."""

from __future__ import annotations

import copy
from typing import Any

import polars as pl
import pytest

from infscale.campaign.layout import Layout
from infscale.campaign.plan import PlannedCell, job_id, plan_campaign, write_plan
from infscale.campaign.spec import campaign_from_dict

SMALL: dict[str, Any] = {
    "name": "small",
    "hardware": "h100-sxm",
    "models": ["llama-3.1-8b", "qwen2.5-32b"],
    "layouts": ["dp1", "tp2", "dp2tp2"],
    "workloads": [
        {"name": "reasoning", "isl": 1024, "osl": [1024, 8192, 32768]},
        {"name": "control", "pairs": [[2048, 128]]},
    ],
}


def plan(raw: dict[str, Any], packing: str = "layout") -> list[PlannedCell]:
    return plan_campaign(campaign_from_dict(copy.deepcopy(raw), source="test.yaml"), packing)


def find(planned: list[PlannedCell], model: str, layout: str, osl: int, workload: str | None = None) -> PlannedCell:
    matches = [p for p in planned if p.cell.model == model and p.cell.layout == Layout.parse(layout)
               and p.cell.osl.max_length == osl and (workload is None or p.cell.workload == workload)]
    assert len(matches) == 1, [p.cell.id for p in matches]
    return matches[0]


@pytest.fixture(scope="module")
def small_plan() -> list[PlannedCell]:
    return plan(SMALL)


def test_cell_count_is_the_product(small_plan):
    # 2 models × 3 layouts × (3 OSL values + 1 pair)
    assert len(small_plan) == 2 * 3 * 4
    combos = {(p.cell.model, str(p.cell.layout), p.cell.workload, p.cell.isl.max_length, p.cell.osl.max_length)
              for p in small_plan}
    assert len(combos) == len(small_plan)


def test_cell_count_with_precision_and_arrival_sweeps():
    raw = copy.deepcopy(SMALL)
    raw["models"] = ["llama-3.1-8b"]
    raw["precision"] = ["bf16", "fp8"]
    raw["arrival"] = {"mode": "concurrency", "concurrency": [16, 64]}
    raw["engine"] = {"max_num_seqs": [256, 1024]}
    # 1 model × 2 precisions × 3 layouts × 4 length pairs × 2 concurrencies × 2 max_num_seqs
    planned = plan(raw)
    assert len(planned) == 2 * 3 * 4 * 2 * 2
    assert len({p.cell.id for p in planned}) == len(planned)


def test_every_cell_id_is_unique(small_plan):
    ids = [p.cell.id for p in small_plan]
    assert len(set(ids)) == len(ids)


def test_cells_carry_the_campaign_settings(small_plan):
    cell = find(small_plan, "llama-3.1-8b", "dp2tp2", 8192).cell
    assert (cell.hardware, cell.backend, cell.seed) == ("h100-sxm", "sim", 0)
    assert cell.isl.max_length == 1024 and cell.workload == "reasoning"
    assert cell.engine.kv_memory_fraction == 0.9           # the hardware's default, filled in
    assert cell.arrival.mode == "offline"


def test_32b_on_one_h100_at_long_osl_is_kept_as_infeasible_with_the_reason(small_plan):
    infeasible = find(small_plan, "qwen2.5-32b", "dp1", 32768)
    assert not infeasible.feasible
    assert infeasible.reason is not None
    assert "cannot hold one sequence of 33792 tokens" in infeasible.reason
    assert "qwen2.5-32b at dp1tp1pp1" in infeasible.reason
    assert infeasible.max_concurrency == 0
    # the same model and layout at short OSL fits; with TP2 the long OSL fits too
    assert find(small_plan, "qwen2.5-32b", "dp1", 1024).feasible
    assert find(small_plan, "qwen2.5-32b", "tp2", 32768).feasible
    assert [p.cell.id for p in small_plan if not p.feasible] == [infeasible.cell.id]


def test_405b_bf16_on_one_gpu_is_infeasible_because_of_weights():
    raw = {**copy.deepcopy(SMALL), "hardware": "h200-sxm", "models": ["llama-3.1-405b"], "layouts": ["dp1", "tp8"],
           "precision": ["bf16"]}
    planned = plan(raw)
    one_gpu = [p for p in planned if p.cell.layout == Layout()]
    assert one_gpu and all(not p.feasible and "weights" in p.reason for p in one_gpu)
    tp8 = [p for p in planned if p.cell.layout == Layout(tp=8)]
    assert tp8 and all(p.feasible for p in tp8 if p.cell.osl.max_length <= 8192)


def test_requests_auto_is_four_times_the_max_concurrency(small_plan):
    for item in small_plan:
        expected = max(1, min(16384, 4 * max(item.max_concurrency, 1)))
        assert item.cell.requests == expected, item.cell.id
    cell = find(small_plan, "llama-3.1-8b", "dp2tp2", 1024)
    assert cell.max_concurrency == 2 * 256               # two replicas, each capped by max_num_seqs
    assert cell.cell.requests == 2048


def test_max_concurrency_is_dp_times_replica_capacity(small_plan):
    item = find(small_plan, "llama-3.1-8b", "dp2tp2", 32768)
    context = 1024 + 32768
    assert item.max_concurrency == 2 * item.memory.max_seqs(context, 256)
    assert item.max_concurrency < 2 * 256                 # KV-bound at this length


def test_requests_auto_is_capped_by_max_requests():
    raw = {**copy.deepcopy(SMALL), "models": ["llama-3.1-8b"], "layouts": ["dp2tp2"], "max_requests": 1000}
    planned = plan(raw)
    short = find(planned, "llama-3.1-8b", "dp2tp2", 1024)
    assert 4 * short.max_concurrency > 1000 and short.cell.requests == 1000
    long = find(planned, "llama-3.1-8b", "dp2tp2", 32768)
    assert long.cell.requests == 4 * long.max_concurrency < 1000


def test_requests_auto_follows_requests_per_slot():
    raw = {**copy.deepcopy(SMALL), "models": ["llama-3.1-8b"], "layouts": ["tp2"], "requests_per_slot": 2}
    item = find(plan(raw), "llama-3.1-8b", "tp2", 8192)
    assert item.cell.requests == 2 * item.max_concurrency


def test_requests_auto_under_fixed_concurrency_uses_the_concurrency():
    raw = {**copy.deepcopy(SMALL), "models": ["llama-3.1-8b"], "layouts": ["dp1"],
           "arrival": {"mode": "concurrency", "concurrency": [8, 64]}}
    planned = plan(raw)
    by_concurrency = {p.cell.arrival.concurrency: p.cell.requests
                      for p in planned if p.cell.osl.max_length == 1024}
    assert by_concurrency == {8: 32, 64: 256}


def test_explicit_requests_are_respected():
    raw = copy.deepcopy(SMALL)
    raw["requests"] = 300
    raw["workloads"][1]["requests"] = 50          # the workload's own setting wins
    planned = plan(raw)
    assert {p.cell.requests for p in planned if p.cell.workload == "reasoning"} == {300}
    assert {p.cell.requests for p in planned if p.cell.workload == "control"} == {50}


def test_job_column_under_layout_packing(small_plan):
    jobs = {p.job for p in small_plan}
    assert len(jobs) == 2 * 3                                   # one per model × layout
    item = find(small_plan, "llama-3.1-8b", "dp2tp2", 8192)
    assert item.job == "llama-3.1-8b.bf16.dp2tp2pp1.h100-sxm.sim" == item.cell.group_key
    assert all(p.job == job_id(p.cell, "layout") for p in small_plan)


def test_job_column_under_model_packing():
    planned = plan(SMALL, packing="model")
    assert {p.job for p in planned} == {"llama-3.1-8b.bf16.h100-sxm.sim", "qwen2.5-32b.bf16.h100-sxm.sim"}


def test_unknown_packing_is_refused():
    with pytest.raises(ValueError, match="unknown packing 'node'; allowed: layout, model"):
        plan(SMALL, packing="node")


def test_gpu_hours_positive_when_feasible_and_zero_when_not(small_plan):
    for item in small_plan:
        if item.feasible:
            assert item.est_seconds > 0 and item.est_gpu_hours > 0, item.cell.id
        else:
            assert item.est_seconds == 0 and item.est_gpu_hours == 0, item.cell.id
    item = find(small_plan, "llama-3.1-8b", "dp2tp2", 8192)
    assert item.est_gpu_hours == pytest.approx(item.est_seconds * 4 / 3600)


def test_longer_outputs_cost_more(small_plan):
    items = [find(small_plan, "llama-3.1-8b", "tp2", osl) for osl in (1024, 8192, 32768)]
    seconds_per_request = [item.est_seconds / item.cell.requests for item in items]
    assert seconds_per_request == sorted(seconds_per_request)
    assert seconds_per_request[0] < seconds_per_request[-1]


def test_layout_sweep_expands_per_model():
    raw = {**copy.deepcopy(SMALL), "hardware": "h200-sxm", "layouts": {"gpus": [1, 2, 4, 8]},
           "workloads": [{"name": "w", "isl": 1024, "osl": 1024}]}
    planned = plan(raw)
    assert len(planned) == 2 * 20                               # 20 layouts each (see test_layout)


def test_write_plan_writes_one_parquet_row_per_cell(tmp_path, small_plan):
    path = write_plan(small_plan, gpus_per_node=8, path=tmp_path / "plans" / "small.parquet")
    assert path.exists()
    frame = pl.read_parquet(path)
    assert frame.height == len(small_plan)
    assert frame["cell_id"].to_list() == [p.cell.id for p in small_plan]
    assert frame["cell_id"].n_unique() == frame.height
    for column in ("job", "feasible", "reason", "model", "layout", "gpus", "isl", "osl", "requests",
                   "kv_capacity_tokens", "max_concurrency", "est_gpu_hours", "cell_json"):
        assert column in frame.columns, column
    infeasible = frame.filter(~pl.col("feasible"))
    assert infeasible.height == 1
    assert infeasible["reason"][0].startswith("KV pool of")
    assert infeasible["est_gpu_hours"][0] == 0
    assert frame.filter(pl.col("feasible"))["reason"].null_count() == frame.height - 1
    assert list(tmp_path.joinpath("plans").iterdir()) == [path]    # no temp file left behind


def test_torch_campaigns_plan_with_the_torch_engine_reserve():
    """backend torch: each cell's memory keeps the torch engine's reserve for its max_num_tokens, which the
    engine (backends/torch) uses too; other backends keep the hardware's assumption."""
    from infscale.memory import torch_engine_reserve_bytes

    raw = copy.deepcopy(SMALL)
    raw.update(backend="torch", hardware="h200-sxm", models=["llama-3.1-8b"], layouts=["tp1"],
               engine={"max_num_tokens": [2048, 8192], "max_num_seqs": 128})
    raw["workloads"] = [{"name": "long", "pairs": [[8192, 4], [32768, 4]]}]
    planned = plan(raw)
    assert planned and all(p.feasible for p in planned)
    from infscale.catalog import get_model

    for item in planned:
        knobs = item.cell.engine
        expected = torch_engine_reserve_bytes(get_model("llama-3.1-8b"), 1, 1, knobs.max_num_tokens, 128)
        assert item.memory.activation_reserve_bytes == expected
    sim = plan(SMALL)
    assert all(p.memory.activation_reserve_bytes == 6 * 1024**3 for p in sim)
