"""Engine builds as jobs of their own (the trtllm backend's `engine` flow): one per engine the campaign needs.

Snakemake's `engine` rule runs `infscale engine CONFIG --engine LABEL` once per engine; it builds the engine into
the shared cache (or finds it there) in a job of the engine's TP × PP GPUs and writes a small pointer file,
`results/<campaign>/engines/<label>.json`. The bench rules of the layouts that need the engine depend on that
file, so every engine is built before, and once for, the bench jobs that run on it (which then find it in the
cache). Other backends and the `pytorch` flow have no engines.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

from infscale.backends.base import BuildSpec
from infscale.campaign.plan import PlannedCell
from infscale.launch.settings import LauncherSettings
from infscale.pipeline import CampaignRun
from infscale.results.io import write_text_atomic
from infscale.results.provenance import utc_now


def engine_flow(launcher: Any) -> bool:
    """Whether the launcher settings (a dict or LauncherSettings) ask the trtllm backend for engines."""
    if isinstance(launcher, LauncherSettings):
        launcher = launcher.model_dump()
    trtllm = (launcher or {}).get("trtllm") or {}
    return trtllm.get("flow") == "engine"


def engine_label(build: BuildSpec) -> str:
    """Readable and unique per engine of a campaign (the cache's own key adds the model config, version, GPU)."""
    ep = f"ep{build.ep}" if build.ep > 1 else ""
    return (f"{build.model}.{build.weight_dtype}-{build.kv_dtype}.tp{build.tp}pp{build.pp}{ep}."
            f"s{build.max_num_seqs}t{build.max_num_tokens}")


def engine_groups(planned: list[PlannedCell]) -> dict[BuildSpec, list[PlannedCell]]:
    """The feasible cells by the engine they run on. One engine serves every workload of its layout, so the key
    leaves the sequence length out (max_seq_len 0; TrtllmBackend._knobs sizes it for the longest)."""
    groups: dict[BuildSpec, list[PlannedCell]] = defaultdict(list)
    for item in planned:
        if item.feasible:
            groups[replace(BuildSpec.for_cells([item.cell]), max_seq_len=0)].append(item)
    return dict(groups)


def engines(run: CampaignRun) -> dict[str, BuildSpec]:
    """Every engine of the campaign's feasible cells, by label."""
    return {engine_label(build): build for build in engine_groups(run.planned)}


def engines_of_job(run: CampaignRun, job: str) -> list[str]:
    return sorted(engine_label(build) for build in engine_groups(run.jobs().get(job, [])))


def pointer_file(run: CampaignRun, label: str) -> Path:
    return run.results_dir / "engines" / f"{label}.json"


class EngineJob:
    """What runs inside the build job: the engine through the backend's prepare (cache hit or build)."""

    def __init__(self, campaign_file: str, results_root: str, packing: str, label: str, options: dict):
        self.campaign_file, self.results_root, self.packing = campaign_file, results_root, packing
        self.label, self.options = label, options

    def __call__(self) -> dict[str, object]:
        from infscale.backends import get_backend
        from infscale.launch.jobfn import task_count, task_rank

        if task_count() > 1 and task_rank() != 0:
            return {"label": self.label, "status": "idle"}  # one task per node; the first starts the build steps

        run = CampaignRun(Path(self.campaign_file), Path(self.results_root), self.packing)
        builds = engines(run)
        if self.label not in builds:
            raise KeyError(f"campaign {run.campaign.name!r} needs no engine {self.label!r}; it needs: "
                           f"{', '.join(sorted(builds)) or 'none'}")
        started = utc_now()
        artefact = get_backend("trtllm", self.options).prepare(builds[self.label], run.campaign)
        pointer = {"label": self.label, "engine_dir": str(artefact.path), "engine_key": artefact.info.get("engine_key"),
                   "trtllm_version": artefact.info.get("trtllm_version"), "started_at": started,
                   "ended_at": utc_now(), "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
        write_text_atomic(pointer_file(run, self.label), json.dumps(pointer, indent=1))
        return pointer


def drive_engine(run: CampaignRun, label: str, settings: LauncherSettings) -> dict[str, object]:
    """Build (or find) one engine through the chosen executor; return the pointer the job wrote."""
    if settings.trtllm is None:
        raise ValueError("the engine flow needs the launcher settings' `trtllm:` section")
    job = EngineJob(str(run.campaign_file.resolve()), str(run.results_root.resolve()), run.packing, label,
                    settings.trtllm)
    if settings.executor == "debug":
        return job()
    import submitit

    folder = run.results_dir / "jobs" / "submitit"
    if settings.executor == "local":
        from infscale.launch.resources import local_executor

        executor = local_executor(folder)
    else:
        from infscale.launch.resources import container_python, submitit_parameters

        build = engines(run)[label]
        gpus = build.tp * build.pp
        nodes = math.ceil(gpus / run.campaign.hardware.gpus_per_node)
        per_node = math.ceil(gpus / nodes)
        slurm = settings.slurm
        resources = _build_resources(nodes, per_node, slurm)
        # under Apptainer the job's python must run inside the image, as for bench jobs
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_python=container_python(slurm))
        from infscale.launch.driver import slurm_job_name

        # named like the campaign's bench jobs, so that sacct/squeue/scancel by campaign find it too
        name = slurm_job_name(run.campaign.name, f"engine.{label}")
        executor.update_parameters(**submitit_parameters(resources, slurm, name, []))
    return executor.submit(job).result()


def _build_resources(nodes: int, gpus_per_node: int, slurm):
    from infscale.launch.resources import JobResources

    # one task: the build runs its own MPI job steps (trtllm-llmapi-launch) on the job's GPUs
    return JobResources(nodes=nodes, gpus_per_node=gpus_per_node, tasks_per_node=1,
                        cpus_per_task=slurm.cpus_per_gpu * gpus_per_node, mem_gb=slurm.mem_per_gpu_gb * gpus_per_node,
                        time_min=min(slurm.time_limit_max_min, max(slurm.time_limit_min_min, ENGINE_BUILD_MIN)))


ENGINE_BUILD_MIN = 120   # time limit of a build job (minutes), within the profile's bounds: large engines take long
