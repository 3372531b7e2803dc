"""docs/results.md is true: its polars, pandas and duckdb examples run against a demo-like campaign and give what
they say, every column of the schema is documented, and the columns are typed (`pl.col("osl") > 4096` works)."""

from __future__ import annotations

import re
from pathlib import Path

import polars as pl
import pytest

from infscale.cli import main
from infscale.results.schemas import CELL_SCHEMA, SCHEMA_VERSION, SUMMARY_COLUMNS
from infscale.results.tables import read_cells, read_requests, read_series, read_telemetry

DOC = Path(__file__).resolve().parents[1] / "docs" / "results.md"


def python_blocks() -> dict[str, str]:
    """The ```python blocks of docs/results.md, by the heading above each."""
    text = DOC.read_text()
    blocks = {}
    for heading, body in re.findall(r"^## (.+?)\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M):
        for code in re.findall(r"```python\n(.*?)```", body, flags=re.S):
            blocks[heading.strip()] = code
    return blocks


@pytest.fixture(scope="module")
def demo(sim_results, tmp_path_factory) -> Path:
    """A folder where `results/demo` is the sim campaign's results, exported as the docs say."""
    config, results = sim_results
    assert main(["export", str(config), "--results-root", str(results)]) == 0
    here = tmp_path_factory.mktemp("docs")
    (here / "results").mkdir()
    (here / "results" / "demo").symlink_to(results / "figs")
    return here


def run_block(name: str, folder: Path, monkeypatch) -> dict:
    monkeypatch.chdir(folder)
    namespace: dict = {}
    exec(compile(python_blocks()[name], f"docs/results.md ({name})", "exec"), namespace)  # noqa: S102
    return namespace


def test_the_blocks_are_there() -> None:
    assert set(python_blocks()) == {"polars", "pandas", "duckdb"}
    assert f"results schema {SCHEMA_VERSION}" in DOC.read_text()


def test_polars_example(demo, monkeypatch) -> None:
    ns = run_block("polars", demo, monkeypatch)
    cells, long_outputs, best, requests, tail = (ns[k] for k in ("cells", "long_outputs", "best", "requests", "tail"))
    assert cells.schema["osl"] == pl.Int64 and cells.schema["isl"] == pl.Int64
    assert long_outputs.height and long_outputs["osl"].min() > 4096
    # one row per model × GPU count × OSL, the best per-GPU throughput of that group
    assert best.height == long_outputs.select("model", "gpus", "osl").n_unique()
    for row in best.iter_rows(named=True):
        group = long_outputs.filter((pl.col("model") == row["model"]) & (pl.col("gpus") == row["gpus"])
                                    & (pl.col("osl") == row["osl"]))
        assert row["output_tok_s_per_gpu"] == group["output_tok_s_per_gpu"].max()
    ok = cells.filter(pl.col("status") == "ok")
    assert requests.height == ok["requests"].sum() and requests["ttft_ms"].min() >= 0
    assert tail.height == ok.height and tail["ttft_ms_p99"].is_not_null().all()


def test_pandas_example(demo, monkeypatch) -> None:
    ns = run_block("pandas", demo, monkeypatch)
    ok, per_gpu, requests = ns["ok"], ns["per_gpu"], ns["requests"]
    assert len(ok) and (ok["osl"] > 4096).all() and str(ok["osl"].dtype) == "int64"
    assert set(per_gpu.columns) == set(ok["osl"]) and per_gpu.notna().sum().sum() == len(ok)
    assert len(requests) == read_requests(demo / "results" / "demo").height


def test_duckdb_example(demo, monkeypatch) -> None:
    ns = run_block("duckdb", demo, monkeypatch)
    top, ttft = ns["top"], ns["ttft"]
    cells = read_cells(demo / "results" / "demo")
    expected = cells.filter((pl.col("status") == "ok") & (pl.col("osl") > 4096)).sort(
        "output_tok_s_per_gpu", descending=True).head(5)
    assert top["output_tok_s_per_gpu"].to_list() == expected["output_tok_s_per_gpu"].to_list()
    # every measured cell once: the glob of cells/ counts no cell twice
    assert ttft.height == cells.filter(pl.col("status") == "ok").height
    flat = read_requests(demo / "results" / "demo").group_by("cell_id").agg(
        ((pl.col("first_token_s") - pl.col("arrival_s")).quantile(0.99, "linear")).alias("p99"))
    joined = ttft.join(flat, on="cell_id")
    assert joined.height == ttft.height and ((joined["ttft_p99_s"] - joined["p99"]).abs() < 1e-9).all()


def test_every_column_is_documented() -> None:
    text = DOC.read_text()
    nested = [f.name for column in ("requests_detail", "series", "telemetry")
              for f in CELL_SCHEMA.field(column).type.value_type]
    missing = [c for c in [*SUMMARY_COLUMNS, *nested] if f"`{c}`" not in text and f"`{c}_*`" not in text
               and not re.search(rf"`{re.escape(c.rsplit('_', 1)[0])}_\*`", text)]
    missing = [c for c in missing if not (c.startswith("isl") and f"`{c.replace('isl', 'osl', 1)}`" in text)]
    assert not missing, missing


def test_flat_tables_have_one_row_per_entry(demo) -> None:
    results = demo / "results" / "demo"
    ok = read_cells(results).filter(pl.col("status") == "ok")
    series = read_series(results)
    assert series.height and set(series["cell_id"]) == set(ok["cell_id"])
    assert {"replica", "time_s", "kv_occupancy"} <= set(series.columns)
    telemetry = read_telemetry(results)  # the sim measures no GPU: an empty table with the columns
    assert telemetry.height == 0 and {"cell_id", "power_w", "sm_util"} <= set(telemetry.columns)
    exported = pl.read_parquet(results / "export" / "requests.parquet")
    assert exported.height == read_requests(results).height
