"""The `trtllm` engine model: measured operator tables, their interpolation, the composition of an iteration,
TensorRT-LLM's memory accounting, and `infscale predict --engine trtllm`."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from infscale import opdata
from infscale.backends.sim.backend import SimBackend
from infscale.backends.sim.stepmodel import TrtllmExecutor
from infscale.campaign import campaign_from_dict
from infscale.campaign.plan import plan_campaign
from infscale.catalog import get_hardware, get_model, load_models
from infscale.layout import Layout
from infscale.memory import GIB, plan_memory
from infscale.serving.executor import IterationBatch
from infscale.trtllm_memory import plan_trtllm_memory
from infscale.trtllm_model import TrtllmStepModel, trtllm_step_model

H200 = get_hardware("h200-sxm")
H100 = get_hardware("h100-sxm")


# ---------------------------------------------------------------------------------------------- grids


def test_grid_is_exact_on_points_linear_between_proportional_above_flat_below():
    columns = {"m": np.array([1, 1, 4, 4]), "n": np.array([10, 20, 10, 20]), "latency": np.array([1.0, 2, 4, 8])}
    grid = opdata.build_grid(columns, ["m", "n"])          # latencies in ms, the grid in seconds
    assert grid(1, 10) == pytest.approx(1e-3) and grid(4, 20) == pytest.approx(8e-3)
    assert grid(2.5, 10) == pytest.approx(2.5e-3)             # halfway in m
    assert grid(2.5, 15) == pytest.approx((2.5 + 5) / 2 * 1e-3)  # bilinear
    assert grid(8, 20) == pytest.approx(16e-3)                # twice the largest m: twice the time
    assert grid(8, 40) == pytest.approx(32e-3)                # and in both dimensions
    assert grid(0.5, 5) == pytest.approx(1e-3)                # below the grid: the smallest measured


def test_grid_holes_are_filled_from_the_smaller_neighbour_in_proportion():
    columns = {"b": np.array([1, 2, 1]), "s": np.array([100, 100, 200]), "latency": np.array([1.0, 2, 3])}
    grid = opdata.build_grid(columns, ["b", "s"])             # (b=2, s=200) was not measured
    assert grid(2, 200) == pytest.approx(6e-3)                # from (1, 200) × 2/1


def _table(system: str, operator: str, filename: str) -> dict:
    path = opdata.package_dir() / "systems" / "data" / system / operator / "trtllm" / opdata.TRTLLM_TABLES / filename
    return pq.read_table(path).to_pydict()


def test_gemm_lookup_returns_the_measured_row_at_a_measured_shape():
    rows = _table("h200_sxm", "gemm", "gemm_perf.parquet")
    checked = 0
    for dtype, m, n, k, latency in zip(rows["gemm_dtype"], rows["m"], rows["n"], rows["k"], rows["latency"]):
        if dtype == "fp8" and n == 10240 and k == 8192 and m in (1, 64, 1024, 8192):
            assert opdata.gemm_grid("h200_sxm", "fp8")(m, n, k) == pytest.approx(latency * 1e-3)
            checked += 1
    assert checked == 4


def test_generation_attention_interpolates_between_measured_contexts():
    grid = opdata.attention_grid("h200_sxm", "generation", 16, 2, 128, "bfloat16", "fp8")
    low, high = grid(64, 2047), grid(64, 4095)
    middle = grid(64, 3071)
    assert low < middle < high and middle == pytest.approx((low + high) / 2)


def test_missing_operator_package_is_named_with_its_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "aiconfigurator_core", None)   # `import aiconfigurator_core` fails
    with pytest.raises(opdata.OperatorDataError, match=r"pip install 'aiconfigurator-core==0\.12\.0'"):
        opdata.data_version()
    campaign = {"name": "x", "backend": "sim", "sim": {"engine": "trtllm"}, "hardware": "h200-sxm",
                "models": ["llama-3.1-8b"], "layouts": ["tp1"], "workloads": [{"name": "w", "isl": 128, "osl": 128}]}
    with pytest.raises(opdata.OperatorDataError, match="aiconfigurator-core"):
        plan_campaign(campaign_from_dict(campaign))


def test_predict_without_the_operator_package_prints_one_line(tmp_path):
    shadow = tmp_path / "aiconfigurator_core.py"
    shadow.write_text("raise ImportError('simulated: not installed')\n")
    result = subprocess.run([sys.executable, "-m", "infscale", "predict", "--model", "llama-3.1-8b", "--engine",
                             "trtllm", "--isl", "128", "--osl", "128"], capture_output=True, text=True, timeout=120,
                            env={**_env(), "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "pip install 'aiconfigurator-core==0.12.0'" in result.stderr


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


def test_hardware_without_tables_is_refused_at_load_time():
    from infscale.campaign import SpecError

    campaign = {"name": "x", "backend": "sim", "sim": {"engine": "trtllm"}, "hardware": "h200-sxm",
                "models": ["llama-3.1-8b"], "layouts": ["tp1"], "workloads": [{"name": "w", "isl": 128, "osl": 128}]}
    assert campaign_from_dict(campaign).sim_engine == "trtllm"
    with pytest.raises(opdata.OperatorDataError, match="covers h100-sxm, h200-sxm"):
        opdata.system_name("a100-sxm")
    with pytest.raises(SpecError, match="sim.engine"):
        campaign_from_dict({**campaign, "sim": {"engine": "vllm"}})


# ---------------------------------------------------------------------------------------------- composition


def _lookups(model: TrtllmStepModel, tokens: int, context: float) -> dict[str, float]:
    """The table lookups a pure-decode iteration of `tokens` sequences at `context` must add up to."""
    arch = model.model
    tp = model.tp
    heads, kv = arch.num_attention_heads // tp, max(1, arch.num_kv_heads // tp)
    gemm = opdata.gemm_grid("h200_sxm", "fp8")
    head = opdata.gemm_grid("h200_sxm", "bfloat16")
    custom = opdata.allreduce_grid("h200_sxm", tp)(tokens * arch.hidden_size)
    nccl = opdata.nccl_allreduce_grid("h200_sxm", tp)(tokens * arch.hidden_size)
    attention = opdata.attention_grid("h200_sxm", "generation", heads, kv, 128, "bfloat16", "fp8")
    h, inter, layers = arch.hidden_size, arch.intermediate_size, arch.num_layers
    return {
        "qkv_gemm": layers * gemm(tokens, (heads + 2 * kv) * 128, h),
        "o_gemm": layers * gemm(tokens, h, heads * 128),
        "gate_up_gemm": layers * gemm(tokens, 2 * inter // tp, h),
        "down_gemm": layers * gemm(tokens, h, inter // tp),
        "allreduce": 2 * layers * min(custom, nccl),
        "lm_head_gemm": head(tokens, -(-arch.vocab_size // tp), h),
        "generation_attention": layers * attention(tokens, context),
    }


@pytest.mark.parametrize("name", ["llama-3.3-70b", "llama-3.1-405b"])
def test_tp_step_times_decompose_into_the_table_lookups(name):
    arch = get_model(name)
    steps = {}
    for tp in (2, 4, 8):
        model = trtllm_step_model(arch, H200, Layout(tp=tp), "fp8", "fp8")
        batch = IterationBatch(np.arange(32), np.full(32, 2048), np.zeros(0, dtype=np.int64),
                               np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
        step = TrtllmExecutor(model).iteration(batch)
        expected = _lookups(model, 32, 2048)
        parts = {p.name: p.total for p in model.step_parts(batch.decode_context, batch.prefill_chunk,
                                                            batch.prefill_past)}
        assert parts == pytest.approx(expected, rel=1e-9)
        assert step == pytest.approx(sum(expected.values()), rel=1e-9)
        steps[tp] = step
    assert steps[2] > steps[4] > steps[8]      # the measured GEMMs shrink faster than the all-reduces grow


def test_decode_span_matches_iterating_step_by_step():
    model = trtllm_step_model(get_model("qwen3-32b"), H100, Layout(tp=2), "fp8", "fp8")
    context = np.array([1000, 1500, 2100, 3000])
    span = model.decode_span(context, 5)
    one_by_one = [model.batch_time(context + j, np.zeros(0), np.zeros(0)) for j in range(5)]
    assert span == pytest.approx(one_by_one, rel=1e-9)


def test_prefill_costs_more_with_longer_prompts_and_moe_and_mla_compose():
    dense = trtllm_step_model(get_model("llama-3.1-8b"), H200, Layout(), "bf16", "bf16")
    empty = np.zeros(0)
    assert dense.batch_time(empty, np.array([4096]), np.array([0])) > dense.batch_time(empty, np.array([1024]),
                                                                                       np.array([0]))
    for name, layout in (("qwen3-30b-a3b", Layout(tp=4, ep=4)), ("deepseek-r1", Layout(tp=8))):
        model = trtllm_step_model(get_model(name), H200, layout, "fp8", "fp8")
        parts = {p.name for p in model.step_parts(np.full(8, 1000), empty, empty)}
        assert "moe" in parts and "generation_attention" in parts


# ---------------------------------------------------------------------------------------------- memory


def test_llama_70b_fp8_on_one_h100_is_feasible_as_tensorrt_llm_runs_it():
    arch = get_model("llama-3.3-70b")
    roofline = plan_memory(arch, H100, Layout(), "fp8", "fp8", None, 16)
    assert roofline.problem(2048, arch.name, Layout()) is not None     # 90 % of HBM − 6 GiB reserve: no room
    trt = plan_trtllm_memory(arch, H100, Layout(), "fp8", "fp8")
    assert trt.problem(2048, arch.name, Layout()) is None
    # KV = 0.9 × (HBM − weights − workspace − runtime): several GiB, tens of thousands of fp8 tokens
    free = H100.hbm_bytes - trt.weights_bytes_per_gpu - trt.activation_reserve_bytes
    assert trt.kv_pool_bytes_per_gpu == pytest.approx(0.9 * free)
    assert trt.kv_tokens_per_replica > 30_000
    planned = plan_campaign(campaign_from_dict({
        "name": "x", "backend": "trtllm", "hardware": "h100-sxm", "models": ["llama-3.3-70b"],
        "precision": ["fp8/fp8"], "layouts": ["tp1"], "workloads": [{"name": "w", "isl": 1024, "osl": 1024}]}))
    assert planned[0].feasible and planned[0].memory.kv_tokens_per_replica == trt.kv_tokens_per_replica


def test_bf16_70b_on_one_h100_is_refused_with_tensorrt_llms_reason():
    arch = get_model("llama-3.3-70b")
    reason = plan_trtllm_memory(arch, H100, Layout(), "bf16", "bf16").problem(2048, arch.name, Layout())
    assert reason is not None and reason.startswith("TensorRT-LLM: weights 131.4 GiB/GPU")
    assert "no free memory for the KV cache" in reason


# ---------------------------------------------------------------------------------------------- campaigns


def test_trtllm_campaign_defaults_and_sim_cell_identity():
    base = {"name": "x", "hardware": "h200-sxm", "models": ["llama-3.1-8b"], "layouts": ["tp1"],
            "workloads": [{"name": "w", "isl": 128, "osl": 128}]}
    (trt,) = plan_campaign(campaign_from_dict({**base, "backend": "trtllm"}))
    assert (trt.cell.engine.max_num_seqs, trt.cell.engine.kv_block_size) == (2048, 32)   # trtllm-bench's
    assert trt.cell.prediction_engine is None                                          # a measurement's id
    (sim,) = plan_campaign(campaign_from_dict({**base, "backend": "sim"}))
    assert (sim.cell.engine.max_num_seqs, sim.cell.engine.kv_block_size) == (256, 16)   # unchanged
    assert "prediction_engine" not in sim.cell.spec_json
    (engine,) = plan_campaign(campaign_from_dict({**base, "backend": "sim", "sim": {"engine": "trtllm"}}))
    assert engine.cell.prediction_engine == "trtllm/aiconfigurator-core==0.12.0"
    assert engine.cell.id != sim.cell.id
    (torch,) = plan_campaign(campaign_from_dict({**base, "backend": "sim", "sim": {"engine": "torch"}}))
    assert torch.cell.id == sim.cell.id                                                 # the roofline model


def test_sim_prediction_names_its_operator_data_and_never_preempts():
    campaign = campaign_from_dict({
        "name": "x", "backend": "sim", "sim": {"engine": "trtllm"}, "hardware": "h100-sxm",
        "models": ["llama-3.3-70b"], "precision": ["fp8/fp8"], "layouts": ["tp1"],
        "workloads": [{"name": "w", "isl": 1024, "osl": 4096, "requests": 96,
                       "arrival": {"mode": "concurrency", "concurrency": 48}}]})
    (item,) = plan_campaign(campaign)
    result = SimBackend().measure(item.cell, None, campaign)  # type: ignore[arg-type]
    assert result.provenance["engine_model"]["operator_data"].startswith("aiconfigurator-core==0.12.0")
    assert result.provenance["engine_model"]["capacity_policy"] == "guaranteed_no_evict"
    assert result.summary["preemptions"] == 0
    # the KV pool holds fewer than 48 whole sequences of 5120 tokens: the rest wait (no-evict admission)
    whole = item.memory.kv_blocks_per_replica // -(-5120 // 32)
    assert result.summary["max_running_batch"] <= whole < 48


def _predict(*args: str) -> dict:
    result = subprocess.run([sys.executable, "-m", "infscale", "predict", "--engine", "trtllm", "--json", *args],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_predict_engine_trtllm_reports_engine_and_data():
    data = _predict("--model", "llama-3.3-70b", "--hardware", "h100-sxm", "--precision", "fp8/fp8",
                    "--isl", "1024", "--osl", "1024", "--arrival", "concurrency:8", "--requests", "16")
    assert data["feasible"] and data["engine"] == "trtllm"
    assert data["operator_data"].startswith("aiconfigurator-core==0.12.0")
    assert (data["max_num_seqs"], data["max_num_tokens"]) == (2048, 8192)
    assert data["preemptions"] == 0 and data["tpot_ms_p50"] > 0


@pytest.mark.parametrize("hardware", ["h100-sxm", "h200-sxm"])
def test_every_catalog_model_predicts_at_a_few_layouts(hardware):
    hw = get_hardware(hardware)
    for name, arch in load_models().items():
        precision = "fp8/fp8" if arch.family == "deepseek_v3" else "bf16"
        for layout in (Layout(tp=8), Layout(tp=4, pp=2), Layout(tp=2), Layout(tp=8, ep=8 if arch.is_moe else 1)):
            campaign = campaign_from_dict({
                "name": "x", "backend": "sim", "sim": {"engine": "trtllm"}, "hardware": hardware,
                "models": [name], "precision": [precision], "layouts": [str(layout)],
                "workloads": [{"name": "w", "isl": 512, "osl": 256, "requests": 16,
                               "arrival": {"mode": "concurrency", "concurrency": 8}}]})
            (item,) = plan_campaign(campaign)
            if not item.feasible:
                assert item.reason and ("TensorRT-LLM" in item.reason or "KV pool" in item.reason)
                assert item.memory.weights_bytes_per_gpu > 0.5 * hw.hbm_bytes  # only the big ones
                continue
            summary = SimBackend().measure(item.cell, None, campaign).summary  # type: ignore[arg-type]
            assert summary["tpot_ms_p50"] > 0 and summary["ttft_ms_p50"] > 0, (name, layout)
            assert summary["preemptions"] == 0


def test_memory_plan_counts_in_gib():
    plan = plan_trtllm_memory(get_model("llama-3.1-8b"), H200, Layout(), "bf16", "bf16")
    assert plan.weights_bytes_per_gpu / GIB == pytest.approx(14.96, abs=0.01)
    assert plan.kv_block_size == 32 and plan.free_fraction == 0.9


def test_step_model_rejects_uncovered_hardware():
    with pytest.raises(opdata.OperatorDataError):
        TrtllmStepModel(get_model("llama-3.1-8b"), H200.model_copy(update={"name": "b200"}), Layout(), "bf16", "bf16")


def test_fp8_weights_run_with_fp8_kv_under_tensorrt_llm():
    from infscale.campaign.plan import engine_kv_dtype

    assert engine_kv_dtype("trtllm", "fp8", "bf16") == "fp8"
    assert engine_kv_dtype(None, "fp8", "bf16") == "bf16" and engine_kv_dtype("trtllm", "bf16", "bf16") == "bf16"
    base = {"name": "x", "backend": "sim", "sim": {"engine": "trtllm"}, "hardware": "h200-sxm",
            "models": ["llama-3.3-70b"], "layouts": ["tp2"], "workloads": [{"name": "w", "isl": 128, "osl": 128}]}
    (fp8,) = plan_campaign(campaign_from_dict({**base, "precision": ["fp8"]}))
    (both,) = plan_campaign(campaign_from_dict({**base, "precision": ["fp8/fp8"]}))
    assert fp8.memory.kv_bytes_per_token_per_gpu == both.memory.kv_bytes_per_token_per_gpu == 80 * 4 * 128 * 2
