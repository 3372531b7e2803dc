"""The GPU check scripts under benchmarks/ run end to end on CPU with their --tiny toy model (the same code path
as on the GPUs: TorchBackend.measure of two campaign cells), so a change that breaks them is caught here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.torch
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("script", "layout", "runs"), [
    ("gpu_pipeline_check.py", "pp2", ("in_turn", "pipelined")),
    ("gpu_proxy_check.py", "pp2", ("full", "proxy")),
])
def test_check_script_measures_both_runs_on_cpu(tmp_path, script, layout, runs):
    out = tmp_path / "check.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--tiny", "--layout", layout,
                    "--out", str(out)], check=True, env=env, cwd=tmp_path, capture_output=True, timeout=600)
    report = json.loads(out.read_text())
    for run in runs:
        assert report[run]["output_tokens"] == report["requests"] * report["osl"], run
        assert report[run]["output_tok_s"] > 0 and report[run]["gpu_name"] == "cpu", run
    assert set(report["relative_difference"]) >= {"output_tok_s", "tpot_ms_p50"}


def test_gpu_campaign_dry_run_passes_over_cells_that_cannot_fit(tmp_path):
    """gpu_campaign.py --dry-run with sim estimates under a hardware profile: a cell estimated above --max-cell-s
    is passed over and the next ones are still tried; a cell on disk is skipped; nothing is measured."""
    import yaml

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "name": "dry", "backend": "torch", "hardware": "h100-sxm", "models": ["llama-3.1-8b"],
        "layouts": ["tp4", "dp4"], "requests": 64, "workloads": [{"name": "w", "isl": 1024, "osl": [1024, 16384]}],
    }))
    profile = ROOT / "results" / "reference" / "profiles" / "h100-sxm.torch.2026-11-27c.yaml"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    cells = tmp_path / "out" / "dry" / "cells"

    def dry(*extra: str) -> list[str]:
        done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_campaign.py"), str(config),
                               "--results-root", str(tmp_path / "out"), "--profile", str(profile), "--estimate",
                               "sim", "--estimate-factor", "1", "--budget-s", "3000", "--dry-run", *extra],
                              check=True, env=env, capture_output=True, text=True, timeout=300)
        return done.stdout.splitlines()

    lines = dry()
    assert len(lines) == 4 and all("would measure" in line for line in lines)
    # the OSL-1K cells take well under 2 minutes, the OSL-16K ones several: passed over, the rest still tried
    lines = dry("--max-cell-s", "120")
    assert all("would measure" in line and "-o1024." in line for line in lines[:2])
    assert all("pass over" in line and "-o16384." in line and "> --max-cell-s 120" in line for line in lines[2:])
    assert len(lines) == 4 and not cells.exists()
    first = lines[0].split("would measure ")[1].split()[0]
    cells.mkdir(parents=True)
    (cells / f"{first}.parquet").touch()
    lines = dry("--max-cell-s", "120")
    assert f"{first}: skipped (measured)" in lines[0] and sum("would measure" in line for line in lines) == 1


def test_engine_speed_script_dry_run_on_cpu(tmp_path):
    """benchmarks/h200_engine_speed.py --cpu-dry-run: its prefill part (kernel check against float64, launch
    timing, the fused forward against the plain-torch layers, the engine's iterations, the layer breakdown) and
    its memory part (campaign cells through TorchBackend with a toy model) run end to end and write the report."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "h200_engine_speed.py"), "--cpu-dry-run", "--parts",
                    "prefill", "memory", "--out", str(tmp_path)], check=True, env=env, cwd=tmp_path,
                   capture_output=True, timeout=900)
    report = json.loads((tmp_path / "engine-speed.json").read_text())
    assert report["failures"] == []
    prefill = report["prefill"]
    assert prefill["passed"] and prefill["forward_check"]["token_agreement"] == 1.0
    assert max(prefill["kernel_check"]["max_rel_err"].values()) < 1e-2
    assert set(prefill["layer_breakdown"]["seconds_per_layer"]) >= {"prefill_attention", "rope_kv_write"}
    rows = report["memory"]["rows"]
    assert len(rows) == 2 and all(r["passed"] for r in rows)
    assert report["headline"]["memory_cells_failed"] == []
