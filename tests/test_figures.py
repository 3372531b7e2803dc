"""The campaign figures: drawn on sim and on measured (reference) data, skipped with a reason when their data is
missing, predictions told apart from measurements, and byte-identical when drawn twice."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import polars as pl
import pytest

from infscale.analysis import figures
from infscale.analysis.figures import read_manifest, read_validation, render_figures, short_layout
from infscale.cli import main

REFERENCE = Path(__file__).resolve().parents[1] / "results" / "reference" / "gpu-node"
ALL = ["throughput_vs_gpus", "reasoning_cliff", "kv_capacity", "best_layout", "latency", "energy",
       "predicted_vs_measured"]


def digests(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def by_name(results) -> dict[str, figures.FigureResult]:
    return {r.name: r for r in results}


def test_sim_campaign_figures_through_the_cli(sim_results) -> None:
    config, results_root = sim_results
    assert main(["figures", str(config), "--results-root", str(results_root)]) == 0
    folder = results_root / "figs" / "figures"
    drawn = by_name(read_manifest(folder))
    assert list(drawn) == ALL
    for name in ALL[:5]:
        assert drawn[name].skipped is None, name
        assert drawn[name].png.read_bytes().startswith(b"\x89PNG") and drawn[name].png.stat().st_size > 10_000
        assert b"<svg" in drawn[name].svg.read_bytes()
    # the sim predicts no energy and there is no validation table: both skipped, each saying why
    assert "sim backend predicts no energy" in drawn["energy"].skipped
    assert "infscale validate" in drawn["predicted_vs_measured"].skipped
    assert not (folder / "energy.png").exists() and not (folder / "predicted_vs_measured.svg").exists()
    title = json.loads((folder / "figures.json").read_text())["title"]
    assert "figs" in title and "(predicted)" in title


def test_reference_figures_with_validation(tmp_path) -> None:
    """The measured 4×H100 cells (a copy: results/reference is never written): energy and predicted-vs-measured are
    drawn; throughput against GPU count is not while every cell there uses 4 GPUs."""
    before = digests(REFERENCE)
    copy = tmp_path / "gpu-node"
    shutil.copytree(REFERENCE, copy)
    cells = pl.read_parquet(copy / "cells.parquet")
    files = sorted(copy.glob("validation*.parquet"))
    validation = read_validation(files)
    predictors = sorted(validation.get_column("predictor").unique())
    assert "catalog" in predictors and "h100-sxm.torch.2026-11-27" in predictors and len(predictors) == len(files)
    results = by_name(render_figures(cells, copy / "figures", fits=pl.read_parquet(copy / "fits.parquet"),
                                     validation=validation, title="gpu-node"))
    if cells.filter(pl.col("status") == "ok").get_column("gpus").n_unique() == 1:
        assert "two or more GPU counts" in results["throughput_vs_gpus"].skipped
    for name in ALL[1:]:
        assert results[name].skipped is None, (name, results[name].skipped)
    assert digests(REFERENCE) == before  # the committed figures and report are not touched


def test_predictions_and_measurements_are_labelled() -> None:
    cells = pl.read_parquet(REFERENCE / "cells.parquet").filter(pl.col("status") == "ok")
    measured = figures._prepare(cells)
    assert not measured.get_column("predicted_point").any()
    as_sim = cells.with_columns(pl.lit("sim").alias("backend"), pl.lit(None, pl.Boolean).alias("predicted"))
    predicted = figures._prepare(as_sim)
    assert predicted.get_column("predicted_point").all()  # a sim row without the flag is predicted
    import matplotlib

    with matplotlib.rc_context(figures.RC):
        for frame, kind, face in ((measured, "(measured)", "filled"), (predicted, "(predicted)", "none")):
            figure = figures.reasoning_cliff(ok=frame)
            axes = [ax for ax in figure.axes if ax.get_visible()]
            assert axes and all(kind in ax.get_title() for ax in axes)
            faces = {str(line.get_markerfacecolor()) for ax in axes for line in ax.lines if line.get_marker() != "None"}
            assert ("none" in faces) == (face == "none") and (len(faces) > 1 or face == "none")


def test_drawing_twice_gives_identical_files(tmp_path) -> None:
    cells = pl.read_parquet(REFERENCE / "cells.parquet")
    validation = read_validation(sorted(REFERENCE.glob("validation*.parquet")))
    first, second = tmp_path / "a", tmp_path / "b"
    render_figures(cells, first, validation=validation, title="twice")
    # the same rows in another order give the same bytes
    render_figures(cells.reverse(), second, validation=validation.reverse(), title="twice")
    assert digests(first) == digests(second)
    assert len([n for n in digests(first) if n.endswith(".png")]) >= 6
    svg = (first / "latency.svg").read_text()
    assert "<dc:date>" not in svg and "Matplotlib v" not in svg  # no date, no version in the files


def test_figures_without_ok_cells(tmp_path) -> None:
    cells = pl.read_parquet(REFERENCE / "cells.parquet")
    # nothing measured yet: only the planned KV capacity and concurrency can be drawn
    pending = by_name(render_figures(cells.with_columns(pl.lit("pending").alias("status")), tmp_path / "p",
                                     title="nothing measured yet"))
    assert list(pending) == ALL
    assert [n for n, r in pending.items() if not r.skipped] == ["kv_capacity"]
    assert "no row with status ok" in pending["throughput_vs_gpus"].skipped
    # nothing feasible: nothing at all
    infeasible = render_figures(cells.with_columns(pl.lit("infeasible").alias("status")), tmp_path / "i", title="t")
    assert all(r.skipped for r in infeasible)
    assert sorted(p.name for p in (tmp_path / "i").iterdir()) == ["figures.json"]


def test_a_figure_skipped_later_leaves_no_stale_file(tmp_path) -> None:
    cells = pl.read_parquet(REFERENCE / "cells.parquet")
    render_figures(cells, tmp_path, title="t")
    assert (tmp_path / "energy.png").exists()
    results = by_name(render_figures(cells.with_columns(pl.lit(None, pl.Float64).alias("energy_per_output_token_j")),
                                     tmp_path, title="t"))
    assert results["energy"].skipped and not (tmp_path / "energy.png").exists()


@pytest.mark.parametrize(("layout", "short"), [("dp4tp1pp1", "dp4"), ("dp1tp2pp2", "tp2pp2"), ("dp1tp1pp1", "1 GPU"),
                                               ("dp1tp8pp1ep8", "tp8ep8"), ("dp2tp2pp1", "dp2tp2")])
def test_short_layout_names(layout: str, short: str) -> None:
    assert short_layout(layout) == short
