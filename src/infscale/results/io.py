"""Writing and reading cell result files: atomic, never clobbering, with schema version and provenance."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from infscale.results.schemas import (
    CELL_SCHEMA,
    REQUEST_STRUCT,
    SCHEMA_VERSION,
    SERIES_STRUCT,
    STATUSES,
    SUMMARY_COLUMNS,
    TELEMETRY_STRUCT,
)

META_VERSION = b"infscale.schema_version"
META_PROVENANCE = b"infscale.provenance"
META_CELL = b"infscale.cell"


class ResultExistsError(FileExistsError):
    """A result file is already there: measured data is never overwritten."""


class SchemaVersionError(ValueError):
    """A result file written by an incompatible (newer) schema."""


def cell_file(results_dir: Path, cell_id: str) -> Path:
    return Path(results_dir) / "cells" / f"{cell_id}.parquet"


def measured_log(results_dir: Path) -> Path:
    """`logs/measured.log`: one line per measured cell (UTC time, cell id, status, host, Slurm job, reason)."""
    return Path(results_dir) / "logs" / "measured.log"


def failure_file(results_dir: Path, cell_id: str) -> Path:
    """`failures/<cell id>.<UTC stamp without dots>.parquet`: one file per failed attempt, sortable by time."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    return Path(results_dir) / "failures" / f"{cell_id}.{stamp}.parquet"


def failure_cell_id(path: Path) -> str:
    """The cell id in a `failure_file` name (cell ids hold dots; the stamp does not)."""
    return path.name.rsplit(".", 2)[0]


def build_cell_table(summary: dict[str, Any], requests: dict[str, Any] | None = None,
                     series: dict[str, Any] | None = None, telemetry: dict[str, Any] | None = None) -> pa.Table:
    """One-row table in CELL_SCHEMA. Unknown summary keys are an error (a typo would otherwise vanish)."""
    unknown = set(summary) - set(SUMMARY_COLUMNS)
    if unknown:
        raise KeyError(f"summary keys not in the cell schema {SCHEMA_VERSION}: {', '.join(sorted(unknown))}")
    missing = [key for key in ("cell_id", "spec_hash") if not summary.get(key)]
    if missing:
        raise KeyError(f"a cell summary needs {', '.join(missing)}")
    if summary.get("status") not in STATUSES:
        raise ValueError(f"status must be one of {', '.join(STATUSES)}; got {summary.get('status')!r}")
    columns: dict[str, pa.Array] = {}
    for field in CELL_SCHEMA:
        if field.name == "requests_detail":
            columns[field.name] = _nested(requests, REQUEST_STRUCT)
        elif field.name == "series":
            columns[field.name] = _nested(series, SERIES_STRUCT)
        elif field.name == "telemetry":
            columns[field.name] = _nested(telemetry, TELEMETRY_STRUCT)
        else:
            columns[field.name] = pa.array([summary.get(field.name)], type=field.type)
    return pa.Table.from_pydict(columns, schema=CELL_SCHEMA)


def _nested(columns: dict[str, Any] | None, struct: pa.StructType) -> pa.Array:
    if not columns:
        return pa.array([[]], type=pa.list_(struct))
    arrays = [pa.array(columns[f.name], type=f.type) for f in struct]
    values = pa.StructArray.from_arrays(arrays, fields=list(struct))
    return pa.ListArray.from_arrays(pa.array([0, len(values)], type=pa.int32()), values)


def new_temp_file(path: Path) -> str:
    """Create an empty, uniquely named temporary file beside `path`, to be renamed over it when complete. Its mode
    is 0o666 less the umask, as for any new file (0o644 under umask 022, 0o664 under 002): `tempfile.mkstemp`
    would make it 0o600 and leave the results unreadable to a group sharing the folder."""
    while True:
        name = str(path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp"))
        try:
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return name
        except FileExistsError:  # a name another writer just drew: draw again
            continue


def write_cell(path: Path, table: pa.Table, provenance: dict[str, Any], cell_json: str) -> Path:
    """Write atomically: a temporary file in the same directory, then a hard link to the final name, which
    fails if the name exists. A killed writer leaves only a `.tmp` file, never a complete-looking result."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        META_VERSION: SCHEMA_VERSION.encode(),
        META_PROVENANCE: json.dumps(provenance, sort_keys=True, default=str).encode(),
        META_CELL: cell_json.encode(),
    }
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    tmp_name = new_temp_file(path)
    try:
        pq.write_table(table, tmp_name, compression="zstd")
        with open(tmp_name, "rb") as handle:
            os.fsync(handle.fileno())
        try:
            os.link(tmp_name, path)
        except FileExistsError:
            raise ResultExistsError(f"{path} already exists; results are never overwritten") from None
    finally:
        with contextlib.suppress(FileNotFoundError):  # pyarrow removes its own output when a write fails
            os.unlink(tmp_name)
    return path


def write_table_atomic(table: pa.Table, path: Path, metadata: dict[bytes, bytes] | None = None) -> Path:
    """Write a derived table (plan, merged cells): complete or absent, replacing an older version."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), META_VERSION: SCHEMA_VERSION.encode(),
                                           **(metadata or {})})
    tmp_name = new_temp_file(path)
    try:
        pq.write_table(table, tmp_name, compression="zstd")
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    """Write a small text file (summary, note, pointer, settings) complete or not at all, replacing an older one."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    """Write a small binary file (a figure) complete or not at all, replacing an older one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(new_temp_file(path))
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return path


def read_metadata(path: Path) -> dict[str, Any]:
    """Schema version, provenance and cell spec of a result file (checks the version)."""
    raw = pq.read_schema(path).metadata or {}
    version = raw.get(META_VERSION, b"").decode()
    check_schema_version(version, path)
    return {
        "schema_version": version,
        "provenance": json.loads(raw.get(META_PROVENANCE, b"{}")),
        "cell": json.loads(raw.get(META_CELL, b"{}")),
    }


def check_schema_version(version: str, source: object) -> None:
    if not version:
        raise SchemaVersionError(f"{source}: not an infscale result file (no schema version)")
    major = version.split(".")[0]
    if major != SCHEMA_VERSION.split(".")[0]:
        raise SchemaVersionError(
            f"{source}: schema version {version} cannot be read by this infscale (schema {SCHEMA_VERSION}); "
            "use the infscale release that wrote it"
        )


def read_summary(path: Path) -> dict[str, Any]:
    """The summary row; columns added by a later minor schema version read as None from older files."""
    with pq.ParquetFile(path) as parquet:  # one footer decode for the schema and the columns (most of the cost)
        present = set(parquet.schema_arrow.names)
        row = parquet.read(columns=[c for c in SUMMARY_COLUMNS if c in present]).to_pylist()[0]
    return {column: row.get(column) for column in SUMMARY_COLUMNS}
