"""Result files: Arrow schemas, atomic never-clobbering writes, schema-version checks, provenance without secrets."""

from __future__ import annotations

import errno
import json
import os
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from infscale.campaign.spec import Arrival, LengthDist
from infscale.results import provenance
from infscale.results.integrity import check_cell_file
from infscale.results.io import (
    META_CELL,
    META_PROVENANCE,
    META_VERSION,
    ResultExistsError,
    SchemaVersionError,
    build_cell_table,
    cell_file,
    read_metadata,
    read_summary,
    write_cell,
    write_table_atomic,
)
from infscale.results.schemas import CELL_SCHEMA, SCHEMA_VERSION, STATUSES, SUMMARY_COLUMNS
from infscale.serving.cluster import ReplicaConfig, serve
from infscale.serving.metrics import request_rows, series_rows, summarize
from infscale.serving.workload import generate_requests

CELL_ID = "tiny-llama.bf16.dp2tp1pp1.i64-o32.off"
SPEC_HASH = "0123456789abcdef"
CELL_JSON = json.dumps({"model": "tiny-llama", "layout": "dp2tp1pp1", "isl": 64, "osl": 32, "seed": 0})


class _Fake:
    deterministic = True

    def iteration(self, batch):
        return 1e-3 + 1e-6 * batch.num_tokens

    def decode_steps(self, ids, context, steps, horizon):
        return np.full(steps, 1e-3 + 1e-6 * len(ids))


@pytest.fixture(scope="module")
def measured():
    """A real (small) serving run: its summary, per-request rows and series, as a backend would return them."""
    fixed = LengthDist(dist="fixed", value=64)
    out = LengthDist(dist="fixed", value=32)
    requests = generate_requests(fixed, out, 12, Arrival(), seed=0)
    state, replicas = serve(requests, 2, ReplicaConfig(64, 16, 4, 128), Arrival(), "round_robin",
                            lambda _: _Fake())
    return summarize(state, replicas, gpus=2), request_rows(state), series_rows(replicas)


def identity(**extra) -> dict:
    return {"cell_id": CELL_ID, "spec_hash": SPEC_HASH, "model": "tiny-llama", "dp": 2, "tp": 1, "pp": 1,
            "status": "ok", "predicted": True, **extra}


@pytest.fixture
def table(measured) -> pa.Table:
    summary, requests, series = measured
    return build_cell_table({**identity(), **summary}, requests, series)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in Path(directory).iterdir() if p.name.endswith(".tmp"))


# ---------------------------------------------------------------------------------------------- tables


def test_build_cell_table_has_the_cell_schema(table, measured):
    summary, _, series = measured
    assert table.schema.equals(CELL_SCHEMA, check_metadata=False)
    assert table.num_rows == 1
    row = table.to_pylist()[0]
    assert row["output_tokens"] == summary["output_tokens"] == 12 * 32
    assert row["duration_s"] == pytest.approx(summary["duration_s"])
    assert len(row["requests_detail"]) == 12
    assert len(row["series"]) == len(series["time_s"])
    # absent summary fields are null, not zero
    assert row["energy_j"] is None and row["reason"] is None


def test_build_cell_table_without_nested_data():
    row = build_cell_table(identity(status="infeasible", reason="KV cache does not fit")).to_pylist()[0]
    assert row["status"] == "infeasible" and row["reason"] == "KV cache does not fit"
    assert row["requests_detail"] == [] and row["series"] == []


def test_build_cell_table_rejects_unknown_summary_keys():
    with pytest.raises(KeyError, match="ttft_p50"):
        build_cell_table(identity(ttft_p50=3.0))   # a typo of ttft_ms_p50 must not vanish silently


@pytest.mark.parametrize("status", ["OK", "done", None, ""])
def test_build_cell_table_rejects_bad_status(status):
    summary = identity()
    summary["status"] = status
    with pytest.raises(ValueError, match="status must be one of"):
        build_cell_table(summary)
    summary.pop("status")
    with pytest.raises(ValueError, match="status must be one of"):
        build_cell_table(summary)


@pytest.mark.parametrize("status", STATUSES)
def test_every_allowed_status_builds(status):
    assert build_cell_table(identity(status=status)).column("status")[0].as_py() == status


