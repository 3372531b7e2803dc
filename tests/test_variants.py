"""Cells that share a model, layout and workload because an engine knob is swept: the summary gives each its own
row, the capacity fits one curve each and the figures one line each, named by the knobs that differ — never one
standing for several cells, or a curve through a mix of them."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
import yaml

from infscale.analysis.figures import _prepare
from infscale.cli import main

SWEPT = ["dp1tp2pp2 (max_num_seqs=16, pp_microbatches=1)", "dp1tp2pp2 (max_num_seqs=16, pp_microbatches=0)",
         "dp1tp2pp2 (max_num_seqs=128, pp_microbatches=1)", "dp1tp2pp2 (max_num_seqs=128, pp_microbatches=0)",
         "dp1tp4pp1 (max_num_seqs=16)", "dp1tp4pp1 (max_num_seqs=128)"]  # pp_microbatches means nothing at pp=1


def _run(tmp_path: Path, engine: dict) -> Path:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "name": "sweep", "backend": "sim", "hardware": "h100-sxm", "models": ["llama-3.1-8b"],
        "layouts": ["tp2pp2", "tp4"], "requests": 32, "engine": engine,
        "workloads": [{"name": "w", "isl": 1024, "osl": [1024, 2048, 4096, 8192]}],
    }))
    results = tmp_path / "results"
    assert main(["run", str(config), "--results-root", str(results)]) == 0
    assert main(["fit", str(config), "--results-root", str(results)]) == 0
    return results / "sweep"


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> Path:
    return _run(tmp_path_factory.mktemp("swept"), {"pp_microbatches": [1, 0], "max_num_seqs": [16, 128]})


def _layout_lines(summary: str) -> list[str]:
    """The rows of the per-model table (`| GPUs | layout | …`)."""
    return [line for line in summary.splitlines() if line.startswith("| 4 | dp1")]


def _rows(summary: str) -> list[str]:
    return [line.split(" | ")[1] for line in _layout_lines(summary)]


def test_the_summary_gives_each_variant_its_row(swept):
    lines = _layout_lines((swept / "summary.md").read_text())
    assert _rows("\n".join(lines)) == SWEPT
    assert all(line.count("|") == 7 and "—" not in line for line in lines)  # every row has all 4 OSL columns


def test_capacity_fits_and_figure_lines_are_per_variant(swept):
    fits = pl.read_parquet(swept / "fits.parquet").filter(pl.col("law") == "capacity")
    assert sorted(fits.get_column("family").to_list()) == sorted(SWEPT)
    shorts = _prepare(pl.read_parquet(swept / "cells.parquet")).get_column("short").unique().to_list()
    assert sorted(shorts) == sorted(s.replace("dp1tp2pp2", "tp2pp2").replace("dp1tp4pp1", "tp4") for s in SWEPT)


def test_a_campaign_without_sweeps_keeps_plain_layouts(tmp_path):
    plain = _run(tmp_path, {"pp_microbatches": 0})
    assert _rows((plain / "summary.md").read_text()) == ["dp1tp2pp2", "dp1tp4pp1"]
    fits = pl.read_parquet(plain / "fits.parquet").filter(pl.col("law") == "capacity")
    assert sorted(fits.get_column("family").to_list()) == ["dp1tp2pp2", "dp1tp4pp1"]
