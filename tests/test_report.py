"""The HTML report: its content (claims, provenance, escaping, nothing from outside) and, in a real headless
Chromium, that it loads without a console message and that every figure renders; a broken image, a script error or
an outside resource must be caught.

Chromium is a Debian package, not a Python one. Without it the browser tests are skipped, unless
INFSCALE_REQUIRE_CHROMIUM=1 (set by `make test`, i.e. CI), which turns the skip into a failure.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
from pathlib import Path

import polars as pl
import pytest

from infscale.analysis.figures import read_manifest
from infscale.analysis.report import report_html, write_report
from infscale.cli import main
from infscale.pipeline import CampaignRun

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "results" / "reference" / "gpu-node"
REQUIRE_ENV = "INFSCALE_REQUIRE_CHROMIUM"
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


@pytest.fixture(scope="session")
def chromium() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    reason = f"no headless browser ({', '.join(BROWSERS)}) on PATH; install one with: apt-get install -y chromium"
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def load(browser: str, page: Path, width: int = 800) -> tuple[str, list[str]]:
    """The DOM after the page's load handlers ran (in a window `width` CSS pixels wide), and the page's console
    messages (errors, CSP violations)."""
    result = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--virtual-time-budget=10000",
         f"--window-size={width},1000", "--hide-scrollbars", "--enable-logging=stderr", "--v=0", "--dump-dom",
         page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
    return result.stdout, console


def body(dom: str) -> dict[str, str]:
    tag = re.search(r"<body([^>]*)>", dom)
    assert tag, dom[:500]
    return dict(re.findall(r'data-([a-z-]+)="([^"]*)"', tag.group(1)))


@pytest.fixture(scope="module")
def sim_report(sim_results) -> Path:
    config, results_root = sim_results
    assert main(["figures", str(config), "--results-root", str(results_root)]) == 0
    assert main(["report", str(config), "--results-root", str(results_root)]) == 0
    return results_root / "figs" / "report.html"


@pytest.fixture(scope="module")
def reference_report(tmp_path_factory) -> Path:
    """The measured campaign's report, made from a copy (results/reference is never written)."""
    root = tmp_path_factory.mktemp("reference")
    shutil.copytree(REFERENCE, root / "gpu-node")
    config = REPO / "config" / "gpu-node.yaml"
    assert main(["figures", str(config), "--results-root", str(root)]) == 0
    assert main(["report", str(config), "--results-root", str(root)]) == 0
    return root / "gpu-node" / "report.html"


# ------------------------------------------------------------------------------------------- in the browser


@pytest.mark.parametrize("which", ["sim_report", "reference_report"])
def test_report_loads_cleanly_and_every_figure_renders(chromium, which, request) -> None:
    page = request.getfixturevalue(which)
    drawn = [f for f in read_manifest(page.parent / "figures") if not f.skipped]
    dom, console = load(chromium, page)
    state = body(dom)
    assert state.get("checked") == "yes", "the report's check script did not run"
    assert console == [] and "errors" not in state
    assert state["figures"] == state["figures-rendered"] == str(len(drawn)) and len(drawn) >= 6
    assert re.findall(r'data-rendered="(\w+)"', dom) == ["yes"] * len(drawn)


NEW_FIGURES = ("pareto", "throughput_vs_gpus", "scaling_efficiency")
WIDTH = 1400  # CSS pixels: the report's width on a desktop screen


def screenshot(browser: str, page: Path, out: Path, height: int) -> Path:
    result = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
         "--virtual-time-budget=10000", f"--window-size={WIDTH},{height}", f"--screenshot={out}",
         page.resolve().as_uri()], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0 and out.is_file(), result.stderr[-3000:]
    return out


def test_the_new_figures_are_on_the_screen(chromium, sim_report, tmp_path) -> None:
    """A screenshot of the whole page (headless Chromium) shows the Pareto and scaling figures where the page
    put them: each one's region of the screenshot is its PNG, as the browser scaled it."""
    import numpy as np
    from PIL import Image

    dom, _ = load(chromium, sim_report, WIDTH)
    state = body(dom)
    boxes = dict(re.findall(r'data-figure="(\w+)"[^>]*data-box="([\d,]+)"', dom)) or \
        {name: box for box, name in re.findall(r'data-box="([\d,]+)"[^>]*data-figure="(\w+)"', dom)}
    assert set(NEW_FIGURES) <= set(boxes), boxes
    shot = np.asarray(Image.open(screenshot(chromium, sim_report, tmp_path / "page.png",
                                            int(state["height"]))).convert("RGB"), dtype=float)
    for name in NEW_FIGURES:
        left, top, width, height = map(int, boxes[name].split(","))
        assert width > 600 and height > 200, (name, boxes[name])
        region = shot[top:top + height, left:left + width]
        png = Image.open(sim_report.parent / "figures" / f"{name}.png").convert("RGB")
        expected = np.asarray(png.resize((region.shape[1], region.shape[0]), Image.Resampling.LANCZOS), dtype=float)
        difference = np.abs(region - expected).mean()
        assert difference < 8, (name, difference)  # the figure itself, not a blank or another image
        assert region.std() > 20, name              # … and not an empty area
    # the check is not vacuous: another figure's place holds something else
    left, top, width, height = map(int, boxes["pareto"].split(","))
    other = Image.open(sim_report.parent / "figures" / "latency.png").convert("RGB")
    wrong = np.asarray(other.resize((width, height), Image.Resampling.LANCZOS), dtype=float)
    assert np.abs(shot[top:top + height, left:left + width] - wrong).mean() > 8


