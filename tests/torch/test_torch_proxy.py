"""Layer-sliced proxy runs: k of L layers run, the KV budget is the full model's, step times are scaled to L."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from infscale.analysis.merge import merge_cells
from infscale.backends.torch.backend import TorchBackend
from infscale.backends.torch.executor import TorchExecutor
from infscale.backends.torch.model import DecoderModel
from infscale.backends.torch.proxy import LayerScaling
from infscale.campaign import load_campaign
from infscale.campaign.plan import plan_campaign
from infscale.launch.runner import run_cells
from infscale.memory import plan_memory
from infscale.serving.executor import IterationBatch

pytestmark = pytest.mark.torch
TINY_LLAMA = Path(__file__).resolve().parents[1] / "data" / "hf" / "tiny-llama.json"  # 4 layers


class FakeTimer:
    """A StepTimer whose every step lasts `seconds` (the controlled clock of the scaling tests)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.marks = 0

    def start(self) -> None:
        self.marks = 1

    def mark(self) -> None:
        self.marks += 1

    def durations(self) -> np.ndarray:
        return np.full(self.marks - 1, self.seconds)

    def last(self) -> float:
        return self.seconds


# ------------------------------------------------------------------------------------------- arithmetic


def test_scaling_stretches_only_the_per_layer_part():
    scaling = LayerScaling(proxy_layers=2, full_layers=8, decode_sizes=[1, 4], decode_fixed_s=[0.1, 0.4],
                           iteration_sizes=[1], iteration_fixed_s=[0.3])
    assert scaling.factor == 4.0
    # 0.1 s fixed + 0.9 s of 2 layers -> 0.1 + 3.6 s for 8 layers
    assert scaling.scale(np.array([1.0]), rows=1)[0] == pytest.approx(0.1 + 0.9 * 4)
    # between measured sizes the fixed part is interpolated: 2 rows -> 0.2 s
    assert scaling.scale(np.array([1.0]), rows=2)[0] == pytest.approx(0.2 + 0.8 * 4)
    # beyond the largest size it is clamped at that size's value
    assert scaling.scale(np.array([1.0]), rows=64)[0] == pytest.approx(0.4 + 0.6 * 4)
    assert scaling.scale(np.array([0.5]), rows=1, kind="iteration")[0] == pytest.approx(0.3 + 0.2 * 4)
    # a step measured faster than its fixed part (noise) has no per-layer part to stretch
    assert scaling.scale(np.array([0.05]), rows=1)[0] == pytest.approx(0.1)


def test_scaling_refuses_what_is_not_a_proxy_or_not_calibrated():
    with pytest.raises(ValueError, match="1 … 7 of the model's 8 layers"):
        LayerScaling(proxy_layers=8, full_layers=8)
    with pytest.raises(ValueError, match="calibrate before scaling"):
        LayerScaling(proxy_layers=2, full_layers=8).scale(np.array([1.0]), rows=1)


# ------------------------------------------------------------------------------------------- executor


def _prefill(ids: list[int], isl: int) -> IterationBatch:
    n = len(ids)
    empty = np.zeros(0, dtype=np.int64)
    return IterationBatch(empty, empty, np.asarray(ids), np.full(n, isl), np.zeros(n, dtype=np.int64))


@pytest.mark.parametrize("fast", [False, True])
def test_executor_scales_measured_steps_with_a_controlled_timer(arch, fast):
    tiny = arch(num_layers=8)
    model = DecoderModel(tiny, dtype=torch.float32, num_layers=2)
    isl, osl = np.array([8, 8]), np.array([4, 4])
    executor = TorchExecutor(model, num_blocks=64, block_size=4, isl=isl, osl=osl, fast=fast, graph_sizes=(1, 2, 4))
    executor.warmup()
    executor.timer = FakeTimer(0.25)  # every step, layer-less or not, "takes" 0.25 s
    scaling = executor.calibrate_proxy(full_layers=8, repeats=3, warm=1)
    assert scaling.proxy_layers == 2 and scaling.factor == 4.0
    # batch sizes up to the first power of two >= the 2 requests (the graphs' sizes are capped the same way)
    assert scaling.decode_sizes == [1, 2] and scaling.decode_fixed_s == [0.25] * 2
    assert scaling.iteration_fixed_s == [0.25] * 2
    # calibration left no trace: no blocks held, no throw-away request, counters reset
    assert executor.cache.allocator.used_blocks == 0 and executor.generated == {} and executor.iterations == 0
    executor.timer = FakeTimer(1.0)  # the real steps "take" 1 s: 0.25 fixed + 0.75 per-layer (x4)
    expected = 0.25 + 0.75 * 4
    assert executor.iteration(_prefill([0, 1], 8)) == pytest.approx(expected)
    steps = executor.decode_steps(np.array([0, 1]), np.array([9, 9]), 3, None)
    assert steps == pytest.approx([expected] * 3)
    # with a horizon, the scaled times decide where the span stops: 2 steps of 3.25 s pass 5 s (5 measured
    # seconds would have taken all 3)
    steps = executor.decode_steps(np.array([0, 1]), np.array([12, 12]), 3, 5.0)
    assert steps == pytest.approx([expected] * 2)
    assert {r: len(t) for r, t in executor.generated.items()} == {0: 6, 1: 6}


