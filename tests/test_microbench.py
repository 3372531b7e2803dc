"""`infscale microbench`: the GPU counts and models a campaign asks for, the job's resources, the command on the CPU
(never replacing a measurement) and `infscale calibrate` without a roofline. The workflow rules are tested in
test_workflow.py, the Slurm job in tests/slurm/test_microbench_slurm.py."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import yaml

from infscale.cli import main
from infscale.launch.microbench import (
    DEFAULT_MODEL,
    calibration_dir,
    campaign_targets,
    collective_worlds,
    dense_models,
    failure_line,
    job_gpus,
)
from infscale.launch.resources import microbench_resources, submitit_parameters
from infscale.launch.settings import SlurmSettings
from infscale.pipeline import CampaignRun

REFERENCE = Path(__file__).resolve().parents[1] / "results" / "reference" / "profiles"
GPU_MICROBENCH = REFERENCE / "h100-sxm-x4.2026-11-27c.microbench.json"


@pytest.mark.parametrize("per_replica, per_node, worlds", [
    ([1], 8, []),                  # DP only: no collectives
    ([1, 2], 8, [2]),
    ([1, 8], 8, [2, 4, 8]),        # the powers of two up to the largest
    ([6], 8, [2, 4, 6]),           # ... and the counts that occur
    ([3, 4], 4, [2, 3, 4]),
    ([16, 2], 8, [2, 4, 8]),       # a two-node replica: capped at one node's GPUs
    ([12], 8, [2, 4, 8]),
    ([4], 2, [2]),
])
def test_collective_worlds(per_replica, per_node, worlds):
    assert collective_worlds(per_replica, per_node) == worlds


def write_campaign(path: Path, **overrides) -> Path:
    raw = {"name": "mb", "backend": "torch", "hardware": {"name": "h100-sxm", "nodes": 2},
           "models": ["llama-3.1-8b", "qwen3-30b-a3b", "qwen2.5-32b"], "layouts": ["dp1", "tp2", "dp2tp2", "tp4pp2"],
           "requests": 8, "workloads": [{"name": "w", "isl": 128, "osl": [128]}], **overrides}
    path.write_text(yaml.safe_dump(raw))
    return path


def test_campaign_targets_are_its_replica_sizes_and_dense_models(tmp_path):
    run = CampaignRun(write_campaign(tmp_path / "c.yaml"), tmp_path / "results", "auto")
    worlds, models = campaign_targets(run)
    assert worlds == [2, 4, 8]                               # tp4pp2 is 8 GPUs per replica; dp2tp2 counts 2
    assert models == ["llama-3.1-8b", "qwen2.5-32b"]         # the MoE model left out, campaign order kept
    assert calibration_dir(run) == tmp_path / "results" / "mb" / "calibration" / "h100-sxm"


def test_campaign_of_moe_models_and_single_gpus_measures_the_default_model_without_collectives(tmp_path):
    config = write_campaign(tmp_path / "c.yaml", models=["qwen3-30b-a3b"], layouts=["dp1", "dp4"])
    run = CampaignRun(config, tmp_path / "results", "auto")
    assert campaign_targets(run) == ([], [DEFAULT_MODEL])
    assert dense_models(run.campaign) == [DEFAULT_MODEL]


def test_job_gpus():
    assert job_gpus([2, 4, 8], "auto") == 8
    assert job_gpus([], "auto") == 1                 # a GPU campaign without collectives still needs its GPU
    assert job_gpus([2, 4], "cpu") == 0
    assert job_gpus([2, 4], "auto", needs_gpu=False) == 0   # the sim backend: a CPU job
    assert job_gpus([2, 4], "cuda", needs_gpu=False) == 4   # CUDA asked for explicitly


def test_microbench_resources_follow_the_profile():
    slurm = SlurmSettings(partition="gpu", account="acct", qos="normal", constraint="h100", cpus_per_gpu=6,
                          mem_per_gpu_gb=40, cpus_per_cpu_job=2, mem_per_cpu_job_gb=3, time_limit_max_min=30,
                          setup=[["module", "load", "cuda/12.4"]], extra_sbatch={"mail-type": "END"})
    gpu = microbench_resources(4, slurm)
    assert (gpu.nodes, gpu.gpus_per_node, gpu.tasks_per_node, gpu.cpus_per_task, gpu.mem_gb) == (1, 4, 1, 24, 160)
    assert gpu.time_min == 30                        # within the profile's cap
    params = submitit_parameters(gpu, slurm, "infscale.mb.x", [])
    assert params["gpus_per_node"] == 4 and params["slurm_partition"] == "gpu" and params["slurm_account"] == "acct"
    assert params["slurm_qos"] == "normal" and params["slurm_constraint"] == "h100"
    assert params["slurm_setup"] == ["module load cuda/12.4"]
    assert params["slurm_additional_parameters"] == {"mail-type": "END"}
    cpu = microbench_resources(0, slurm)
    assert (cpu.gpus_per_node, cpu.tasks_per_node, cpu.cpus_per_task, cpu.mem_gb) == (0, 1, 2, 3)
    assert "gpus_per_node" not in submitit_parameters(cpu, slurm, "infscale.mb.x", [])


def test_failure_line_finds_the_jobs_exception():
    trace = ("Job (task=0) failed during processing with trace:\n----\nTraceback (most recent call last):\n"
             '  File "x.py", line 1\nRuntimeError: no CUDA here\n\n----\nYou can check full logs')
    assert failure_line(RuntimeError(trace)) == "RuntimeError: no CUDA here"
    assert failure_line(ValueError("plain")) == "ValueError: plain"


def test_bad_arguments_exit_2(tmp_path, capsys):
    assert main(["microbench"]) == 2
    assert "CONFIG" in capsys.readouterr().err
    config = write_campaign(tmp_path / "c.yaml")
    assert main(["microbench", str(config), "--out", str(tmp_path)]) == 2
    assert main(["microbench", "--out", str(tmp_path), "--models", "no-such-model"]) == 2
    assert "no-such-model" in capsys.readouterr().err
    assert main(["microbench", "--out", str(tmp_path), "--gpus", "0"]) == 2
    assert not (tmp_path / "microbench.json").exists()


@pytest.fixture(scope="module")
def cpu_microbench(tmp_path_factory) -> Path:
    """One CPU measurement (2 gloo ranks) through the command line (about 30 s on 2 cores)."""
    out = tmp_path_factory.mktemp("microbench")
    assert main(["microbench", "--out", str(out), "--gpus", "2", "--models", "llama-3.1-8b", "--device", "cpu"]) == 0
    return out / "microbench.json"


def test_microbench_on_cpu_writes_every_part(cpu_microbench):
    report = json.loads(cpu_microbench.read_text())
    assert {"memory", "gemm", "attention", "collectives", "allreduce", "environment"} <= set(report)
    assert report["environment"]["device"] == "cpu"
    assert report["memory"]["hbm_read_bytes_per_s"] > 0
    assert {row["tp"] for row in report["gemm"]} == {1, 2}
    assert [c["world"] for c in report["collectives"]] == [2] and report["collectives"][0]["sum_correct"]
    assert set(report["collectives"][0]["ops"]) == {"all_reduce", "all_gather", "all_to_all", "pp_handoff"}
    assert [c["world"] for c in report["allreduce"]] == [2]
    overhead = report["engine_overhead"]["rows"]  # 8-token prompts, 64 output tokens: 64 steps per batch
    assert [r["batch"] for r in overhead] == [1, 4] and all(r["iterations"] == 64 for r in overhead)
    assert all(0 < r["seconds_per_iteration"] * r["iterations"] <= r["wall_seconds_with_build"] for r in overhead)
    tidy = pl.read_parquet(cpu_microbench.with_suffix(".parquet"))  # the same measurements as rows
    assert set(tidy["kind"]) == {"memory", "gemm", "attention", "collective", "engine_overhead"}
    assert tidy.filter(pl.col("kind") == "gemm").height == len(report["gemm"])


def test_a_second_run_keeps_the_measurement(cpu_microbench, capsys):
    before = (cpu_microbench.read_bytes(), cpu_microbench.stat().st_mtime_ns)
    capsys.readouterr()
    assert main(["microbench", "--out", str(cpu_microbench.parent), "--gpus", "2", "--device", "cpu"]) == 0
    assert "exists" in capsys.readouterr().out
    assert (cpu_microbench.read_bytes(), cpu_microbench.stat().st_mtime_ns) == before


def test_calibrate_refuses_a_cpu_measurement(cpu_microbench, tmp_path, capsys):
    out = tmp_path / "profile.yaml"
    assert main(["calibrate", "--hardware", "h100-sxm", "--microbench", str(cpu_microbench), "--name", "x",
                 "--out", str(out)]) == 2
    assert "measured on the CPU" in capsys.readouterr().err
    assert not out.exists()


def test_calibrate_without_roofline_lists_only_its_inputs(tmp_path):
    out = tmp_path / "profile.yaml"
    assert main(["calibrate", "--hardware", "h100-sxm", "--microbench", str(GPU_MICROBENCH), "--name", "h100.mb",
                 "--out", str(out)]) == 0
    profile = yaml.safe_load(out.read_text())
    assert list(profile["inputs"]) == [GPU_MICROBENCH.name]
    assert {"hbm_bandwidth", "matmul", "allreduce_bus_bandwidth"} <= set(profile["efficiency"])


def test_a_failed_job_exits_1_with_its_error(tmp_path, capsys, monkeypatch):
    """The job (a submitit subprocess: the `local` executor) fails inside run_microbench: CUDA asked for where the
    job sees no GPU. The command says why, exits 1 and leaves no file."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the job's process sees no GPU, also on a GPU machine
    config = write_campaign(tmp_path / "c.yaml", backend="sim", models=["llama-3.1-8b"], layouts=["dp1"])
    launcher = tmp_path / "launcher.yaml"
    launcher.write_text(yaml.safe_dump({"executor": "local"}))
    results = tmp_path / "results"
    assert main(["microbench", str(config), "--results-root", str(results), "--launcher", str(launcher),
                 "--device", "cuda"]) == 1
    err = capsys.readouterr().err
    assert "failed: RuntimeError: --device cuda asked for, but CUDA is not available here" in err
    assert "_log.err" in err  # where the job's own log is
    assert not (results / "mb" / "calibration" / "h100-sxm" / "microbench.json").exists()


def test_without_torch_the_error_names_the_install_command(tmp_path, capsys, monkeypatch):
    """The calibration target on a machine without PyTorch: one line naming the package and the command that
    installs it, not a bare ModuleNotFoundError."""
    import sys

    from infscale.backends import get_backend
    from infscale.extras import MissingDependencyError

    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` fails as if it were not installed
    monkeypatch.delitem(sys.modules, "infscale.microbench", raising=False)
    assert main(["microbench", "--out", str(tmp_path), "--device", "cpu", "--gpus", "1"]) == 1
    err = capsys.readouterr().err
    assert "MissingDependencyError: the calibration microbenchmarks" in err and "needs PyTorch" in err
    assert "scripts/setup-venv.sh torch" in err and "ModuleNotFoundError" not in err
    with pytest.raises(MissingDependencyError, match=r"the 'torch' backend needs PyTorch.*setup-venv.sh torch"):
        get_backend("torch")