# ------------------------------------------------------------------------------------------ write_cell


def test_write_cell_is_readable_with_summary_and_nested_rows(tmp_path, table, measured):
    summary, requests, series = measured
    path = cell_file(tmp_path, CELL_ID)
    assert path == tmp_path / "cells" / f"{CELL_ID}.parquet"
    assert write_cell(path, table, {"hostname": "node01"}, CELL_JSON) == path   # creates cells/

    back = pq.read_table(path)
    assert back.num_rows == 1
    row = back.to_pylist()[0]
    assert row["cell_id"] == CELL_ID and row["spec_hash"] == SPEC_HASH and row["status"] == "ok"
    for key, value in summary.items():
        assert row[key] == pytest.approx(value), key
    detail = row["requests_detail"]
    assert [r["request"] for r in detail] == list(range(12))
    np.testing.assert_allclose([r["finish_s"] for r in detail], requests["finish_s"])
    assert {r["replica"] for r in detail} == {0, 1}
    assert [s["time_s"] for s in row["series"]] == pytest.approx(list(series["time_s"]))

    # summary-only readers never need the nested columns
    assert read_summary(path)["output_tokens"] == summary["output_tokens"]
    assert set(read_summary(path)) == set(SUMMARY_COLUMNS)
    assert check_cell_file(path, SPEC_HASH, CELL_JSON).state == "valid"
    assert check_cell_file(tmp_path / "cells" / "missing.parquet", SPEC_HASH, CELL_JSON).state == "absent"
    assert leftovers(path.parent) == []


def test_write_cell_metadata_has_version_provenance_and_cell(tmp_path, table):
    path = tmp_path / "cell.parquet"
    meta_in = {"hostname": "node01", "slurm": {"SLURM_JOB_ID": "4242"}, "started_at": "2025-01-01T00:00:00Z"}
    write_cell(path, table, meta_in, CELL_JSON)
    raw = pq.read_schema(path).metadata
    assert raw[META_VERSION] == SCHEMA_VERSION.encode()
    assert json.loads(raw[META_PROVENANCE]) == meta_in
    assert json.loads(raw[META_CELL]) == json.loads(CELL_JSON)
    meta = read_metadata(path)
    assert meta == {"schema_version": SCHEMA_VERSION, "provenance": meta_in, "cell": json.loads(CELL_JSON)}


def test_write_cell_never_overwrites(tmp_path, table):
    path = tmp_path / "cells" / "a.parquet"
    write_cell(path, table, {"run": 1}, CELL_JSON)
    first = path.read_bytes()
    other = build_cell_table(identity(status="failed", reason="second writer"))
    with pytest.raises(ResultExistsError, match="already exists"):
        write_cell(path, other, {"run": 2}, CELL_JSON)
    assert issubclass(ResultExistsError, FileExistsError)
    assert path.read_bytes() == first
    assert read_metadata(path)["provenance"] == {"run": 1}
    assert leftovers(path.parent) == []


def test_concurrent_writers_of_one_cell_one_wins(tmp_path, table):
    path = tmp_path / "race.parquet"
    outcomes: list[str] = []
    lock = threading.Lock()

    def writer(n: int) -> None:
        try:
            write_cell(path, table, {"writer": n}, CELL_JSON)
            result = "ok"
        except ResultExistsError:
            result = "exists"
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["exists"] * 5 + ["ok"]
    assert pq.read_table(path).num_rows == 1
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("error", [RuntimeError("killed mid-write"), KeyboardInterrupt()],
                         ids=["exception", "interrupt"])
def test_crash_during_write_leaves_nothing(tmp_path, table, monkeypatch, error):
    seen: list[str] = []

    def dying_write(tbl, where, **kwargs):
        seen.append(str(where))
        assert Path(where).exists(), "the temporary file is created before writing"
        with open(where, "wb") as handle:
            handle.write(b"PAR1 half a file")
        raise error

    monkeypatch.setattr(pq, "write_table", dying_write)
    path = tmp_path / "cells" / "crash.parquet"
    with pytest.raises(type(error)):
        write_cell(path, table, {}, CELL_JSON)
    assert seen and Path(seen[0]).parent == path.parent
    assert not path.exists()
    assert list(path.parent.iterdir()) == []