def test_calibration_measures_a_real_fixed_part(arch):
    """Without a fake clock the fixed part is a positive time, and the scaled step is longer than measured."""
    model = DecoderModel(arch(num_layers=4), dtype=torch.float32, num_layers=2)
    executor = TorchExecutor(model, num_blocks=64, block_size=4, isl=np.array([8]), osl=np.array([2]))
    executor.warmup()
    scaling = executor.calibrate_proxy(full_layers=4, repeats=3, warm=1)
    assert all(s > 0 for s in scaling.decode_fixed_s + scaling.iteration_fixed_s)
    assert scaling.decode_sizes == [1]  # the eager path: powers of two below twice the request count
    measured = np.array([1.0])
    assert scaling.scale(measured, 1)[0] > measured[0]


# ------------------------------------------------------------------------------------------- campaign


def _campaign(tmp_path: Path, proxy: int | None, layouts: list[str]) -> Path:
    model: dict[str, object] = {"name": str(TINY_LLAMA)}
    if proxy is not None:
        model["proxy_layers"] = proxy
    config = tmp_path / f"proxy{proxy}.yaml"
    config.write_text(yaml.safe_dump({
        "name": "tiny-proxy", "backend": "torch", "hardware": "h100-sxm", "models": [model],
        "layouts": layouts, "requests": 5, "engine": {"max_num_seqs": 4, "max_num_tokens": 64},
        "workloads": [{"name": "w", "isl": 20, "osl": 6}],
    }))
    return config


def test_proxy_cells_have_the_full_models_capacity_and_their_own_ids(tmp_path):
    full = {p.cell.layout: p for p in plan_campaign(load_campaign(_campaign(tmp_path, None, ["dp1", "pp2"])))}
    proxy = {p.cell.layout: p for p in plan_campaign(load_campaign(_campaign(tmp_path, 2, ["dp1", "pp2"])))}
    assert full.keys() == proxy.keys()
    for layout, item in proxy.items():
        whole = full[layout]
        assert item.cell.proxy_layers == 2 and whole.cell.proxy_layers is None
        assert item.cell.spec_hash != whole.cell.spec_hash
        assert ".proxy2." in item.cell.id and ".proxy" not in whole.cell.id
        assert item.capacity_columns() == whole.capacity_columns()  # tokens, concurrency: the full model's
        assert item.memory.proxy.weights_bytes_per_gpu < whole.memory.weights_bytes_per_gpu
        assert item.memory.proxy.kv_bytes_per_token_per_gpu == whole.memory.kv_bytes_per_token_per_gpu / 2
    # the executor's KV pool: the full model's blocks, at two layers' bytes per token
    campaign = load_campaign(_campaign(tmp_path, 2, ["dp1"]))
    (item,) = plan_campaign(campaign)
    work = TorchBackend("cpu").cell_work(item.cell, campaign)
    assert work.num_layers == 2 and work.arch.num_layers == 4
    full_memory = plan_memory(work.arch, campaign.hardware, item.cell.layout, "bf16", "bf16",
                              item.cell.engine.kv_memory_fraction, item.cell.engine.kv_block_size,
                              activation_reserve_bytes=work.activation_reserve_bytes)  # the torch engine's
    assert work.config.num_blocks == full_memory.kv_blocks_per_replica == item.memory.kv_blocks_per_replica
    model = DecoderModel(work.arch, dtype=torch.float32, num_layers=work.num_layers)
    assert len(model.new_cache(4, 16).k) == 2


def test_a_proxy_campaign_runs_and_labels_its_rows(tmp_path):
    config = _campaign(tmp_path, 2, ["dp1", "pp2"])
    campaign = load_campaign(config)
    planned = plan_campaign(campaign)
    run_cells(campaign, planned, tmp_path)
    merged = merge_cells(planned, tmp_path, campaign.hardware.gpus_per_node)
    assert merged.height == 2 and set(merged["status"]) == {"ok"}, merged.select("cell_id", "status", "reason")
    assert merged["proxy_layers"].to_list() == [2, 2]
    assert (merged["output_tokens"] == 5 * 6).all()  # the executor's own OSL check passed on every rank
    assert (merged["tpot_ms_p50"] > 0).all()
    for cell_id in merged["cell_id"]:
        path = tmp_path / "cells" / f"{cell_id}.parquet"
        assert pl.read_parquet(path, columns=["proxy_layers"])["proxy_layers"][0] == 2
        meta = json.loads(pq.read_schema(path).metadata[b"infscale.provenance"])
        proxy = meta["measurement"]["proxy"]
        assert proxy["proxy_layers"] == 2 and proxy["full_layers"] == 4 and proxy["per_layer_factor"] == 2.0
        assert proxy["decode_fixed_s"] and "fixed part measured" in proxy["method"]


def test_sim_proxy_rows_are_labelled_and_predict_the_full_model(tmp_path):
    rows = {}
    for proxy in (None, 2):
        raw = yaml.safe_load(_campaign(tmp_path, proxy, ["dp1"]).read_text())
        raw["backend"] = "sim"
        config = tmp_path / f"sim{proxy}.yaml"
        config.write_text(yaml.safe_dump(raw))
        campaign = load_campaign(config)
        planned = plan_campaign(campaign)
        results = tmp_path / f"sim{proxy}"
        run_cells(campaign, planned, results)
        rows[proxy] = merge_cells(planned, results, campaign.hardware.gpus_per_node).row(0, named=True)
    assert rows[2]["proxy_layers"] == 2 and rows[None]["proxy_layers"] is None
    assert rows[2]["output_tok_s"] == rows[None]["output_tok_s"]  # the full model's prediction, labelled
