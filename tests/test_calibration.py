"""Hardware profiles: constants from the committed GPU benchmark outputs, a fit on measured cells with a held-out
model, and the errors a user gets for a bad profile."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from infscale.analysis.merge import merge_cells
from infscale.analysis.validate import validate
from infscale.calibration import (
    ProfileError,
    fit_engine_constants,
    from_microbenchmarks,
    load_profile,
    make_profile,
    moe_layer_latency,
    with_hardware,
    write_profile,
)
from infscale.campaign import load_campaign
from infscale.campaign.plan import plan_campaign
from infscale.catalog import get_hardware
from infscale.cli import main

ROOT = Path(__file__).resolve().parents[1]
PROFILES = ROOT / "results" / "reference" / "profiles"
MICROBENCH = PROFILES / "h100-sxm-x4.2026-11-27.microbench.json"
ROOFLINE = PROFILES / "h100-sxm-x4.2026-11-27.torch_decode_roofline.json"
CONFIG = ROOT / "config" / "gpu-node.yaml"
RESULTS = ROOT / "results" / "reference"


def test_constants_from_the_benchmark_outputs() -> None:
    hardware = get_hardware("h100-sxm")
    roofline = json.loads(ROOFLINE.read_text())
    efficiency, sources = from_microbenchmarks(hardware, json.loads(MICROBENCH.read_text()), roofline)
    assert set(sources) == {f"efficiency.{k}" for k in efficiency}
    tp1 = [r["bytes_per_step"] / r["step_seconds_median"] for r in roofline["rows"] if r["tp"] == 1]
    assert efficiency["hbm_bandwidth"] == pytest.approx(np.median(tp1) / 3.35e12)
    assert 0.6 < efficiency["hbm_bandwidth"] < 0.95 and 0.4 < efficiency["matmul"] < 0.8
    # inside a CUDA graph an all-reduce costs ~13-17 us per call here, far from the 75-85 us of an eager one
    assert 5e-6 < efficiency["allreduce_latency_s"] < 2e-5
    assert efficiency["allreduce_bus_bandwidth"] == pytest.approx(334.2e9, rel=1e-3)


def test_moe_layer_latency_from_the_moe_block_benchmark() -> None:
    """The committed H100 MoE block times: a fixed ~140 us per layer beyond reading the experts at ~2.6 TB/s."""
    block = json.loads((PROFILES / "h100-sxm-x4.2026-11-27.moe-block.json").read_text())
    latency, source = moe_layer_latency(block)
    assert 100e-6 < latency < 180e-6 and "grouped GEMMs" in source and "H100" in source
    hardware = get_hardware("h100-sxm")
    efficiency, sources = from_microbenchmarks(hardware, json.loads(MICROBENCH.read_text()),
                                               json.loads(ROOFLINE.read_text()), block)
    assert efficiency["moe_layer_latency_s"] == latency and "efficiency.moe_layer_latency_s" in sources
    with pytest.raises(ProfileError, match="at least 2 batch sizes"):
        moe_layer_latency({"moe_block": block["moe_block"][:1]})
    flat = [dict(r, graph_ms=0.5) for r in block["moe_block"]]  # no growth with bytes: no bandwidth term
    with pytest.raises(ProfileError, match="do not fit"):
        moe_layer_latency({"moe_block": flat})


def test_moe_layer_latency_adds_its_cost_to_every_moe_layer_of_a_step() -> None:
    from infscale.calibration import with_efficiency
    from infscale.catalog import get_model
    from infscale.layout import Layout
    from infscale.perfmodel import build_step_model

    model, hardware = get_model("qwen3-30b-a3b"), get_hardware("h100-sxm")
    layout = Layout(dp=1, tp=2, pp=2)
    base = build_step_model(model, hardware, layout, "bf16", "bf16")
    slow = build_step_model(model, with_efficiency(hardware, {"moe_layer_latency_s": 1e-4}), layout, "bf16", "bf16")
    # 48 MoE layers over 2 stages: 24 per stage, each stage runs once per (single micro-batch) decode step
    added = slow.iteration_time(1, 1, 1000, 1000) - base.iteration_time(1, 1, 1000, 1000)
    assert added == pytest.approx(2 * 24 * 1e-4)
    llama = get_model("llama-3.1-8b")
    dense = build_step_model(llama, with_efficiency(hardware, {"moe_layer_latency_s": 1e-4}), layout, "bf16", "bf16")
    plain = build_step_model(llama, hardware, layout, "bf16", "bf16")
    assert dense.iteration_time(1, 1, 1000, 1000) == plain.iteration_time(1, 1, 1000, 1000)


MICROBENCH_C = PROFILES / "h100-sxm-x4.2026-11-27c.microbench.json"


def test_constants_from_the_package_microbenchmark_without_a_roofline() -> None:
    """infscale.microbench's H100 output alone: HBM read, and the latencies of collectives issued in a CUDA graph."""
    hardware = get_hardware("h100-sxm")
    microbench = json.loads(MICROBENCH_C.read_text())
    efficiency, sources = from_microbenchmarks(hardware, microbench)
    assert set(sources) == {f"efficiency.{k}" for k in efficiency}
    assert efficiency["hbm_bandwidth"] == pytest.approx(microbench["memory"]["hbm_read_bytes_per_s"] / 3.35e12)
    # one call inside a graph: ~9-12 us; the same call timed eagerly costs 40-110 us of launch and wait
    assert 5e-6 < efficiency["p2p_latency_s"] < 2e-5 and 5e-6 < efficiency["allreduce_latency_s"] < 2e-5
    eager = [min(c["ops"]["pp_handoff"], key=lambda r: r["bytes"])["seconds"] for c in microbench["collectives"]]
    assert min(eager) > 2 * efficiency["p2p_latency_s"]
    assert efficiency["pp_microbatches"] == 1 and "in turn" in sources["efficiency.pp_microbatches"]
    other_engine, _ = from_microbenchmarks(hardware, microbench, engine="trtllm")
    assert "pp_microbatches" not in other_engine


