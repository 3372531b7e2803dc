"""The paper's claims as checks over merged cells: verdicts and evidence on a small sim campaign, a claim flips
when its evidence does, and missing evidence is NOT TESTABLE with the reason."""

from __future__ import annotations

import json

import polars as pl
import pytest
import yaml

from infscale.analysis.claims import FAIL, PASS, UNTESTABLE, check_claims, claims_markdown
from infscale.analysis.fits import fit_campaign
from infscale.analysis.merge import merge_cells
from infscale.campaign import load_campaign
from infscale.campaign.plan import plan_campaign
from infscale.launch.runner import run_cells


@pytest.fixture(scope="module")
def sim_campaign(tmp_path_factory):
    root = tmp_path_factory.mktemp("claims")
    config = root / "c.yaml"
    config.write_text(yaml.safe_dump({
        "name": "claims", "backend": "sim", "hardware": "h200-sxm", "models": ["llama-3.1-8b", "qwen2.5-32b"],
        "layouts": ["dp8", "tp8", "dp4tp2", "dp2tp4", "dp1"], "requests": "auto",
        "workloads": [{"name": "r", "isl": 1024, "osl": [1024, 4096, 16384]},
                      {"name": "control", "pairs": [[2048, 128]]}]}))
    campaign = load_campaign(config)
    planned = plan_campaign(campaign)
    run_cells(campaign, [p for p in planned if p.feasible], root)
    merged = merge_cells(planned, root, campaign.hardware.gpus_per_node)
    params = {a.name: float(a.param_counts().total) for a in campaign.models.values()}
    return merged, params


def by_claim(verdicts):
    return {v.claim: v for v in verdicts}


def test_claims_on_a_sim_campaign(sim_campaign) -> None:
    merged, params = sim_campaign
    verdicts = by_claim(check_claims(merged, params, fit_campaign(merged, bootstrap=0)))
    assert list(verdicts) == [f"C{i}" for i in range(1, 13)]
    c1 = verdicts["C1"]
    assert c1.verdict == PASS and c1.source == "predicted" and c1.numbers["gpus"] == 8 and c1.numbers["ratio"] > 1.3
    assert verdicts["C2"].verdict == PASS and verdicts["C2"].numbers["ratio"][1] < verdicts["C2"].numbers["ratio"][0]
    assert verdicts["C5"].verdict == PASS and all(t >= 2 for t in verdicts["C5"].numbers["best_tp"])
    assert verdicts["C12"].verdict == PASS
    for claim in ("C3", "C4", "C8", "C9", "C10", "C11"):  # no lognormal OSL, telemetry, 405B, R1 here
        assert verdicts[claim].verdict == UNTESTABLE and verdicts[claim].source is None and verdicts[claim].evidence
    text = claims_markdown(list(verdicts.values()), "claims")
    assert text.count("| **C") == 12 and "NOT TESTABLE" in text and "| passes when |" in text
    # every verdict states its criterion; C8's says it needs every workload
    for verdict in verdicts.values():
        assert verdict.criterion and verdict.row()["criterion"] == verdict.criterion
        line = next(row for row in text.splitlines() if row.startswith(f"| **{verdict.claim}** "))
        assert verdict.criterion in line
    assert "in every workload measured for both" in verdicts["C8"].criterion


def test_a_claim_follows_its_evidence(sim_campaign) -> None:
    merged, params = sim_campaign
    # make TP8 twice as fast as recorded: DP8 no longer beats it at short output
    slower_dp = merged.with_columns(
        pl.when((pl.col("tp") == 8) & (pl.col("dp") == 1)).then(pl.col("output_tok_s") * 2)
        .otherwise(pl.col("output_tok_s")).alias("output_tok_s"))
    c1 = by_claim(check_claims(slower_dp, params))["C1"]
    assert c1.verdict == FAIL and json.loads(json.dumps(c1.numbers))["ratio"] < 1.3
    # measured rows say so
    measured = merged.with_columns(pl.lit(False).alias("predicted"))
    assert by_claim(check_claims(measured, params))["C1"].source == "measured"


def test_nothing_to_test_is_said_so(sim_campaign) -> None:
    merged, params = sim_campaign
    empty = merged.clear()
    verdicts = check_claims(empty, params)
    assert {v.verdict for v in verdicts} == {UNTESTABLE} and all(v.evidence for v in verdicts)
