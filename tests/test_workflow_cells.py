"""Missing, damaged and misnamed cell files through the real Snakemake run: found when the workflow starts (also
on a dry run), measured again or refused, and never reported as ok by `summary` and `merge`."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.workflow

CAMPAIGN = {"name": "damage", "backend": "sim", "hardware": "h200-sxm", "models": ["llama-3.1-8b"],
            "layouts": ["dp1", "tp2"], "requests": 16,
            "workloads": [{"name": "a", "isl": 128, "osl": [128, 256]}, {"name": "b", "isl": 256, "osl": [128]}]}


def snakemake(workdir: Path, config_file: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory",
               str(workdir), "--profile", str(REPO / "profiles" / "local"), *extra,
               "--config", f"campaign={config_file}", f"results_root={workdir / 'results'}"]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def infscale(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "infscale", *args], capture_output=True, text=True, timeout=120)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_missing_damaged_and_misnamed_cell_files(tmp_path: Path) -> None:
    config_file = tmp_path / "damage.yaml"
    config_file.write_text(yaml.safe_dump(CAMPAIGN))
    results = tmp_path / "results" / "damage"
    cells = results / "cells"
    first = snakemake(tmp_path, config_file)
    assert first.returncode == 0, first.stdout + first.stderr
    names = sorted(p.name.removesuffix(".parquet") for p in cells.glob("*.parquet"))
    assert len(names) == 6
    gone, truncated, garbage, impostor, source, _ = names
    original = {name: sha(cells / f"{name}.parquet") for name in names}

    (cells / f"{gone}.parquet").unlink()
    data = (cells / f"{truncated}.parquet").read_bytes()
    (cells / f"{truncated}.parquet").write_bytes(data[: len(data) // 3])
    (cells / f"{garbage}.parquet").write_bytes(b"\x00garbage\xff" * 300)
    shutil.copy(cells / f"{source}.parquet", cells / f"{impostor}.parquet")
    damaged_bytes = {truncated: sha(cells / f"{truncated}.parquet"), garbage: sha(cells / f"{garbage}.parquet")}

    # the dry run is honest: it names every problem and lists the bench job that will measure again
    dry = snakemake(tmp_path, config_file, "-n")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert f"infscale: cell {gone}: missing" in dry.stderr
    assert f"infscale: cell {truncated}: damaged" in dry.stderr and f"infscale: cell {garbage}: damaged" in dry.stderr
    assert f"REFUSED: {cells / impostor}.parquet records cell {source}, not {impostor}" in dry.stderr
    assert "Nothing to be done" not in dry.stdout + dry.stderr
    assert any(line.split()[:2] == ["bench", "1"] for line in dry.stdout.splitlines()), dry.stdout

    # the real run measures the missing and damaged cells again and refuses the misnamed file
    second = snakemake(tmp_path, config_file)
    assert second.returncode != 0
    bench_log = next((results / "logs" / "bench").glob("*.log")).read_text()
    assert f"records cell {source}, not {impostor}; move that file away" in bench_log
    for name in (gone, truncated, garbage):
        assert (cells / f"{name}.parquet").is_file(), name
    moved = {p.name.split(".parquet.")[0]: p for p in (results / "damaged").iterdir()
             if ".parquet." in p.name and not p.name.endswith(".reason")}
    assert {name: sha(path) for name, path in moved.items()} == damaged_bytes       # kept, never deleted
    assert all(path.with_name(path.name + ".reason").read_text() for path in moved.values())
    assert sha(cells / f"{impostor}.parquet") == original[source]                    # left where it is
    assert sha(cells / f"{source}.parquet") == original[source]                      # the intact ones untouched

    # summary and merge never call the refused cell ok
    summary = infscale("summary", str(config_file), "--results-root", str(tmp_path / "results"))
    assert summary.returncode == 1 and "0 missing, 0 damaged, 1 misnamed" in summary.stderr
    merge = infscale("merge", str(config_file), "--results-root", str(tmp_path / "results"))
    assert merge.returncode == 0, merge.stderr
    assert "cell files need attention: 0 missing, 0 damaged, 1 misnamed" in merge.stderr
    merged = pl.read_parquet(results / "cells.parquet")
    assert merged.height == 6 and merged["cell_id"].n_unique() == 6                  # no duplicate, none dropped
    status = dict(zip(merged["cell_id"], merged["status"]))
    assert status[impostor] == "misnamed" and sum(s == "ok" for s in status.values()) == 5
    text = (results / "summary.md").read_text()
    assert "6 cells planned: 5 ok, 1 misnamed" in text and "## cell files needing attention" in text

    # once the misnamed file is moved away, a rerun measures that cell and completes
    shutil.move(cells / f"{impostor}.parquet", tmp_path / "kept-aside.parquet")
    third = snakemake(tmp_path, config_file)
    assert third.returncode == 0, third.stdout + third.stderr
    assert "6 cells planned: 6 ok" in (results / "summary.md").read_text()
    assert infscale("summary", str(config_file), "--results-root", str(tmp_path / "results")).returncode == 0
    again = snakemake(tmp_path, config_file)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