def test_a_measurement_of_other_hardware_or_the_cpu_is_refused() -> None:
    microbench = json.loads(MICROBENCH_C.read_text())
    with pytest.raises(ProfileError, match="ran on 'NVIDIA H100 80GB HBM3', not on h200-sxm"):
        from_microbenchmarks(get_hardware("h200-sxm"), microbench)
    on_cpu = {**microbench, "environment": {"device": "cpu", "gpu_name": "cpu", "host": "laptop"}}
    with pytest.raises(ProfileError, match="measured on the CPU .host laptop., not on h100-sxm"):
        from_microbenchmarks(get_hardware("h100-sxm"), on_cpu)


def test_an_engine_without_micro_batches_runs_its_pp_stages_in_turn() -> None:
    from infscale.calibration import with_efficiency
    from infscale.catalog import get_model
    from infscale.layout import Layout
    from infscale.perfmodel import build_step_model

    model, hardware = get_model("llama-3.1-8b"), get_hardware("h100-sxm")
    pipelined = build_step_model(model, hardware, Layout(dp=1, tp=2, pp=2), "bf16", "bf16")
    in_turn = build_step_model(model, with_efficiency(hardware, {"pp_microbatches": 1}), Layout(dp=1, tp=2, pp=2),
                               "bf16", "bf16")
    batch, context = 64, 64 * 4096
    expected = 2 * (in_turn.stage_time(batch, context, context) + in_turn.p2p_time(batch)) + in_turn.iteration_overhead
    assert in_turn.iteration_time(batch, batch, context, context) == pytest.approx(expected)
    # split in two micro-batches each stage reads half the KV per pass: the in-turn engine pays all of it twice
    assert in_turn.iteration_time(batch, batch, context, context) > pipelined.iteration_time(batch, batch, context,
                                                                                             context)
    first, slope = in_turn.decode_line(batch, context)
    assert first == pytest.approx(expected) and slope == pytest.approx(2 * batch * in_turn.kv_bytes_per_token
                                                                       / in_turn.hbm_bandwidth)
    tp4 = Layout(dp=1, tp=4, pp=1)  # no PP: nothing changes
    assert build_step_model(model, with_efficiency(hardware, {"pp_microbatches": 1}), tp4, "bf16", "bf16"
                            ).iteration_time(8, 8, 8000, 8000) == pytest.approx(
        build_step_model(model, hardware, tp4, "bf16", "bf16").iteration_time(8, 8, 8000, 8000))


