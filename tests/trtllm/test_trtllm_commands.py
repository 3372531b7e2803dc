"""The exact TensorRT-LLM command lines infscale produces, checked against the documented interfaces
(docs/trtllm.md cites each flag): both flows; 1 GPU, TP4, PP2×TP4, DP2×TP4 and a 16-GPU two-node layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from infscale.backends.trtllm.commands import (
    BuildKnobs,
    TrtllmConfigError,
    TrtllmSettings,
    built_engine_dir,
    engine_build_commands,
    extra_options,
    launch,
    replica_gpus,
    replica_processes,
    throughput_argv,
)
from infscale.backends.trtllm.dataset import dataset_lines
from infscale.catalog import get_model
from infscale.layout import Layout
from infscale.serving.workload import Requests

MODEL_DIRS = {"llama-3.1-8b": "/models/Llama-3.1-8B", "llama-3.1-405b": "/models/Llama-3.1-405B",
              "qwen3-30b-a3b": "/models/Qwen3-30B-A3B"}
KNOBS = BuildKnobs(max_batch_size=256, max_num_tokens=8192, max_seq_len=17408)
OUT = Path("/scratch/c/cell")


def settings(flow: str = "pytorch", version: str = "1.2.1") -> TrtllmSettings:
    return TrtllmSettings(flow=flow, version=version, model_paths=MODEL_DIRS, engine_cache="/shared/engines")


def processes(layout: str, flow: str = "pytorch", slurm: bool = False, model: str = "llama-3.1-8b"):
    parsed = Layout.parse(layout)
    datasets = [OUT / f"dataset{r}.jsonl" for r in range(parsed.dp)]
    engine = Path("/shared/engines/x") if flow == "engine" else None
    return replica_processes(settings(flow), get_model(model), model, parsed, KNOBS, datasets, [64] * parsed.dp,
                             None, OUT, 8, slurm, OUT / "options.yaml", engine)


def bench_tail(replica: int = 0) -> list[str]:
    out = OUT / f"replica{replica}"
    return ["--max_batch_size", "256", "--max_num_tokens", "8192", "--num_requests", "64", "--warmup", "2",
            "--streaming", "--kv_cache_free_gpu_mem_fraction", "0.9", "--report_json", f"{out}/report.json",
            "--request_json", f"{out}/requests.json", "--iteration_log", f"{out}/iterations.log",
            "--extra_llm_api_options", f"{OUT}/options.yaml"]


def pytorch_run(tp: int, pp: int, replica: int = 0, model: str = "llama-3.1-8b") -> list[str]:
    return ["trtllm-bench", "--model", model, "--model_path", MODEL_DIRS[model], "--workspace", "/tmp",
            "throughput", "--dataset", f"{OUT}/dataset{replica}.jsonl", "--backend", "pytorch", "--tp", str(tp),
            "--pp", str(pp), "--max_seq_len", "17408", *bench_tail(replica)]


def test_one_gpu_pytorch_flow_runs_bench_directly() -> None:
    (only,) = processes("dp1tp1pp1")
    assert only.argv == pytorch_run(1, 1) and only.env == {}
    assert only.report_json == OUT / "replica0" / "report.json"


def test_tp4_on_one_node_runs_four_mpi_tasks() -> None:
    (only,) = processes("dp1tp4pp1")
    assert only.argv == ["mpirun", "--allow-run-as-root", "-n", "4", "trtllm-llmapi-launch", *pytorch_run(4, 1)]


def test_pp2_tp4_in_a_slurm_job_uses_srun_pmix_with_block_distribution() -> None:
    (only,) = processes("dp1tp4pp2", slurm=True)
    assert only.argv == ["srun", "--mpi=pmix", "--export=ALL", "--overlap", "--nodes", "1", "--ntasks", "8",
                         "--ntasks-per-node", "8", "--distribution=block", "trtllm-llmapi-launch",
                         *pytorch_run(4, 2)]


def test_dp2_tp4_replicas_take_disjoint_gpus() -> None:
    first, second = processes("dp2tp4pp1")
    assert first.env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3" and second.env["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"
    assert second.argv == ["mpirun", "--allow-run-as-root", "-n", "4", "trtllm-llmapi-launch",
                           *pytorch_run(4, 1, replica=1)]
    # in a Slurm job, each replica is its own job step on its own slice of the job's GPUs
    step_one, step_two = processes("dp2tp4pp1", slurm=True)
    assert step_two.argv[:11] == ["srun", "--mpi=pmix", "--export=ALL", "--overlap", "--nodes", "1", "--ntasks",
                                  "4", "--ntasks-per-node", "4", "--distribution=block"]
    assert step_two.argv[11:14] == ["env", "CUDA_VISIBLE_DEVICES=4,5,6,7", "trtllm-llmapi-launch"]
    # replicas of whole nodes go to their own node of the job
    parsed = Layout.parse("dp2tp8pp1")
    wide = replica_processes(settings(), get_model("llama-3.1-8b"), "llama-3.1-8b", parsed, KNOBS,
                             [OUT / "a", OUT / "b"], [8, 8], None, OUT, 8, True, None)
    assert "--relative=1" in wide[1].argv and "--relative=1" not in wide[0].argv
    assert "CUDA_VISIBLE_DEVICES" not in wide[1].env
    # the job's own device list is what replicas share out
    assert replica_gpus(1, 2, 8, ["3", "5", "6", "7", "0", "1", "2", "4"]) == (0, "6,7")
    assert replica_gpus(5, 2, 8, None) == (1, "2,3")


def test_sixteen_gpus_over_two_nodes_keep_tp_inside_a_node() -> None:
    (only,) = processes("dp1tp8pp2", slurm=True, model="llama-3.1-405b")
    assert only.argv[:10] == ["srun", "--mpi=pmix", "--export=ALL", "--overlap", "--nodes", "2", "--ntasks", "16",
                              "--ntasks-per-node", "8"]
    assert only.argv[11:] == ["trtllm-llmapi-launch", *pytorch_run(8, 2, model="llama-3.1-405b")]
    with pytest.raises(TrtllmConfigError, match="spans nodes"):
        launch(["x"], 16, 8, slurm=False)


def test_engine_flow_runs_the_engine_with_its_own_mapping() -> None:
    (only,) = processes("dp1tp4pp2", flow="engine", slurm=True)
    bench = only.argv[only.argv.index("trtllm-bench"):]
    assert bench == ["trtllm-bench", "--model", "llama-3.1-8b", "--model_path", MODEL_DIRS["llama-3.1-8b"],
                     "--workspace", "/tmp", "throughput", "--dataset", f"{OUT}/dataset0.jsonl",
                     "--backend", "tensorrt", "--engine_dir", "/shared/engines/x", *bench_tail()]
    assert "--tp" not in bench and "--max_seq_len" not in bench  # ignored / refused by the tensorrt backend


def test_engine_builds_per_layout() -> None:
    arch = get_model("llama-3.1-8b")
    work = Path("/shared/engines/.tmp")
    (build,) = engine_build_commands(settings("engine"), arch, "llama-3.1-8b", Layout.parse("tp4pp2"), KNOBS, work)
    assert build == ["trtllm-bench", "--model", "llama-3.1-8b", "--model_path", MODEL_DIRS["llama-3.1-8b"],
                     "--workspace", str(work), "build", "--tp_size", "4", "--pp_size", "2", "--max_seq_len",
                     "17408", "--max_batch_size", "256", "--max_num_tokens", "8192", "--no_weights_loading", "true"]
    assert built_engine_dir("llama-3.1-8b", Layout.parse("tp4pp2"), work) == work / "llama-3.1-8b" / "tp_4_pp_2"
    # beyond trtllm-bench build's 8 ranks: convert_checkpoint without weights, then trtllm-build --model_config
    big = get_model("llama-3.1-405b")
    convert, build = engine_build_commands(settings("engine"), big, "llama-3.1-405b", Layout.parse("tp8pp2"),
                                           BuildKnobs(256, 8192, 17408, quantization="FP8"), work)
    assert convert[:2] == ["python3", "/app/tensorrt_llm/examples/models/core/llama/convert_checkpoint.py"]
    flags = dict(zip(convert[2::2], convert[3::2]))
    assert flags["--tp_size"] == "8" and flags["--pp_size"] == "2" and "--model_dir" not in convert
    assert flags["--n_layer"] == "126" and flags["--vocab_size"] == "128256" and convert[-1] == "--use_fp8"
    assert build[:3] == ["trtllm-build", "--model_config", f"{work}/checkpoint/config.json"]
    assert "--tp_size" not in build  # removed from trtllm-build in 0.12: the mapping is the checkpoint's
    with pytest.raises(TrtllmConfigError, match="Llama-family"):
        engine_build_commands(settings("engine"), get_model("qwen3-30b-a3b"), "qwen3-30b-a3b",
                              Layout.parse("tp8pp2"), KNOBS, work)


def test_settings_refuse_what_cannot_work() -> None:
    with pytest.raises(TrtllmConfigError, match="needs TensorRT-LLM ≤ 1.2.x"):
        settings("engine", version="1.3.0rc26").check_flow()
    settings("pytorch", version="1.3.0rc26").check_flow()
    with pytest.raises(TrtllmConfigError, match="no local model directory for 'qwen2.5-32b'"):
        settings().model_path("qwen2.5-32b")
    with pytest.raises(ValueError, match="not a TensorRT-LLM version"):
        TrtllmSettings(version="latest", model_paths={})
    fp8 = BuildKnobs(256, 8192, 17408, quantization="FP8", kv_fp8=True)
    pp_fp8 = replica_processes(settings(), get_model("llama-3.1-8b"), "llama-3.1-8b", Layout.parse("tp2pp2"), fp8,
                               [OUT / "d.jsonl"], [8], None, OUT, 8, False, None)[0]
    assert pp_fp8.env == {"TRTLLM_LLAMA_EAGER_FUSION_DISABLED": "1"}  # TensorRT-LLM 1.0 known issue
    assert extra_options(settings(), fp8) == {
        "load_format": "dummy", "cuda_graph_config": {"enable_padding": True, "max_batch_size": 256},
        "kv_cache_config": {"dtype": "fp8", "free_gpu_memory_fraction": 0.9}}


def test_dataset_lines_follow_the_documented_format() -> None:
    requests = Requests(np.array([4, 6]), np.array([100, 200]), np.zeros(2))
    lines = dataset_lines(requests, vocab_size=10, eos_token_id=3, seed=7)
    rows = [json.loads(line) for line in lines]
    assert [r["task_id"] for r in rows] == [0, 1] and [r["output_tokens"] for r in rows] == [100, 200]
    assert [len(r["input_ids"]) for r in rows] == [4, 6] and all(3 not in r["input_ids"] for r in rows)
    assert lines[0].startswith('{"task_id":0,"input_ids":[') and " " not in lines[0]
    assert dataset_lines(requests, 10, 3, seed=7) == lines  # seeded: the same file on every node


@pytest.mark.parametrize("layout, slurm, wrapper", [
    ("dp1tp1pp1", False, []),
    ("dp1tp4pp1", False, ["mpirun", "--allow-run-as-root", "-n", "4", "trtllm-llmapi-launch"]),
    ("dp1tp4pp2", True, ["srun", "--mpi=pmix", "--export=ALL", "--overlap", "--nodes", "1", "--ntasks", "8",
                         "--ntasks-per-node", "8", "--distribution=block", "trtllm-llmapi-launch"]),
    ("dp2tp4pp1", False, ["mpirun", "--allow-run-as-root", "-n", "4", "trtllm-llmapi-launch"]),
    ("dp1tp8pp2", True, ["srun", "--mpi=pmix", "--export=ALL", "--overlap", "--nodes", "2", "--ntasks", "16",
                         "--ntasks-per-node", "8", "--distribution=block", "trtllm-llmapi-launch"]),
])
def test_engine_flow_for_every_layout_kind(layout: str, slurm: bool, wrapper: list[str]) -> None:
    model = "llama-3.1-405b" if layout == "dp1tp8pp2" else "llama-3.1-8b"
    found = processes(layout, flow="engine", slurm=slurm, model=model)
    assert len(found) == Layout.parse(layout).dp
    for replica, process in enumerate(found):
        bench = ["trtllm-bench", "--model", model, "--model_path", MODEL_DIRS[model], "--workspace", "/tmp",
                 "throughput", "--dataset", f"{OUT}/dataset{replica}.jsonl", "--backend", "tensorrt",
                 "--engine_dir", "/shared/engines/x", *bench_tail(replica)]
        assert process.argv == wrapper + bench
    if layout == "dp2tp4pp1":
        assert [p.env["CUDA_VISIBLE_DEVICES"] for p in found] == ["0,1,2,3", "4,5,6,7"]


def test_scheduler_policy_reaches_trtllm_bench_only_when_set(tmp_path):
    plain = throughput_argv(settings(), "llama-3.1-8b", Layout(tp=2), KNOBS, tmp_path / "d.jsonl", 10, 4, tmp_path,
                            None)
    assert "--scheduler_policy" not in plain
    chosen = throughput_argv(settings(), "llama-3.1-8b", Layout(tp=2), KNOBS, tmp_path / "d.jsonl", 10, 4, tmp_path,
                             None, scheduler_policy="max_utilization")
    assert chosen[chosen.index("--scheduler_policy") + 1] == "max_utilization"
