"""Artifact evaluation: bundle, verify, regenerate, reduce, compare — on copies, never in results/reference."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml

from infscale.ae.bundle import make_bundle
from infscale.ae.compare import DEFAULT_TOLERANCES, compare, load_side
from infscale.ae.manifest import MANIFEST_NAME, BundleError, verify_bundle
from infscale.ae.reduce import reduce_campaign
from infscale.ae.regenerate import regenerate
from infscale.cli import main
from infscale.pipeline import CampaignRun

REPO = Path(__file__).resolve().parents[1]
GPU_NODE = REPO / "config" / "gpu-node.yaml"
REFERENCE = REPO / "results" / "reference"
MEASURED_GPU_CELLS = 29  # the committed gpu-node cells (tests/test_reference_results.py checks the same count)


def tree_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def gpu_bundle(tmp_path_factory) -> Path:
    """A bundle of the committed GPU campaign, built straight from results/reference (read only)."""
    before = tree_hashes(REFERENCE)
    out = tmp_path_factory.mktemp("ae")
    bundle = make_bundle(GPU_NODE, REFERENCE, out)
    assert tree_hashes(REFERENCE) == before  # bundling never writes into the results
    return bundle.directory


def copy_bundle(bundle: Path, tmp_path: Path) -> Path:
    target = tmp_path / bundle.name
    shutil.copytree(bundle, target)
    return target


# ------------------------------------------------------------------------------------------------ bundle


def test_bundle_of_the_committed_gpu_campaign_holds_everything_and_verifies(gpu_bundle: Path, capsys) -> None:
    manifest = json.loads((gpu_bundle / MANIFEST_NAME).read_text())
    paths = {entry["path"] for entry in manifest["files"]}
    cells = sorted(p.name for p in (REFERENCE / "gpu-node" / "cells").glob("*.parquet"))
    assert {f"results/gpu-node/cells/{c}" for c in cells} <= paths and len(cells) == MEASURED_GPU_CELLS
    for expected in ("config/gpu-node.yaml", "results/gpu-node/plan.parquet", "results/gpu-node/cells.parquet",
                     "results/gpu-node/fits.parquet", "results/gpu-node/claims.parquet", "results/gpu-node/claims.md",
                     "results/gpu-node/PROVENANCE.md", "environment/constraints.txt", "environment/envs/infscale.yaml",
                     "profiles/h100-sxm.torch.2026-11-27.yaml", "reduced/gpu-node-cpu.yaml", "tolerances.json",
                     "ARTIFACT.md"):
        assert expected in paths, expected
    for entry in manifest["files"]:
        data = (gpu_bundle / entry["path"]).read_bytes()
        assert entry["size"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert manifest["campaign"] == "gpu-node" and manifest["manifest_version"] == "1.0"
    assert manifest["results_schema_version"] and manifest["infscale_version"] and "created_utc" in manifest
    assert (gpu_bundle / "config" / "gpu-node.yaml").read_bytes() == GPU_NODE.read_bytes()
    plan = pl.read_parquet(gpu_bundle / "results" / "gpu-node" / "plan.parquet")
    assert plan.height == 33
    # the tarball holds the same files
    with tarfile.open(gpu_bundle.parent / "gpu-node-ae.tar.gz") as tar:
        members = {m.name for m in tar.getmembers() if m.isfile()}
    assert members == {f"gpu-node-ae/{p}" for p in paths} | {"gpu-node-ae/manifest.json"}
    assert main(["ae", "verify", str(gpu_bundle)]) == 0
    assert f"OK: {len(paths)} files in the manifest, 0 missing, 0 altered" in capsys.readouterr().out


def test_artifact_md_maps_claims_to_commands_hardware_and_durations(gpu_bundle: Path) -> None:
    text = (gpu_bundle / "ARTIFACT.md").read_text()
    for claim in [f"C{i}" for i in range(1, 13)]:
        assert f"| {claim} " in text
    assert "infscale ae regenerate gpu-node-ae" in text and "NVIDIA H100 80GB HBM3" in text
    assert "reduced/gpu-node-cpu.yaml" in text and "CPU only (sim backend)" in text
    assert "environment/constraints.txt" in text and "output_tok_s`: ±10%" in text
    (c2,) = [line for line in text.splitlines() if line.startswith("| C2 ")]
    assert "`results/gpu-node/figures/reasoning_cliff.png`" in c2  # the claim's figure, as bundled


@pytest.mark.parametrize("dirty", [True, False], ids=["dirty", "clean"])
def test_artifact_md_never_names_a_dirty_tree_as_the_commits_code(tmp_path: Path, monkeypatch, capsys,
                                                                   dirty: bool) -> None:
    """A bundle written from a checkout with uncommitted changes names the clean commit and says the tree was
    dirty (ARTIFACT.md, manifest.json), and `ae bundle` warns; a clean checkout is named plainly."""
    from infscale.results import provenance

    monkeypatch.setattr(provenance, "git_commit", lambda: "0123abcd" + ("-dirty" if dirty else ""))
    assert main(["ae", "bundle", str(GPU_NODE), "--results-root", str(REFERENCE), "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    bundle = tmp_path / "gpu-node-ae"
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    assert (manifest["git_commit"], manifest["git_tree_dirty"]) == ("0123abcd", dirty)
    header = (bundle / "ARTIFACT.md").read_text().split("\n\n")[1]
    assert "0123abcd-dirty" not in header
    if dirty:
        assert "commit `0123abcd` with uncommitted changes (the working tree was dirty" in header
        assert "warning: the code has uncommitted changes on top of commit 0123abcd" in err
    else:
        assert "(commit `0123abcd`) on " in header and "uncommitted" not in header + err
    assert "-dirty`" not in (bundle / "ARTIFACT.md").read_text()  # nor the cells' provenance line


def test_an_existing_bundle_is_never_overwritten(gpu_bundle: Path) -> None:
    with pytest.raises(BundleError, match="never overwritten"):
        make_bundle(GPU_NODE, REFERENCE, gpu_bundle.parent)


def test_bundle_never_writes_inside_the_results(tmp_path: Path) -> None:
    shutil.copytree(REFERENCE / "gpu-node", tmp_path / "results" / "gpu-node")
    with pytest.raises(BundleError, match="inside the results directory"):
        make_bundle(GPU_NODE, tmp_path / "results", tmp_path / "results" / "gpu-node" / "ae")
    assert not (tmp_path / "results" / "gpu-node" / "ae").exists()


def test_bundle_needs_the_analysis_first(tmp_path: Path) -> None:
    shutil.copytree(REFERENCE / "gpu-node" / "cells", tmp_path / "results" / "gpu-node" / "cells")
    with pytest.raises(BundleError, match="cells.parquet, fits.parquet, claims.parquet missing"):
        make_bundle(GPU_NODE, tmp_path / "results", tmp_path / "out")


# ------------------------------------------------------------------------------------------------ verify


def test_bundle_refuses_results_whose_cell_files_are_damaged(tmp_path: Path) -> None:
    shutil.copytree(REFERENCE / "gpu-node", tmp_path / "results" / "gpu-node")
    victim = sorted((tmp_path / "results" / "gpu-node" / "cells").glob("*.parquet"))[0]
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(BundleError, match="cell files need attention \\(0 missing, 1 damaged, 0 misnamed"):
        make_bundle(GPU_NODE, tmp_path / "results", tmp_path / "out")
    assert victim.stat().st_size == 100 and not (tmp_path / "out" / "gpu-node-ae").exists()  # nothing moved


def test_one_altered_byte_fails_verify_naming_the_file(gpu_bundle: Path, tmp_path: Path, capsys) -> None:
    bundle = copy_bundle(gpu_bundle, tmp_path)
    victim = sorted((bundle / "results" / "gpu-node" / "cells").glob("*.parquet"))[3]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    assert main(["ae", "verify", str(bundle)]) == 1
    out = capsys.readouterr().out
    rel = victim.relative_to(bundle).as_posix()
    assert f"altered: {rel}" in out and "1 altered" in out and "FAILED" in out
    result = verify_bundle(bundle)
    assert result.altered == [rel] and not result.missing and not result.extra


def test_missing_and_extra_files_are_named(gpu_bundle: Path, tmp_path: Path, capsys) -> None:
    bundle = copy_bundle(gpu_bundle, tmp_path)
    (bundle / "results" / "gpu-node" / "fits.parquet").unlink()
    (bundle / "stray.txt").write_text("not packed")
    assert main(["ae", "verify", str(bundle)]) == 1
    out = capsys.readouterr().out
    assert "missing: results/gpu-node/fits.parquet" in out and "not in the manifest: stray.txt" in out


def test_a_bundle_of_a_newer_schema_is_a_clear_error(gpu_bundle: Path, tmp_path: Path, capsys) -> None:
    bundle = copy_bundle(gpu_bundle, tmp_path)
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    (bundle / MANIFEST_NAME).write_text(json.dumps({**manifest, "manifest_version": "2.0"}))
    for command in (["ae", "verify", str(bundle)], ["ae", "regenerate", str(bundle)],
                    ["ae", "compare", str(bundle), str(bundle)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "manifest version 2.0 is newer than this infscale reads (1.0)" in err, err
    (bundle / MANIFEST_NAME).write_text(json.dumps({**manifest, "results_schema_version": "3.0"}))
    assert main(["ae", "verify", str(bundle)]) == 2
    assert "schema version 3.0" in capsys.readouterr().err
    # an older schema this infscale reads: verified and compared as it is; regenerated tables could not equal it
    (bundle / MANIFEST_NAME).write_text(json.dumps({**manifest, "results_schema_version": "1.1"}))
    assert main(["ae", "verify", str(bundle)]) == 0
    capsys.readouterr()
    assert main(["ae", "regenerate", str(bundle)]) == 2
    assert "written under results schema 1.1" in capsys.readouterr().err


def test_not_a_bundle_is_a_clear_error(tmp_path: Path, capsys) -> None:
    assert main(["ae", "verify", str(tmp_path)]) == 2
    assert "no manifest.json; not an infscale artifact bundle" in capsys.readouterr().err
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    assert main(["ae", "verify", str(tmp_path)]) == 2
    assert "not readable as JSON" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ regenerate


def test_regenerate_from_the_unpacked_tarball_reproduces_the_tables(gpu_bundle: Path, tmp_path: Path) -> None:
    with tarfile.open(gpu_bundle.parent / "gpu-node-ae.tar.gz") as tar:
        tar.extractall(tmp_path, filter="data")
    bundle = tmp_path / "gpu-node-ae"
    result = regenerate(bundle)
    assert result.ok, result.lines()
    names = [c.name for c in result.checks]
    assert names[:5] == ["cells.parquet", "fits.parquet", "claims.parquet", "summary.md", "claims.md"]
    assert "report.html" in names and any(n.startswith("figures/") for n in names)
    assert [name for name, _ in result.steps] == ["merge", "fits", "claims", "figures", "report"]
    assert (bundle / "regenerated" / "results" / "gpu-node" / "claims.parquet").is_file()
    assert verify_bundle(bundle).ok          # regenerated/ is not part of the bundle, the originals untouched
    assert regenerate(bundle).ok             # a second run replaces its own earlier output


def test_regenerate_reports_a_table_that_differs(gpu_bundle: Path, tmp_path: Path, capsys) -> None:
    bundle = copy_bundle(gpu_bundle, tmp_path)
    claims = bundle / "results" / "gpu-node" / "claims.parquet"
    frame = pl.read_parquet(claims)
    frame.with_columns(pl.when(pl.col("claim") == "C5").then(pl.lit("FAIL")).otherwise(pl.col("verdict"))
                       .alias("verdict")).write_parquet(claims)
    assert main(["ae", "regenerate", str(bundle), "--out", str(tmp_path / "regen")]) == 1
    out = capsys.readouterr().out
    assert "claims.parquet: DIFFERENT in column(s) verdict" in out and "cells.parquet: identical" in out
    assert pl.read_parquet(claims).filter(pl.col("claim") == "C5")["verdict"][0] == "FAIL"  # originals kept


def nudge_fits(bundle: Path, column: str, change) -> float:
    """Replace the first value of a float column of the bundled fits.parquet by change(value); returns it."""
    fits = bundle / "results" / "gpu-node" / "fits.parquet"
    frame = pl.read_parquet(fits)
    value = float(frame[column][0])
    frame.with_columns(pl.when(pl.int_range(pl.len()) == 0).then(pl.lit(change(value))).otherwise(pl.col(column))
                       .alias(column)).write_parquet(fits)
    return value


def test_regenerate_compares_floats_within_a_relative_tolerance(gpu_bundle: Path, tmp_path: Path, capsys) -> None:
    """Another CPU may round a refit's last bit differently: one ulp passes, and the largest relative difference
    is reported (in the output and in checks.json); a 1e-6 relative change is a difference."""
    bundle = copy_bundle(gpu_bundle, tmp_path)
    value = nudge_fits(bundle, "p1", lambda v: float(np.nextafter(v, np.inf)))
    assert main(["ae", "regenerate", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert "fits.parquet: equal within relative tolerance 1e-09 (7 rows; largest relative difference" in out
    checks = json.loads((bundle / "regenerated" / "checks.json").read_text())
    assert checks["ok"] is True and checks["table_relative_tolerance"] == 1e-9
    (fits,) = [c for c in checks["checks"] if c["name"] == "fits.parquet"]
    assert 0 < fits["largest_relative_difference"] < 1e-12

    nudge_fits(bundle, "p1", lambda v: value * (1 + 1e-6))
    assert main(["ae", "regenerate", str(bundle)]) == 1
    out = capsys.readouterr().out
    assert "fits.parquet: DIFFERENT in column(s) p1 (largest relative difference 1e-06 (column p1, row 0); " \
           "relative tolerance 1e-09)" in out
    assert out.rstrip().splitlines()[-1].startswith("DIFFERENT: 12 of 13 files reproduced")
    assert json.loads((bundle / "regenerated" / "checks.json").read_text())["ok"] is False
    # the tolerance is the reviewer's to set
    assert main(["ae", "regenerate", str(bundle), "--rel-tol", "1e-5"]) == 0
    assert "fits.parquet: equal within relative tolerance 1e-05" in capsys.readouterr().out
    assert main(["ae", "regenerate", str(bundle), "--rel-tol", "-1"]) == 2  # main returns argparse's status
    assert "--rel-tol: '-1': expected a relative tolerance of 0 or more" in capsys.readouterr().err


def test_table_comparison_rules() -> None:
    from infscale.ae.tables import compare_tables, json_difference

    def frame(**columns) -> pl.DataFrame:
        return pl.DataFrame(columns, strict=False)

    base = 0.4956372129802472
    ulp = float(np.nextafter(base, 1.0))
    assert compare_tables(frame(x=[base]), frame(x=[base])).identical
    one_ulp = compare_tables(frame(x=[base, 1.0]), frame(x=[ulp, 1.0]))
    assert one_ulp.equal and not one_ulp.identical and 0 < one_ulp.largest_rel_diff < 1e-15
    assert one_ulp.largest_at == "column x, row 0"
    far = compare_tables(frame(x=[base]), frame(x=[base * (1 + 1e-6)]))
    assert not far.equal and far.differing_columns == ("x",) and far.largest_rel_diff == pytest.approx(1e-6, rel=1e-3)
    assert compare_tables(frame(x=[base]), frame(x=[base * (1 + 1e-6)]), rel_tol=1e-5).equal
    nan, inf = float("nan"), float("inf")
    assert compare_tables(frame(x=[nan, None, inf, 0.0]), frame(x=[nan, None, inf, 0.0])).equal
    for left, right in ((nan, 1.0), (1.0, nan), (None, 1.0), (inf, 1e308), (inf, -inf), (0.0, 1e-300)):
        diff = compare_tables(frame(x=[left]), frame(x=[right]))
        assert not diff.equal, (left, right)
    # integers and strings: exactly
    assert compare_tables(frame(n=[2**53]), frame(n=[2**53 + 1])).differing_columns == ("n",)
    assert compare_tables(frame(s=["PASS"]), frame(s=["PASS "])).differing_columns == ("s",)
    # a JSON text column compares by content: its floats within the tolerance, everything else exactly
    params = '{"c": 1621.0877356828742, "knee": 5120.0, "alpha": %r}'
    assert compare_tables(frame(p=[params % base]), frame(p=[params % ulp])).equal
    assert not compare_tables(frame(p=[params % base]), frame(p=[params % (base * (1 + 1e-6))])).equal
    assert json_difference('{"a": 1}', '{"a": 2}') == float("inf")            # integers exactly
    assert json_difference('{"a": 1.0}', '{"b": 1.0}') == float("inf")        # keys exactly
    assert json_difference('[1.0, "x"]', '[1.0, "y"]') == float("inf")
    assert json_difference("not json", "not json either") == float("inf")
    # what cannot be compared is named
    assert "columns" in compare_tables(frame(x=[1.0]), frame(y=[1.0])).detail()
    assert "1 rows expected, 2 found" in compare_tables(frame(x=[1.0]), frame(x=[1.0, 2.0])).detail()


def test_regenerate_refuses_to_write_over_a_foreign_directory(gpu_bundle: Path, tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(BundleError, match="not an earlier regeneration"):
        regenerate(gpu_bundle, tmp_path / "mine")
    with pytest.raises(BundleError, match="over the bundled results"):
        regenerate(gpu_bundle, gpu_bundle)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_regenerate_of_a_bundle_missing_its_cells_says_so(gpu_bundle: Path, tmp_path: Path) -> None:
    bundle = copy_bundle(gpu_bundle, tmp_path)
    shutil.rmtree(bundle / "results" / "gpu-node" / "cells")
    with pytest.raises(BundleError, match="cells is missing"):
        regenerate(bundle)


# ------------------------------------------------------------------------------------------------ reduce


def test_cpu_profile_keeps_the_matrix_on_the_sim_backend(capsys, tmp_path: Path) -> None:
    reduced = reduce_campaign(GPU_NODE, "cpu")
    assert reduced.raw["backend"] == "sim" and reduced.raw["name"] == "gpu-node-cpu" and reduced.cells == 33
    assert reduced.raw["models"] == yaml.safe_load(GPU_NODE.read_text())["models"]
    assert 0 < reduced.expected_s < 120
    out = tmp_path / "cpu.yaml"
    assert main(["ae", "reduce", str(GPU_NODE), "--target", "cpu", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.startswith("gpu-node-cpu: 33 cells, expected wall time about ")
    assert yaml.safe_load(out.read_text())["backend"] == "sim"
    assert main(["ae", "reduce", str(GPU_NODE), "--out", str(out)]) == 2  # never overwritten


def test_1gpu_profile_runs_single_gpu_cells_and_leaves_out_what_does_not_fit() -> None:
    reduced = reduce_campaign(GPU_NODE, "1gpu")
    assert reduced.raw["backend"] == "torch" and reduced.raw["layouts"] == ["dp1tp1pp1"]
    assert reduced.raw["workloads"][0]["osl"] == [1024] and reduced.raw["requests"] == 16
    assert reduced.cells == 3 and reduced.expected_s > 60
    demo = reduce_campaign(REPO / "config" / "demo.yaml", "1gpu", osl_max=2048, max_requests=8)
    names = [m["name"] for m in demo.raw["models"]]
    assert "llama-3.1-405b" not in names and "llama-3.1-8b" in names
    assert any(note.startswith("llama-3.1-405b is left out") for note in demo.notes)


# ------------------------------------------------------------------------------------------------ compare


def run_campaign(config: Path, root: Path) -> CampaignRun:
    """plan → every bench job → merge → fit → claims, through the command line (sim: in this process)."""
    common = [str(config), "--results-root", str(root)]
    assert main(["plan", *common, "--write", "--quiet"]) == 0
    run = CampaignRun(config, root, "auto")
    for job in run.jobs():
        assert main(["bench", *common, "--job", job]) == 0
    for step in ("merge", "fit", "claims"):
        assert main([step, *common]) == 0
    return run


@pytest.fixture(scope="module")
def reduced_reference(tmp_path_factory) -> tuple[Path, Path]:
    """The CPU profile of the GPU campaign, run once and bundled as the reference; its campaign file."""
    work = tmp_path_factory.mktemp("reduced")
    config = work / "gpu-node-cpu.yaml"
    assert main(["ae", "reduce", str(GPU_NODE), "--target", "cpu", "--out", str(config)]) == 0
    run_campaign(config, work / "reference")
    return make_bundle(config, work / "reference", work / "artifacts").directory, config


def test_a_rerun_of_the_reduced_profile_matches_the_reference_bundle(reduced_reference, tmp_path: Path,
                                                                        capsys) -> None:
    bundle, config = reduced_reference
    assert regenerate(bundle).ok
    rerun = run_campaign(config, tmp_path / "rerun")
    capsys.readouterr()
    assert main(["ae", "compare", str(bundle), str(rerun.results_dir)]) == 0
    out = capsys.readouterr().out
    for metric, tol in DEFAULT_TOLERANCES.items():
        assert f"{metric}: 33 of 33 cells within ±{tol:.0%}" in out
    cell_ids = pl.read_parquet(rerun.merged_file)["cell_id"].to_list()
    assert all(cell_id in out for cell_id in cell_ids)                     # every cell reported
    assert all(f"C{i} " in out for i in range(1, 13)) and "claims: 12 of 12 verdicts the same" in out
    assert "result: AGREES" in out


def test_compare_reports_a_perturbed_cell_a_missing_cell_and_a_changed_verdict(reduced_reference,
                                                                               tmp_path: Path, capsys) -> None:
    bundle, _ = reduced_reference
    new = tmp_path / "new"
    shutil.copytree(bundle / "results" / "gpu-node-cpu", new)
    cells = pl.read_parquet(new / "cells.parquet")
    perturbed, dropped = cells["cell_id"][0], cells["cell_id"][5]
    cells = cells.with_columns(pl.when(pl.col("cell_id") == perturbed).then(pl.col("output_tok_s") * 1.2)
                               .otherwise(pl.col("output_tok_s")).alias("output_tok_s"),
                               pl.when(pl.col("cell_id") == perturbed).then(pl.col("tpot_ms_p50") * 1.05)
                               .otherwise(pl.col("tpot_ms_p50")).alias("tpot_ms_p50"))
    cells.filter(pl.col("cell_id") != dropped).write_parquet(new / "cells.parquet")
    claims = pl.read_parquet(new / "claims.parquet")
    claims.with_columns(pl.when(pl.col("claim") == "C5").then(pl.lit("FAIL")).otherwise(pl.col("verdict"))
                        .alias("verdict")).write_parquet(new / "claims.parquet")

    result = compare(load_side(bundle), load_side(new))
    assert not result.ok
    assert [c.reference_id for c in result.outside("output_tok_s")] == [perturbed]
    assert not result.outside("tpot_ms_p50")                      # +5 % is inside the ±10 % band
    assert [c.reference_id for c in result.cells if c.outcome == "missing in new"] == [dropped]
    assert [(c.claim, c.reference, c.new) for c in result.claims if not c.same] == [("C5", "PASS", "FAIL")]
    # a tighter band from the command line puts the TPOT change outside too
    assert main(["ae", "compare", str(bundle), str(new), "--tol", "tpot_ms_p50=0.01"]) == 1
    out = capsys.readouterr().out
    assert f"tpot_ms_p50: 31 of 32 cells within ±1%; outside: {perturbed}" in out
    assert f"output_tok_s: 31 of 32 cells within ±10%; outside: {perturbed}" in out
    assert f"missing in new: 1: {dropped}" in out
    assert "C5   reference PASS          new FAIL          DIFFERENT" in out and "result: DIFFERS" in out
    assert main(["ae", "compare", str(bundle), str(new), "--json"]) == 1
    payload = json.loads(capsys.readouterr().out)
    assert payload["ok"] is False and len(payload["cells"]) == 33 and len(payload["claims"]) == 12
    assert main(["ae", "compare", str(bundle), str(new), "--tol", "no_such_metric=0.1"]) == 2
    assert "unknown metric(s) no_such_metric" in capsys.readouterr().err


def test_compare_by_shape_holds_sim_predictions_against_the_gpu_measurements(gpu_bundle: Path,
                                                                             reduced_reference) -> None:
    bundle, _ = reduced_reference
    result = compare(load_side(gpu_bundle), load_side(bundle), match="shape")
    compared = [c for c in result.cells if c.metrics]
    assert len(result.cells) == 33 and len(compared) == MEASURED_GPU_CELLS  # every measured cell has a prediction
    assert {c.outcome for c in result.cells} - {"within", "outside"} == {"status pending → ok"}
    with pytest.raises(Exception, match="no merged cells"):
        load_side(gpu_bundle / "results")


# ------------------------------------------------------------------------------------------------ figures


def test_pixel_tolerance_of_regenerated_figures(tmp_path: Path) -> None:
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from infscale.ae.images import compare_png

    def figure(path: Path, y: list[float], marker_at: float | None = None, size=(4, 3)) -> Path:
        fig, ax = plt.subplots(figsize=size, dpi=100)
        ax.plot([1, 2, 4, 8], y)
        if marker_at is not None:
            ax.plot([marker_at], [y[0]], ".", markersize=1)
        fig.savefig(path, metadata={"Software": None})
        plt.close(fig)
        return path

    a = figure(tmp_path / "a.png", [1, 2, 3, 4])
    same = figure(tmp_path / "same.png", [1, 2, 3, 4])
    speck = figure(tmp_path / "speck.png", [1, 2, 3, 4], marker_at=3.0)
    other = figure(tmp_path / "other.png", [4, 1, 3, 2])
    bigger = figure(tmp_path / "bigger.png", [1, 2, 3, 4], size=(5, 3))
    assert compare_png(a, same).identical
    near = compare_png(a, speck)
    assert not near.identical and near.within and 0 < near.differing_pixels < 0.005 * near.pixels
    far = compare_png(a, other)
    assert not far.within and "DIFFERENT" in far.line()
    assert "size 400×300 vs 500×300" in compare_png(a, bigger).reason


def test_regenerate_redraws_the_bundled_figures_and_report(gpu_bundle: Path, tmp_path: Path) -> None:
    """The committed campaign's figures and report are bundled; regenerate redraws each figure within the pixel
    tolerance (here identical: the drawing is deterministic) and rewrites the report. A bundled figure that the
    data does not give (here: one replaced by another picture) is reported, not passed."""
    bundle = copy_bundle(gpu_bundle, tmp_path)
    figures = sorted((bundle / "results" / "gpu-node" / "figures").glob("*.png"))
    assert len(figures) >= 5 and (bundle / "results" / "gpu-node" / "report.html").is_file()
    result = regenerate(bundle)
    assert result.ok, result.lines()
    assert [name for name, _ in result.steps] == ["merge", "fits", "claims", "figures", "report"]
    checked = {c.name: c for c in result.checks}
    assert {f"figures/{f.name}" for f in figures} <= set(checked) and checked["report.html"].ok
    shutil.copy2(figures[1], figures[0])  # a different picture under the first figure's name
    (check,) = [c for c in regenerate(bundle).checks if c.name == f"figures/{figures[0].name}"]
    assert not check.ok and "DIFFERENT" in check.detail


# ------------------------------------------------------------------------------------------------ Snakemake


@pytest.mark.workflow
def test_snakemake_ae_bundle_target(tmp_path: Path) -> None:
    shutil.copytree(REFERENCE / "gpu-node", tmp_path / "results" / "gpu-node")
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory",
               str(tmp_path), "--cores", "1", "ae_bundle", "--config", f"campaign={GPU_NODE}",
               f"results_root={tmp_path / 'results'}", f"ae_out={tmp_path / 'artifacts'}", "ae_existing=true"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "artifacts" / "gpu-node-ae.tar.gz").is_file()
    assert verify_bundle(tmp_path / "artifacts" / "gpu-node-ae").ok
