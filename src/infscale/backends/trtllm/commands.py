"""Command lines for TensorRT-LLM: engine builds and `trtllm-bench` runs, as argv lists and environments.

Everything follows the documented interfaces of TensorRT-LLM 1.0–1.2 (docs/trtllm.md cites each flag). Nothing
here runs a process, so every command a campaign would run can be checked where TensorRT-LLM is not installed.

Two flows:
- `pytorch` (TensorRT-LLM's default backend since 1.0): no engine; `trtllm-bench throughput --backend pytorch
  --tp T --pp P` with `load_format: dummy` (random weights) in the `--extra_llm_api_options` YAML;
- `engine` (TensorRT engines, removed after 1.2.x): an engine per (model, precision, TP, PP, build knobs), built by
  `trtllm-bench build --no_weights_loading true` (TP × PP ≤ 8, its limit) or, beyond that, by
  `convert_checkpoint.py` without weights + `trtllm-build --model_config`; runs pass `--backend tensorrt
  --engine_dir` (the engine's own mapping decides TP/PP; `--max_seq_len` is not a runtime flag there).

Launch: one replica of world W = TP × PP runs as W MPI tasks under `trtllm-llmapi-launch` (`mpirun` on one node
outside Slurm, `srun --mpi=pmix` in a Slurm job, TP inside a node and PP across nodes by block distribution). DP
replicas are separate processes on disjoint GPUs (`CUDA_VISIBLE_DEVICES` on one node, separate `srun` steps
otherwise), each with its own report files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from infscale.catalog import ModelArch
from infscale.layout import Layout

BENCH_BUILD_MAX_WORLD = 8          # trtllm-bench build rejects tp*pp > 8 ("currently unsupported")
LAST_ENGINE_VERSION = (1, 2)       # the TensorRT flow is removed from trtllm-bench after 1.2.x


class TrtllmConfigError(ValueError):
    """A campaign asks for something this TensorRT-LLM setup cannot do; the message says what and why."""


class TrtllmSettings(BaseModel):
    """How a campaign runs TensorRT-LLM (the `trtllm:` section of the launcher settings)."""

    model_config = ConfigDict(extra="forbid")

    flow: Literal["pytorch", "engine"] = "pytorch"
    version: str = Field(description="TensorRT-LLM version in the container, e.g. 1.2.1 (recorded in provenance)")
    model_paths: dict[str, str] = Field(
        description="model name -> local Hugging Face dir with config.json and the tokenizer (trtllm-bench "
                    "downloads the full weights from the Hub when no --model_path is given)")
    engine_cache: str | None = Field(None, description="shared directory of built engines (engine flow)")
    examples_dir: str = "/app/tensorrt_llm/examples"   # convert_checkpoint.py lives here in NVIDIA's containers
    workspace: str = "/tmp"
    kv_cache_free_gpu_mem_fraction: float = Field(0.9, gt=0, le=1)
    warmup: int = Field(2, ge=0)
    build_workers: int = Field(1, ge=1)
    gpu_name: str | None = Field(None, description="the GPU model for the engine cache key where NVML cannot "
                                                   "tell (NVML is asked otherwise)")
    extra_llm_api_options: dict[str, object] = {}

    @field_validator("version")
    @classmethod
    def _version_shape(cls, value: str) -> str:
        if not re.fullmatch(r"\d+\.\d+\.\d+([a-z0-9.]*)?", value):
            raise ValueError(f"'{value}' is not a TensorRT-LLM version like 1.2.1 or 1.3.0rc26")
        return value

    def version_tuple(self) -> tuple[int, int]:
        major, minor = self.version.split(".")[:2]
        return int(major), int(minor)

    def check_flow(self) -> None:
        if self.flow == "engine" and self.version_tuple() > LAST_ENGINE_VERSION:
            raise TrtllmConfigError(
                f"flow 'engine' needs TensorRT-LLM ≤ 1.2.x; {self.version} has no TensorRT engine backend in "
                "trtllm-bench (removed upstream after 1.2): use flow 'pytorch' or a 1.2.x container")
        if self.flow == "engine" and not self.engine_cache:
            raise TrtllmConfigError("flow 'engine' needs `engine_cache`: a shared directory for built engines")

    def model_path(self, model: str) -> str:
        if model not in self.model_paths:
            raise TrtllmConfigError(
                f"no local model directory for {model!r} in trtllm.model_paths (trtllm-bench would download the "
                f"full weights from the Hugging Face Hub); known: {', '.join(sorted(self.model_paths)) or 'none'}")
        return self.model_paths[model]


@dataclass(frozen=True)
class BuildKnobs:
    """What an engine is built for (the engine cache keys on these, among others)."""

    max_batch_size: int
    max_num_tokens: int
    max_seq_len: int
    quantization: str | None = None      # trtllm-bench's --quantization, e.g. FP8; None: the model's dtype
    kv_fp8: bool = False


@dataclass
class Process:
    """One process (a replica) to start: its argv, the environment it adds, where it writes."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    report_json: Path | None = None
    request_json: Path | None = None
    iteration_log: Path | None = None


