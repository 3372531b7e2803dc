"""summary.md: every layout and GPU count measured, grouped by GPU count, per-GPU throughput, the best of each GPU
count marked, and a legend for the column headers."""

from __future__ import annotations

import re

import polars as pl

from infscale.results.tables import read_cells


def table_rows(text: str, model: str) -> list[list[str]]:
    """The rows of a model's table, as lists of cells (GPUs, layout, workloads …)."""
    section = text.split(f"## {model}: ", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| GPUs")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_every_gpu_count_and_layout_grouped_with_the_best_per_group(sim_results) -> None:
    config, results = sim_results
    text = (results / "figs" / "summary.md").read_text()
    cells = read_cells(results / "figs").filter(pl.col("status") == "ok")
    for model in ("llama-3.1-8b", "qwen2.5-32b"):
        rows = table_rows(text, model)
        measured = cells.filter(pl.col("model") == model)
        # one row per layout measured, every GPU count (not only the largest of a node), in GPU-count order
        assert sorted(r[1] for r in rows) == sorted(measured.get_column("layout").unique().to_list())
        gpus = [int(r[0]) for r in rows]
        assert gpus == sorted(gpus) and set(gpus) == set(measured.get_column("gpus").to_list())
        header = next(line for line in text.split(f"## {model}: ", 1)[1].splitlines() if line.startswith("| GPUs"))
        columns = [c.strip() for c in header.strip("|").split("|")][2:]
        for index, column in enumerate(columns, start=2):
            for count in set(gpus):
                group = [r for r in rows if int(r[0]) == count and r[index] != "—"]
                bold = [r for r in group if r[index].startswith("**")]
                if len(group) < 2:
                    assert not bold, (model, count, column)  # one layout is no choice
                    continue
                values = [float(r[index].strip("*").replace(",", "")) for r in group]
                assert bold and all(float(r[index].strip("*").replace(",", "")) == max(values) for r in bold)
                # the number is the per-GPU throughput of that cell
                layout = group[0][1]
                workload, lengths, arrival = column.split(" ")
                isl, osl = lengths.split("/")
                cell = measured.filter((pl.col("layout") == layout) & (pl.col("workload") == workload)
                                       & (pl.col("isl_label") == isl) & (pl.col("osl_label") == osl)
                                       & (pl.col("arrival") == arrival))
                assert values[0] == round(cell.get_column("output_tok_s_per_gpu")[0])


def test_the_legend_explains_the_headers(sim_results) -> None:
    config, results = sim_results
    text = (results / "figs" / "summary.md").read_text()
    assert "`off` offline" in text and "`c256`" in text and "lognormal" in text
    assert "output tokens/s per GPU" in text and re.search(r"\*\*bold\*\* is the best layout of its GPU count", text)
