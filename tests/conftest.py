"""Shared fixtures: a small sim campaign taken through the analysis commands (merge, fit, claims), for the figure
and report tests."""

from __future__ import annotations

import pytest
import yaml


@pytest.fixture(scope="session")
def sim_results(tmp_path_factory):
    """(config file, results root) of a demo-like sim campaign: two models, layouts over 1, 2 and 8 GPUs, an OSL
    sweep and the prefill-heavy control; merged, fitted and its claims checked, figures and report not yet made."""
    from infscale.cli import main
    from infscale.launch.runner import run_cells
    from infscale.pipeline import CampaignRun

    root = tmp_path_factory.mktemp("analysis")
    config = root / "figs.yaml"
    config.write_text(yaml.safe_dump({
        "name": "figs", "backend": "sim", "hardware": "h200-sxm", "models": ["llama-3.1-8b", "qwen2.5-32b"],
        "layouts": ["dp1", "dp2", "tp2", "dp8", "tp8", "dp4tp2", "dp2tp4", "tp4pp2"], "requests": 64,
        "workloads": [{"name": "reasoning", "isl": 1024, "osl": [1024, 4096, 16384]},
                      {"name": "prefill-heavy", "pairs": [[2048, 128]]}]}))
    results = root / "results"
    run = CampaignRun(config, results, "auto")
    run_cells(run.campaign, [p for p in run.planned if p.feasible], run.results_dir)
    for command in ("merge", "fit", "claims"):
        assert main([command, str(config), "--results-root", str(results)]) == 0
    return config, results