# ---------------------------------------------------------------------------------------------- build


def engine_build_commands(settings: TrtllmSettings, arch: ModelArch, model: str, layout: Layout, knobs: BuildKnobs,
                          workspace: Path) -> list[list[str]]:
    """The commands that build the engine of one replica layout into `workspace` (in order).

    TP × PP ≤ 8: `trtllm-bench build`, which writes `<workspace>/<model>/tp_<T>_pp_<P>`. Larger: the
    checkpoint route (Llama-family architectures only), which writes `<workspace>/engine`."""
    settings.check_flow()
    tp, pp = layout.tp, layout.pp
    if tp * pp <= BENCH_BUILD_MAX_WORLD:
        argv = ["trtllm-bench", "--model", model, "--model_path", settings.model_path(model),
                "--workspace", str(workspace), "build", "--tp_size", str(tp), "--pp_size", str(pp),
                "--max_seq_len", str(knobs.max_seq_len), "--max_batch_size", str(knobs.max_batch_size),
                "--max_num_tokens", str(knobs.max_num_tokens), "--no_weights_loading", "true"]
        if knobs.quantization:
            argv += ["--quantization", knobs.quantization]
        return [argv]
    if arch.family not in ("llama",):
        raise TrtllmConfigError(
            f"an engine for TP×PP = {tp * pp} > {BENCH_BUILD_MAX_WORLD} needs the convert_checkpoint route, which "
            f"infscale writes for Llama-family models only; {model} is {arch.family}: use flow 'pytorch'")
    checkpoint = workspace / "checkpoint"
    convert = ["python3", f"{settings.examples_dir}/models/core/llama/convert_checkpoint.py",
               "--output_dir", str(checkpoint), "--dtype", "bfloat16", "--tp_size", str(tp), "--pp_size", str(pp),
               # no --model_dir: a config.json from these architecture flags, no weights (random at build)
               "--vocab_size", str(arch.vocab_size), "--n_positions", str(arch.max_context),
               "--n_layer", str(arch.num_layers), "--n_head", str(arch.num_attention_heads),
               "--n_kv_head", str(arch.num_kv_heads), "--n_embd", str(arch.hidden_size),
               "--inter_size", str(arch.intermediate_size), "--hidden_act", "silu",
               "--rotary_base", f"{arch.rope_theta:g}"]
    if knobs.quantization == "FP8":
        convert.append("--use_fp8")
    if knobs.kv_fp8:
        convert.append("--fp8_kv_cache")
    build = ["trtllm-build", "--model_config", str(checkpoint / "config.json"), "--output_dir",
             str(workspace / "engine"), "--max_batch_size", str(knobs.max_batch_size), "--max_num_tokens",
             str(knobs.max_num_tokens), "--max_seq_len", str(knobs.max_seq_len), "--gemm_plugin", "auto",
             "--kv_cache_type", "paged", "--use_paged_context_fmha", "enable",
             "--workers", str(settings.build_workers)]
    return [convert, build]


