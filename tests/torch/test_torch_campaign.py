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


def test_tiny_campaign_is_measured_by_the_torch_backend(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "name": "tiny-torch", "backend": "torch", "hardware": "h100-sxm", "models": [str(TINY_LLAMA)],
        "layouts": ["dp1", "dp2", "tp2"], "requests": 6,
        "engine": {"max_num_seqs": 4, "max_num_tokens": 64},
        "workloads": [{"name": "w", "isl": 24, "osl": [8, 12]}],
    }))
    campaign = load_campaign(config)
    planned = plan_campaign(campaign)
    outcomes = {o.cell_id: o for o in run_cells(campaign, [p for p in planned if p.feasible], tmp_path)}
    merged = merge_cells(planned, tmp_path, campaign.hardware.gpus_per_node)
    single = merged.filter(pl.col("tp") == 1)
    assert single.height == 4 and set(single["status"]) == {"ok"}
    assert not single["predicted"].any()  # measured, not modelled
    assert (single["output_tokens"] == 6 * single["osl_max"]).all()
    assert (single["output_tok_s"] > 0).all() and (single["tpot_ms_p50"] > 0).all()
    multi = [o for o in outcomes.values() if ".dp1tp2pp1." in o.cell_id]
    assert len(multi) == 2 and all(o.status == "failed" and "multi-rank" in o.reason for o in multi)