def test_summary_without_identity_is_rejected_before_writing():
    with pytest.raises(KeyError, match="cell_id, spec_hash"):
        build_cell_table({"status": "ok"})


def test_write_error_from_pyarrow_is_reported_not_masked(tmp_path, table):
    # pq.write_table removes its partial output itself when it fails; here the real failure is a null in the
    # non-nullable cell_id column. The user must see that error, not "No such file or directory: .x.tmp".
    broken = table.set_column(0, table.schema.field("cell_id"), pa.array([None], type=pa.string()))
    path = tmp_path / "x.parquet"
    with pytest.raises(pa.ArrowInvalid, match="cell_id"):
        write_cell(path, broken, {}, CELL_JSON)
    assert not path.exists() and leftovers(tmp_path) == []


def _disk_full_like_pyarrow(tbl, where, **kwargs):
    """What pyarrow.parquet.write_table does on an I/O error: remove its partial output, re-raise."""
    with open(where, "wb") as handle:
        handle.write(b"PAR1")
    os.remove(where)
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_is_reported_by_write_cell(tmp_path, table, monkeypatch):
    monkeypatch.setattr(pq, "write_table", _disk_full_like_pyarrow)
    with pytest.raises(OSError) as caught:
        write_cell(tmp_path / "c.parquet", table, {}, CELL_JSON)
    assert caught.value.errno == errno.ENOSPC


def test_disk_full_is_reported_by_write_table_atomic(tmp_path, monkeypatch):
    monkeypatch.setattr(pq, "write_table", _disk_full_like_pyarrow)
    with pytest.raises(OSError) as caught:
        write_table_atomic(pa.table({"x": [1]}), tmp_path / "plan.parquet")
    assert caught.value.errno == errno.ENOSPC


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)],
                         ids=["umask022", "umask002", "umask077"])
def test_result_files_respect_the_umask(tmp_path, table, umask, mode):
    """A group sharing a project folder reads the results as it reads any file there: every writer makes its
    file 0o666 less the umask (tempfile.mkstemp's 0o600 would not)."""
    from infscale.launch.registry import JobRecord, Registry
    from infscale.results.io import write_bytes_atomic, write_text_atomic

    previous = os.umask(umask)
    try:
        written = [
            write_cell(tmp_path / "cells" / "a.parquet", table, {}, CELL_JSON),
            write_table_atomic(pa.table({"x": [1]}), tmp_path / "cells.parquet"),
            write_table_atomic(pa.table({"x": [2]}), tmp_path / "cells.parquet"),  # replacing keeps the rule
            write_text_atomic(tmp_path / "summary.md", "# summary\n"),
            write_bytes_atomic(tmp_path / "figures" / "a.png", b"\x89PNG"),
        ]
        registry = Registry(tmp_path)
        registry.save(JobRecord("job-a"))
        written.append(registry.path("job-a"))
    finally:
        os.umask(previous)
    assert {path.name: oct(path.stat().st_mode & 0o777) for path in written} == \
        {path.name: oct(mode) for path in written}
    assert leftovers(tmp_path) == [] and leftovers(tmp_path / "cells") == []


# -------------------------------------------------------------------------------------- derived tables


def test_write_table_atomic_replaces_an_older_file(tmp_path):
    path = tmp_path / "merged" / "cells.parquet"
    write_table_atomic(pa.table({"cell_id": ["a"], "value": [1.0]}), path)
    write_table_atomic(pa.table({"cell_id": ["a", "b"], "value": [2.0, 3.0]}), path,
                       {b"infscale.config_hash": b"cafe"})
    back = pq.read_table(path)
    assert back.column("value").to_pylist() == [2.0, 3.0]
    raw = back.schema.metadata
    assert raw[META_VERSION] == SCHEMA_VERSION.encode()
    assert raw[b"infscale.config_hash"] == b"cafe"
    assert read_metadata(path)["schema_version"] == SCHEMA_VERSION
    assert leftovers(path.parent) == []


