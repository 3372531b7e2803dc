"""The campaign figures: drawn on sim and on measured (reference) data, skipped with a reason when their data is
missing, predictions told apart from measurements, and byte-identical when drawn twice."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import polars as pl
import pytest

from infscale.analysis import figures
from infscale.analysis.figures import read_manifest, read_validation, render_figures, short_layout
from infscale.cli import main

REFERENCE = Path(__file__).resolve().parents[1] / "results" / "reference" / "gpu-node"
ALL = ["pareto", "throughput_vs_gpus", "scaling_efficiency", "reasoning_cliff", "kv_capacity", "best_layout",
       "latency", "energy", "predicted_vs_measured"]
SCALING = ["throughput_vs_gpus", "scaling_efficiency"]


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
    for name in ALL[:7]:
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
        for name in SCALING:
            assert "two or more GPU counts" in results[name].skipped
    for name in set(ALL) - set(SCALING):
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


# ------------------------------------------------------------------------------------------- what a reader sees


def drawn_figures(cells: pl.DataFrame, **kwargs) -> dict[str, object]:
    """Every figure the data allows, as matplotlib figures with their titles and ticks settled."""
    import matplotlib

    data = figures.prepare_data(cells, **kwargs)
    out = {}
    with matplotlib.rc_context(figures.RC):
        for name, *_ in figures.FIGURES:
            try:
                out[name] = figures.draw_figure(name, data, "a campaign title")
            except figures.Skip:
                continue
    return out


@pytest.fixture(scope="module")
def sim_figures(sim_results) -> dict[str, object]:
    from infscale.results.tables import read_cells

    config, results = sim_results
    return drawn_figures(read_cells(results / "figs"), fits=pl.read_parquet(results / "figs" / "fits.parquet"))


@pytest.fixture(scope="module")
def reference_figures() -> dict[str, object]:
    from infscale.results.tables import read_cells

    validation = read_validation(sorted(REFERENCE.glob("validation*.parquet")))
    return drawn_figures(read_cells(REFERENCE), validation=validation)


def test_pareto_frontier_and_scaling_figures(sim_figures) -> None:
    assert {"pareto", *SCALING} <= set(sim_figures)
    pareto = sim_figures["pareto"]
    panels = [ax for ax in pareto.axes if ax.get_visible()]
    assert panels and all("tok/s per user" in ax.get_xlabel() for ax in panels)
    for ax in panels:
        labels = [t.get_text() for t in ax.texts]  # the frontier's points: layout and arrival
        assert labels and all(label.endswith(" off") for label in labels)
        frontier = [line for line in ax.lines if line.get_color() == "#333333"][0]
        x, y = frontier.get_data()
        assert list(x) == sorted(x) and list(y) == sorted(y, reverse=True)  # faster per user, less per GPU
    # the ideal line in every scaling panel, the efficiency axis on the per-GPU one
    for name in SCALING:
        panels = [ax for ax in sim_figures[name].axes if ax.get_visible() and ax.get_title()]
        assert panels and all(any(line.get_linestyle() == ":" for line in ax.lines) for ax in panels)
    efficiency = [ax for ax in sim_figures["scaling_efficiency"].axes if ax.get_visible() and ax.get_title()]
    assert all(re.match(r"efficiency \(1 = [\d,]+\ntok/s/GPU at \d+ GPUs?\)", ax.get_ylabel()) for ax in efficiency)
    for ax in efficiency:  # every family starts at 1 where it shares the baseline, and the ideal is 1
        ideal = next(line for line in ax.lines if line.get_linestyle() == ":")
        assert set(ideal.get_ydata()) == {1.0}
    assert all(ax.get_yscale() == "log" for ax in sim_figures["throughput_vs_gpus"].axes if ax.get_title())


def test_one_style_per_layout_in_every_figure(sim_figures, reference_figures) -> None:
    for drawn in (sim_figures, reference_figures):
        styles: dict[str, tuple] = {}
        for name in ("pareto", "reasoning_cliff", "latency"):
            legend = drawn[name].legends[0]
            for handle, text in zip(legend.legend_handles, legend.get_texts()):
                label = text.get_text()
                if handle.get_marker() in (None, "None", "", "_") or label.startswith(("measured", "predicted")):
                    continue
                style = (handle.get_color(), handle.get_marker())
                assert styles.setdefault(label, style) == style, (name, label)  # the same in every figure
        assert len(styles) >= 3 and len(set(styles.values())) == len(styles)  # never shared by two layouts


def test_every_panel_names_its_workload_and_ticks_are_plain(sim_figures, reference_figures) -> None:
    for drawn, workloads in ((sim_figures, ("reasoning", "prefill-heavy")), (reference_figures, ("reasoning",))):
        for name, figure in drawn.items():
            titled = [ax for ax in figure.axes if ax.get_visible() and ax.get_title()]
            if name in ("pareto", *SCALING, "reasoning_cliff", "latency", "energy"):
                assert titled and all(any(w in ax.get_title() for w in workloads) for ax in titled), name
            for ax in figure.axes:
                for label in [*ax.get_xticklabels(), *ax.get_yticklabels()]:
                    text = label.get_text()
                    assert "e+" not in text and "$" not in text, (name, text)  # no 1e+06, no mathtext
            log_axes = [axis for ax in figure.axes if ax.get_visible()
                        for axis in (ax.xaxis, ax.yaxis) if axis.get_scale() == "log"]
            assert all(len(axis.get_majorticklocs()) >= 2 for axis in log_axes), name


def test_long_times_in_seconds(sim_results) -> None:
    from infscale.results.tables import read_cells

    assert figures.time_unit([12.0, 9_999.0]) == (1.0, "ms") and figures.time_unit([5.0, 1.2e6]) == (1e-3, "s")
    config, results = sim_results
    cells = read_cells(results / "figs")
    for factor, unit in ((1, "ms"), (1000, "s")):  # offline TTFTs of up to 1e6 ms: seconds
        slow = cells.with_columns(pl.col("ttft_ms_p50") * factor, pl.col("ttft_ms_p99") * factor)
        latency = drawn_figures(slow)["latency"]
        labels = [ax.get_ylabel() for ax in latency.axes if ax.get_visible()]
        assert f"TTFT ({unit})" in labels and "TPOT (ms)" in labels
        ticks = [t.get_text() for ax in latency.axes for t in ax.get_yticklabels()]
        assert ticks and not any("e+" in t for t in ticks)


def test_nothing_is_cut_off(sim_figures, reference_figures, tmp_path) -> None:
    """Every artist's bounding box lies inside what the files hold, at the size the report shows them (its PNG at
    the figures' DPI); a legend wider than the figure grows the file instead of being cut."""
    from matplotlib.figure import Figure
    from PIL import Image

    def check(figure, name: str) -> None:
        png, _ = figures._save(figure, tmp_path, name)
        box = figures.saved_box(figure)
        width, height = Image.open(png).size
        saved = box if box is not None else type(figure.bbox_inches).from_bounds(0, 0, *figure.get_size_inches())
        assert (width, height) == pytest.approx((saved.width * figures.DPI, saved.height * figures.DPI), abs=2)
        tight = figure.get_tightbbox()
        assert saved.x0 <= tight.x0 and saved.y0 <= tight.y0 and tight.x1 <= saved.x1 and tight.y1 <= saved.y1, name

    for drawn in (sim_figures, reference_figures):
        for name, figure in drawn.items():
            check(figure, name)
    wide = Figure(figsize=(2, 2))
    wide.add_subplot().plot([1, 2], [1, 2], label="a legend entry far wider than its two-inch figure")
    wide.legend(loc="lower center", ncols=1)
    check(wide, "wide")
    assert Image.open(tmp_path / "wide.png").size[0] > 2 * figures.DPI


def test_two_processes_draw_the_same_files(sim_results, tmp_path, monkeypatch) -> None:
    from infscale.results.tables import read_cells

    config, results = sim_results
    cells = read_cells(results / "figs")
    monkeypatch.setattr(figures, "PARALLEL_ABOVE_CELLS", 0)  # a small campaign, drawn as a large one would be
    here, there = figures._split([name for name, *_ in figures.FIGURES])
    assert here and there and not set(here) & set(there)
    render_figures(cells, tmp_path / "two", title="t", workers=2)
    render_figures(cells, tmp_path / "one", title="t", workers=1)
    assert digests(tmp_path / "two") == digests(tmp_path / "one") and len(digests(tmp_path / "one")) >= 15
