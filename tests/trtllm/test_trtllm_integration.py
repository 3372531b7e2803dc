"""A real TensorRT-LLM run: one tiny cell through the trtllm backend, both flows.

Runs only where `tensorrt_llm` imports, `trtllm-bench` is on PATH, a GPU is visible and
INFSCALE_TRTLLM_MODEL_DIR names a local Hugging Face model directory (config.json + tokenizer; weights are not
read). Everywhere else it is skipped and pytest shows which of these is missing. Never runs in this project's CI
(no GPU, and TensorRT-LLM is not installable from PyPI).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest
import yaml

from infscale.telemetry import visible_gpus

MODEL_DIR = os.environ.get("INFSCALE_TRTLLM_MODEL_DIR")


def _missing() -> str | None:
    if importlib.util.find_spec("tensorrt_llm") is None:
        return "tensorrt_llm does not import here (TensorRT-LLM comes from NVIDIA's container or package index)"
    if shutil.which("trtllm-bench") is None:
        return "trtllm-bench is not on PATH"
    if not visible_gpus():
        return "no GPU visible through NVML"
    if not MODEL_DIR or not (Path(MODEL_DIR) / "config.json").exists():
        return "INFSCALE_TRTLLM_MODEL_DIR does not name a local model dir with config.json and a tokenizer"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


@pytest.mark.parametrize("flow", ["pytorch", "engine"])
def test_one_tiny_cell_end_to_end(tmp_path: Path, flow: str) -> None:
    import tensorrt_llm

    from infscale.campaign import load_campaign
    from infscale.campaign.plan import plan_campaign
    from infscale.launch.runner import run_cells

    version = tensorrt_llm.__version__
    if flow == "engine" and tuple(int(x) for x in version.split(".")[:2]) > (1, 2):
        pytest.skip(f"the engine flow needs TensorRT-LLM ≤ 1.2.x; this is {version}")
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "name": f"trtllm-{flow}", "backend": "trtllm", "hardware": "h100-sxm", "models": [f"{MODEL_DIR}/config.json"],
        "layouts": ["dp1"], "requests": 8, "engine": {"max_num_seqs": 8, "max_num_tokens": 2048},
        "workloads": [{"name": "w", "isl": 64, "osl": 32}]}))
    campaign = load_campaign(config)
    model = next(iter(campaign.models.values())).name
    from infscale.backends import get_backend

    backend = get_backend("trtllm", {"flow": flow, "version": version, "model_paths": {model: MODEL_DIR},
                                     "engine_cache": str(tmp_path / "engines"), "workspace": str(tmp_path),
                                     "warmup": 0})
    (outcome,) = run_cells(campaign, [p for p in plan_campaign(campaign) if p.feasible], tmp_path / "results",
                           backend)
    assert outcome.status == "ok", outcome.reason
    assert outcome.summary["output_tokens"] == 8 * 32 and outcome.summary["output_tok_s"] > 0
    assert outcome.summary["ttft_ms_p50"] is not None and outcome.summary["engine_path"] == f"trtllm-{flow}"
