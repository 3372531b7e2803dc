"""The GPU machine has torch, pyarrow, pydantic and pyyaml but no polars, submitit or Snakemake: a torch campaign
(with a hardware profile) must load, plan and measure there through `run_cells`, as benchmarks/gpu_campaign.py
does. Run in a subprocess whose imports of those three packages fail."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.torch
ROOT = Path(__file__).resolve().parents[2]
PROFILE = ROOT / "results" / "reference" / "profiles" / "h100-sxm.torch.2026-11-27c.yaml"
TINY_LLAMA = ROOT / "tests" / "data" / "hf" / "tiny-llama.json"

SCRIPT = """
import json, sys
class Missing:
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("polars", "submitit", "snakemake"):
            raise ImportError(f"{name} is not installed on the GPU machine")
sys.meta_path.insert(0, Missing())
from infscale.backends.torch.backend import TorchBackend
from infscale.campaign import load_campaign
from infscale.campaign.plan import plan_campaign
from infscale.launch.runner import run_cells
campaign = load_campaign(sys.argv[1])
planned = [p for p in plan_campaign(campaign) if p.feasible]
backend = TorchBackend("cpu")
try:
    outcomes = run_cells(campaign, planned, sys.argv[2], backend)
finally:
    backend.close()
print(json.dumps({"statuses": [o.status for o in outcomes], "profile": campaign.hardware.efficiency.pp_microbatches}))
"""


def test_a_profiled_torch_campaign_runs_without_polars_submitit_or_snakemake(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "name": "tiny-gpu-path", "backend": "torch", "hardware": {"name": "h100-sxm", "profile": str(PROFILE)},
        "models": [str(TINY_LLAMA)], "layouts": ["dp1", "pp2"], "requests": 3,
        "engine": {"max_num_seqs": 4, "max_num_tokens": 64, "pp_microbatches": 0},
        "workloads": [{"name": "w", "isl": 16, "osl": 5}],
    }))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    results = tmp_path / "results" / "tiny-gpu-path"
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(config), str(results)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"statuses": ["ok", "ok"], "profile": 1}  # the profile's constants were applied
    assert len(list((results / "cells").glob("*.parquet"))) == 2
