"""`infscale recommend`: layouts of a GPU budget ranked by throughput, or by goodput under SLOs; models from the
catalog or a config.json; measured cells replace predictions."""

from __future__ import annotations

import json
import re
from pathlib import Path

import polars as pl

from infscale.analysis.recommend import _label, budget_campaign, format_ms, recommend, why
from infscale.cli import main

TINY = Path(__file__).resolve().parent / "data" / "hf" / "tiny-llama.json"


def test_ranked_by_throughput_with_a_reason(capsys) -> None:
    assert main(["recommend", "--model", "qwen2.5-32b", "--gpus", "8", "--hardware", "h200-sxm", "--isl", "1024",
                 "--osl", "16384"]) == 0
    out = capsys.readouterr().out
    assert "ranked by output throughput" in out and "why: " in out and "dp8tp1pp1" in out
    options = recommend(budget_campaign("qwen2.5-32b", 8, "h200-sxm", 1024, 16384, "auto"))
    throughputs = [o.output_tok_s for o in options if o.feasible]
    assert throughputs == sorted(throughputs, reverse=True) and len(options) == 10
    assert {o.dp * o.tp * o.pp for o in options} == {8} and {o.source for o in options} == {"predicted"}
    line = why(options, 16384)
    assert "highest output throughput" in line and "of its throughput" in line
    assert "KV capacity of DP8" in line and "sequences per replica at OSL 16384" in line
    runner_share = int(line.split(" at ")[1].split("%")[0])
    assert runner_share <= 100  # ranked by throughput: the runner-up never beats the winner on it


def test_slos_rank_by_goodput() -> None:
    campaign = budget_campaign("qwen2.5-32b", 8, "h200-sxm", 1024, 4096, 256)
    free = recommend(campaign)
    tpot_limit = sorted(o.tpot_ms_p99 for o in free)[len(free) // 2]  # half the layouts meet it at p99
    ranked = recommend(campaign, tpot_slo_ms=tpot_limit)
    meeting = [o for o in ranked if o.slo_met_share == 1.0]
    assert meeting and all(o.tpot_ms_p99 <= tpot_limit for o in meeting)
    assert ranked[0].goodput_tok_s == max(o.goodput_tok_s for o in ranked)
    failing = [o for o in ranked if o.tpot_ms_p99 > tpot_limit]  # over the SLO at p99: ≥ 1 % of requests
    assert failing and all(o.goodput_tok_s < o.output_tok_s for o in failing)  # requests over the SLO don't count
    goodputs = [o.goodput_tok_s for o in ranked]
    assert goodputs == sorted(goodputs, reverse=True)
    # the reason speaks of the metric it ranked on, naming the SLO, and the runner-up as a share of it
    line = why(ranked, 4096, tpot_slo_ms=tpot_limit)
    assert line.startswith(f"{_label(ranked[0])}: highest goodput under the SLOs (TPOT p99 ≤ {tpot_limit:,g} ms)")
    assert f"next: {_label(ranked[1])} at {ranked[1].goodput_tok_s / ranked[0].goodput_tok_s:.0%} of its goodput" \
        in line


def test_long_times_are_printed_in_seconds(capsys) -> None:
    assert main(["recommend", "--model", "qwen2.5-32b", "--gpus", "8", "--hardware", "h200-sxm", "--isl", "1024",
                 "--osl", "16384", "--tpot-p99-ms", "40", "--ttft-p99-ms", "2000"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\d,\d{3}\.\d s", out) and not re.search(r"\d{1,3},\d{3},\d{3}", out)  # 1,337.0 s
    assert "highest goodput under the SLOs (TTFT p99 ≤ 2,000 ms, TPOT p99 ≤ 40 ms)" in out.replace("\n", " ")
    assert format_ms(1_336_985) == "1,337.0 s" and format_ms(9_999) == "9,999 ms" and format_ms(29.94) == "29.9 ms"


def test_model_from_config_json_and_measured_cells(tmp_path: Path, capsys) -> None:
    assert main(["recommend", "--model", str(TINY), "--gpus", "2", "--hardware", "h100-sxm", "--isl", "64",
                 "--osl", "64", "--requests", "32", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {o["layout"] for o in result["options"]} == {"dp2tp1pp1", "dp1tp2pp1", "dp1tp1pp2"}
    # a measured cell replaces its prediction
    campaign = budget_campaign(str(TINY), 2, "h100-sxm", 64, 64, 32)
    predicted = recommend(campaign)
    target = predicted[-1]
    model = next(iter(campaign.models.values())).name
    measured = pl.DataFrame([{"status": "ok", "model": model, "hardware": "h100-sxm", "layout": target.layout,
                              "isl_max": 64, "osl_max": 64, "predicted": False, "output_tok_s": 1e9,
                              "output_tok_s_per_gpu": 5e8, "ttft_ms_p99": 1.0, "tpot_ms_p99": 1.0}])
    ranked = recommend(campaign, measured=measured)
    assert ranked[0].layout == target.layout and ranked[0].source == "measured"
    assert main(["recommend", "--model", "llama-3.1-8b", "--gpus", "0", "--isl", "1", "--osl", "1"]) == 2