def test_a_cell_that_pipelines_decode_keeps_its_engines_prefill_schedule() -> None:
    """A torch profile says 1 (stages in turn); a cell with pp_microbatches 0 pipelines its decode steps, but
    the engine still runs iterations with prompt tokens in turn, and the model says so. A cell of an engine that
    pipelines anyway (catalog: 0) pipelines both; a cell asking for 1 runs both in turn."""
    from infscale.calibration import with_efficiency
    from infscale.catalog import get_model
    from infscale.layout import Layout
    from infscale.perfmodel import build_step_model

    model, hardware = get_model("llama-3.1-8b"), get_hardware("h100-sxm")
    torch_engine = with_efficiency(hardware, {"pp_microbatches": 1})
    layout = Layout(dp=1, tp=2, pp=2)
    cell = build_step_model(model, torch_engine, layout, "bf16", "bf16", pp_microbatches=0)
    assert (cell.microbatches(64), cell.microbatches(64, prefill=True)) == (2, 1)
    in_turn = build_step_model(model, torch_engine, layout, "bf16", "bf16")
    pipelined = build_step_model(model, hardware, layout, "bf16", "bf16")
    args = (64, 64, 64 * 4096, 64 * 4096)
    assert cell.iteration_time(*args) == pytest.approx(pipelined.iteration_time(*args))
    assert cell.iteration_time(*args, prefill=True) == pytest.approx(in_turn.iteration_time(*args, prefill=True))
    both = build_step_model(model, hardware, layout, "bf16", "bf16", pp_microbatches=0)
    assert (both.microbatches(64), both.microbatches(64, prefill=True)) == (2, 2)
    neither = build_step_model(model, hardware, layout, "bf16", "bf16", pp_microbatches=1)
    assert (neither.microbatches(64), neither.microbatches(64, prefill=True)) == (1, 1)


def test_fit_on_one_model_and_check_the_other(tmp_path: Path) -> None:
    campaign = load_campaign(CONFIG)
    planned = plan_campaign(campaign)
    merged = merge_cells(planned, RESULTS / "gpu-node", campaign.hardware.gpus_per_node)
    hardware = campaign.hardware
    measured, _ = from_microbenchmarks(hardware, json.loads(MICROBENCH.read_text()), json.loads(ROOFLINE.read_text()))
    base = hardware.model_copy(update={"efficiency": hardware.efficiency.model_copy(update=measured)})
    fitted, sources, cells, rms = fit_engine_constants(with_hardware(campaign, base), planned, merged, base,
                                                       ["llama-3.1-8b"])
    assert len(cells) == 15 and all(c.startswith("llama-3.1-8b.") for c in cells)  # every Llama cell (graphed)
    assert set(fitted) == {"matmul", "iteration_overhead_s"} and np.isfinite(rms)
    profile = make_profile("test-profile", hardware, "torch", {**measured, **fitted}, {
        **{f"efficiency.{k}": "microbenchmark" for k in measured}, **sources}, [MICROBENCH, ROOFLINE], cells)
    path = write_profile(profile, tmp_path / "p.yaml")
    loaded = load_profile(path)
    assert loaded == profile and "profile test-profile:" in loaded.apply(hardware).sources["efficiency.matmul"]

    def median_error(frame: pl.DataFrame, held_out: bool) -> float:
        rows = frame.filter(pl.col("in_medians") & (pl.col("held_out") == held_out))
        return float(rows.get_column("output_tok_s_error").abs().median())

    before = validate(campaign, planned, merged, cells)
    after = validate(with_hardware(campaign, loaded.apply(hardware)), planned, merged, loaded.fitted_on)
    # the Qwen2.5-32B and Qwen3-30B-A3B cells took no part in the fit: calibration must bring them closer
    assert median_error(after, held_out=True) < median_error(before, held_out=True)
    assert after.filter(~pl.col("held_out")).get_column("model").unique().to_list() == ["llama-3.1-8b"]


