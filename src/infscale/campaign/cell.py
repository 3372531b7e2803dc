"""The cell: one measurement. Immutable, hashable, JSON round-trip, with a readable and stable id."""

from __future__ import annotations

import hashlib
from functools import cached_property

from pydantic import BaseModel, ConfigDict, Field, model_validator

from infscale.campaign.layout import Layout
from infscale.campaign.spec import Arrival, EngineKnobs, LengthDist, Precision
from infscale.results.columns import arrival_columns, length_columns


class Cell(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    hardware: str
    backend: str
    precision: Precision
    dp: int = Field(gt=0)
    tp: int = Field(gt=0)
    pp: int = Field(gt=0)
    ep: int = Field(default=1, gt=0)
    workload: str
    isl: LengthDist
    osl: LengthDist
    requests: int = Field(gt=0)
    arrival: Arrival
    engine: EngineKnobs
    seed: int = 0
    proxy_layers: int | None = Field(default=None, gt=0)  # a layer-sliced proxy of the model (None: full run)
    # sim cells of a campaign that predicts with a hardware profile: "name@sha256[:12]" (None: catalog constants)
    hardware_profile: str | None = None
    # sim cells predicted by an engine model other than the roofline: "trtllm/<operator data>" (None: roofline)
    prediction_engine: str | None = None

    @model_validator(mode="after")
    def _no_microbatches_without_pp(self) -> "Cell":
        """PP micro-batches mean nothing at pp = 1: drop the knob, so such a cell is the one it always was."""
        if self.pp == 1 and self.engine.pp_microbatches is not None:
            object.__setattr__(self, "engine", self.engine.model_copy(update={"pp_microbatches": None}))
        return self

    @property
    def layout(self) -> Layout:
        return Layout(self.dp, self.tp, self.pp, self.ep)

    @cached_property
    def spec_json(self) -> str:
        """Canonical JSON: the identity of the measurement. Fields added later are left out while unset, so cells
        keep the hashes (and files) they had before those fields existed."""
        unset: dict[str, object] = {name: True for name in ("proxy_layers", "hardware_profile", "prediction_engine")
                                    if getattr(self, name) is None}
        engine_unset = {name for name in ("pp_microbatches", "scheduler_policy") if getattr(self.engine, name) is None}
        if engine_unset:
            unset["engine"] = engine_unset
        if not self.arrival.stagger:
            unset["arrival"] = {"stagger"}
        return self.model_dump_json(exclude=unset or None)

    @cached_property
    def spec_hash(self) -> str:
        return hashlib.sha256(self.spec_json.encode()).hexdigest()[:16]

    @cached_property
    def id(self) -> str:
        """e.g. `llama-3.1-8b.bf16.dp2tp2pp1.i1024-o16384.off.3f2a9c1e` (the tail is the spec hash); a proxy
        cell names its slice after the layout: `….dp2tp2pp1.proxy8.i1024-…`."""
        proxy = "" if self.proxy_layers is None else f".proxy{self.proxy_layers}"
        return (
            f"{self.model}.{self.precision.label}.{self.layout}{proxy}."
            f"i{self.isl.label}-o{self.osl.label}.{self.arrival.label}.{self.spec_hash[:8]}"
        )

    @property
    def build_key(self) -> str:
        """Cells with the same build key share one engine/artefact (DP replicas reuse the same engine)."""
        proxy = "" if self.proxy_layers is None else f".proxy{self.proxy_layers}"
        return f"{self.model}.{self.precision.label}.tp{self.tp}pp{self.pp}ep{self.ep}{proxy}"

    @property
    def group_key(self) -> str:
        """Cells with the same group key run in one job: same model, precision, layout, hardware, backend."""
        return f"{self.model}.{self.precision.label}.{self.layout}.{self.hardware}.{self.backend}"

    def identity(self, gpus_per_node: int) -> dict[str, object]:
        """The identity columns of this cell's result row (see results.schemas.IDENTITY_FIELDS)."""
        layout = self.layout
        return {
            "cell_id": self.id, "spec_hash": self.spec_hash, "model": self.model, "hardware": self.hardware,
            "backend": self.backend, "weight_dtype": self.precision.weights, "kv_dtype": self.precision.kv,
            "layout": str(layout), "dp": self.dp, "tp": self.tp, "pp": self.pp, "ep": self.ep,
            "gpus": layout.gpus, "nodes": layout.nodes(gpus_per_node), "workload": self.workload,
            **length_columns("isl", self.isl.model_dump(), self.isl.label),
            **length_columns("osl", self.osl.model_dump(), self.osl.label),
            "requests": self.requests, "arrival": self.arrival.label, **arrival_columns(self.arrival.model_dump()),
            "max_num_seqs": self.engine.max_num_seqs, "max_num_tokens": self.engine.max_num_tokens,
            "kv_memory_fraction": self.engine.kv_memory_fraction, "kv_block_size": self.engine.kv_block_size,
            "router": self.engine.router, "seed": self.seed, "cell_json": self.spec_json,
            "proxy_layers": self.proxy_layers,
        }

    def model_copy(self, *, update: dict[str, object] | None = None, deep: bool = False) -> Cell:
        """A copy with some fields changed; its id and hash are computed afresh (not copied from this cell)."""
        copied = super().model_copy(update=update, deep=deep)
        for name in ("spec_json", "spec_hash", "id"):
            copied.__dict__.pop(name, None)
        return copied

    @classmethod
    def from_json(cls, text: str) -> "Cell":
        return cls.model_validate_json(text)
