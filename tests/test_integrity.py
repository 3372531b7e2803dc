"""Cell files checked before they are trusted (results/integrity.py): missing, damaged and misnamed files, as the
check, the bench runner and the merge see them. The same cases through a real Snakemake run are in
tests/test_workflow_cells.py."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from infscale.analysis.merge import merge_cells
from infscale.analysis.summary import summary_markdown
from infscale.campaign import load_campaign
from infscale.campaign.plan import plan_campaign
from infscale.launch.runner import run_cells, write_job_summary
from infscale.results.integrity import check_cell_file, check_cells
from infscale.results.io import META_VERSION, SchemaVersionError, cell_file


@pytest.fixture
def measured(tmp_path: Path):
    """A small sim campaign measured into tmp_path/results (4 feasible cells, one bench-job summary)."""
    config = tmp_path / "check.yaml"
    config.write_text(yaml.safe_dump({"name": "check", "backend": "sim", "hardware": "h200-sxm",
                                      "models": ["llama-3.1-8b"], "layouts": ["dp1", "tp2"], "requests": 8,
                                      "workloads": [{"name": "w", "isl": 64, "osl": [64, 128]}]}))
    campaign = load_campaign(config)
    planned = plan_campaign(campaign)
    results = tmp_path / "results"
    outcomes = run_cells(campaign, planned, results)
    summary = write_job_summary(results / "bench" / "all.parquet", "all", outcomes)
    assert len(outcomes) == 4 and all(o.status == "ok" for o in outcomes)
    return campaign, planned, results, summary


def expected(planned) -> dict[str, tuple[str, str]]:
    return {p.cell.id: (p.cell.spec_hash, p.cell.spec_json) for p in planned if p.feasible}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_each_kind_of_file_is_told_apart(measured, tmp_path: Path) -> None:
    _, planned, results, _ = measured
    first, second = planned[0].cell, planned[1].cell
    path = cell_file(results, first.id)

    def state(p: Path, cell=first) -> tuple[str, str | None]:
        found = check_cell_file(p, cell.spec_hash, cell.spec_json)
        return found.state, found.reason

    assert state(path) == ("valid", None)
    assert state(tmp_path / "nope.parquet")[0] == "absent"
    data = path.read_bytes()
    for name, content in (("half", data[: len(data) // 2]), ("last-byte", data[:-1]), ("empty", b""),
                          ("garbage", b"PAR1" + bytes(range(256)) * 8)):
        damaged = tmp_path / name / path.name
        damaged.parent.mkdir()
        damaged.write_bytes(content)
        found, reason = state(damaged)
        assert found == "damaged" and ("truncated" in reason or "not a complete Parquet file" in reason), name
    foreign = tmp_path / "foreign" / path.name
    foreign.parent.mkdir()
    pq.write_table(pa.table({"x": [1]}), foreign)
    assert state(foreign) == ("damaged", "not an infscale result file (no schema version in its metadata)")
    # another cell's complete file under this cell's name: misnamed, both named
    impostor = tmp_path / "impostor" / path.name
    impostor.parent.mkdir()
    shutil.copy(cell_file(results, second.id), impostor)
    found, reason = state(impostor)
    assert found == "misnamed" and f"records cell {second.id}, not {first.id}" in reason
    # this id, but another spec (a hand-edited campaign): misnamed too
    found, reason = state(path, cell=first.model_copy(update={"seed": first.seed + 1}))
    assert found == "misnamed" and f"with spec hash {first.spec_hash}" in reason
    # a file a newer infscale wrote (another major schema) is never taken for damaged and moved: its own error
    future = tmp_path / "future" / path.name
    future.parent.mkdir()
    table = pq.read_table(cell_file(results, second.id))
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata, META_VERSION: b"2.0"}), future)
    with pytest.raises(SchemaVersionError, match="schema version 2.0"):
        state(future)


def test_check_with_repair_moves_damaged_files_aside_and_drops_stale_summaries(measured) -> None:
    _, planned, results, summary = measured
    cells = [p.cell.id for p in planned if p.feasible]
    gone, broken, impostor, intact = cells
    cell_file(results, gone).unlink()
    broken_path = cell_file(results, broken)
    broken_path.write_bytes(broken_path.read_bytes()[:500])
    broken_sha = sha(broken_path)
    shutil.copy(cell_file(results, intact), cell_file(results, impostor))
    impostor_sha = sha(cell_file(results, impostor))

    looked = check_cells(results, expected(planned), [summary])           # without repair: nothing touched
    assert looked.missing == [gone] and set(looked.damaged) == {broken} and set(looked.misnamed) == {impostor}
    assert looked.valid == {intact} and looked.stale_summaries == [summary] and summary.exists()
    assert broken_path.exists() and not (results / "damaged").exists()

    repaired = check_cells(results, expected(planned), [summary], repair=True)
    assert repaired.counts() == "1 missing, 1 damaged, 1 misnamed" and not summary.exists()
    (moved,) = repaired.moved
    assert moved.parent == results / "damaged" and moved.name.startswith(broken_path.name + ".")
    assert sha(moved) == broken_sha and not broken_path.exists()                     # moved, never deleted
    assert "not a complete Parquet file" in moved.with_name(moved.name + ".reason").read_text()
    assert f"moved to damaged/{moved.name}" in repaired.damaged[broken]
    assert sha(cell_file(results, impostor)) == impostor_sha                         # refused, left in place
    log = (results / "logs" / "cell-check.log").read_text()
    assert all(word in log for word in ("damaged", "missing", "misnamed"))
    lines = "\n".join(repaired.lines())
    assert f"cell {impostor}: REFUSED" in lines and f"records cell {intact}, not {impostor}" in lines

    # later, without the job summary: the measured log still tells missing from never measured, and the
    # damaged file waiting in damaged/ keeps its cell damaged until it is measured again
    again = check_cells(results, expected(planned), [])
    assert again.missing == [gone] and "moved to damaged/ earlier" in again.damaged[broken]


def test_the_bench_runner_moves_a_damaged_file_aside_measures_it_and_refuses_a_misnamed_one(measured) -> None:
    campaign, planned, results, _ = measured
    cells = [p.cell.id for p in planned if p.feasible]
    broken, impostor, gone = cells[0], cells[1], cells[2]
    cell_file(results, broken).write_bytes(b"not parquet at all")
    shutil.copy(cell_file(results, cells[3]), cell_file(results, impostor))
    cell_file(results, gone).unlink()
    outcomes = {o.cell_id: o for o in run_cells(campaign, planned, results)}          # no pyarrow crash
    assert outcomes[broken].status == "ok" and outcomes[gone].status == "ok" and outcomes[cells[3]].status == "skipped"
    assert outcomes[impostor].status == "failed"
    assert f"records cell {cells[3]}, not {impostor}" in outcomes[impostor].reason
    assert check_cell_file(cell_file(results, broken), planned[0].cell.spec_hash,
                           planned[0].cell.spec_json).state == "valid"
    assert [p.read_bytes() for p in (results / "damaged").glob("*.parquet.*") if not p.name.endswith(".reason")] \
        == [b"not parquet at all"]


def test_the_merge_counts_problem_files_and_never_calls_them_ok(measured) -> None:
    campaign, planned, results, summary = measured
    cells = [p.cell.id for p in planned if p.feasible]
    gone, broken, impostor, intact = cells
    cell_file(results, gone).unlink()
    cell_file(results, broken).write_bytes(b"\0" * 100)
    shutil.copy(cell_file(results, intact), cell_file(results, impostor))
    merged = merge_cells(planned, results, 8, [summary], repair=True)
    assert merged["cell_id"].to_list() == [p.cell.id for p in planned]                # no duplicate, none dropped
    status = dict(zip(merged["cell_id"], merged["status"]))
    assert (status[gone], status[broken], status[impostor], status[intact]) == ("missing", "damaged", "misnamed", "ok")
    text = summary_markdown(merged, "check", "sim", "h200-sxm", 8)
    assert "4 cells planned: 1 ok, 1 missing, 1 damaged, 1 misnamed" in text
    assert "## cell files needing attention" in text and f"`{impostor}`: misnamed: " in text
    assert not cell_file(results, broken).exists() and len(list((results / "damaged").iterdir())) == 2