def test_a_broken_image_is_caught(chromium, sim_report, tmp_path) -> None:
    text = sim_report.read_text()
    broken = re.sub(r'src="data:image/png;base64,[^"]{20}', 'src="data:image/png;base64,AAAAAAAAAAAAAAAAAAAA', text,
                    count=1)
    assert broken != text
    page = tmp_path / "broken.html"
    page.write_text(broken)
    dom, _ = load(chromium, page)
    state = body(dom)
    assert int(state["figures-rendered"]) == int(state["figures"]) - 1
    assert state.get("errors") == "1"  # the failed load is counted too
    assert re.findall(r'data-rendered="(\w+)"', dom)[0] == "no"


@pytest.mark.parametrize(("insert", "expect"), [
    ('<img src="https://example.invalid/x.png">', "Content Security Policy"),   # an outside resource
    ("<script>undefinedFunction();</script>", "undefinedFunction"),            # a script error
])
def test_outside_resources_and_script_errors_are_caught(chromium, sim_report, tmp_path, insert, expect) -> None:
    page = tmp_path / "bad.html"
    page.write_text(sim_report.read_text().replace("</body>", insert + "</body>"))
    dom, console = load(chromium, page)
    assert any(expect in line for line in console), console
    assert body(dom).get("errors") == "1"


# ------------------------------------------------------------------------------------------- content


def test_report_holds_the_twelve_claims_and_the_provenance(sim_report) -> None:
    text = sim_report.read_text()
    for index in range(1, 13):
        assert f"<b>C{index}</b>" in text
    claims = pl.read_parquet(sim_report.parent / "claims.parquet")
    for verdict in set(claims.get_column("verdict")):
        assert verdict in text
    assert "numbers from" in text and "predicted" in text
    assert "config hash" in text and "infscale git commits" in text and "sim" in text and "h200-sxm" in text
    assert "Scaling-law fits" in text and "usl" in text
    assert "Figures not drawn" in text and "sim backend predicts no energy" in text


def test_reference_report_names_the_gpus_and_measured_claims(reference_report) -> None:
    text = reference_report.read_text()
    ok = pl.read_parquet(REFERENCE / "cells.parquet").filter(pl.col("status") == "ok")
    assert "NVIDIA H100 80GB HBM3" in text and "torch" in text
    assert f"{ok.height} measured, 0 predicted" in text
    assert ok.get_column("started_at").min() in text  # the first measurement
    assert "PROVENANCE.md" in text
    measured_claims = pl.read_parquet(REFERENCE / "claims.parquet").filter(pl.col("source") == "measured").height
    assert measured_claims and text.count("measured</td>") >= measured_claims


def test_nothing_is_loaded_from_outside(sim_report) -> None:
    text = sim_report.read_text()
    for attribute in re.findall(r'(?:src|href)="([^"]*)"', text):
        assert attribute.startswith("data:"), attribute
    assert "default-src 'none'" in html.unescape(text)


def test_text_from_the_data_is_escaped() -> None:
    cells = pl.read_parquet(REFERENCE / "cells.parquet").with_columns(pl.lit("<b>model&co</b>").alias("model"))
    claims = pl.DataFrame({"claim": ["C1"], "title": ["<script>alert(1)</script>"], "verdict": ["PASS"],
                           "evidence": ["x < y & z"], "numbers": ["{}"], "source": ["measured"]})
    text = report_html(campaign="<i>camp</i>", description="a <b>bold</b> \"claim\"", config_hash="h",
                       cells=cells, cells_config_hash="h", provenance={}, figures=None,
                       summary="# `<x>` and **<y>**\n\n| a<b | c |\n|---|---|\n| <td> | 1 |\n", claims=claims,
                       fits=None)
    for raw in ("<script>alert", "<i>camp", "<b>bold", "<b>model", "<x>", "<y>", "a<b", "<td> |"):
        assert raw not in text, raw
    for escaped in ("&lt;script&gt;alert(1)&lt;/script&gt;", "&lt;i&gt;camp&lt;/i&gt;", "x &lt; y &amp; z",
                    "&lt;b&gt;model&amp;co&lt;/b&gt;", "<code>&lt;x&gt;</code>", "<b>&lt;y&gt;</b>"):
        assert escaped in text, escaped


def test_report_before_the_merge_says_what_to_run(tmp_path, capsys) -> None:
    config = REPO / "config" / "gpu-node.yaml"
    assert main(["report", str(config), "--results-root", str(tmp_path)]) == 1
    assert "run `infscale merge` first" in capsys.readouterr().err


def test_report_without_figures_says_how_to_make_them(tmp_path) -> None:
    shutil.copytree(REFERENCE, tmp_path / "gpu-node", ignore=shutil.ignore_patterns("figures", "report.html"))
    run = CampaignRun(REPO / "config" / "gpu-node.yaml", tmp_path, "auto")
    path = write_report(run, tmp_path / "elsewhere.html")
    assert path == tmp_path / "elsewhere.html" and not run.report_file.exists()
    assert "infscale figures</code> draws them" in path.read_text()
