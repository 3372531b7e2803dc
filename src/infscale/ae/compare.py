"""`infscale ae compare REFERENCE NEW`: a rerun against a reference, cell by cell and claim by claim.

Cells are matched by their spec hash (the same model, precision, layout, ISL/OSL, requests, arrival, engine knobs,
backend, hardware and seed), or with `match="shape"` by model × precision × layout × workload × ISL × OSL × arrival
only (to hold a rerun on other hardware or another backend against the reference). For every metric of the
tolerance band, each cell measured on both sides is within the band when |new − reference| ≤ tolerance ×
|reference|. Cells on one side only, and cells measured on one side but not the other, are reported by id. Each
claim's verdict is compared too.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from infscale.results.tables import read_cells

# Relative tolerance per metric (|new − ref| / |ref|). Throughput and the median token latency of a rerun on the
# same hardware repeat within a few per cent (results/reference/gpu-node/PROVENANCE.md: 6 of 7 cells within
# 0.8 %, one 6 % off); TTFT depends on when each request's prefill is scheduled and moves more.
DEFAULT_TOLERANCES: dict[str, float] = {
    "output_tok_s": 0.10,
    "output_tok_s_per_gpu": 0.10,
    "tpot_ms_p50": 0.10,
    "ttft_ms_p50": 0.25,
}
TOLERANCES_NAME = "tolerances.json"
SHAPE_KEYS = ("model", "weight_dtype", "kv_dtype", "layout", "workload", "isl_label", "osl_label", "arrival")


class CompareError(ValueError):
    """Inputs that cannot be compared (no merged cells, an ambiguous match, an unknown metric)."""


@dataclass
class Side:
    """One side of a comparison: a bundle or a results directory."""
    label: str
    results_dir: Path
    cells: pl.DataFrame
    claims: pl.DataFrame | None
    tolerances: dict[str, float] | None     # a bundle's stated tolerance band


def load_side(path: Path) -> Side:
    """A bundle (has manifest.json: its results/<campaign>/) or a results directory (has cells.parquet)."""
    from infscale.ae.manifest import MANIFEST_NAME, read_manifest

    path = Path(path)
    tolerances = None
    if (path / MANIFEST_NAME).is_file():
        manifest = read_manifest(path)
        results_dir = path / "results" / str(manifest["campaign"])
        if (path / TOLERANCES_NAME).is_file():
            tolerances = read_tolerances(path / TOLERANCES_NAME)
    else:
        results_dir = path
    merged = results_dir / "cells.parquet"
    if not merged.is_file():
        raise CompareError(f"{path}: no merged cells ({merged} does not exist); give a bundle or a results "
                           "directory after `infscale merge`")
    claims_file = results_dir / "claims.parquet"
    claims = pl.read_parquet(claims_file) if claims_file.is_file() else None
    return Side(str(path), results_dir, read_cells(merged), claims, tolerances)


def read_tolerances(path: Path) -> dict[str, float]:
    raw = json.loads(Path(path).read_text())
    values = raw.get("relative", raw) if isinstance(raw, dict) else None
    if not isinstance(values, dict) or not all(isinstance(v, (int, float)) for v in values.values()):
        raise CompareError(f"{path}: expected {{\"relative\": {{metric: tolerance, ...}}}}")
    return {str(k): float(v) for k, v in values.items()}


def tolerance_document(tolerances: dict[str, float]) -> str:
    return json.dumps({"relative": tolerances, "meaning": "a cell is within the band for a metric when "
                       "|new - reference| <= tolerance * |reference|"}, indent=1, sort_keys=True) + "\n"


def parse_tolerance_overrides(items: list[str]) -> dict[str, float]:
    """`metric=0.05` items of the command line."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
            if not sep or out[name.strip()] < 0:
                raise ValueError
        except ValueError:
            raise CompareError(f"--tol {item!r}: expected METRIC=RELATIVE_TOLERANCE, e.g. output_tok_s=0.05") \
                from None
    return out


