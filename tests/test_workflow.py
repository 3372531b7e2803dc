"""Incremental reruns through Snakemake itself, with the cell files' contents checked."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.workflow


def campaign(osl: list[int], knobs_b: dict | None = None) -> dict:
    return {
        "name": "incr",
        "backend": "sim",
        "hardware": "h200-sxm",
        "models": ["llama-3.1-8b"],
        "layouts": ["dp1", "tp2"],
        "requests": 24,
        "workloads": [
            {"name": "a", "isl": 128, "osl": osl},
            {"name": "b", "isl": 256, "osl": [256], **({"engine": knobs_b} if knobs_b else {})},
        ],
    }


def snakemake(workdir: Path, config_file: Path) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
        "--profile", str(REPO / "profiles" / "local"),
        "--config", f"campaign={config_file}", f"results_root={workdir / 'results'}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def cell_files(workdir: Path, folder: Path | None = None) -> dict[str, tuple[str, int]]:
    """cell id -> (sha256 of the file, mtime in ns) in cells/ (or `folder`)"""
    folder = folder or workdir / "results" / "incr" / "cells"
    return {
        p.name.removesuffix(".parquet"): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in folder.glob("*.parquet")
    }


def merged(workdir: Path) -> pl.DataFrame:
    return pl.read_parquet(workdir / "results" / "incr" / "cells.parquet")


def test_incremental_reruns(tmp_path: Path) -> None:
    config_file = tmp_path / "incr.yaml"
    config_file.write_text(yaml.safe_dump(campaign([256, 512])))

    # 1. first run: 2 layouts × (2 + 1) workload cells, all measured
    snakemake(tmp_path, config_file)
    first = cell_files(tmp_path)
    assert len(first) == 6
    table = merged(tmp_path)
    assert table.height == 6 and set(table["status"]) == {"ok"}
    summary = (tmp_path / "results" / "incr" / "summary.md").read_text()
    assert "llama-3.1-8b" in summary

    # 2. a second run does nothing, and touches no file
    again = snakemake(tmp_path, config_file)
    assert "Nothing to be done" in again.stdout + again.stderr
    assert cell_files(tmp_path) == first

    # 3. one more OSL value for workload a: only its 2 new cells (one per layout) are measured
    config_file.write_text(yaml.safe_dump(campaign([256, 512, 1024])))
    snakemake(tmp_path, config_file)
    third = cell_files(tmp_path)
    new = set(third) - set(first)
    assert len(new) == 2 and all(".i128-o1024." in cell for cell in new)
    assert {k: third[k] for k in first} == first  # nothing measured before was rewritten
    assert merged(tmp_path).height == 8

    # 4. a knob of workload b changes: only b's 2 cells are measured again (under new ids); the old b cells move to
    # superseded/ unchanged, each with its reason, so cells/ holds exactly the plan's 8 cells
    config_file.write_text(yaml.safe_dump(campaign([256, 512, 1024], {"max_num_seqs": 8})))
    snakemake(tmp_path, config_file)
    fourth = cell_files(tmp_path)
    new = set(fourth) - set(third)
    assert len(new) == 2 and all(".i256-o256." in cell for cell in new)
    old_b = set(third) - set(fourth)
    assert len(old_b) == 2 and len(fourth) == 8
    assert {k: fourth[k] for k in third if k not in old_b} == {k: third[k] for k in third if k not in old_b}
    superseded = tmp_path / "results" / "incr" / "superseded"
    assert {k: cell_files(tmp_path, superseded)[k] for k in old_b} == {k: third[k] for k in old_b}  # untouched
    for cell in old_b:
        reason = (superseded / f"{cell}.parquet.reason").read_text()
        assert "engine.max_num_seqs: 256 → 8" in reason and "superseded by the planned cell" in reason
    table = merged(tmp_path)
    assert table.height == 8  # exactly the plan's cells: the superseded b cells are not in the merge
    assert set(table.filter(pl.col("workload") == "b")["max_num_seqs"]) == {8}

    # 5. the knob changes back: the superseded cells return to cells/ (not measured again), the others leave
    config_file.write_text(yaml.safe_dump(campaign([256, 512, 1024])))
    result = snakemake(tmp_path, config_file)
    assert cell_files(tmp_path) == third
    assert "moved back from superseded/" in result.stderr
    assert set(cell_files(tmp_path, superseded)) == new and not list(superseded.glob(f"{min(old_b)}*"))


def test_merge_reads_only_planned_cells(tmp_path: Path) -> None:
    config_file = tmp_path / "incr.yaml"
    config_file.write_text(yaml.safe_dump(campaign([256])))
    snakemake(tmp_path, config_file)
    cells = tmp_path / "results" / "incr" / "cells"
    stray = cells / "stray.parquet"
    stray.write_bytes(next(cells.glob("*.parquet")).read_bytes())
    subprocess.run([sys.executable, "-m", "infscale", "merge", str(config_file), "--results-root",
                    str(tmp_path / "results")], check=True, capture_output=True)
    table = merged(tmp_path)
    assert table.height == 4 and table["cell_id"].n_unique() == 4


def test_local_submitit_executor_gives_the_debug_executors_results(tmp_path: Path) -> None:
    """The `local` executor runs each bench job in a submitit subprocess: same cells, same numbers."""
    raw = campaign([64, 128])
    frames = {}
    for executor in ("debug", "local"):
        workdir = tmp_path / executor
        workdir.mkdir()
        config_file = workdir / "incr.yaml"
        config_file.write_text(yaml.safe_dump(raw))
        settings = workdir / "settings.yaml"
        settings.write_text(yaml.safe_dump({"packing": "layout", "launcher": {"executor": executor}}))
        result = subprocess.run(
            [sys.executable, "-m", "infscale", "run", str(config_file), "--profile", str(REPO / "profiles" / "local"),
             "--settings", str(settings), "--results-root", str(workdir / "results"), "--directory", str(workdir)],
            capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        frames[executor] = merged(workdir).drop("started_at", "ended_at")
        assert (workdir / "results" / "incr" / "jobs" / "submitit").is_dir() == (executor == "local")
    assert frames["debug"].height == 6 and frames["debug"].equals(frames["local"])


def test_calibration_target_measures_once_through_the_local_executor(tmp_path: Path) -> None:
    """`microbench` writes results/<c>/calibration/<hw>/microbench.json in a submitit subprocess (the `local`
    executor); a rerun does nothing; `calibration` then fails: a CPU measurement makes no GPU profile."""
    config_file = tmp_path / "calib.yaml"
    # DP layouts only: no collectives, so the CPU measurement stays short (GEMM, memory, attention)
    config_file.write_text(yaml.safe_dump({**campaign([128]), "name": "calib", "layouts": ["dp1", "dp2"]}))
    settings = tmp_path / "settings.yaml"
    settings.write_text(yaml.safe_dump({"launcher": {"executor": "local"}}))
    results = tmp_path / "results" / "calib"
    target = results / "calibration" / "h200-sxm" / "microbench.json"

    def snakemake_target(name: str, *extra: str) -> subprocess.CompletedProcess:
        command = [
            sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path),
            "--profile", str(REPO / "profiles" / "local"), "--configfile", str(settings),
            "--config", f"campaign={config_file}", f"results_root={tmp_path / 'results'}", *extra, "--", name,
        ]
        return subprocess.run(command, capture_output=True, text=True, timeout=300)

    first = snakemake_target(str(target))
    assert first.returncode == 0, first.stdout + first.stderr
    report = json.loads(target.read_text())
    assert report["environment"]["device"] == "cpu" and report["collectives"] == []
    assert {row["model"] for row in report["gemm"]} == {"llama-3.1-8b"}
    assert any((results / "jobs" / "submitit").glob("*_0_result.pkl"))  # it ran as a submitit job
    log = (results / "logs" / "calibration" / "h200-sxm.microbench.log").read_text()
    assert "local executor" in log and "wrote" in log
    assert not (results / "cells").exists()  # the calibration target runs no bench job
    measured = (target.read_bytes(), target.stat().st_mtime_ns)

    again = snakemake_target(str(target))
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
    # a forced rerun (as after a change of the rule's code) neither deletes nor measures again
    forced = snakemake_target(str(target), "--forcerun", "microbench")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert target.read_bytes() == measured[0]  # the same bytes (Snakemake itself sets a new mtime)
    assert "exists; a measurement is never overwritten" in (
        results / "logs" / "calibration" / "h200-sxm.microbench.log").read_text()

    failed = snakemake_target("calibration")
    assert failed.returncode != 0
    calibrate_log = (results / "logs" / "calibration" / "h200-sxm.calibrate.log").read_text()
    assert "measured on the CPU" in calibrate_log, calibrate_log
    assert not (results / "calibration" / "h200-sxm" / "profile.yaml").exists()
    assert target.read_bytes() == measured[0]  # the measurement is kept
