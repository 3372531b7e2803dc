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