@dataclass
class CellRow:
    key: str
    reference_id: str | None
    new_id: str | None
    reference_status: str | None
    new_status: str | None
    metrics: dict[str, dict[str, object]] = field(default_factory=dict)  # metric -> ref, new, rel, within

    @property
    def outcome(self) -> str:
        if self.reference_id is None:
            return "only in new"
        if self.new_id is None:
            return "missing in new"
        if self.reference_status != self.new_status:
            return f"status {self.reference_status} → {self.new_status}"
        if self.reference_status != "ok":
            return f"{self.reference_status} in both"
        return "within" if all(m["within"] for m in self.metrics.values()) else "outside"


@dataclass
class ClaimRow:
    claim: str
    reference: str | None
    new: str | None

    @property
    def same(self) -> bool:
        return self.reference is not None and self.reference == self.new


@dataclass
class Comparison:
    reference: str
    new: str
    match: str
    tolerances: dict[str, float]
    cells: list[CellRow]
    claims: list[ClaimRow] | None       # None when a side has no claims table
    claims_note: str = ""

    def within(self, metric: str) -> list[CellRow]:
        return [c for c in self.cells if metric in c.metrics and c.metrics[metric]["within"]]

    def outside(self, metric: str) -> list[CellRow]:
        return [c for c in self.cells if metric in c.metrics and not c.metrics[metric]["within"]]

    @property
    def ok(self) -> bool:
        cells_ok = all(c.outcome in ("within",) or c.outcome.endswith(" in both") for c in self.cells)
        claims_ok = self.claims is not None and all(c.same for c in self.claims)
        return cells_ok and claims_ok

    def lines(self) -> list[str]:
        out = [f"reference: {self.reference}", f"new:       {self.new}",
               f"cells matched by {self.match}; tolerance band (relative): "
               + ", ".join(f"{m} ±{t:.0%}" for m, t in self.tolerances.items()), ""]
        metrics = list(self.tolerances)
        header = f"{'cell (reference id)':<62} {'outcome':<22} " + " ".join(f"{m:>22}" for m in metrics)
        out += [header, "-" * len(header)]
        for cell in self.cells:
            shown = []
            for m in metrics:
                value = cell.metrics.get(m)
                if value is None:
                    shown.append(f"{'—':>22}")
                else:
                    rel = value["rel"]
                    text = "missing value" if rel is None else f"{rel:+.2%}"
                    shown.append(f"{text + (' ok' if value['within'] else ' OUT'):>22}")
            out.append(f"{(cell.reference_id or cell.new_id or ''):<62} {cell.outcome:<22} " + " ".join(shown))
        out.append("")
        compared = [c for c in self.cells if c.metrics]
        for m in metrics:
            outside = self.outside(m)
            out.append(f"{m}: {len(self.within(m))} of {len(compared)} cells within ±{self.tolerances[m]:.0%}"
                       + (f"; outside: {', '.join(str(c.reference_id) for c in outside)}" if outside else ""))
        for label in ("missing in new", "only in new"):
            ids = [str(c.reference_id or c.new_id) for c in self.cells if c.outcome == label]
            if ids:
                out.append(f"{label}: {len(ids)}: {', '.join(ids)}")
        changed = [c for c in self.cells if c.outcome.startswith("status ")]
        if changed:
            out.append(f"status changed: {len(changed)}: "
                       + ", ".join(f"{c.reference_id} ({c.outcome[7:]})" for c in changed))
        out.append("")
        if self.claims is None:
            out.append(f"claims: not compared ({self.claims_note})")
        else:
            for claim in self.claims:
                out.append(f"{claim.claim:<4} reference {str(claim.reference):<13} new {str(claim.new):<13} "
                           + ("same" if claim.same else "DIFFERENT"))
            same = sum(c.same for c in self.claims)
            out.append(f"claims: {same} of {len(self.claims)} verdicts the same")
        out.append(f"result: {'AGREES' if self.ok else 'DIFFERS'} (tolerance band, cells and claim verdicts)")
        return out

    def to_dict(self) -> dict[str, object]:
        return {
            "reference": self.reference, "new": self.new, "match": self.match, "tolerances": self.tolerances,
            "ok": self.ok,
            "cells": [{"key": c.key, "reference_id": c.reference_id, "new_id": c.new_id, "outcome": c.outcome,
                       "reference_status": c.reference_status, "new_status": c.new_status, "metrics": c.metrics}
                      for c in self.cells],
            "claims": None if self.claims is None else
            [{"claim": c.claim, "reference": c.reference, "new": c.new, "same": c.same} for c in self.claims],
        }


