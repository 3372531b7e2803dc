"""Checking measured cell files before anything trusts them: present, complete, and holding the cell their name says.

A planned cell's file `cells/<id>.parquet` is
- **valid**: a complete Parquet file whose footer records that cell (its canonical spec JSON, `infscale.cell`);
- **damaged**: unreadable or truncated (no Parquet footer, a footer that does not decode, no infscale metadata,
  the recorded cell unreadable). With `repair` it is moved to `damaged/<name>.<UTC stamp>`, its reason written
  beside it (`….reason`) and to `logs/cell-check.log`; nothing is ever deleted. The cell is then measured again;
- **misnamed**: a complete infscale file that records another cell (or this id with another spec). It is refused
  and left where it is, named together with the cell it holds: the cell cannot be measured until someone moves
  the file away, and its content is never taken for that cell.
A planned cell without a file is **missing** when it was measured before (its bench job's summary or
`logs/measured.log` lists it; it is measured again), **damaged** while its damaged file waits in `damaged/` to be
measured again, and otherwise simply not measured yet (the merge tells pending from failed).

A bench job's summary (`bench/<job>.parquet`, the bench rule's output: an index over its cell files) that lists a
cell which is not valid any more is stale: with `repair` it is removed, so that Snakemake runs that bench job
again, which measures what is missing. The check reads each file's footer only (a few microseconds when the
footer holds the expected spec); it proves completeness and identity, not every data page.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from infscale.results.io import META_VERSION, cell_file, check_schema_version, measured_log, write_text_atomic
from infscale.results.schemas import FILE_PROBLEMS

VALID, ABSENT = "valid", "absent"
MISSING, DAMAGED, MISNAMED = FILE_PROBLEMS     # also the merged table's statuses of such cells
MAGIC = b"PAR1"
DAMAGED_DIR = "damaged"
CHECK_LOG = Path("logs") / "cell-check.log"


@dataclass(frozen=True)
class FileCheck:
    state: str                 # VALID, ABSENT, DAMAGED or MISNAMED
    reason: str | None = None  # why damaged; for misnamed, the cell the file holds


def check_cell_file(path: Path, spec_hash: str, spec_json: str) -> FileCheck:
    """Whether `path` (`cells/<id>.parquet`) is a complete result file of the cell with this spec."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size < 12:
                return FileCheck(DAMAGED, f"truncated: {size} bytes, not a Parquet file")
            head = handle.read(4)
            handle.seek(-8, os.SEEK_END)
            tail = handle.read(8)
            footer_length = int.from_bytes(tail[:4], "little")
            if head == MAGIC and tail[4:] == MAGIC and footer_length <= size - 12:
                handle.seek(-8 - footer_length, os.SEEK_END)
                if spec_json.encode() in handle.read(footer_length):
                    return FileCheck(VALID)  # the usual case: complete, and it records this cell's spec
    except FileNotFoundError:
        return FileCheck(ABSENT)
    return _decode_check(path, spec_hash)


def _decode_check(path: Path, spec_hash: str) -> FileCheck:
    """The slow path: decode the footer and read the recorded identity, to say what is wrong."""
    try:
        metadata = pq.read_metadata(path)
    except (OSError, pa.ArrowException) as err:
        return FileCheck(DAMAGED, f"not a complete Parquet file ({_first_line(err)})")
    version = (metadata.metadata or {}).get(META_VERSION, b"").decode()
    if not version:
        return FileCheck(DAMAGED, "not an infscale result file (no schema version in its metadata)")
    check_schema_version(version, path)  # a file of another major schema: refused with its own clear error
    try:
        recorded = pq.read_table(path, columns=["cell_id", "spec_hash"]).to_pylist()[0]
    except (OSError, IndexError, KeyError, pa.ArrowException) as err:
        return FileCheck(DAMAGED, f"its recorded cell cannot be read ({_first_line(err)})")
    name = path.name.removesuffix(".parquet")
    if recorded["cell_id"] != name:
        return FileCheck(MISNAMED, f"{path} records cell {recorded['cell_id']}, not {name}")
    if recorded["spec_hash"] != spec_hash:
        return FileCheck(MISNAMED, f"{path} records cell {name} with spec hash {recorded['spec_hash']}, not the "
                                   f"planned {spec_hash}")
    return FileCheck(VALID)  # the identity columns agree (the spec JSON is written differently): trusted


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _utc_stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")


def move_aside(results_dir: Path, path: Path, reason: str) -> Path | None:
    """Move a damaged file to `damaged/<name>.<UTC stamp>` and write its reason beside it (`….reason`) and to
    `logs/cell-check.log`. Never deletes. None when the file is already gone (another process moved it)."""
    folder = Path(results_dir) / DAMAGED_DIR
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{path.name}.{_utc_stamp()}"
    try:
        os.rename(path, target)
    except FileNotFoundError:
        return None
    note = f"{reason}\nmoved from {path} on {socket.gethostname()}; the cell is measured again by the next run\n"
    write_text_atomic(target.with_name(target.name + ".reason"), note)
    log_check(results_dir, f"damaged\t{path.name}\t{reason}\tmoved to {target}")
    return target


def log_check(results_dir: Path, line: str) -> None:
    """Append one line to `logs/cell-check.log` (UTC time first): what a check found and did."""
    log = Path(results_dir) / CHECK_LOG
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as handle:
        handle.write(f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}\t{line}\n")


