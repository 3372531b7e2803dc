"""`infscale ae regenerate BUNDLE`: rebuild the derived files from the bundle alone (no GPU), then diff them.

The bundled cell files are the input (with the validation tables and PROVENANCE.md, which the figures and the
report show but the workflow does not make). The steps are the workflow's own (`pipeline.write_merge`,
`write_fits`, `write_claims`, `write_figures`, `analysis.report.write_report`: what `infscale merge`, `fit`,
`claims`, `figures` and `report` run), in the order of `STEPS`, writing into
`<bundle>/regenerated/` (or `--out`), never over the bundled originals. The regenerated tables must equal the
bundled ones: integers and strings exactly, floats within a relative tolerance (`ae.tables`, default 1e-9: another
CPU may round the last bits of a refit differently), with the largest relative difference reported; the texts
byte for byte; figures identical or within the pixel tolerance of `ae.images`. Every check, with that largest
difference, is also written to `<out>/checks.json`.
"""

from __future__ import annotations

import filecmp
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from infscale.ae.manifest import REGENERATED_DIR as REGENERATED
from infscale.ae.manifest import BundleError, read_manifest
from infscale.ae.tables import REL_TOL, compare_tables

MARKER = ".infscale-regenerated"      # marks an --out directory as ours, so a second run may replace it
TABLES = ("cells.parquet", "fits.parquet", "claims.parquet")     # ae.tables: floats within a relative tolerance
TEXTS = ("summary.md", "claims.md")                              # byte equality
INPUTS = ("cells", "failures")                                   # what the steps read: the measured files
INPUT_FILES = ("validation*.parquet", "PROVENANCE.md")           # read by figures and report, made by hand
CHECKS_NAME = "checks.json"                                      # the checks, written into --out


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    largest_rel_diff: float | None = None  # tables: over the float values compared

    def line(self) -> str:
        return f"{self.name}: {self.detail}"


@dataclass
class Regeneration:
    out: Path
    rel_tol: float = REL_TOL
    steps: list[tuple[str, float]] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def lines(self) -> list[str]:
        out = [f"regenerated into {self.out}: " + ", ".join(f"{n} {s:.1f} s" for n, s in self.steps)]
        out += [c.line() for c in self.checks]
        same = sum(c.ok for c in self.checks)
        largest = max((c.largest_rel_diff for c in self.checks if c.largest_rel_diff is not None), default=0.0)
        out.append(f"{'OK' if self.ok else 'DIFFERENT'}: {same} of {len(self.checks)} files reproduced (tables: "
                   f"floats within relative tolerance {self.rel_tol:g}, largest relative difference {largest:.3g})")
        return out

    def document(self) -> str:
        """`checks.json`: the outcome, the tolerance and every check with its largest relative difference."""
        def number(value: float | None) -> float | str | None:  # JSON has no infinity (a NaN against a number)
            return value if value is None or math.isfinite(value) else str(value)

        checks = [{"name": c.name, "ok": c.ok, "detail": c.detail,
                   "largest_relative_difference": number(c.largest_rel_diff)} for c in self.checks]
        return json.dumps({"ok": self.ok, "table_relative_tolerance": self.rel_tol, "checks": checks},
                          indent=1) + "\n"


def _step_merge(run) -> None:
    from infscale.pipeline import write_merge

    write_merge(run)


def _step_fits(run) -> None:
    from infscale.pipeline import write_fits

    write_fits(run, pl.read_parquet(run.merged_file))   # as `infscale fit`: from the merged table on disk


def _step_claims(run) -> None:
    from infscale.pipeline import write_claims

    write_claims(run, pl.read_parquet(run.merged_file))


def _step_figures(run) -> None:
    from infscale.pipeline import write_figures

    write_figures(run, pl.read_parquet(run.merged_file))


def _step_report(run) -> None:
    from infscale.analysis.report import write_report

    write_report(run)


# The regeneration, in order (the workflow's rules from merge to report).
STEPS: list[tuple[str, Callable[[object], None]]] = [
    ("merge", _step_merge),
    ("fits", _step_fits),
    ("claims", _step_claims),
    ("figures", _step_figures),
    ("report", _step_report),
]


def _table_check(name: str, bundled: Path, regenerated: Path, rel_tol: float) -> Check:
    if not bundled.is_file():
        return Check(name, True, "not in the bundle (nothing to compare)")
    if not regenerated.is_file():
        return Check(name, False, "DIFFERENT: not regenerated")
    diff = compare_tables(pl.read_parquet(bundled), pl.read_parquet(regenerated), rel_tol)
    return Check(name, diff.equal, diff.detail(), None if diff.problem else diff.largest_rel_diff)


def _checks(bundled: Path, regenerated: Path, rel_tol: float) -> list[Check]:
    from infscale.ae.images import compare_png

    checks = [_table_check(name, bundled / name, regenerated / name, rel_tol) for name in TABLES]
    for name in TEXTS:
        if (bundled / name).is_file():
            same = (regenerated / name).is_file() and filecmp.cmp(bundled / name, regenerated / name, shallow=False)
            checks.append(Check(name, same, "identical" if same else "DIFFERENT"))
    for png in sorted((bundled / "figures").rglob("*.png")) if (bundled / "figures").is_dir() else []:
        rel = png.relative_to(bundled).as_posix()
        new = regenerated / rel
        if not new.is_file():
            checks.append(Check(rel, False, "DIFFERENT: not regenerated"))
            continue
        diff = compare_png(png, new)
        checks.append(Check(rel, diff.within, diff.line().split(": ", 1)[1]))
    if (bundled / "report.html").is_file():
        present = (regenerated / "report.html").is_file()
        checks.append(Check("report.html", present, "regenerated" if present else "DIFFERENT: not regenerated"))
    return checks


def regenerate(bundle: Path, out: Path | None = None, rel_tol: float = REL_TOL) -> Regeneration:
    """Run `STEPS` on the bundle's cell files into `out` (default `<bundle>/regenerated`), then diff (the tables'
    floats within `rel_tol`, relative)."""
    from infscale.pipeline import CampaignRun

    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    bundled = bundle / str(manifest["results_dir"])
    config = bundle / str(manifest["campaign_file"])
    if not config.is_file() or not (bundled / "cells").is_dir():
        raise BundleError(f"{bundle}: the campaign file or {manifest['results_dir']}/cells is missing "
                          "(infscale ae verify names what is wrong)")
    out = Path(out) if out else bundle / REGENERATED
    if out.resolve() == bundle.resolve() or bundled.resolve().is_relative_to(out.resolve()):
        raise BundleError(f"--out {out}: would write over the bundled results; choose a new directory")
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise BundleError(f"--out {out}: exists and is not an earlier regeneration; choose a new directory")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(f"regenerated from {bundle}\n")

    run = CampaignRun(config, out / "results", "auto")
    for name in INPUTS:
        if (bundled / name).is_dir():
            shutil.copytree(bundled / name, run.results_dir / name)
    for pattern in INPUT_FILES:
        for path in sorted(bundled.glob(pattern)):
            shutil.copy2(path, run.results_dir / path.name)
    result = Regeneration(run.results_dir, rel_tol)
    for name, step in STEPS:
        started = time.perf_counter()
        step(run)
        result.steps.append((name, time.perf_counter() - started))
    result.checks = _checks(bundled, run.results_dir, rel_tol)
    (out / CHECKS_NAME).write_text(result.document())
    return result
