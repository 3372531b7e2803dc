"""The trtllm backend's orchestration through the runner, with a stand-in `trtllm-bench` (tests/trtllm/standin:
the documented flags in, the documented report formats out) because TensorRT-LLM cannot be installed here."""

from __future__ import annotations

import json
import os
from pathlib import Path

import polars as pl
import pytest
import yaml

from infscale.backends.trtllm import backend as backend_module
from infscale.backends.trtllm.backend import TrtllmBackend, run_processes
from infscale.backends.trtllm.cache import EngineCache
from infscale.backends.trtllm.commands import TrtllmSettings
from infscale.campaign import load_campaign
from infscale.campaign.plan import plan_campaign
from infscale.launch.runner import run_cells

STANDIN = Path(__file__).resolve().parent / "standin"
TINY = Path(__file__).resolve().parents[1] / "data" / "hf" / "tiny-llama.json"


@pytest.fixture
def standin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("PATH", f"{STANDIN}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("STANDIN_LOG", str(log))
    return log


def campaign_file(tmp_path: Path, layouts: list[str]) -> Path:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "name": "trt", "backend": "trtllm", "hardware": "h100-sxm", "models": [str(TINY)], "layouts": layouts,
        "requests": 6, "engine": {"max_num_seqs": 8, "max_num_tokens": 512},
        "workloads": [{"name": "w", "isl": 16, "osl": [20, 40]}]}))
    return config


def settings(tmp_path: Path, flow: str = "pytorch") -> TrtllmSettings:
    model_dir = tmp_path / "hf"
    model_dir.mkdir(exist_ok=True)
    (model_dir / "config.json").write_text(TINY.read_text())
    return TrtllmSettings(flow=flow, version="1.2.1", model_paths={"tiny-llama": str(model_dir)},
                          engine_cache=str(tmp_path / "engines"), workspace=str(tmp_path / "work"), warmup=0)


def calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_dp2_replicas_run_together_and_combine(tmp_path: Path, standin: Path) -> None:
    campaign = load_campaign(campaign_file(tmp_path, ["dp1", "dp2"]))
    planned = [p for p in plan_campaign(campaign) if p.feasible]
    outcomes = run_cells(campaign, planned, tmp_path / "results", TrtllmBackend(settings(tmp_path), slurm=False))
    assert [o.status for o in outcomes] == ["ok"] * 4, [o.reason for o in outcomes]
    rows = {(o.summary["dp"], o.summary["osl_max"]): o.summary for o in outcomes}
    for (dp, osl), row in rows.items():
        assert row["output_tokens"] == 6 * osl and row["engine_path"] == "trtllm-pytorch"
        # the stand-in decodes at 10 ms per token after a 50 ms first token: every request ends at the same time
        assert row["duration_s"] == pytest.approx(0.05 + (osl - 1) * 0.01, rel=1e-6)
        assert row["tpot_ms_p50"] == pytest.approx(10.0) and row["ttft_ms_p50"] == pytest.approx(50.0)
        assert row["output_tok_s_per_gpu"] == pytest.approx(row["output_tok_s"] / dp)
        assert row["max_kv_occupancy"] == pytest.approx(0.3) and row["kv_pool_blocks"] == 1000
    dp2 = [c for c in calls(standin) if c["cuda_visible_devices"] is not None]
    assert sorted(c["cuda_visible_devices"] for c in dp2) == ["0", "0", "1", "1"]  # disjoint GPUs per replica
    for call in dp2:  # each replica got its round-robin half of the 6 requests
        argv = call["argv"]
        assert argv[argv.index("--num_requests") + 1] == "3" and "--streaming" in argv
    merged = pl.read_parquet(sorted((tmp_path / "results" / "cells").glob("*dp2*o40*.parquet"))[0])
    assert merged["status"].to_list() == ["ok"] and merged["output_tokens"].to_list() == [240]


