"""Hostile paths through the real workflow: a campaign file and a results root whose names hold spaces, quotes,
`$(…)` and backticks run to completion through `snakemake` and through `infscale run`; nothing they name is
executed, and nothing outside the results root is written (besides Snakemake's own .snakemake/ folder in its
working directory)."""

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

# Each injected command would create a file named pwned-*; the shell would run it in the rule's working directory.
HOSTILE = "it's \"q\" $(touch pwned-dollar) `touch pwned-tick` a;b&c|d key: value #comment"
CAMPAIGN = {"name": "hostile", "backend": "sim", "hardware": "h200-sxm", "models": ["llama-3.1-8b"],
            "layouts": ["dp1"], "requests": 8, "workloads": [{"name": "w", "isl": 64, "osl": [64, 128]}]}


def files_under(folder: Path, skip: list[Path]) -> dict[str, str]:
    """relative path -> sha256 of every file below `folder`, but those inside `skip`."""
    found = {}
    for path in folder.rglob("*"):
        if path.is_file() and not any(path.is_relative_to(s) for s in skip):
            found[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


@pytest.fixture
def hostile_layout(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(campaign file, results root, working directory) under tmp_path, with a precious file the unquoted
    results root "<dir>/precious.txt …" once overwrote."""
    folder = tmp_path / f"campaign {HOSTILE}"
    folder.mkdir()
    config = folder / f"my {HOSTILE}.yaml"
    config.write_text(yaml.safe_dump(CAMPAIGN))
    (tmp_path / "precious.txt").write_text("measured by hand, never to be lost\n")
    results = tmp_path / f"precious.txt {HOSTILE}"
    workdir = tmp_path / "work"
    workdir.mkdir()
    return config, results, workdir


def check_the_run(tmp_path: Path, results: Path, workdir: Path, before: dict[str, str]) -> None:
    assert not [p for p in tmp_path.rglob("pwned-*")], "a command in a path name was executed"
    after = files_under(tmp_path, [results, workdir / ".snakemake"])
    assert after == before, "a file outside the results root was written"
    merged = pl.read_parquet(results / "hostile" / "cells.parquet")
    assert merged.height == 2 and set(merged["status"]) == {"ok"}
    assert (results / "hostile" / "report.html").is_file()


def test_snakemake_with_hostile_campaign_path_and_results_root(hostile_layout, tmp_path: Path) -> None:
    config, results, workdir = hostile_layout
    # the values go through a config file: --config would parse them as YAML, which a user quotes for (docs)
    settings = tmp_path / "config.json"
    # the artifact bundle too (its rule removes the previous bundle directory first): inside the results root
    bundles = results / f"artifacts {HOSTILE}"
    settings.write_text(json.dumps({"campaign": str(config), "results_root": str(results), "ae_out": str(bundles)}))
    before = files_under(tmp_path, [])
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
         "--profile", str(REPO / "profiles" / "local"), "--configfile", str(settings), "--", "all", "ae_bundle"],
        capture_output=True, text=True, timeout=300, cwd=workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    check_the_run(tmp_path, results, workdir, before)
    assert (bundles / "hostile-ae.tar.gz").is_file() and (bundles / "hostile-ae" / "manifest.json").is_file()


def test_infscale_run_with_hostile_campaign_path_and_results_root(hostile_layout, tmp_path: Path) -> None:
    config, results, workdir = hostile_layout
    before = files_under(tmp_path, [])
    result = subprocess.run(
        [sys.executable, "-m", "infscale", "run", str(config), "--profile", str(REPO / "profiles" / "local"),
         "--results-root", str(results), "--directory", str(workdir)],
        capture_output=True, text=True, timeout=300, cwd=workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "llama-3.1-8b" in result.stdout  # the summary, printed at the end
    check_the_run(tmp_path, results, workdir, before)
