"""The cell: immutable, hashable, JSON round trip, and an id that never drifts between versions."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from infscale.campaign.cell import Cell
from infscale.campaign.layout import Layout
from infscale.campaign.spec import Arrival, EngineKnobs, LengthDist, Precision


def make_cell(**changes: object) -> Cell:
    fields: dict[str, object] = {
        "model": "llama-3.1-8b", "hardware": "h200-sxm", "backend": "sim", "precision": Precision(),
        "dp": 2, "tp": 2, "pp": 1, "ep": 1, "workload": "reasoning",
        "isl": LengthDist.fixed(1024), "osl": LengthDist.fixed(16384), "requests": 512,
        "arrival": Arrival(), "engine": EngineKnobs(kv_memory_fraction=0.9), "seed": 0,
    }
    fields.update(changes)
    return Cell(**fields)


# Frozen on purpose: cell ids name result files on disk; a change here orphans every measured result.
FROZEN_HASH = "472d84b7bdfbbcb0"
FROZEN_ID = f"llama-3.1-8b.bf16.dp2tp2pp1.i1024-o16384.off.{FROZEN_HASH[:8]}"


def test_spec_hash_is_stable_across_versions():
    cell = make_cell()
    assert cell.spec_hash == FROZEN_HASH
    assert cell.id == FROZEN_ID


def test_id_format():
    cell = make_cell()
    assert re.fullmatch(r"llama-3\.1-8b\.bf16\.dp2tp2pp1\.i1024-o16384\.off\.[0-9a-f]{8}", cell.id)
    assert cell.id.endswith(cell.spec_hash[:8])
    assert len(cell.spec_hash) == 16


@pytest.mark.parametrize(("changes", "expected_prefix"), [
    ({"precision": Precision(weights="fp8", kv="fp8"), "tp": 8, "dp": 1},
     "llama-3.1-8b.fp8-kvfp8.dp1tp8pp1.i1024-o16384.off."),
    ({"model": "qwen3-30b-a3b", "tp": 4, "ep": 4, "dp": 1}, "qwen3-30b-a3b.bf16.dp1tp4pp1ep4.i1024-o16384.off."),
    ({"arrival": Arrival(mode="concurrency", concurrency=256)}, "llama-3.1-8b.bf16.dp2tp2pp1.i1024-o16384.c256."),
    ({"arrival": Arrival(mode="poisson", rate=2.5)}, "llama-3.1-8b.bf16.dp2tp2pp1.i1024-o16384.r2.5."),
    ({"osl": LengthDist(dist="lognormal", median=6000, sigma=0.9, cap=32768)},
     "llama-3.1-8b.bf16.dp2tp2pp1.i1024-oLN6000s0.9c32768.off."),
    ({"osl": LengthDist(dist="normal", mean=4000, std=1000, cap=8000)},
     "llama-3.1-8b.bf16.dp2tp2pp1.i1024-oN4000s1000c8000.off."),
])
def test_id_reads_as_the_cell(changes, expected_prefix):
    cell = make_cell(**changes)
    assert cell.id.startswith(expected_prefix), cell.id
    assert re.fullmatch(r"[0-9a-f]{8}", cell.id.removeprefix(expected_prefix)), cell.id


def test_json_round_trip():
    cell = make_cell(osl=LengthDist(dist="lognormal", median=6000, sigma=0.9, cap=32768),
                     arrival=Arrival(mode="concurrency", concurrency=64), ep=1)
    again = Cell.from_json(cell.spec_json)
    assert again == cell
    assert again.spec_hash == cell.spec_hash
    assert again.id == cell.id
    assert again.spec_json == cell.spec_json
    assert hash(again) == hash(cell)


def test_from_json_rejects_unknown_fields():
    text = make_cell().spec_json.replace('"seed":0', '"seed":0,"colour":"red"')
    with pytest.raises(ValidationError):
        Cell.from_json(text)


ALTERED_FIELDS = {
    "model": "qwen3-8b",
    "hardware": "h100-sxm",
    "backend": "torch",
    "precision": Precision(weights="fp8"),
    "dp": 4,
    "tp": 1,
    "pp": 2,
    "ep": 2,
    "workload": "other",
    "isl": LengthDist.fixed(256),
    "osl": LengthDist.fixed(16385),
    "requests": 513,
    "arrival": Arrival(mode="concurrency", concurrency=32),
    "engine": EngineKnobs(kv_memory_fraction=0.9, max_num_seqs=1024),
    "seed": 1,
    "proxy_layers": 8,
    "hardware_profile": "h100-sxm.torch.2026-11-27c@0123456789ab",
    "prediction_engine": "trtllm/aiconfigurator-core==0.12.0",
}


def test_every_field_is_covered():
    assert set(ALTERED_FIELDS) == set(Cell.model_fields)


@pytest.mark.parametrize("field", sorted(ALTERED_FIELDS))
def test_any_field_change_changes_the_hash(field):
    base = make_cell()
    changed = make_cell(**{field: ALTERED_FIELDS[field]})
    assert changed != base
    assert changed.spec_hash != base.spec_hash
    assert changed.id != base.id


@pytest.mark.parametrize("field", ["seed", "requests", "workload", "engine"])
def test_model_copy_recomputes_the_id(field):
    """A copy with a changed field must not carry the original's cached hash and id."""
    base = make_cell()
    _ = base.id, base.spec_hash, base.spec_json        # fill the caches first
    copied = base.model_copy(update={field: ALTERED_FIELDS[field]})
    fresh = make_cell(**{field: ALTERED_FIELDS[field]})
    assert copied.spec_json == fresh.spec_json
    assert copied.spec_hash == fresh.spec_hash
    assert copied.id == fresh.id != base.id


