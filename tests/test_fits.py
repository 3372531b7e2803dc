"""Scaling-law fits recover known parameters from synthetic data (noise-free and noisy), refuse what they cannot
fit, and run over a real (sim) campaign's merged table."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from infscale.analysis.fits import capacity, family, fit_campaign, fit_law, power_law, scaling_efficiency, usl

GPUS = np.array([1, 2, 4, 8, 16, 32, 64])


def noisy(values: np.ndarray, level: float, seed: int = 1) -> np.ndarray:
    return values * (1 + np.random.default_rng(seed).normal(0, level, len(values)))


def test_usl_recovers_its_parameters() -> None:
    exact = fit_law("usl", GPUS, usl(GPUS, 1000.0, 0.05, 0.002), bootstrap=50)
    assert exact["lambda"] == pytest.approx(1000.0, rel=1e-4)
    assert exact["sigma"] == pytest.approx(0.05, rel=1e-3) and exact["kappa"] == pytest.approx(0.002, rel=1e-3)
    assert exact["r2"] == pytest.approx(1.0)
    x = np.repeat(GPUS, 3)
    fit = fit_law("usl", x, noisy(usl(x, 1000.0, 0.05, 0.002), 0.02), bootstrap=200)
    assert fit["lambda"] == pytest.approx(1000.0, rel=0.05) and fit["sigma"] == pytest.approx(0.05, abs=0.02)
    assert fit["kappa"] == pytest.approx(0.002, abs=0.001) and fit["r2"] > 0.95
    # the true value lies inside the bootstrap interval
    assert fit["lambda_low"] <= 1000.0 <= fit["lambda_high"] and fit["sigma_low"] <= 0.05 <= fit["sigma_high"]


def test_power_law_and_capacity_knee() -> None:
    x = np.repeat(GPUS, 2)
    fit = fit_law("power", x, noisy(power_law(x, 500.0, 0.8), 0.03, seed=2))
    assert fit["a"] == pytest.approx(500.0, rel=0.08) and fit["b"] == pytest.approx(0.8, abs=0.03)
    lengths = np.array([2048, 3072, 5120, 9216, 17408, 33792], dtype=float)
    exact = fit_law("capacity", lengths, capacity(lengths, 2000.0, 6000.0, 1.0), bootstrap=30)
    assert exact["knee"] == pytest.approx(6000.0, rel=0.02) and exact["c"] == pytest.approx(2000.0, rel=1e-3)
    fit = fit_law("capacity", np.repeat(lengths, 2), noisy(capacity(np.repeat(lengths, 2), 2000, 6000, 1.0), 0.02))
    assert fit["knee"] == pytest.approx(6000.0, rel=0.15) and fit["alpha"] == pytest.approx(1.0, abs=0.15)


def test_too_few_points_give_no_fit() -> None:
    assert fit_law("usl", np.array([1, 2]), np.array([10.0, 19.0])) is None
    assert fit_law("power", np.array([4, 4, 4]), np.array([1.0, 1.1, 0.9])) is None
    assert family(4, 1, 1) == "dp" and family(2, 4, 1) == "tp×dp" and family(1, 1, 1) == "single"


def test_fits_over_a_sim_campaign(tmp_path) -> None:
    import yaml

    from infscale.analysis.merge import merge_cells
    from infscale.campaign import load_campaign
    from infscale.campaign.plan import plan_campaign
    from infscale.launch.runner import run_cells

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "name": "fits", "backend": "sim", "hardware": "h200-sxm", "models": ["llama-3.1-8b"],
        "layouts": ["dp1", "dp2", "dp4", "dp8", "tp2", "tp4", "tp8"], "requests": 256,
        "workloads": [{"name": "r", "isl": 1024, "osl": [1024, 4096, 16384]}]}))
    campaign = load_campaign(config)
    planned = plan_campaign(campaign)
    run_cells(campaign, [p for p in planned if p.feasible], tmp_path)
    merged = merge_cells(planned, tmp_path, campaign.hardware.gpus_per_node)
    fits = fit_campaign(merged, bootstrap=20)
    usl_dp = fits.filter((pl.col("law") == "usl") & (pl.col("family") == "dp"))
    assert usl_dp.height == 3  # one per OSL: 1, 2, 4, 8 GPUs of pure DP
    # 256 requests over more replicas: smaller batches each, so DP is sublinear (σ > 0) but well described
    assert 0 < usl_dp.get_column("p1").min() and usl_dp.get_column("p1").max() < 0.5
    assert usl_dp.get_column("r2").min() > 0.95 and set(usl_dp.get_column("p1_name")) == {"sigma"}
    cliffs = fits.filter(pl.col("law") == "capacity")
    assert set(cliffs.get_column("family")) == {"dp1tp1pp1", "dp2tp1pp1", "dp4tp1pp1", "dp8tp1pp1", "dp1tp2pp1",
                                                 "dp1tp4pp1", "dp1tp8pp1"}
    assert all(set(json.loads(p)) == {"c", "knee", "alpha"} for p in cliffs.get_column("params"))
    # the fits run on worker processes when there are many: the same numbers as in one process
    from polars.testing import assert_frame_equal

    assert_frame_equal(fit_campaign(merged, bootstrap=20, workers=2, parallel_above=0), fits)
    efficiency = scaling_efficiency(merged)
    assert efficiency.filter(pl.col("gpus") == 1).get_column("efficiency").to_list() == [1.0] * 3