def test_write_table_atomic_crash_keeps_the_older_file(tmp_path, monkeypatch):
    path = tmp_path / "cells.parquet"
    write_table_atomic(pa.table({"value": [1]}), path)
    before = path.read_bytes()

    def dying_write(tbl, where, **kwargs):
        Path(where).write_bytes(b"PAR1 half")
        raise RuntimeError("killed")

    monkeypatch.setattr(pq, "write_table", dying_write)
    with pytest.raises(RuntimeError, match="killed"):
        write_table_atomic(pa.table({"value": [2]}), path)
    assert path.read_bytes() == before
    assert leftovers(tmp_path) == []


# -------------------------------------------------------------------------------------- schema version


def _parquet_with_metadata(path: Path, metadata: dict[bytes, bytes] | None) -> Path:
    pq.write_table(pa.table({"x": [1, 2]}).replace_schema_metadata(metadata), path)
    return path


def test_read_metadata_rejects_a_newer_major_version(tmp_path):
    path = _parquet_with_metadata(tmp_path / "future.parquet", {META_VERSION: b"2.0"})
    with pytest.raises(SchemaVersionError) as caught:
        read_metadata(path)
    message = str(caught.value)
    assert "2.0" in message and SCHEMA_VERSION in message and "future.parquet" in message
    assert "release" in message   # says what to do


def test_read_metadata_accepts_a_minor_version_of_the_same_major(tmp_path):
    major = SCHEMA_VERSION.split(".")[0]
    path = _parquet_with_metadata(tmp_path / "minor.parquet", {META_VERSION: f"{major}.9".encode()})
    assert read_metadata(path) == {"schema_version": f"{major}.9", "provenance": {}, "cell": {}}


@pytest.mark.parametrize("metadata", [None, {b"pandas": b"{}"}], ids=["no-metadata", "foreign-metadata"])
def test_read_metadata_rejects_a_foreign_parquet(tmp_path, metadata):
    path = _parquet_with_metadata(tmp_path / "other.parquet", metadata)
    with pytest.raises(SchemaVersionError, match="not an infscale result file"):
        read_metadata(path)


# ------------------------------------------------------------------------------------------ provenance

SECRETS = {
    "HF_TOKEN": "hf_secretvalue123",
    "MY_PASSWORD": "hunter2-pw-value",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-value-xyz",
    "WANDB_API_KEY": "wandb-key-value-789",
}


def test_provenance_records_slurm_job_but_no_secrets(monkeypatch, tmp_path, table):
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SLURM_JOB_ID", "987654")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[01-02]")
    monkeypatch.setenv("SLURM_JOB_ACCOUNT", "secret-account-name")   # a Slurm variable off the allow-list
    info = provenance.collect("demo", "cfg-hash")
    text = json.dumps(info, sort_keys=True, default=str)
    assert info["slurm"]["SLURM_JOB_ID"] == "987654"
    assert info["slurm"]["SLURM_JOB_NODELIST"] == "gpu[01-02]"
    assert "SLURM_JOB_ACCOUNT" not in info["slurm"] and "secret-account-name" not in text
    for key, value in SECRETS.items():
        assert value not in text, key
    assert info["campaign"] == "demo" and info["config_hash"] == "cfg-hash"
    assert info["infscale_version"] and info["python"] and info["hostname"]
    assert "pyarrow" in info["packages"] and "numpy" in info["packages"]
    # and nothing of the secrets reaches the file
    path = tmp_path / "cell.parquet"
    write_cell(path, table, info, CELL_JSON)
    data = path.read_bytes()
    assert b"987654" in pq.read_schema(path).metadata[META_PROVENANCE]
    for value in SECRETS.values():
        assert value.encode() not in data
    assert read_metadata(path)["provenance"]["slurm"]["SLURM_JOB_ID"] == "987654"


def test_provenance_without_slurm(monkeypatch):
    for key in provenance.SLURM_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    info = provenance.collect()
    assert info["slurm"] == {}
    json.dumps(info)   # serialisable as is


def test_utc_now_is_utc_iso():
    stamp = provenance.utc_now()
    assert stamp.endswith("+00:00") and "T" in stamp
