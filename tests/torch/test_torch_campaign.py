"""The torch backend behind the Backend protocol: a tiny model measured cell by cell through the runner."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
import yaml

from infscale.analysis.merge import merge_cells
from infscale.campaign import load_campaign
from infscale.campaign.plan import plan_campaign
from infscale.launch.runner import run_cells

pytestmark = pytest.mark.torch
TINY_LLAMA = Path(__file__).resolve().parents[1] / "data" / "hf" / "tiny-llama.json"
TINY_MOE = TINY_LLAMA.with_name("tiny-qwen3-moe.json")


def test_tiny_campaign_is_measured_by_the_torch_backend(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "name": "tiny-torch", "backend": "torch", "hardware": "h100-sxm", "models": [str(TINY_LLAMA)],
        "layouts": ["dp1", "dp2", "tp2", "pp2"], "requests": 6,
        "engine": {"max_num_seqs": 4, "max_num_tokens": 64},
        "workloads": [{"name": "w", "isl": 24, "osl": [8, 12]}],
    }))
    campaign = load_campaign(config)
    planned = plan_campaign(campaign)
    outcomes = {o.cell_id: o for o in run_cells(campaign, [p for p in planned if p.feasible], tmp_path)}
    merged = merge_cells(planned, tmp_path, campaign.hardware.gpus_per_node)
    assert merged.height == 8 and set(merged["status"]) == {"ok"}, merged.select("cell_id", "status", "reason")
    assert len(outcomes) == 8
    assert not merged["predicted"].any()  # measured, not modelled
    assert (merged["output_tokens"] == 6 * merged["osl_max"]).all()
    assert (merged["output_tok_s"] > 0).all() and (merged["tpot_ms_p50"] > 0).all()
    assert set(merged["gpu_name"]) == {"cpu"}
    # DP2 ran two replicas in two processes: each took its round-robin half of the requests
    dp2 = merged.filter(pl.col("dp") == 2)["cell_id"][0]
    detail = pl.read_parquet(tmp_path / "cells" / f"{dp2}.parquet", columns=["requests_detail"])
    replicas = detail.explode("requests_detail").unnest("requests_detail")
    assert replicas.group_by("replica").len().sort("replica")["len"].to_list() == [3, 3]
    assert (replicas["finish_s"] > replicas["first_token_s"]).all()


def test_least_loaded_poisson_is_refused_for_separate_replicas(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "name": "tiny-torch", "backend": "torch", "hardware": "h100-sxm", "models": [str(TINY_LLAMA)],
        "layouts": ["dp2"], "requests": 4, "engine": {"router": "least_loaded"},
        "workloads": [{"name": "w", "isl": 16, "osl": 4, "arrival": {"mode": "poisson", "rate": 10.0}}],
    }))
    campaign = load_campaign(config)
    planned = [p for p in plan_campaign(campaign) if p.feasible]
    (outcome,) = run_cells(campaign, planned, tmp_path)
    assert outcome.status == "failed" and "use router round_robin" in outcome.reason


def test_an_expert_parallel_cell_is_measured_with_its_experts_split(tmp_path):
    """tp2ep2 of a MoE model: measured (each rank holds half of the experts at full width), labelled ep=2, and the
    same tokens' worth of work as tp2."""
    config = tmp_path / "moe.yaml"
    config.write_text(yaml.safe_dump({
        "name": "tiny-moe", "backend": "torch", "hardware": "h100-sxm", "models": [str(TINY_MOE)],
        "layouts": ["tp2", "tp2ep2"], "requests": 4, "engine": {"max_num_seqs": 4, "max_num_tokens": 64},
        "workloads": [{"name": "w", "isl": 16, "osl": 6}],
    }))
    campaign = load_campaign(config)
    planned = plan_campaign(campaign)
    run_cells(campaign, [p for p in planned if p.feasible], tmp_path)
    merged = merge_cells(planned, tmp_path, campaign.hardware.gpus_per_node).sort("ep")
    assert merged["status"].to_list() == ["ok", "ok"] and merged["ep"].to_list() == [1, 2]
    assert (merged["output_tokens"] == 4 * 6).all()


def test_a_pipelined_pp_cell_is_its_own_measurement(tmp_path):
    """pp_microbatches: 0 (one per stage) makes a pp2 cell pipelined: measured next to the plain pp2 cell (a
    different cell, with the knob in its identity) with every token; the tp2 cell, which has no stages to
    pipeline, is the cell it would be without the knob. A value the torch engine cannot run is refused by name."""
    base = {"name": "tiny-torch", "backend": "torch", "hardware": "h100-sxm", "models": [str(TINY_LLAMA)],
            "layouts": ["tp2", "pp2"], "requests": 5, "engine": {"max_num_seqs": 4, "max_num_tokens": 64},
            "workloads": [{"name": "w", "isl": 24, "osl": 9}]}
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(base))
    plain = {p.cell.layout.pp: p.cell for p in plan_campaign(load_campaign(config))}
    config.write_text(yaml.safe_dump({**base, "engine": {**base["engine"], "pp_microbatches": [0, 3]}}))
    campaign = load_campaign(config)
    planned = plan_campaign(campaign)
    by_knob = {(p.cell.pp, p.cell.engine.pp_microbatches): p for p in planned}
    assert set(by_knob) == {(1, None), (2, 0), (2, 3)}
    assert by_knob[(1, None)].cell.id == plain[1].id and by_knob[(2, 0)].cell.id != plain[2].id
    outcomes = {o.cell_id: o for o in run_cells(campaign, [p for p in planned if p.feasible], tmp_path)}
    pipelined, refused = by_knob[(2, 0)].cell.id, by_knob[(2, 3)].cell.id
    assert outcomes[pipelined].status == "ok", outcomes[pipelined].reason
    assert outcomes[refused].status == "failed" and "pp_microbatches=3" in outcomes[refused].reason
    merged = merge_cells(planned, tmp_path, campaign.hardware.gpus_per_node).filter(pl.col("cell_id") == pipelined)
    assert merged["output_tokens"].to_list() == [5 * 9] and merged["engine_path"].to_list() == ["cuda_graphs"]
