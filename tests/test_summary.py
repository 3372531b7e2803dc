"""summary.md: cells that share a layout and a workload column (an engine knob swept) each get their own row,
named by the knobs that differ, never one row silently standing for several cells."""

from __future__ import annotations

from pathlib import Path

import yaml

from infscale.cli import main


def _summary(tmp_path: Path, engine: dict) -> str:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "name": "sweep", "backend": "sim", "hardware": "h100-sxm", "models": ["llama-3.1-8b"],
        "layouts": ["tp2pp2", "tp4"], "requests": 32, "engine": engine,
        "workloads": [{"name": "w", "isl": 1024, "osl": [1024, 2048]}],
    }))
    assert main(["run", str(config), "--results-root", str(tmp_path / "results")]) == 0
    return (tmp_path / "results" / "sweep" / "summary.md").read_text()


def test_swept_knobs_name_their_rows(tmp_path):
    text = _summary(tmp_path, {"pp_microbatches": [1, 0], "max_num_seqs": [16, 128]})
    rows = [line for line in text.splitlines() if line.startswith("| dp1")]
    # tp2pp2: 2 × 2 variants; tp4: pp_microbatches means nothing at pp=1, so only max_num_seqs tells them apart
    assert [r.split(" |")[0] for r in rows] == [
        "| dp1tp2pp2 (max_num_seqs=16, pp_microbatches=1)", "| dp1tp2pp2 (max_num_seqs=16, pp_microbatches=0)",
        "| dp1tp2pp2 (max_num_seqs=128, pp_microbatches=1)", "| dp1tp2pp2 (max_num_seqs=128, pp_microbatches=0)",
        "| dp1tp4pp1 (max_num_seqs=16)", "| dp1tp4pp1 (max_num_seqs=128)",
    ]
    assert all(r.count("|") == 4 and "—" not in r for r in rows)  # every row has both OSL columns


def test_a_campaign_without_sweeps_keeps_plain_layout_rows(tmp_path):
    text = _summary(tmp_path, {"pp_microbatches": 0})
    assert [line.split(" |")[0] for line in text.splitlines() if line.startswith("| dp1")] == [
        "| dp1tp2pp2", "| dp1tp4pp1"]