def test_failed_run_is_classified_from_its_output(tmp_path: Path, standin: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STANDIN_FAIL", "oom")
    campaign = load_campaign(campaign_file(tmp_path, ["dp1"]))
    planned = [p for p in plan_campaign(campaign) if p.feasible][:1]
    (outcome,) = run_cells(campaign, planned, tmp_path / "results", TrtllmBackend(settings(tmp_path), slurm=False))
    assert outcome.status == "infeasible" and "CUDA out of memory" in outcome.reason


def test_engine_flow_builds_once_per_layout_and_reuses_it(tmp_path: Path, standin: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # NVML cannot exist on this machine: name the GPU the engine key records
    monkeypatch.setattr(backend_module, "visible_gpus", lambda: [("GPU-0", "NVIDIA H100 80GB HBM3")])
    campaign = load_campaign(campaign_file(tmp_path, ["dp1", "dp2"]))
    planned = [p for p in plan_campaign(campaign) if p.feasible]
    backend = TrtllmBackend(settings(tmp_path, "engine"), slurm=False)
    outcomes = run_cells(campaign, planned, tmp_path / "results", backend)
    assert [o.status for o in outcomes] == ["ok"] * 4, [o.reason for o in outcomes]
    builds = [c["argv"] for c in calls(standin) if "build" in c["argv"]]
    assert len(builds) == 1  # one engine (TP1 PP1) for both DP layouts and both OSLs: sized for the longest
    assert builds[0][builds[0].index("--max_seq_len") + 1] == str(16 + 40)
    (engine,) = EngineCache(tmp_path / "engines").list_engines()
    runs = [c["argv"] for c in calls(standin) if "throughput" in c["argv"]]
    assert all(argv[argv.index("--engine_dir") + 1] == engine["path"] and "--tp" not in argv for argv in runs)


def test_run_processes_reports_the_failing_replica(tmp_path: Path) -> None:
    from infscale.backends.trtllm.commands import Process

    ok = Process(argv=["python3", "-c", "print('fine')"])
    bad = Process(argv=["python3", "-c", "import sys; print('NCCL error: unhandled system error'); sys.exit(3)"])
    with pytest.raises(RuntimeError, match=r"replica 1 exited with 3: NCCL error"):
        run_processes([ok, bad], tmp_path)


def test_engines_cli_lists_and_collects(tmp_path: Path, standin: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture) -> None:
    from infscale.cli import main

    monkeypatch.setattr(backend_module, "visible_gpus", lambda: [("GPU-0", "NVIDIA H100 80GB HBM3")])
    campaign = load_campaign(campaign_file(tmp_path, ["dp1"]))
    planned = [p for p in plan_campaign(campaign) if p.feasible]
    run_cells(campaign, planned, tmp_path / "results", TrtllmBackend(settings(tmp_path, "engine"), slurm=False))
    cache = tmp_path / "engines"
    assert main(["engines", "list", "--cache", str(cache)]) == 0
    listed = capsys.readouterr().out
    assert "tiny-llama.bf16.tp1pp1." in listed and "TensorRT-LLM 1.2.1" in listed
    assert main(["engines", "gc", "--cache", str(cache)]) == 2
    assert "gc needs --budget-gb" in capsys.readouterr().err
    assert main(["engines", "gc", "--cache", str(cache), "--budget-gb", "1"]) == 0  # within budget: nothing goes
    assert len(EngineCache(cache).list_engines()) == 1
    assert main(["engines", "gc", "--cache", str(cache), "--budget-gb", "0"]) == 0
    assert "1 removed" in capsys.readouterr().out and EngineCache(cache).list_engines() == []


def test_engine_flow_through_the_workflow(tmp_path: Path, standin: Path) -> None:
    """`infscale run` with the engine flow: the workflow's engine rule builds each engine once (a pointer file per
    engine), then the bench jobs run on them; a rerun builds and measures nothing."""
    import subprocess
    import sys

    config = campaign_file(tmp_path, ["dp1", "tp2"])
    model_dir = settings(tmp_path).model_paths["tiny-llama"]
    launcher = {"executor": "debug", "trtllm": {
        "flow": "engine", "version": "1.2.1", "model_paths": {"tiny-llama": model_dir}, "warmup": 0,
        "engine_cache": str(tmp_path / "engines"), "workspace": str(tmp_path / "work"),
        "gpu_name": "NVIDIA H100 80GB HBM3"}}
    settings_file = tmp_path / "settings.yaml"
    settings_file.write_text(yaml.safe_dump({"packing": "layout", "launcher": launcher}))
    # off Slurm a TP2 replica runs under mpirun: a stand-in mpirun runs rank 0's command
    fake_mpirun = tmp_path / "bin" / "mpirun"
    fake_mpirun.parent.mkdir()
    fake_mpirun.write_text("#!/bin/sh\n# stand-in: drop mpirun's own options, run the command once\n"
                           "while [ \"$1\" != trtllm-llmapi-launch ]; do shift; done\nshift\nexec \"$@\"\n")
    fake_mpirun.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake_mpirun.parent}{os.pathsep}{os.environ['PATH']}"}
    command = [sys.executable, "-m", "infscale", "run", str(config), "--settings", str(settings_file),
               "--results-root", str(tmp_path / "results"), "--directory", str(tmp_path)]
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    pointers = sorted((tmp_path / "results" / "trt" / "engines").glob("*.json"))
    assert [p.name for p in pointers] == ["tiny-llama.bf16-bf16.tp1pp1.s8t512.json",
                                          "tiny-llama.bf16-bf16.tp2pp1.s8t512.json"]
    builds = [c for c in calls(standin) if "build" in c["argv"]]
    assert len(builds) == 2 and len(EngineCache(tmp_path / "engines").list_engines()) == 2
    merged = pl.read_parquet(tmp_path / "results" / "trt" / "cells.parquet")
    assert merged["status"].to_list() == ["ok"] * 4 and set(merged["engine_path"]) == {"trtllm-engine"}
    before = len(calls(standin))
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and len(calls(standin)) == before  # nothing built or measured again
