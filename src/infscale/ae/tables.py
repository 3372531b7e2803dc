"""Whether a regenerated table equals the bundled one: integers, strings and every other exact type exactly, floats
within a relative tolerance.

Refitting the same cells with the same pinned numpy/scipy on another x86-64 CPU can differ in the last bits (SIMD
paths, summation order), so an exact comparison of `fits.parquet` would call a faithful reproduction "different".
Two floats `a`, `b` are equal when both are null, both NaN, `a == b` (also ±inf), or
|a − b| ≤ rel_tol × max(|a|, |b|). The default `REL_TOL` = 1e-9 passes last-bit noise (one ulp of a float64 is
about 2.2e-16 relative) and catches any change a reader of the tables could see (a value in the sixth significant
digit is a 1e-6 change). A NaN against a number, a null against a value, and an infinity against a finite number
are always different. A string column compares exactly, except that two different strings that are both JSON
documents of the same shape (e.g. `fits.parquet`'s `params`, the fitted parameters as JSON) compare by their
content: keys, strings, integers and booleans exactly, floats by the rule above. Nested columns (lists, structs)
compare exactly.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import polars as pl

REL_TOL = 1e-9


@dataclass
class TableDiff:
    rows: int
    rel_tol: float
    identical: bool                         # bit for bit, nulls and NaNs included
    problem: str | None = None              # columns, types or row counts differ: nothing compared
    differing_columns: tuple[str, ...] = ()
    largest_rel_diff: float = 0.0           # over every float value compared (0 when all are equal)
    largest_at: str | None = None           # "column alpha, row 3" of that difference

    @property
    def equal(self) -> bool:
        return self.problem is None and not self.differing_columns

    def detail(self) -> str:
        if self.problem:
            return f"DIFFERENT: {self.problem}"
        if self.identical:
            return f"identical ({self.rows} rows)"
        largest = f"largest relative difference {self.largest_rel_diff:.3g} ({self.largest_at})"
        if self.equal:
            return (f"equal within relative tolerance {self.rel_tol:g} ({self.rows} rows"
                    + (f"; {largest})" if self.largest_at else ")"))
        return (f"DIFFERENT in column(s) {', '.join(self.differing_columns)}"
                + (f" ({largest}; relative tolerance {self.rel_tol:g})" if self.largest_at else ""))


def relative_difference(a: float | None, b: float | None) -> float:
    """0 for equal values (two nulls, two NaNs, the same infinity), inf for values that no tolerance can make
    equal (a NaN or null against a value, an infinity against anything else), else |a − b| / max(|a|, |b|)."""
    if a is None or b is None:
        return 0.0 if a is None and b is None else math.inf
    if math.isnan(a) or math.isnan(b):
        return 0.0 if math.isnan(a) and math.isnan(b) else math.inf
    if a == b:
        return 0.0
    if math.isinf(a) or math.isinf(b):
        return math.inf
    return abs(a - b) / max(abs(a), abs(b))


def json_difference(a: str | None, b: str | None) -> float:
    """0 for equal strings; for two JSON documents of the same shape, the largest relative difference of their
    floats (inf when anything else differs); inf for other strings that differ."""
    if a == b:
        return 0.0
    try:
        return _tree_difference(json.loads(a), json.loads(b))  # type: ignore[arg-type]
    except (TypeError, ValueError):  # a null, or not JSON
        return math.inf


def _tree_difference(a: object, b: object) -> float:
    if type(a) is not type(b):
        return math.inf
    if isinstance(a, float):
        return relative_difference(a, b)  # type: ignore[arg-type]
    if isinstance(a, dict):
        if list(a) != list(b):  # type: ignore[arg-type]
            return math.inf
        return max((_tree_difference(a[k], b[k]) for k in a), default=0.0)  # type: ignore[index]
    if isinstance(a, list):
        if len(a) != len(b):  # type: ignore[arg-type]
            return math.inf
        return max((_tree_difference(x, y) for x, y in zip(a, b)), default=0.0)  # type: ignore[arg-type]
    return 0.0 if a == b else math.inf


def compare_tables(expected: pl.DataFrame, actual: pl.DataFrame, rel_tol: float = REL_TOL) -> TableDiff:
    """Row by row (the tables are written in a fixed order), column by column."""
    if rel_tol < 0 or math.isnan(rel_tol):
        raise ValueError(f"relative tolerance must be 0 or more; got {rel_tol}")
    if expected.columns != actual.columns or expected.dtypes != actual.dtypes:
        return TableDiff(expected.height, rel_tol, False,
                         problem=f"columns {_schema(expected)} vs {_schema(actual)}")
    if expected.height != actual.height:
        return TableDiff(expected.height, rel_tol, False,
                         problem=f"{expected.height} rows expected, {actual.height} found")
    diff = TableDiff(expected.height, rel_tol, identical=expected.equals(actual, null_equal=True))
    if diff.identical:
        return diff
    differing = []
    for name in expected.columns:
        left, right = expected.get_column(name), actual.get_column(name)
        if left.equals(right, null_equal=True):  # NaN equals NaN here, as in the float rule
            continue
        if left.dtype.is_float():
            difference = relative_difference
        elif left.dtype == pl.String:
            difference = json_difference
        else:
            differing.append(name)
            continue
        worst_row, worst = max(enumerate(difference(a, b) for a, b in zip(left.to_list(), right.to_list())),
                               key=lambda item: item[1])
        if worst > diff.largest_rel_diff:
            diff.largest_rel_diff, diff.largest_at = worst, f"column {name}, row {worst_row}"
        if worst > rel_tol:
            differing.append(name)
    diff.differing_columns = tuple(differing)
    return diff


def _schema(frame: pl.DataFrame) -> str:
    return "[" + ", ".join(f"{name}: {dtype}" for name, dtype in frame.schema.items()) + "]"