def built_engine_dir(model: str, layout: Layout, workspace: Path) -> Path:
    """Where `engine_build_commands` leaves the engine."""
    if layout.tp * layout.pp <= BENCH_BUILD_MAX_WORLD:
        return workspace / model / f"tp_{layout.tp}_pp_{layout.pp}"
    return workspace / "engine"


# ---------------------------------------------------------------------------------------------- runs


def extra_options(settings: TrtllmSettings, knobs: BuildKnobs) -> dict[str, object]:
    """The `--extra_llm_api_options` YAML content (the pytorch flow's random weights, CUDA graphs and KV)."""
    options: dict[str, object] = {}
    if settings.flow == "pytorch":
        options["load_format"] = "dummy"  # random weights: no checkpoint is read
        options["cuda_graph_config"] = {"enable_padding": True, "max_batch_size": knobs.max_batch_size}
        if knobs.kv_fp8:
            options["kv_cache_config"] = {"dtype": "fp8",
                                          "free_gpu_memory_fraction": settings.kv_cache_free_gpu_mem_fraction}
    options.update(settings.extra_llm_api_options)
    return options


def throughput_argv(settings: TrtllmSettings, model: str, layout: Layout, knobs: BuildKnobs, dataset: Path,
                    num_requests: int, concurrency: int | None, out_dir: Path, options_file: Path | None,
                    engine_dir: Path | None = None, scheduler_policy: str | None = None) -> list[str]:
    """`trtllm-bench … throughput` for one replica (streaming on, so TTFT/TPOT exist)."""
    argv = ["trtllm-bench", "--model", model, "--model_path", settings.model_path(model),
            "--workspace", settings.workspace, "throughput", "--dataset", str(dataset)]
    if settings.flow == "engine":
        if engine_dir is None:
            raise TrtllmConfigError("flow 'engine' runs need the engine directory")
        # the engine's mapping decides TP/PP; max_seq_len is baked into the engine (a runtime flag fails)
        argv += ["--backend", "tensorrt", "--engine_dir", str(engine_dir)]
    else:
        argv += ["--backend", "pytorch", "--tp", str(layout.tp), "--pp", str(layout.pp)]
        if layout.ep > 1:
            argv += ["--ep", str(layout.ep)]
        argv += ["--max_seq_len", str(knobs.max_seq_len)]
    argv += ["--max_batch_size", str(knobs.max_batch_size), "--max_num_tokens", str(knobs.max_num_tokens),
             "--num_requests", str(num_requests), "--warmup", str(settings.warmup), "--streaming",
             "--kv_cache_free_gpu_mem_fraction", f"{settings.kv_cache_free_gpu_mem_fraction:g}",
             "--report_json", str(out_dir / "report.json"), "--request_json", str(out_dir / "requests.json"),
             "--iteration_log", str(out_dir / "iterations.log")]
    if concurrency is not None:
        argv += ["--concurrency", str(concurrency)]
    if scheduler_policy is not None:   # unset: trtllm-bench's own default (guaranteed_no_evict)
        argv += ["--scheduler_policy", scheduler_policy]
    if options_file is not None:
        argv += ["--extra_llm_api_options", str(options_file)]
    return argv


def replica_environment(settings: TrtllmSettings, arch: ModelArch, layout: Layout, knobs: BuildKnobs) -> dict[str, str]:
    env: dict[str, str] = {}
    if layout.pp > 1 and arch.family == "llama" and knobs.quantization in ("FP8", "NVFP4"):
        # TensorRT-LLM 1.0 known issue: Llama 3.x PP with FP8/NVFP4 weights needs eager fusion off
        env["TRTLLM_LLAMA_EAGER_FUSION_DISABLED"] = "1"
    return env


