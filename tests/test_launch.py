"""The launcher's pieces that need no cluster: settings, resources, failure classes, registry and locks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from infscale.campaign import campaign_from_dict
from infscale.campaign.plan import plan_campaign
from infscale.campaign.spec import SpecError
from infscale.launch.failures import Failure, classify_error, classify_state
from infscale.launch.registry import Attempt, JobRecord, LockHeld, Registry, driver_lock, pid_alive
from infscale.launch.resources import job_resources, submitit_parameters
from infscale.launch.settings import LauncherSettings, SlurmSettings, load_launcher_settings


def settings(**slurm) -> LauncherSettings:
    return load_launcher_settings({"executor": "slurm", "slurm": slurm}, "profile.yaml")


@pytest.mark.parametrize("slurm, key, words", [
    ({"account": "x;rm -rf /"}, "launcher.slurm.account", "letters, digits"),
    ({"partition": "gpu$(id)"}, "launcher.slurm.partition", "letters, digits"),
    ({"qos": "a b"}, "launcher.slurm.qos", "letters, digits"),
    ({"time_limit_max_min": -5}, "launcher.slurm.time_limit_max_min", "greater than 0"),
    ({"constraint": "h200;reboot"}, "launcher.slurm.constraint", "feature names"),
    ({"extra_sbatch": {"mail-type": "END; curl x"}}, "launcher.slurm.extra_sbatch", "shell"),
    ({"extra_sbatch": {"--bad": 1}}, "launcher.slurm.extra_sbatch", "option name"),
    ({"setup": [[]]}, "launcher.slurm.setup", "non-empty"),
    ({"container": {"runtime": "docker", "image": "x"}}, "launcher.slurm.container.runtime", "apptainer"),
    ({"partiton": "gpu"}, "launcher.slurm.partiton", "did you mean 'partition'"),
])
def test_bad_settings_are_one_clear_line(slurm, key, words):
    with pytest.raises(SpecError) as err:
        settings(**slurm)
    first = err.value.lines[0]
    assert first.startswith(f"profile.yaml: {key}") and words in first


def test_unknown_executor():
    with pytest.raises(SpecError, match="launcher.executor"):
        load_launcher_settings({"executor": "pbs"}, "profile.yaml")


def test_settings_from_yaml_file(tmp_path):
    path = tmp_path / "s.yaml"
    setup = [["module", "load", "cuda/12.4"]]
    path.write_text(yaml.safe_dump({"executor": "slurm", "slurm": {"partition": "gpu", "setup": setup}}))
    loaded = load_launcher_settings(path, "x")
    assert loaded.slurm.partition == "gpu" and loaded.slurm.setup == [["module", "load", "cuda/12.4"]]


def planned_cells(backend: str, layouts: list[str], model: str = "llama-3.3-70b"):
    raw = {"name": "r", "backend": backend, "hardware": {"name": "h200-sxm", "nodes": 2}, "models": [model],
           "layouts": layouts, "requests": 64, "workloads": [{"name": "w", "isl": 1024, "osl": [1024, 4096]}]}
    campaign = campaign_from_dict(raw)
    return campaign, [p for p in plan_campaign(campaign) if p.feasible]


def test_gpu_layout_maps_to_one_task_per_rank_over_few_nodes():
    campaign, cells = planned_cells("torch", ["tp8pp2"], "llama-3.1-405b")
    resources = job_resources(cells, campaign.hardware, "torch", SlurmSettings(time_limit_max_min=600))
    assert (resources.nodes, resources.gpus_per_node, resources.tasks_per_node) == (2, 8, 8)
    assert resources.cpus_per_task == 8 and resources.mem_gb == 8 * 64
    expected = max(5, min(600, int(-(-(300 + sum(c.est_seconds for c in cells)) * 1.5 // 60))))
    assert resources.time_min == expected


def test_time_limit_is_capped_and_floored():
    campaign, cells = planned_cells("torch", ["tp2"])
    capped = job_resources(cells, campaign.hardware, "torch", SlurmSettings(time_limit_max_min=7))
    assert capped.time_min == 7
    floored = job_resources(cells[:1], campaign.hardware, "sim", SlurmSettings(time_limit_min_min=30))
    assert floored.time_min == 30 and floored.gpus_per_node == 0 and floored.tasks_per_node == 1


def test_submitit_parameters_quote_setup_and_add_exclusions():
    campaign, cells = planned_cells("torch", ["tp4"])
    slurm = SlurmSettings(partition="gpu", account="proj", setup=[["source", "/opt/env with space/activate"]],
                          extra_sbatch={"mail-type": "END"})
    params = submitit_parameters(job_resources(cells, campaign.hardware, "torch", slurm), slurm, "infscale.x",
                                 ["node3"])
    assert params["slurm_partition"] == "gpu" and params["slurm_account"] == "proj"
    assert params["slurm_setup"] == ["source '/opt/env with space/activate'"]
    assert params["slurm_additional_parameters"] == {"mail-type": "END", "exclude": "node3"}
    assert params["gpus_per_node"] == 4 and params["tasks_per_node"] == 4


@pytest.mark.parametrize("text, expected", [
    ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", Failure.INFEASIBLE),
    ("RuntimeError: [TensorRT-LLM] engine build failed: out of memory", Failure.INFEASIBLE),
    ("torch.distributed.DistBackendError: NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled system error",
     Failure.RETRY_ELSEWHERE),
    ("NVRM: Xid (PCI:0000:3b:00): 79, GPU has fallen off the bus", Failure.RETRY_ELSEWHERE),
    ("ValueError: bad prompt length", Failure.FAILED),
])
def test_error_classes(text, expected):
    assert classify_error(text) is expected


@pytest.mark.parametrize("state, expected", [
    ("COMPLETED", None), ("TIMEOUT", Failure.REQUEUE), ("PREEMPTED", Failure.REQUEUE),
    ("NODE_FAIL", Failure.RETRY_ELSEWHERE), ("CANCELLED by 0", Failure.CANCELLED), ("FAILED", Failure.FAILED),
    ("OUT_OF_MEMORY", Failure.FAILED),
])
def test_slurm_state_classes(state, expected):
    assert classify_state(state) is expected


def test_registry_round_trip(tmp_path):
    registry = Registry(tmp_path)
    record = JobRecord("job-a", [Attempt("42", "t0", "first submission")])
    registry.save(record)
    loaded = registry.load("job-a")
    assert loaded.last.slurm_job_id == "42" and registry.active_ids() == ["42"]
    loaded.last.ended_at = "t1"
    registry.save(loaded)
    assert registry.active_ids() == []
    assert json.loads((tmp_path / "jobs" / "job-a.json").read_text())["attempts"][0]["reason"] == "first submission"


def test_lock_refuses_a_live_driver_and_takes_over_from_a_dead_one(tmp_path):
    lock = tmp_path / "driver.lock"
    with driver_lock(lock, "campaign c"):
        with pytest.raises(LockHeld, match="already driven by pid"):
            with driver_lock(lock, "campaign c"):
                pass
    assert not lock.exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename, "started_at": "t"}))
    assert not pid_alive(dead.pid)
    with driver_lock(lock, "campaign c"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()


def test_jobs_run_their_python_inside_an_apptainer_image_and_pyxis_through_srun():
    from infscale.launch.resources import container_python

    apptainer = settings(container={"runtime": "apptainer", "image": "/images/infscale.sif",
                                    "binds": ["/scratch:/scratch"]}).slurm
    assert container_python(apptainer) == ("apptainer exec --nv --bind /scratch:/scratch /images/infscale.sif "
                                           "python3")
    pyxis = settings(container={"runtime": "pyxis", "image": "nvcr.io/nvidia/pytorch:25.01-py3"}).slurm
    assert container_python(pyxis) is None and container_python(settings().slurm) is None