def test_equal_cells_hash_equal_and_work_as_set_and_dict_keys():
    a, b = make_cell(), make_cell()
    assert a is not b and a == b and hash(a) == hash(b)
    other = make_cell(seed=7)
    cells = {a, b, other}
    assert len(cells) == 2
    table = {a: "first"}
    table[b] = "second"
    assert table == {a: "second"}
    assert other not in table


def test_cell_is_immutable():
    cell = make_cell()
    with pytest.raises(ValidationError):
        cell.dp = 4
    with pytest.raises(ValidationError):
        cell.model = "qwen3-8b"
    assert cell.dp == 2 and cell.id == FROZEN_ID


def test_nested_parts_are_immutable():
    cell = make_cell()
    with pytest.raises(ValidationError):
        cell.engine.max_num_seqs = 1  # type: ignore[misc]
    with pytest.raises(ValidationError):
        cell.osl.value = 1  # type: ignore[misc]


@pytest.mark.parametrize("field", ["dp", "tp", "pp", "ep", "requests"])
def test_degrees_and_requests_must_be_positive(field):
    with pytest.raises(ValidationError):
        make_cell(**{field: 0})


def test_layout_and_keys():
    cell = make_cell(model="qwen3-30b-a3b", dp=2, tp=4, pp=1, ep=4)
    assert cell.layout == Layout(dp=2, tp=4, pp=1, ep=4)
    assert cell.build_key == "qwen3-30b-a3b.bf16.tp4pp1ep4"      # DP replicas share one engine
    assert cell.group_key == "qwen3-30b-a3b.bf16.dp2tp4pp1ep4.h200-sxm.sim"
    assert make_cell(dp=1).build_key == make_cell(dp=4).build_key
    assert make_cell(dp=1).group_key != make_cell(dp=4).group_key


def test_identity_row():
    cell = make_cell(dp=4, tp=4)
    row = cell.identity(gpus_per_node=8)
    assert row["cell_id"] == cell.id and row["spec_hash"] == cell.spec_hash
    assert (row["layout"], row["gpus"], row["nodes"]) == ("dp4tp4pp1", 16, 2)
    assert (row["isl_max"], row["osl_max"], row["arrival"]) == (1024, 16384, "off")
    assert Cell.from_json(row["cell_json"]) == cell


def test_pp_microbatches_is_part_of_a_pp_cell_and_dropped_without_pp():
    plain = make_cell(dp=1, tp=2, pp=2)
    pipelined = make_cell(dp=1, tp=2, pp=2, engine=EngineKnobs(kv_memory_fraction=0.9, pp_microbatches=0))
    assert pipelined.spec_hash != plain.spec_hash and '"pp_microbatches":0' in pipelined.spec_json
    assert "pp_microbatches" not in plain.spec_json  # unset: the hash it had before the knob existed
    assert Cell.from_json(pipelined.spec_json) == pipelined
    # at pp = 1 there is nothing to split: the knob is left out and the cell is the one it always was
    no_pp = make_cell(engine=EngineKnobs(kv_memory_fraction=0.9, pp_microbatches=2))
    assert no_pp.engine.pp_microbatches is None and no_pp.spec_hash == FROZEN_HASH


def test_scheduler_policy_enters_the_hash_only_when_set():
    plain = make_cell()
    assert "scheduler_policy" not in plain.spec_json and plain.spec_hash == FROZEN_HASH
    no_evict = make_cell(engine=EngineKnobs(kv_memory_fraction=0.9, scheduler_policy="guaranteed_no_evict"))
    assert '"scheduler_policy":"guaranteed_no_evict"' in no_evict.spec_json
    assert no_evict.spec_hash != plain.spec_hash