def damaged_cell_ids(results_dir: Path) -> set[str]:
    """Cells with a file in `damaged/` (named `<cell id>.parquet.<stamp>`)."""
    folder = Path(results_dir) / DAMAGED_DIR
    if not folder.is_dir():
        return set()
    return {p.name.split(".parquet.")[0] for p in folder.iterdir() if ".parquet." in p.name}


def measured_cell_ids(results_dir: Path) -> set[str]:
    """Cells `logs/measured.log` says were written to `cells/` (status ok or infeasible)."""
    log = measured_log(results_dir)
    if not log.is_file():
        return set()
    ids = set()
    with open(log, errors="replace") as handle:
        for line in handle:
            parts = line.split("\t")
            if len(parts) > 2 and parts[2] in ("ok", "infeasible"):
                ids.add(parts[1])
    return ids


@dataclass
class CellCheck:
    """What a check of a campaign's cell files found (and, with repair, did)."""
    valid: set[str] = field(default_factory=set)
    missing: list[str] = field(default_factory=list)             # measured before, the file is gone
    damaged: dict[str, str] = field(default_factory=dict)        # cell id -> reason (its file is in damaged/)
    misnamed: dict[str, str] = field(default_factory=dict)       # cell id -> what its file holds (refused)
    moved: list[Path] = field(default_factory=list)              # damaged files this check moved aside
    summaries: list[Path] = field(default_factory=list)          # job summaries that can be used
    stale_summaries: list[Path] = field(default_factory=list)    # … that list a cell no longer valid (removed
                                                                 #     with repair, so the job runs again)
    repaired: bool = False                                       # checked with repair

    @property
    def problems(self) -> int:
        return len(self.missing) + len(self.damaged) + len(self.misnamed)

    def status(self, cell_id: str) -> tuple[str, str] | None:
        """(merged status, reason) of a cell with a file problem, else None."""
        if cell_id in self.damaged:
            return DAMAGED, self.damaged[cell_id]
        if cell_id in self.misnamed:
            return MISNAMED, self.misnamed[cell_id]
        if cell_id in self.missing:
            return MISSING, "its cell file is gone though it was measured; the next run measures it again"
        return None

    def counts(self) -> str:
        return f"{len(self.missing)} missing, {len(self.damaged)} damaged, {len(self.misnamed)} misnamed"

    def lines(self) -> list[str]:
        out = [f"cell {cell_id}: missing (measured before, its file is gone): to be measured again"
               for cell_id in self.missing]
        out += [f"cell {cell_id}: damaged ({reason}): to be measured again"
                for cell_id, reason in self.damaged.items()]
        out += [f"cell {cell_id}: REFUSED: {holds}; move that file away to measure the cell"
                for cell_id, holds in self.misnamed.items()]
        out += [f"bench job summary {path}: lists a cell no longer intact"
                + ("; removed, so that its job runs again" if self.repaired else "")
                for path in self.stale_summaries]
        return out


def check_cells(results_dir: Path, expected: dict[str, tuple[str, str]], summaries: list[Path] = (),
                repair: bool = False) -> CellCheck:
    """Check the files of the `expected` cells (id -> (spec hash, spec JSON)) and the bench-job `summaries`.
    With `repair`, damaged files are moved aside and stale summaries removed (see the module doc)."""
    results_dir = Path(results_dir)
    check = CellCheck(repaired=repair)
    absent = []
    for cell_id, (spec_hash, spec_json) in expected.items():
        path = cell_file(results_dir, cell_id)
        found = check_cell_file(path, spec_hash, spec_json)
        if found.state == VALID:
            check.valid.add(cell_id)
        elif found.state == ABSENT:
            absent.append(cell_id)
        elif found.state == MISNAMED:
            check.misnamed[cell_id] = found.reason or ""
        else:
            check.damaged[cell_id] = found.reason or ""
            if repair:
                moved = move_aside(results_dir, path, found.reason or "damaged")
                if moved:
                    check.moved.append(moved)
                    check.damaged[cell_id] += f"; moved to {moved.relative_to(results_dir)}"
    readable: dict[Path, set[str]] = {}
    for path in summaries:
        if Path(path).exists():
            ids = _summary_cell_ids(path)
            if ids is None:
                check.stale_summaries.append(path)  # unreadable: an index cannot be trusted either
            else:
                readable[path] = ids
    if absent:
        listed = measured_cell_ids(results_dir).union(*readable.values())
        earlier = damaged_cell_ids(results_dir)
        for cell_id in absent:
            if cell_id in earlier:
                check.damaged[cell_id] = f"moved to {DAMAGED_DIR}/ earlier (see its .reason file there)"
            elif cell_id in listed:
                check.missing.append(cell_id)
    for path, ids in readable.items():
        if any(cell_id in expected and cell_id not in check.valid for cell_id in ids):
            check.stale_summaries.append(path)
        else:
            check.summaries.append(path)
    if repair:
        for cell_id in check.missing:
            log_check(results_dir, f"missing\t{cell_id}\tmeasured before, the file is gone; to be measured again")
        for cell_id, holds in check.misnamed.items():
            log_check(results_dir, f"misnamed\t{cell_id}\trefused: {holds}")
        for path in check.stale_summaries:
            Path(path).unlink(missing_ok=True)  # an index over the cell files, rewritten by the bench job
    return check


def _summary_cell_ids(path: Path) -> set[str] | None:
    """The cells a bench-job summary lists; None when it is unreadable."""
    try:
        return set(pq.read_table(path, columns=["cell_id"]).column("cell_id").to_pylist())
    except (OSError, KeyError, pa.ArrowException):
        return None
