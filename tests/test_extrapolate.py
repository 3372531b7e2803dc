"""Predictions with error bands for unmeasured cells: bands from validation residuals, every row labelled as a
prediction and with how it lies beyond the validation cells, recorded predictions never silently replaced."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from infscale.analysis.extrapolate import MIN_CELLS, ErrorBand, ExtrapolationError, ValidationScope, error_bands
from infscale.campaign import load_campaign
from infscale.campaign.plan import plan_campaign
from infscale.cli import main

ROOT = Path(__file__).resolve().parents[1]
VALIDATION = ROOT / "results" / "reference" / "gpu-node" / "validation.h100-sxm.torch.2026-11-27b.parquet"
PROFILE = ROOT / "results" / "reference" / "profiles" / "h100-sxm.torch.2026-11-27b.yaml"


def _validation(errors: list[float], in_medians: list[bool] | None = None) -> pl.DataFrame:
    n = len(errors)
    return pl.DataFrame({
        "cell_id": [f"m.bf16.dp{i + 1}tp1pp1.i1-o1.off.x" for i in range(n)], "model": ["m"] * n,
        "layout": [f"dp{i + 1}tp1pp1" for i in range(n)], "osl": [1024 * (i + 1) for i in range(n)],
        "in_medians": in_medians or [True] * n,
        "output_tok_s_error": errors, "tpot_ms_p50_error": errors, "ttft_ms_p50_error": errors})


def test_bands_are_the_10_to_90_percent_range_of_the_in_median_errors():
    errors = [-0.2, -0.1, 0.0, 0.05, 0.1, 0.3, 5.0]
    bands = error_bands(_validation(errors, [True] * 6 + [False]))  # the excluded (eager) cell's +500 % is ignored
    low, high = np.quantile(errors[:6], [0.1, 0.9])
    band = bands["output_tok_s"]
    assert (band.low, band.high, band.cells) == (pytest.approx(low), pytest.approx(high), 6)
    # a model that over-predicts by up to +20 % and under-predicts by up to −10 % stands for p/1.2 … p/0.9
    assert ErrorBand("x", -0.1, 0.2, 9).bounds(120.0) == (pytest.approx(100.0), pytest.approx(133.333, rel=1e-4))


def test_bands_need_enough_cells_and_the_error_columns():
    with pytest.raises(ExtrapolationError, match=f"at least {MIN_CELLS}"):
        error_bands(_validation([0.1] * (MIN_CELLS - 1)))
    with pytest.raises(ExtrapolationError, match="ttft_ms_p50_error"):
        error_bands(_validation([0.1] * MIN_CELLS).drop("ttft_ms_p50_error"))


def test_scope_names_what_the_validation_did_not_cover():
    scope = ValidationScope.of(_validation([0.1] * 5))
    assert scope.beyond("m", "bf16", 5, 5120) is None
    assert scope.beyond("other", "fp8", 8, 16384) == ("model not validated; fp8 not validated; 8 GPUs > 5; "
                                                      "OSL 16384 > 5120")


def test_scope_compares_osl_as_numbers_as_validate_writes_them():
    """`infscale validate` writes OSL as text (a label, e.g. "1024"): "16384" must still count above "4096"."""
    committed = pl.read_parquet(ROOT / "results" / "reference" / "gpu-node"
                                / "validation.h100-sxm.torch.2026-11-27c.parquet")
    assert committed.schema["osl"] == pl.String
    assert ValidationScope.of(committed).max_osl == 16384
    assert ValidationScope.of(committed).beyond("llama-3.1-8b", "bf16", 4, 16384) is None


def test_extrapolate_the_8_gpu_node_from_the_4_gpu_validation(tmp_path: Path, capsys):
    out = tmp_path / "pred"
    args = ["extrapolate", str(ROOT / "config" / "h100-node.yaml"), "--validation", str(VALIDATION),
            "--profile", str(PROFILE), "--out", str(out)]
    assert main(args) == 0
    table = pl.read_parquet(out / "predictions.parquet")
    feasible = [p for p in plan_campaign(load_campaign(ROOT / "config" / "h100-node.yaml")) if p.feasible]
    assert table.height == len(feasible) and table["predicted"].all()
    assert set(table["profile"]) == {"h100-sxm.torch.2026-11-27b"}
    rows = table.filter(pl.col("output_tok_s").is_not_null())
    bands = error_bands(pl.read_parquet(VALIDATION))
    for metric, band in bands.items():
        assert band.low < 0 < band.high  # the committed errors go both ways, so each band holds its prediction
        assert ((rows[f"{metric}_low"] < rows[metric]) & (rows[metric] < rows[f"{metric}_high"])).all()
    assert table["beyond_validation"].str.contains("8 GPUs > 4").all()  # every cell: the validation had 4 GPUs
    assert table.filter(pl.col("model") == "llama-3.1-405b")["beyond_validation"].str.contains("fp8").all()
    text = (out / "predictions.md").read_text()
    assert "(not measurements)" in text and "llama-3.3-70b" in text
    # recorded predictions are kept unless the user asks to replace them
    before = (out / "predictions.parquet").read_bytes()
    assert main(args) == 2 and "--replace" in capsys.readouterr().err
    assert (out / "predictions.parquet").read_bytes() == before
    assert main(["extrapolate", str(ROOT / "config" / "h100-node.yaml"), "--validation", str(tmp_path / "none"),
                 "--out", str(tmp_path / "other")]) == 2
    assert "is not a file" in capsys.readouterr().err