def _keyed(frame: pl.DataFrame, match: str, label: str) -> dict[str, dict]:
    if match == "spec":
        keys = [str(h) for h in frame.get_column("spec_hash").to_list()]
    elif match == "shape":
        keys = ["/".join(str(r[k]) for k in SHAPE_KEYS) for r in frame.select(SHAPE_KEYS).iter_rows(named=True)]
    else:
        raise CompareError(f"match '{match}': allowed spec, shape")
    rows = frame.to_dicts()
    out: dict[str, dict] = {}
    for key, row in zip(keys, rows):
        if key in out:
            raise CompareError(f"{label}: cells {out[key]['cell_id']} and {row['cell_id']} have the same {match} "
                               f"({key}); match them by spec instead")
        out[key] = row
    return out


def _relative(ref: object, new: object) -> tuple[float | None, bool]:
    if ref is None or new is None or (isinstance(ref, float) and math.isnan(ref)) or \
            (isinstance(new, float) and math.isnan(new)):
        return None, False
    ref_f, new_f = float(ref), float(new)  # type: ignore[arg-type]
    if ref_f == 0.0:
        return (0.0, True) if new_f == 0.0 else (math.inf, False)
    return (new_f - ref_f) / abs(ref_f), True


def compare(reference: Side, new: Side, tolerances: dict[str, float] | None = None,
            match: str = "spec") -> Comparison:
    """Hold `new` against `reference`. Tolerances: the given ones, else the reference bundle's, else the defaults."""
    band = dict(tolerances if tolerances is not None else (reference.tolerances or DEFAULT_TOLERANCES))
    unknown = [m for m in band if m not in reference.cells.columns]
    if unknown:
        raise CompareError(f"unknown metric(s) {', '.join(unknown)} in the tolerance band; metrics are columns of "
                           f"cells.parquet, e.g. {', '.join(DEFAULT_TOLERANCES)}")
    ref_rows = _keyed(reference.cells, match, reference.label)
    new_rows = _keyed(new.cells, match, new.label)
    cells: list[CellRow] = []
    for key in list(ref_rows) + [k for k in new_rows if k not in ref_rows]:
        r, n = ref_rows.get(key), new_rows.get(key)
        row = CellRow(key, r and r["cell_id"], n and n["cell_id"], r and r["status"], n and n["status"])
        if r is not None and n is not None and r["status"] == n["status"] == "ok":
            for metric, tol in band.items():
                rel, comparable = _relative(r.get(metric), n.get(metric))
                within = comparable and rel is not None and abs(rel) <= tol + 1e-12
                row.metrics[metric] = {"reference": r.get(metric), "new": n.get(metric), "rel": rel,
                                       "tolerance": tol, "within": bool(within)}
        cells.append(row)
    claims: list[ClaimRow] | None = None
    note = ""
    if reference.claims is None or new.claims is None:
        missing = [s.label for s in (reference, new) if s.claims is None]
        note = f"no claims.parquet in {', '.join(missing)}"
    else:
        ref_v = dict(zip(reference.claims["claim"].to_list(), reference.claims["verdict"].to_list()))
        new_v = dict(zip(new.claims["claim"].to_list(), new.claims["verdict"].to_list()))
        claims = [ClaimRow(c, ref_v.get(c), new_v.get(c)) for c in list(ref_v) + [c for c in new_v if c not in ref_v]]
    return Comparison(reference.label, new.label, match, band, cells, claims, note)
