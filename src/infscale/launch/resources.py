"""From a bench job (a layout group) to the Slurm resources it asks for, and the submitit parameters (or the local
executor that runs the same job function on this machine)."""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass
from pathlib import Path

from infscale.campaign.plan import PlannedCell
from infscale.catalog import Hardware
from infscale.launch.settings import SlurmSettings

GPU_BACKENDS = ("torch", "trtllm")
SIM_SECONDS_PER_CELL = 5.0   # generous: the sim backend takes well under a second per cell
STARTUP_SECONDS = 300.0      # engine load/build, imports, NCCL set-up of a GPU job
LOCAL_TIMEOUT_MIN = 24 * 60  # the local executor's limit: long enough for any job, set so none runs forever


@dataclass(frozen=True)
class JobResources:
    nodes: int
    gpus_per_node: int
    tasks_per_node: int
    cpus_per_task: int
    mem_gb: int
    time_min: int

    def describe(self) -> str:
        return (f"{self.nodes} node(s) × {self.gpus_per_node} GPU(s), {self.tasks_per_node} task(s)/node, "
                f"{self.cpus_per_task} CPU(s)/task, {self.mem_gb} GB, {self.time_min} min")


def job_resources(cells: list[PlannedCell], hardware: Hardware, backend: str, settings: SlurmSettings) -> JobResources:
    """One task per rank for GPU backends (the layout's GPUs, spread over as few nodes as possible); one CPU
    task for the sim backend. The time limit is the plan's estimate × `time_factor`, within the profile's bounds."""
    if backend in GPU_BACKENDS:
        layout = cells[0].cell.layout
        nodes = layout.nodes(hardware.gpus_per_node)
        gpus_per_node = math.ceil(layout.gpus / nodes)
        estimate = STARTUP_SECONDS + sum(c.est_seconds for c in cells)
        if backend == "torch":  # one task per GPU rank (the tasks join one process group)
            resources = (nodes, gpus_per_node, gpus_per_node, settings.cpus_per_gpu,
                         settings.mem_per_gpu_gb * gpus_per_node)
        else:  # trtllm: one task that starts the MPI ranks as job steps (srun --mpi=pmix … trtllm-llmapi-launch)
            resources = (nodes, gpus_per_node, 1, settings.cpus_per_gpu * gpus_per_node,
                         settings.mem_per_gpu_gb * gpus_per_node)
    else:
        estimate = 60.0 + SIM_SECONDS_PER_CELL * len(cells)
        resources = (1, 0, 1, settings.cpus_per_cpu_job, settings.mem_per_cpu_job_gb)
    minutes = math.ceil(estimate * settings.time_factor / 60)
    minutes = max(settings.time_limit_min_min, min(settings.time_limit_max_min, minutes))
    return JobResources(*resources, time_min=minutes)


MICROBENCH_MIN = {"gpu": 60, "cpu": 15}  # time limit of a microbenchmark job (minutes), within the profile's bounds


def microbench_resources(gpus: int, settings: SlurmSettings) -> JobResources:
    """One node, one task (the collectives start their own rank processes): `gpus` GPUs with `cpus_per_gpu` and
    `mem_per_gpu_gb` each, or, with `gpus` 0, a CPU job sized like a sim bench job."""
    if gpus > 0:
        cpus, mem, minutes = settings.cpus_per_gpu * gpus, settings.mem_per_gpu_gb * gpus, MICROBENCH_MIN["gpu"]
    else:
        cpus, mem, minutes = settings.cpus_per_cpu_job, settings.mem_per_cpu_job_gb, MICROBENCH_MIN["cpu"]
    minutes = max(settings.time_limit_min_min, min(settings.time_limit_max_min, minutes))
    return JobResources(nodes=1, gpus_per_node=gpus, tasks_per_node=1, cpus_per_task=cpus, mem_gb=mem,
                        time_min=minutes)


def submitit_parameters(resources: JobResources, settings: SlurmSettings, job_name: str,
                        exclude: list[str]) -> dict[str, object]:
    """Parameters for `submitit.AutoExecutor.update_parameters` (values are validated names, never shell text)."""
    params: dict[str, object] = {
        "name": job_name,
        "nodes": resources.nodes,
        "tasks_per_node": resources.tasks_per_node,
        "cpus_per_task": resources.cpus_per_task,
        "mem_gb": resources.mem_gb,
        "timeout_min": resources.time_min,
        "slurm_signal_delay_s": settings.signal_delay_s,
    }
    if resources.gpus_per_node:
        params["gpus_per_node"] = resources.gpus_per_node
    for key in ("partition", "account", "qos", "constraint"):
        value = getattr(settings, key)
        if value:
            params[f"slurm_{key}"] = value
    extra = dict(settings.extra_sbatch)
    if exclude:
        extra["exclude"] = ",".join(exclude)
    if extra:
        params["slurm_additional_parameters"] = extra
    setup = [shlex.join(command) for command in settings.setup]
    if setup:
        params["slurm_setup"] = setup
    if settings.container is not None:
        params["slurm_srun_args"] = container_srun_args(settings)
    return params


def container_python(settings: SlurmSettings) -> str | None:
    """submitit's `slurm_python` under Apptainer (the job's python runs inside the image); None otherwise."""
    container = settings.container
    if container is None or container.runtime != "apptainer":
        return None
    binds = [arg for bind in container.binds for arg in ("--bind", bind)]
    return shlex.join(["apptainer", "exec", "--nv", *binds, container.image, "python3"])


def container_srun_args(settings: SlurmSettings) -> list[str]:
    """pyxis takes the image as an srun option; Apptainer wraps the command (see `container_prefix`)."""
    container = settings.container
    if container is None or container.runtime != "pyxis":
        return []
    args = [f"--container-image={container.image}"]
    if container.binds:
        args.append(f"--container-mounts={','.join(container.binds)}")
    return args


def local_executor(folder: Path):
    """submitit's LocalExecutor (a subprocess of this machine, logs and pickles under `folder`) for bench, engine
    and microbenchmark jobs alike."""
    import submitit

    executor = submitit.LocalExecutor(folder=folder)
    executor.update_parameters(timeout_min=LOCAL_TIMEOUT_MIN)
    return executor
