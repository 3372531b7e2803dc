"""The backend protocol: every engine infscale can measure with implements `prepare` and `measure`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from infscale.campaign import Campaign, Cell


class InfeasibleCell(RuntimeError):
    """The cell cannot run on this hardware (out of memory, engine build refused): recorded, never retried."""


@dataclass(frozen=True)
class BuildSpec:
    """Everything that changes the engine/artefact: cells with equal build specs share one artefact."""

    model: str
    weight_dtype: str
    kv_dtype: str
    tp: int
    pp: int
    ep: int
    hardware: str
    max_seq_len: int
    max_num_seqs: int
    max_num_tokens: int

    @classmethod
    def for_cells(cls, cells: list[Cell]) -> "BuildSpec":
        first = cells[0]
        return cls(
            model=first.model, weight_dtype=first.precision.weights, kv_dtype=first.precision.kv,
            tp=first.tp, pp=first.pp, ep=first.ep, hardware=first.hardware,
            max_seq_len=max(c.isl.max_length + c.osl.max_length for c in cells),
            max_num_seqs=max(c.engine.max_num_seqs for c in cells),
            max_num_tokens=max(c.engine.max_num_tokens for c in cells),
        )


@dataclass
class Artefact:
    """What `prepare` made: an engine directory for trtllm, nothing on disk for sim."""

    build: BuildSpec
    path: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class CellResult:
    summary: dict[str, Any]                      # metric columns of the cell schema
    requests: dict[str, Any] | None = None       # per-request columns
    series: dict[str, Any] | None = None         # time-series columns
    telemetry: dict[str, Any] | None = None      # GPU telemetry samples (telemetry.py)
    predicted: bool = False
    provenance: dict[str, Any] | None = None     # how the numbers were made (e.g. a proxy's time scaling):
                                                 # stored as the cell file's provenance `measurement`


class Backend(Protocol):
    name: str

    def prepare(self, build: BuildSpec, campaign: Campaign) -> Artefact:
        """Make (or find) the artefact for `build`; idempotent."""
        ...

    def measure(self, cell: Cell, artefact: Artefact, campaign: Campaign) -> CellResult:
        """Run one cell. Raise InfeasibleCell when the hardware cannot run it."""
        ...

    # optional: `close()` releases what the backend holds across cells (rank processes); the runner calls it