def launch(argv: list[str], world: int, gpus_per_node: int, slurm: bool, srun_extra: list[str] = (),
           first_node: int = 0, devices: str | None = None) -> list[str]:
    """Wrap one replica's command: W MPI tasks under trtllm-llmapi-launch (nothing to wrap for W = 1 off Slurm).

    In a Slurm job the ranks are a job step; `--overlap` because the job's own task (the bench job driving this)
    holds the allocation's CPUs and GPUs, and `--relative` puts a replica on its own node(s) of the job. Slurm
    sets each step's CUDA_VISIBLE_DEVICES to all the job's GPUs, so a replica's share (`devices`) is set inside
    the step, by `env`, after Slurm's."""
    if not slurm:
        if world == 1:
            return list(argv)
        if world > gpus_per_node:
            raise TrtllmConfigError(f"a replica of {world} GPUs spans nodes: run it in a Slurm job")
        return ["mpirun", "--allow-run-as-root", "-n", str(world), "trtllm-llmapi-launch", *argv]
    nodes = -(-world // gpus_per_node)
    per_node = -(-world // nodes)
    if nodes * per_node != world:
        raise TrtllmConfigError(f"{world} ranks do not split evenly over {nodes} nodes of {gpus_per_node} GPUs")
    step = ["srun", "--mpi=pmix", "--export=ALL", "--overlap", "--nodes", str(nodes), "--ntasks", str(world),
            "--ntasks-per-node", str(per_node), "--distribution=block"]
    if first_node:
        step.append(f"--relative={first_node}")
    inside = ["env", f"CUDA_VISIBLE_DEVICES={devices}"] if devices is not None else []
    return [*step, *srun_extra, *inside, "trtllm-llmapi-launch", *argv]


def replica_gpus(replica: int, world: int, gpus_per_node: int, visible: list[str] | None) -> tuple[int, str | None]:
    """The node (index within the job) and the CUDA_VISIBLE_DEVICES of DP replica `replica`: replicas fill nodes
    in order; a replica smaller than a node takes a slice of the node's GPUs (`visible`: the job's own list on a
    node, the same on every node; None = 0 … gpus_per_node-1), a larger one whole nodes."""
    if world >= gpus_per_node:
        return replica * (world // gpus_per_node), None
    first = replica * world
    node, local = divmod(first, gpus_per_node)
    ids = visible or [str(g) for g in range(gpus_per_node)]
    return node, ",".join(ids[local:local + world])


def replica_processes(settings: TrtllmSettings, arch: ModelArch, model: str, layout: Layout, knobs: BuildKnobs,
                      dataset_per_replica: list[Path], requests_per_replica: list[int], concurrency: int | None,
                      out_dir: Path, gpus_per_node: int, slurm: bool, options_file: Path | None,
                      engine_dir: Path | None = None, srun_extra: list[str] = (),
                      visible_devices: list[str] | None = None, scheduler_policy: str | None = None
                      ) -> list[Process]:
    """One process per DP replica, on disjoint GPUs, each with its own dataset share and report files
    (`visible_devices`: the job's CUDA_VISIBLE_DEVICES, which replicas smaller than a node share out)."""
    settings.check_flow()
    world = layout.tp * layout.pp
    processes = []
    for replica in range(layout.dp):
        replica_dir = out_dir / f"replica{replica}"
        argv = throughput_argv(settings, model, layout, knobs, dataset_per_replica[replica],
                               requests_per_replica[replica], concurrency, replica_dir, options_file, engine_dir,
                               scheduler_policy)
        env = replica_environment(settings, arch, layout, knobs)
        node, devices = 0, None
        if layout.dp > 1:
            node, devices = replica_gpus(replica, world, gpus_per_node, visible_devices)
            if not slurm and node:
                raise TrtllmConfigError(f"{layout} needs {layout.gpus} GPUs, more than one node: run it in a Slurm job")
            if devices is not None and not slurm:
                env["CUDA_VISIBLE_DEVICES"] = devices
        command = launch(argv, world, gpus_per_node, slurm, srun_extra, first_node=node,
                         devices=devices if slurm else None)
        processes.append(Process(argv=command, env=env,
                                 report_json=replica_dir / "report.json",
                                 request_json=replica_dir / "requests.json",
                                 iteration_log=replica_dir / "iterations.log"))
    return processes
