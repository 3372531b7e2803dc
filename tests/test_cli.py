"""The command line as a user runs it, and the bench runner's failure handling."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml

from infscale.analysis.merge import merge_cells
from infscale.backends import InfeasibleCell
from infscale.backends.sim.backend import SimBackend
from infscale.campaign import load_campaign
from infscale.campaign.plan import plan_campaign
from infscale.launch.runner import run_cells

PREDICT_KEYS = {"output_tok_s", "output_tok_s_per_gpu", "ttft_ms_p50", "tpot_ms_p50", "max_concurrency",
                "kv_capacity_tokens", "feasible", "reason"}


def infscale(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "infscale", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_predict_json_has_the_documented_keys():
    result = infscale("predict", "--model", "llama-3.1-8b", "--hardware", "h200-sxm", "--precision", "fp8",
                      "--tp", "1", "--pp", "1", "--dp", "1", "--isl", "128", "--osl", "2048", "--requests", "2000",
                      "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert PREDICT_KEYS <= set(data)
    assert data["feasible"] is True and data["reason"] is None
    assert data["output_tok_s"] > 0 and data["output_tok_s_per_gpu"] == pytest.approx(data["output_tok_s"])
    assert 0 < data["max_concurrency"] <= 256  # capped by the default max_num_seqs
    assert data["kv_capacity_tokens"] > 100_000
    assert data["requests"] == 2000


def test_predict_infeasible_cell_says_why():
    result = infscale("predict", "--model", "llama-3.1-405b", "--hardware", "h100-sxm", "--isl", "1024",
                      "--osl", "1024", "--json")
    data = json.loads(result.stdout)
    assert data["feasible"] is False and "exceed" in data["reason"] and data["output_tok_s"] is None


def test_predict_rejects_invalid_layout_with_one_line():
    result = infscale("predict", "--model", "llama-3.1-8b", "--tp", "3", "--isl", "128", "--osl", "128")
    assert result.returncode == 2
    assert "tp=3 does not divide" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def small_campaign(tmp_path: Path, **overrides) -> Path:
    raw = {"name": "cli", "hardware": "h200-sxm", "models": ["llama-3.1-8b", "llama-3.1-405b"],
           "layouts": ["dp1", "tp2"], "requests": 16, "workloads": [{"name": "w", "isl": 128, "osl": [128, 256]}]}
    raw.update(overrides)
    path = tmp_path / "cli.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_plan_prints_table_with_totals_and_writes_parquet(tmp_path):
    config = small_campaign(tmp_path)
    result = infscale("plan", str(config), "--results-root", str(tmp_path / "results"), "--write")
    assert result.returncode == 0, result.stderr
    assert "dp1tp2pp1" in result.stdout and "total: 8 cells, 4 feasible, 4 infeasible" in result.stdout
    plan = pl.read_parquet(tmp_path / "results" / "cli" / "plan.parquet")
    assert plan.height == 8 and plan.filter(~pl.col("feasible"))["reason"].str.contains("exceed").all()


def test_invalid_campaign_is_one_line_per_problem(tmp_path):
    config = small_campaign(tmp_path, workloads=[{"name": "w", "isl": 128, "osll": [128]}])
    result = infscale("plan", str(config))
    assert result.returncode == 2
    first = result.stderr.strip().splitlines()[0]
    assert first.startswith(f"{config}: workloads[0].osll") and "did you mean 'osl'" in first


def test_bench_unknown_job_is_a_clear_error(tmp_path):
    result = infscale("bench", str(small_campaign(tmp_path)), "--job", "nope")
    assert result.returncode == 2 and "no bench job 'nope'" in result.stderr


class FlakyBackend(SimBackend):
    """Fails (or is infeasible) for chosen cells, measures the rest like the sim backend."""

    def __init__(self, fail: set[str], infeasible: set[str], message: str = "tokenizer mismatch"):
        self.fail, self.infeasible, self.message = fail, infeasible, message
        self.measured: list[str] = []

    def measure(self, cell, artefact, campaign):
        self.measured.append(cell.id)
        if cell.id in self.fail:
            raise RuntimeError(self.message)
        if cell.id in self.infeasible:
            raise InfeasibleCell("CUDA out of memory while allocating the KV cache")
        return super().measure(cell, artefact, campaign)


def test_runner_records_failures_and_retries_only_them(tmp_path):
    campaign = load_campaign(small_campaign(tmp_path))
    planned = [p for p in plan_campaign(campaign) if p.feasible]
    broken, oom = planned[0].cell.id, planned[1].cell.id
    backend = FlakyBackend(fail={broken}, infeasible={oom})
    outcomes = {o.cell_id: o for o in run_cells(campaign, planned, tmp_path, backend)}
    assert outcomes[broken].status == "failed" and "tokenizer mismatch" in outcomes[broken].reason
    assert outcomes[oom].status == "infeasible"
    assert len(list((tmp_path / "failures").glob("*.parquet"))) == 1

    merged = merge_cells(plan_campaign(campaign), tmp_path, 8)
    status = dict(zip(merged["cell_id"], merged["status"]))
    assert status[broken] == "failed" and status[oom] == "infeasible"

    retry = FlakyBackend(fail=set(), infeasible=set())
    again = {o.cell_id: o.status for o in run_cells(campaign, planned, tmp_path, retry)}
    assert retry.measured == [broken]  # the OOM cell is not retried; measured cells are skipped
    assert again[broken] == "ok" and again[oom] == "skipped"
    merged = merge_cells(plan_campaign(campaign), tmp_path, 8)
    assert dict(zip(merged["cell_id"], merged["status"]))[broken] == "ok"


def test_merge_through_job_summaries_equals_merge_from_cell_files(tmp_path):
    from infscale.launch.runner import write_job_summary

    campaign = load_campaign(small_campaign(tmp_path))
    planned = plan_campaign(campaign)
    outcomes = run_cells(campaign, [p for p in planned if p.feasible], tmp_path)
    summary = write_job_summary(tmp_path / "bench" / "all.parquet", "all", outcomes)
    direct = merge_cells(planned, tmp_path, 8)
    indexed = merge_cells(planned, tmp_path, 8, [summary])
    assert direct.equals(indexed) and direct.height == len(planned)
    # a summary row whose cell file is gone is not trusted: the cell is missing (measured, its file gone)
    victim = next(p for p in planned if p.feasible).cell.id
    (tmp_path / "cells" / f"{victim}.parquet").unlink()
    after = merge_cells(planned, tmp_path, 8, [summary])
    assert dict(zip(after["cell_id"], after["status"]))[victim] == "missing"
    assert summary.exists()  # without repair, nothing is touched


def test_node_problem_stops_the_job_after_recording_the_failure(tmp_path):
    from infscale.launch.jobfn import NodeProblem

    campaign = load_campaign(small_campaign(tmp_path))
    planned = [p for p in plan_campaign(campaign) if p.feasible]
    sick = planned[1].cell.id
    backend = FlakyBackend(fail={sick}, infeasible=set(), message="NCCL error: unhandled system error")
    with pytest.raises(NodeProblem, match="NCCL"):
        run_cells(campaign, planned, tmp_path, backend)
    assert backend.measured == [planned[0].cell.id, sick]  # the rest waits for a healthy node
    assert len(list((tmp_path / "failures").glob(f"{sick}.*.parquet"))) == 1
    log = (tmp_path / "logs" / "measured.log").read_text().splitlines()
    assert [line.split("\t")[1:3] for line in log] == [[planned[0].cell.id, "ok"], [sick, "failed"]]


def test_cuda_oom_message_makes_the_cell_infeasible_not_failed(tmp_path, monkeypatch):
    campaign = load_campaign(small_campaign(tmp_path))
    planned = [p for p in plan_campaign(campaign) if p.feasible]
    target = planned[0].cell.id
    monkeypatch.setenv("INFSCALE_SIM_FAIL", f"oom:{target}")
    outcomes = {o.cell_id: o for o in run_cells(campaign, planned, tmp_path)}
    assert outcomes[target].status == "infeasible" and "CUDA out of memory" in outcomes[target].reason
    monkeypatch.delenv("INFSCALE_SIM_FAIL")
    again = {o.cell_id: o.status for o in run_cells(campaign, planned, tmp_path)}
    assert again[target] == "skipped"  # recorded as infeasible: never retried
