"""The `trtllm` backend behind the Backend protocol: TensorRT-LLM measured with `trtllm-bench`.

`prepare`: for the `engine` flow, the engine of the cell group's replica layout from the shared engine cache
(built once per key: model config, precision, TP, PP, build knobs, TensorRT-LLM version, GPU model); nothing for the
`pytorch` flow. `measure`: the cell's requests routed to its DP replicas up front, one dataset per replica, one
`trtllm-bench throughput` process per replica on disjoint GPUs (all started together), their reports parsed
and combined, KV use from the iteration logs, GPU telemetry from infscale's NVML sampler on this node.

Nothing here imports tensorrt_llm: the commands run as processes (`commands.py`), so a job needs the TensorRT-LLM
container, not this process. Raw outputs stay in `<workspace>/infscale/<campaign>/<cell id>/` for inspection.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import yaml

from infscale.backends.base import Artefact, BuildSpec, CellResult
from infscale.backends.trtllm import report as reports
from infscale.backends.trtllm.cache import EngineCache, EngineKey, hash_model_config
from infscale.backends.trtllm.commands import (
    BuildKnobs,
    Process,
    TrtllmConfigError,
    TrtllmSettings,
    built_engine_dir,
    engine_build_commands,
    extra_options,
    launch,
    replica_processes,
)
from infscale.backends.trtllm.dataset import write_dataset
from infscale.campaign import Campaign, Cell
from infscale.serving.cluster import static_routes
from infscale.serving.workload import Requests, generate_requests
from infscale.telemetry import GpuSampler, visible_gpus

TAIL_LINES = 20   # of a failed process's output, in the error (so the runner can classify e.g. CUDA OOM)


def run_processes(processes: list[Process], log_dir: Path) -> None:
    """Start every process at once (DP replicas run together), wait for all; raise with the output's tail of
    the first that failed."""
    log_dir.mkdir(parents=True, exist_ok=True)
    running = []
    for index, process in enumerate(processes):
        log = open(log_dir / f"replica{index}.log", "w")
        env = {**os.environ, **process.env}
        running.append((subprocess.Popen(process.argv, env=env, stdout=log, stderr=subprocess.STDOUT), log, index))
        if index < len(processes) - 1:
            time.sleep(1.0)  # trtllm-llmapi-launch picks a free port by a bind test: stagger concurrent starts
    failures = []
    for popen, log, index in running:
        code = popen.wait()
        log.close()
        if code != 0:
            failures.append((index, code))
    if failures:
        index, code = failures[0]
        tail = (log_dir / f"replica{index}.log").read_text(errors="replace").splitlines()[-TAIL_LINES:]
        raise RuntimeError(f"trtllm-bench of replica {index} exited with {code}: " + " | ".join(tail))


class TrtllmBackend:
    name = "trtllm"

    def __init__(self, settings: TrtllmSettings, run: Callable[[list[Process], Path], None] = run_processes,
                 slurm: bool | None = None):
        settings.check_flow()
        self.settings = settings
        self.run = run
        # inside a Slurm job the ranks are job steps (srun --mpi=pmix); elsewhere mpirun on this node
        self.slurm = bool(os.environ.get("SLURM_JOB_ID")) if slurm is None else slurm
        self._longest: dict[tuple, int] = {}

    # ------------------------------------------------------------------------------------------ prepare

    def prepare(self, build: BuildSpec, campaign: Campaign) -> Artefact:
        info = {"engine": "tensorrt-llm", "trtllm_version": self.settings.version, "flow": self.settings.flow}
        if self.settings.flow == "pytorch":
            return Artefact(build=build, info=info)
        knobs = self._knobs(build, campaign)
        arch = campaign.model_for(build)
        key = EngineKey(
            model=build.model, model_config_hash=self._config_hash(build.model), weight_dtype=build.weight_dtype,
            kv_dtype=build.kv_dtype, quantization=knobs.quantization, tp=build.tp, pp=build.pp,
            max_batch_size=knobs.max_batch_size, max_num_tokens=knobs.max_num_tokens, max_seq_len=knobs.max_seq_len,
            trtllm_version=self.settings.version, gpu_name=self._gpu_name(), extra={"ep": build.ep})
        layout = _replica_layout(build)

        def build_engine(directory: Path) -> None:
            work = directory / "build"
            for argv in engine_build_commands(self.settings, arch, build.model, layout, knobs, work):
                wrapped = launch(argv, layout.tp * layout.pp, campaign.hardware.gpus_per_node, self.slurm) \
                    if argv[0] == "trtllm-bench" else argv
                self.run([Process(argv=wrapped)], Path(self.settings.workspace) / "infscale" / "engine-builds"
                         / directory.name)
            built = built_engine_dir(build.model, layout, work)
            if not (built / "config.json").exists():
                raise RuntimeError(f"the engine build left no {built}/config.json")
            for item in built.iterdir():  # the engine files at the top of the cache entry
                shutil.move(str(item), directory / item.name)
            shutil.rmtree(work)

        path = EngineCache(self.settings.engine_cache).get_or_build(key, build_engine)
        return Artefact(build=build, path=path, info={**info, "engine_key": key.digest(), "engine_dir": str(path)})

    def _knobs(self, build: BuildSpec, campaign: Campaign) -> BuildKnobs:
        # one engine serves every workload of its layout: sized for the longest sequence of any of the campaign's
        # cells on it, so a rerun with fewer pending cells finds the same engine
        key = (campaign.name, build.model, build.tp, build.pp)
        if key not in self._longest:
            from infscale.campaign.plan import plan_campaign

            self._longest[key] = max((p.cell.isl.max_length + p.cell.osl.max_length for p in plan_campaign(campaign)
                                      if (p.cell.model, p.cell.tp, p.cell.pp) == key[1:]), default=0)
        longest = self._longest[key]
        return BuildKnobs(max_batch_size=build.max_num_seqs, max_num_tokens=build.max_num_tokens,
                          max_seq_len=max(build.max_seq_len, longest),
                          quantization="FP8" if build.weight_dtype == "fp8" else None,
                          kv_fp8=build.kv_dtype == "fp8")

    def _config_hash(self, model: str) -> str:
        path = Path(self.settings.model_path(model)) / "config.json"
        try:
            return hash_model_config(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as err:
            raise TrtllmConfigError(f"{path}: cannot read the model's config.json ({err})") from None

    def _gpu_name(self) -> str:
        if self.settings.gpu_name:
            return self.settings.gpu_name
        gpus = visible_gpus()
        if not gpus:
            raise TrtllmConfigError("no GPU visible through NVML: engines are built for a GPU model, and this "
                                    "node has none")
        return gpus[0][1]

    # ------------------------------------------------------------------------------------------ measure

    def measure(self, cell: Cell, artefact: Artefact, campaign: Campaign) -> CellResult:
        if cell.arrival.mode == "poisson":
            raise NotImplementedError("trtllm-bench throughput has no arrival rate (offline or --concurrency "
                                      "only); use arrival offline or concurrency with the trtllm backend")
        arch = campaign.model_for(cell)
        requests = generate_requests(cell.isl, cell.osl, cell.requests, cell.arrival, cell.seed)
        routes = static_routes(requests, cell.dp, cell.arrival, cell.engine.router)
        out_dir = Path(self.settings.workspace) / "infscale" / campaign.name / cell.id
        if out_dir.exists():
            shutil.rmtree(out_dir)  # a previous attempt's partial outputs: never mixed into this one
        out_dir.mkdir(parents=True)
        datasets, counts = [], []
        for replica, route in enumerate(routes):
            ids = route.ids()
            share = Requests(requests.isl[ids], requests.osl[ids], requests.arrival[ids])
            datasets.append(write_dataset(out_dir / f"dataset{replica}.jsonl", share, arch.vocab_size,
                                          eos_token_id=None, seed=cell.seed))
            counts.append(len(ids))
        knobs = self._knobs(artefact.build, campaign)
        options = extra_options(self.settings, knobs)
        options_file = None
        if options:
            options_file = out_dir / "extra_llm_api_options.yaml"
            options_file.write_text(yaml.safe_dump(options, sort_keys=True))
        concurrency = None
        if cell.arrival.mode == "concurrency":  # each replica gets its clients' share
            concurrency = max(1, -(-(cell.arrival.concurrency or 1) // cell.dp))
        processes = replica_processes(self.settings, arch, cell.model, cell.layout, knobs, datasets, counts,
                                      concurrency, out_dir, campaign.hardware.gpus_per_node, self.slurm,
                                      options_file, artefact.path, visible_devices=_visible_devices(),
                                      scheduler_policy=cell.engine.scheduler_policy)
        gpus = visible_gpus()
        sampler = GpuSampler([uuid for uuid, _ in gpus]) if gpus else None
        if sampler:
            sampler.start()
        try:
            self.run(processes, out_dir / "logs")
        finally:
            telemetry = sampler.stop() if sampler else None
        return self._result(cell, processes, requests, routes, telemetry, gpus)

    def _result(self, cell: Cell, processes: list[Process], requests: Requests, routes, telemetry, gpus) -> CellResult:
        parsed = [reports.load_report(p.report_json) for p in processes]
        for replica, (report, route) in enumerate(zip(parsed, routes)):
            expected = int(requests.osl[route.ids()].sum())
            produced = report.summary().get("output_tokens")
            if produced is not None and produced != expected:  # EOS must stay off: every request runs to its OSL
                raise RuntimeError(f"replica {replica} produced {produced} output tokens, the requests asked for "
                                   f"{expected}; refusing to report its numbers")
        records = [reports.load_request_records(p.request_json) if p.request_json and p.request_json.exists()
                   else None for p in processes]
        summary = reports.aggregate_replicas(parsed, records if all(r is not None for r in records) else None,
                                             gpus=cell.layout.gpus)
        # (without per-request records the latency columns are the worst replica's: docs/trtllm.md)
        summary.pop("latency_from", None)
        logs = [reports.load_iteration_log(p.iteration_log) for p in processes
                if p.iteration_log and p.iteration_log.exists() and p.iteration_log.stat().st_size]
        kv = [log.summary() for log in logs]
        occupancy = [k["mean_kv_occupancy"] for k in kv if k.get("mean_kv_occupancy") is not None]
        if occupancy:
            summary["mean_kv_occupancy"] = float(np.mean(occupancy))
        for column in ("max_kv_occupancy", "max_running_batch"):
            values = [k[column] for k in kv if k.get(column) is not None]
            if values:
                summary[column] = max(values)
        pools = [k["kv_pool_blocks"] for k in kv if k.get("kv_pool_blocks") is not None]
        if pools:
            summary["kv_pool_blocks"] = int(min(pools))
        summary["engine_path"] = f"trtllm-{self.settings.flow}"
        if gpus:
            summary["gpu_name"] = gpus[0][1]
        series = None
        if telemetry is not None:
            summary.update({k: v for k, v in telemetry.summary().items() if v is not None})
            if telemetry.error is None and summary.get("energy_j") is not None and summary.get("output_tokens"):
                summary["energy_per_output_token_j"] = summary["energy_j"] / summary["output_tokens"]
            series = telemetry.series()
        return CellResult(summary=summary, telemetry=series, predicted=False)


def _visible_devices() -> list[str] | None:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return [d.strip() for d in visible.split(",") if d.strip()] if visible else None


def _replica_layout(build: BuildSpec):
    from infscale.layout import Layout

    return Layout(dp=1, tp=build.tp, pp=build.pp, ep=build.ep)

