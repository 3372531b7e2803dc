"""The committed GPU measurements stay readable and attached to their campaign file.

If `config/gpu-node.yaml` changed in a way that changes its cells' spec hashes, the committed cell files would no
longer count as measured for it: this test says so before anything is silently orphaned.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from infscale.analysis.merge import merge_cells
from infscale.campaign import load_campaign
from infscale.campaign.plan import plan_campaign

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "reference" / "gpu-node"
MEASURED = {"gpu-node": 29, "gpu-node-pipelined": 7}  # cells committed per campaign


@pytest.mark.parametrize("name", sorted(MEASURED))
def test_gpu_reference_results_merge_back(name: str) -> None:
    results = ROOT / "results" / "reference" / name
    campaign = load_campaign(ROOT / "config" / f"{name}.yaml")
    planned = plan_campaign(campaign)
    merged = merge_cells(planned, results, campaign.hardware.gpus_per_node)
    committed = pl.read_parquet(results / "cells.parquet")
    ok = merged.filter(pl.col("status") == "ok")
    assert ok.height == len(list((results / "cells").glob("*.parquet"))) == MEASURED[name]
    assert set(ok["engine_path"]) == {"cuda_graphs"}  # the eager PP cells live under superseded/, not merged
    assert not ok["predicted"].any() and set(ok["gpu_name"]) == {"NVIDIA H100 80GB HBM3"}
    assert ok["energy_per_output_token_j"].is_not_null().all()
    assert (ok["output_tokens"] == 64 * ok["osl_max"]).all()  # every request produced its OSL tokens
    pipelined = ok["cell_json"].str.contains('"pp_microbatches":0')
    assert pipelined.all() if name.endswith("pipelined") else not pipelined.any()
    assert_frame_equal(merged, committed)


def test_validate_predicts_every_measured_cell(tmp_path: Path) -> None:
    """`infscale validate` on a copy of the committed results: one row per measured cell, errors computed against
    the measurement, eager-path cells kept out of the medians, files written next to the results."""
    import shutil

    from infscale.cli import main

    root = tmp_path / "results"
    shutil.copytree(RESULTS / "cells", root / "gpu-node" / "cells")
    assert main(["validate", str(ROOT / "config" / "gpu-node.yaml"), "--results-root", str(root)]) == 0
    frame = pl.read_parquet(root / "gpu-node" / "validation.parquet")
    # every committed cell ran the CUDA-graph path
    assert frame.height == MEASURED["gpu-node"] and frame["in_medians"].all()
    row = frame.row(0, named=True)
    expected = (row["output_tok_s_predicted"] - row["output_tok_s_measured"]) / row["output_tok_s_measured"]
    assert row["output_tok_s_error"] == pytest.approx(expected) and row["output_tok_s_predicted"] > 0
    text = (root / "gpu-node" / "validation.md").read_text()
    assert f"| output tok/s | {MEASURED['gpu-node']} |" in text and row["cell_id"] in frame["cell_id"].to_list()