@pytest.mark.parametrize("content, expected", [
    ("name: x\nhardware: h100-sxm\nengine: torch\ncreated_at: now\nefficiency: {hbm_bw: 0.8}\nsources: {}\n",
     r"unknown efficiency field\(s\) hbm_bw"),
    ("name: x\nhardware: h100-sxm\n", "engine: Field required"),
    ("- a list\n", "not a profile mapping"),
])
def test_bad_profiles_are_refused_with_the_reason(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(ProfileError, match=expected):
        load_profile(path)
    with pytest.raises(ProfileError, match="no such profile file"):
        load_profile(tmp_path / "missing.yaml")


def test_cli_refuses_a_profile_of_other_hardware_and_a_fit_without_models(capsys) -> None:
    profile = PROFILES / "h100-sxm.torch.2026-11-27.yaml"
    assert main(["predict", "--model", "llama-3.1-8b", "--hardware", "h200-sxm", "--isl", "128", "--osl", "128",
                 "--profile", str(profile)]) == 2
    assert "is for h100-sxm, not h200-sxm" in capsys.readouterr().err
    assert main(["calibrate", "--hardware", "h100-sxm", "--microbench", str(MICROBENCH), "--roofline", str(ROOFLINE),
                 "--name", "x", "--out", "/dev/null", "--fit", str(CONFIG)]) == 2
    assert "--fit needs --train-models" in capsys.readouterr().err


def _sim_campaign(tmp_path: Path, profile: str | None, backend: str = "sim"):
    from infscale.campaign import load_campaign

    hardware = {"name": "h100-sxm", **({"profile": profile} if profile else {})}
    spec = {"name": "prof", "backend": backend, "hardware": hardware, "models": ["llama-3.1-8b"],
            "layouts": ["tp2", "pp2"], "workloads": [{"name": "r", "isl": 256, "osl": 512}], "requests": 16}
    path = tmp_path / f"prof-{backend}-{bool(profile)}.yaml"
    path.write_text(json.dumps(spec))
    return load_campaign(path)


def test_a_sim_campaign_predicts_with_the_profile_it_names(tmp_path: Path) -> None:
    """hardware.profile: the sim cells carry the profile in their identity and their files its provenance, and
    the numbers are the profile's (PP2 runs its stages in turn with profile c)."""
    import shutil

    from infscale.launch.runner import run_cells
    from infscale.results.io import cell_file, read_metadata, read_summary

    profile_path = PROFILES / "h100-sxm.torch.2026-11-27c.yaml"
    shutil.copy(profile_path, tmp_path / "c.yaml")
    plain, profiled = _sim_campaign(tmp_path, None), _sim_campaign(tmp_path, "c.yaml")  # relative to the file
    assert profiled.hardware.efficiency.pp_microbatches == 1 and plain.hardware.efficiency.pp_microbatches == 0
    plain_cells, profiled_cells = plan_campaign(plain), plan_campaign(profiled)
    label = profiled_cells[0].cell.hardware_profile
    assert label is not None and label.startswith("h100-sxm.torch.2026-11-27c@")
    assert plain_cells[0].cell.hardware_profile is None and "hardware_profile" not in plain_cells[0].cell.spec_json
    assert {p.cell.id for p in plain_cells}.isdisjoint({p.cell.id for p in profiled_cells})
    assert profiled_cells[0].est_seconds != plain_cells[0].est_seconds  # the planner uses the profile too

    run_cells(profiled, profiled_cells, tmp_path / "out")
    run_cells(plain, plain_cells, tmp_path / "plain")
    for planned, other in zip(profiled_cells, plain_cells):
        path = cell_file(tmp_path / "out", planned.cell.id)
        recorded = read_metadata(path)["provenance"]["measurement"]["hardware_profile"]
        assert recorded["sha256"] == hashlib.sha256(profile_path.read_bytes()).hexdigest()
        assert recorded["efficiency"]["pp_microbatches"] == 1
        assert label in pl.read_parquet(path).get_column("cell_json")[0]
        mine, theirs = read_summary(path), read_summary(cell_file(tmp_path / "plain", other.cell.id))
        assert mine["output_tok_s"] != theirs["output_tok_s"]


def test_a_campaign_profile_that_cannot_be_used_is_a_spec_error(tmp_path: Path) -> None:
    from infscale.campaign import SpecError

    with pytest.raises(SpecError, match=r"hardware.profile: .*missing.yaml: no such profile file"):
        _sim_campaign(tmp_path, "missing.yaml")
    other = tmp_path / "h200.yaml"
    other.write_text((PROFILES / "h100-sxm.torch.2026-11-27c.yaml").read_text().replace("hardware: h100-sxm",
                                                                                        "hardware: h200-sxm"))
    with pytest.raises(SpecError, match=r"hardware.profile: profile 'h100-sxm.torch.2026-11-27c' is for h200-sxm, "
                                        "not h100-sxm"):
        _sim_campaign(tmp_path, str(other))


def test_a_measuring_campaign_keeps_its_cells_whatever_the_profile(tmp_path: Path) -> None:
    """A torch cell's identity does not depend on the model's constants (only its time estimate does)."""
    plain = plan_campaign(_sim_campaign(tmp_path, None, backend="torch"))
    profiled = plan_campaign(_sim_campaign(tmp_path, str(PROFILES / "h100-sxm.torch.2026-11-27c.yaml"), "torch"))
    assert [p.cell.id for p in plain] == [p.cell.id for p in profiled]
    assert [p.est_seconds for p in plain] != [p.est_seconds for p in profiled]


def test_the_engine_overhead_benchmark_gives_t0_when_nothing_is_fitted() -> None:
    microbench = json.loads(MICROBENCH_C.read_text())
    assert "engine_overhead" not in microbench  # measured before the benchmark existed: t_0 stays the catalog's
    assert "iteration_overhead_s" not in from_microbenchmarks(get_hardware("h100-sxm"), microbench)[0]
    microbench["engine_overhead"] = {"rows": [{"batch": b, "seconds_per_iteration": s}
                                              for b, s in ((1, 1.2e-4), (8, 1.5e-4), (32, 2.5e-4))]}
    efficiency, sources = from_microbenchmarks(get_hardware("h100-sxm"), microbench)
    assert efficiency["iteration_overhead_s"] == pytest.approx(1.5e-4)
    assert "batch 32 250 us" in sources["efficiency.iteration_overhead_s"]


def test_the_microbenchmarks_as_tidy_rows_for_parquet() -> None:
    import pyarrow as pa

    from infscale.microbench import microbench_rows

    microbench = json.loads(MICROBENCH_C.read_text())
    rows = pl.from_arrow(pa.Table.from_pylist(microbench_rows(microbench)))  # as run_microbench writes them
    assert rows.group_by("kind").len().sort("kind").rows() == [("attention", 6), ("collective", 88), ("gemm", 480),
                                                               ("memory", 2)]
    assert set(rows["gpu_name"]) == {"NVIDIA H100 80GB HBM3"} and set(rows["driver"]) == {"580.159.04"}
    handoffs = rows.filter((pl.col("op") == "pp_handoff") & (pl.col("world") == 4)).sort("bytes")
    assert handoffs["graph_seconds"][0] < handoffs["seconds"][0] and handoffs["graph_seconds"].null_count() > 0
    committed = pl.read_parquet(MICROBENCH_C.with_suffix(".parquet"))  # written from the JSON by the same function
    assert committed.equals(rows)
