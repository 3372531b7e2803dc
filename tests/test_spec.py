"""Campaign files: every mistake is one clear line naming the file, the key, the bad value and what is allowed.

Each malformed spec is written as a real YAML file and loaded with `load_campaign`, as a user would.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from infscale.campaign.layout import Layout
from infscale.campaign.spec import LayoutSweep, SpecError, load_campaign

REPO = Path(__file__).resolve().parents[1]
HF_DATA = REPO / "tests" / "data" / "hf"

BASE: dict[str, Any] = {
    "name": "t",
    "hardware": "h200-sxm",
    "models": ["llama-3.1-8b"],
    "layouts": ["dp1", "tp2"],
    "workloads": [{"name": "reasoning", "isl": 1024, "osl": [1024, 8192]}],
}


def write(tmp_path: Path, content: dict[str, Any] | str, name: str = "campaign.yaml") -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False))
    return path


def first_line_of_error(path: Path) -> str:
    with pytest.raises(SpecError) as caught:
        load_campaign(path)
    lines = caught.value.lines
    assert lines, "SpecError without any line"
    assert all(line.startswith(f"{path}: ") for line in lines), lines
    assert all("\n" not in line for line in lines), lines
    return lines[0]


# ------------------------------------------------------------------------------------------- mutations


def put(*keys: Any, value: Any) -> Callable[[dict], None]:
    """Set raw[keys...] = value."""
    def mutate(raw: dict) -> None:
        target = raw
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
    return mutate


def drop(*keys: Any) -> Callable[[dict], None]:
    def mutate(raw: dict) -> None:
        target = raw
        for key in keys[:-1]:
            target = target[key]
        del target[keys[-1]]
    return mutate


def both(*mutations: Callable[[dict], None]) -> Callable[[dict], None]:
    def mutate(raw: dict) -> None:
        for m in mutations:
            m(raw)
    return mutate


# (id, mutation of BASE, key path the first line must name, substrings the line must contain)
MALFORMED: list[tuple[str, Callable[[dict], None], str, list[str]]] = [
    # --- keys
    ("typo-top-level-key", both(drop("workloads"), put("worklods", value=BASE["workloads"])),
     "worklods", ["unknown key", "did you mean 'workloads'", "allowed keys:", "models", "hardware", "engine"]),
    ("typo-workload-key", put("workloads", 0, "osll", value=[1024]),
     "workloads[0].osll", ["unknown key", "did you mean 'osl'", "allowed keys:", "isl", "pairs", "arrival"]),
    ("typo-engine-key", put("engine", value={"max_num_seq": 256}),
     "engine.max_num_seq", ["did you mean 'max_num_seqs'", "kv_block_size", "router"]),
    ("typo-hardware-key", put("hardware", value={"name": "h200-sxm", "node": 2}),
     "hardware.node", ["did you mean 'nodes'", "allowed keys: name, nodes"]),
    ("typo-layout-sweep-key", put("layouts", value={"gpus": [1, 2], "maxpp": 2}),
     "layouts.maxpp", ["did you mean 'max_pp'", "expert_parallel", "gpus"]),
    ("typo-distribution-key",
     put("workloads", 0, "osl", value={"dist": "lognormal", "median": 6000, "sigma": 0.9, "cap": 32768, "capp": 1}),
     "workloads[0].osl[0].capp", ["did you mean 'cap'", "median", "sigma"]),
    # --- catalog names
    ("unknown-model", put("models", value=["llama-3.1-8b", "gpt-5"]),
     "models[1].name", ["'gpt-5'", "Known:", "llama-3.1-8b", "qwen2.5-32b", "deepseek-r1"]),
    ("model-name-typo", put("models", value=["llama-3.1-8x"]),
     "models[0].name", ["'llama-3.1-8x'", "Did you mean 'llama-3.1-8b'"]),
    ("unknown-hardware", put("hardware", value="h300-sxm"),
     "hardware.name", ["'h300-sxm'", "Known:", "h100-sxm", "h200-sxm"]),
    ("unknown-backend", put("backend", value="vllm"),
     "backend", ["'vllm'", "'sim'", "'torch'", "'trtllm'"]),
    ("duplicate-model", put("models", value=["llama-3.1-8b", "llama-3.1-8b"]),
     "models[1].name", ["'llama-3.1-8b'", "listed twice"]),
    # --- layouts
    ("tp-not-dividing-heads", both(put("models", value=["qwen2.5-32b"]), put("layouts", value=["dp2", "tp3"])),
     "layouts[1]", ["'tp3'", "qwen2.5-32b", "40 attention heads", "allowed tp: 1, 2, 4, 5, 8, 10, 20, 40"]),
    ("tp-not-dividing-heads-in-model-entry",
     both(put("hardware", value={"name": "h200-sxm", "nodes": 2}),
          put("models", value=["llama-3.1-8b", {"name": "qwen2.5-32b", "layouts": ["tp16"]}])),
     "models[1].layouts[0]", ["'tp16'", "40 attention heads", "allowed tp:"]),
    ("layout-needs-more-gpus", put("layouts", value=["dp16"]),
     "layouts[0]", ["'dp16'", "needs 16 GPUs", "the target has 8", "1 node(s) × 8 h200-sxm"]),
    ("layout-needs-more-nodes", both(put("hardware", value={"name": "h200-sxm", "nodes": 2}),
                                     put("layouts", value=["tp8pp4"])),
     "layouts[0]", ["'tp8pp4'", "needs 32 GPUs", "the target has 16", "2 node(s)"]),
    ("bad-layout-string", put("layouts", value=["tp2dp4"]),
     "layouts[0]", ["'tp2dp4' is not a layout", "'dp8'", "'dp2tp4'", "'tp8ep8'"]),
    ("layout-degree-zero", put("layouts", value=["dp0"]),
     "layouts[0]", ["'dp0'", "at least 1"]),
    ("ep-on-dense-model", put("layouts", value=["tp2ep2"]),
     "layouts[0]", ["'tp2ep2'", "ep=2", "mixture-of-experts", "llama-3.1-8b is dense"]),
    ("ep-not-dividing-tp", both(put("models", value=["qwen3-30b-a3b"]), put("layouts", value=["tp4ep8"])),
     "layouts[0]", ["'tp4ep8'", "ep=8 must divide tp=4"]),
    # --- lengths
    ("isl-plus-osl-beyond-context", put("workloads", 0, "osl", value=[1024, 131072]),
     "workloads[0].osl[1]", ["1024+131072", "132096", "llama-3.1-8b", "context of 131072"]),
    ("pair-beyond-context", both(put("models", value=["qwen3-32b"]),
                                 put("workloads", value=[{"name": "long", "pairs": [[1024, 1024], [8192, 40000]]}])),
     "workloads[0].pairs[1]", ["8192+40000", "qwen3-32b", "context of 40960"]),
    ("negative-osl", put("workloads", 0, "osl", value=[1024, -5]),
     "workloads[0].osl[1]", ["(got -5)", "> 0"]),
    ("zero-osl", put("workloads", 0, "osl", value=0),
     "workloads[0].osl[0]", ["(got 0)", "> 0"]),
    ("non-integer-osl", put("workloads", 0, "osl", value=[1.5]),
     "workloads[0].osl[0]", ["(got 1.5)", "whole number", "dist: fixed|normal|lognormal"]),
    ("non-integer-isl", put("workloads", 0, "isl", value="long"),
     "workloads[0].isl", ["(got 'long')", "whole number"]),
    ("lognormal-without-cap", put("workloads", 0, "osl", value={"dist": "lognormal", "median": 6000, "sigma": 0.9}),
     "workloads[0].osl[0]", ["lognormal", "needs cap"]),
    ("normal-without-std", put("workloads", 0, "osl", value=[{"dist": "normal", "mean": 4000, "cap": 8000}]),
     "workloads[0].osl[0]", ["normal", "needs std"]),
    ("unknown-distribution", put("workloads", 0, "osl", value={"dist": "zipf", "value": 3}),
     "workloads[0].osl[0].dist", ["'zipf'", "'fixed'", "'normal'", "'lognormal'"]),
    ("pairs-and-isl-osl", put("workloads", 0, "pairs", value=[[2048, 128]]),
     "workloads[0]", ["either 'pairs' or 'isl' + 'osl', not both"]),
    ("missing-isl", drop("workloads", 0, "isl"),
     "workloads[0]", ["needs 'isl' and 'osl'", "pairs"]),
    # --- arrival
    ("concurrency-without-number", put("arrival", value="concurrency"),
     "arrival", ["'concurrency'", "needs 'concurrency: N'"]),
    ("workload-concurrency-without-number", put("workloads", 0, "arrival", value={"mode": "concurrency"}),
     "workloads[0].arrival", ["needs 'concurrency: N'"]),
    ("poisson-without-rate", put("arrival", value={"mode": "poisson"}),
     "arrival", ["'poisson'", "needs 'rate"]),
    ("offline-with-rate", put("arrival", value={"mode": "offline", "rate": 2.5}),
     "arrival", ["'offline'", "neither 'concurrency' nor 'rate'", "rate=2.5"]),
    ("negative-concurrency-in-sweep", put("arrival", value={"mode": "concurrency", "concurrency": [16, -1]}),
     "arrival.concurrency[1]", ["(got -1)", "greater than 0"]),
    ("unknown-arrival-mode", put("arrival", value="burst"),
     "arrival.mode", ["'burst'", "'offline'", "'concurrency'", "'poisson'"]),
    # --- precision
    ("bad-weight-dtype", put("precision", value=["bf16", "fp4"]),
     "precision[1].weights", ["'fp4'", "'bf16'", "'fp8'"]),
    ("bad-kv-dtype", put("precision", value="fp8/int4"),
     "precision[0].kv", ["'int4'", "'bf16'", "'fp8'"]),
    ("bad-model-entry-dtype", put("models", value=[{"name": "llama-3.1-8b", "precision": "fp16"}]),
     "models[0].precision[0].weights", ["'fp16'", "'bf16'", "'fp8'"]),
    # --- engine
    ("kv-memory-fraction-above-1", put("engine", value={"kv_memory_fraction": 1.5}),
     "engine.kv_memory_fraction", ["(got 1.5)", "less than or equal to 1"]),
    ("workload-kv-memory-fraction-above-1", put("workloads", 0, "engine", value={"kv_memory_fraction": [0.9, 1.2]}),
     "workloads[0].engine.kv_memory_fraction[1]", ["(got 1.2)", "less than or equal to 1"]),
    ("max-num-seqs-zero", put("engine", value={"max_num_seqs": 0}),
     "engine.max_num_seqs", ["(got 0)", "greater than 0"]),
    ("bad-router", put("engine", value={"router": "random"}),
     "engine.router", ["'random'", "'round_robin'", "'least_loaded'"]),
    ("chunk-below-block", put("engine", value={"max_num_tokens": 8, "kv_block_size": 16}),
     "engine.max_num_tokens", ["8 is below kv_block_size 16"]),
    ("workload-chunk-below-block", put("workloads", 0, "engine", value={"max_num_tokens": 8}),
     "workloads[0].engine.max_num_tokens", ["8 is below kv_block_size 16"]),
    # --- workloads, models, requests, hardware
    ("duplicate-workload-names",
     put("workloads", value=[{"name": "w", "isl": 1024, "osl": 1024}, {"name": "w", "pairs": [[2048, 128]]}]),
     "workloads", ["unique", "repeated: w"]),
    ("bad-workload-name", put("workloads", 0, "name", value="my workload"),
     "workloads[0].name", ["'my workload'", "pattern"]),
    ("missing-workloads", drop("workloads"),
     "workloads", ["required key is missing"]),
    ("empty-workloads", put("workloads", value=[]),
     "workloads", ["at least 1 item"]),
    ("empty-models", put("models", value=[]),
     "models", ["at least 1 item"]),
    ("missing-hardware", drop("hardware"),
     "hardware", ["required key is missing"]),
    ("requests-zero", put("requests", value=0),
     "requests", ["(got 0)", "at least 1", "'auto'"]),
    ("workload-requests-zero", put("workloads", 0, "requests", value=0),
     "workloads[0].requests", ["(got 0)", "at least 1", "'auto'"]),
    ("zero-nodes", put("hardware", value={"name": "h200-sxm", "nodes": 0}),
     "hardware.nodes", ["(got 0)", "greater than 0"]),
    ("layout-sweep-zero-gpus", put("layouts", value={"gpus": [0, 8]}),
     "layouts.gpus[0]", ["(got 0)", "greater than 0"]),
    # --- layer-sliced proxies
    ("proxy-zero-layers", put("models", value=[{"name": "llama-3.1-8b", "proxy_layers": 0}]),
     "models[0].proxy_layers", ["(got 0)", "greater than 0"]),
    ("proxy-not-an-integer", put("models", value=[{"name": "llama-3.1-8b", "proxy_layers": "eight"}]),
     "models[0].proxy_layers", ["(got 'eight')", "integer"]),
    ("proxy-all-layers", put("models", value=[{"name": "llama-3.1-8b", "proxy_layers": 32}]),
     "models[0].proxy_layers", ["(got 32)", "below llama-3.1-8b's 32 layers", "leave it out"]),
    ("proxy-uneven-pipeline", both(put("layouts", value=["tp2", "pp2", "pp4"]),
                                   put("models", value=[{"name": "llama-3.1-8b", "proxy_layers": 6}])),
     "models[0].proxy_layers", ["(got 6)", "split evenly over pp4", "multiple of 4"]),
    ("proxy-uneven-pipeline-in-sweep", both(put("layouts", value={"gpus": [8], "max_pp": 8}),
                                            put("models", value=[{"name": "llama-3.1-8b", "proxy_layers": 4}])),
     "models[0].proxy_layers", ["(got 4)", "pp8", "multiple of 8"]),
    ("proxy-on-trtllm", both(put("backend", value="trtllm"),
                             put("models", value=[{"name": "llama-3.1-8b", "proxy_layers": 8}])),
     "models[0].proxy_layers", ["(got 8)", "trtllm backend cannot", "torch and sim"]),
    # --- PP micro-batches
    ("pp-microbatches-negative", put("engine", value={"pp_microbatches": -1}),
     "engine.pp_microbatches", ["(got -1)", "greater than or equal to 0"]),
    ("pp-microbatches-on-trtllm", both(put("backend", value="trtllm"), put("engine", value={"pp_microbatches": 0})),
     "engine.pp_microbatches", ["(got 0)", "trtllm backend schedules PP micro-batches itself"]),
    ("pp-microbatches-on-trtllm-engine", both(put("sim", value={"engine": "trtllm"}),
                                              put("engine", value={"pp_microbatches": 0})),
     "engine.pp_microbatches", ["(got 0)", "TensorRT-LLM (sim.engine: trtllm) schedules PP micro-batches"]),
    # --- the engine model and arrivals
    ("unknown-sim-engine", put("sim", value={"engine": "vllm"}),
     "sim.engine", ["'vllm'", "'trtllm'", "'torch'"]),
    ("unknown-scheduler-policy", put("engine", value={"scheduler_policy": "fcfs"}),
     "engine.scheduler_policy", ["(got 'fcfs')", "'guaranteed_no_evict'", "'max_utilization'"]),
    ("stagger-offline", put("arrival", value={"mode": "offline", "stagger": True}),
     "arrival", ["'stagger'", "'concurrency' only"]),
    ("stagger-on-torch", both(put("backend", value="torch"),
                              put("arrival", value={"mode": "concurrency", "concurrency": 8, "stagger": True})),
     "arrival.stagger", ["prediction setting of the sim backend", "torch"]),
    # --- inputs that once gave a traceback, a hang or a silent "yes" (issue 17)
    ("requests-true", put("requests", value=True), "requests", ["(got True)", "valid integer or 'auto'"]),
    ("workload-requests-true", put("workloads", 0, "requests", value=True),
     "workloads[0].requests", ["(got True)", "valid integer"]),
    ("nodes-true", put("hardware", value={"name": "h200-sxm", "nodes": True}), "hardware.nodes", ["(got True)"]),
    ("osl-true", put("workloads", 0, "osl", value=[True]), "workloads[0].osl[0]", ["(got True)", "whole number"]),
    ("requests-2-pow-70", put("requests", value=2**70), "requests", ["at most 1,000,000", f"(got {2**70})"]),
    ("seed-2-pow-70", put("seed", value=2**70), "seed", ["less than or equal to 9223372036854775807"]),
    ("max-num-seqs-2-pow-70", put("engine", value={"max_num_seqs": 2**70}), "engine.max_num_seqs",
     ["less than or equal to"]),
    ("concurrency-2-pow-70", put("arrival", value={"mode": "concurrency", "concurrency": 2**70}),
     "arrival.concurrency", ["less than or equal to 1000000", f"(got {2**70})"]),
    ("nodes-beyond-limit", put("hardware", value={"name": "h200-sxm", "nodes": 5000}), "hardware.nodes",
     ["less than or equal to 1024", "(got 5000)"]),
    ("mean-infinite", put("workloads", 0, "osl", value=[{"dist": "normal", "mean": float("inf"), "std": 1,
                                                          "cap": 100}]),
     "workloads[0].osl[0].mean", ["finite number", "(got inf)"]),
    ("rate-nan", put("arrival", value={"mode": "poisson", "rate": float("nan")}), "arrival.rate",
     ["finite number", "(got nan)"]),
    ("sigma-huge", put("workloads", 0, "osl", value=[{"dist": "lognormal", "median": 100, "sigma": 1e6, "cap": 100}]),
     "workloads[0].osl[0].sigma", ["less than or equal to 10"]),
    ("name-too-long", put("name", value="n" * 300), "name", ["at most 100 characters"]),
    ("workload-name-too-long", put("workloads", 0, "name", value="w" * 300), "workloads[0].name",
     ["at most 64 characters"]),
    ("min-requests-above-max", both(put("min_requests", value=100), put("max_requests", value=10)), "<top level>",
     ["min_requests (100) is above max_requests (10)"]),
    ("sweep-of-a-billion-gpus", put("layouts", value={"gpus": [8, 10**9]}), "layouts.gpus[1]",
     ["1000000000 GPUs exceed the target's 8", "allowed: 1 to 8", "hardware.nodes"]),
    ("sweep-beyond-the-nodes", put("layouts", value={"gpus": [1024]}), "layouts.gpus[0]",
     ["1024 GPUs exceed the target's 8 (1 node(s) × 8 h200-sxm)"]),
    ("model-path-too-long", put("models", value=["x" * 5000 + ".json"]), "models[0].name",
     ["neither a catalog model nor a readable config.json"]),
]


@pytest.mark.parametrize(("mutation", "key", "expected"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_spec_names_file_key_value_and_allowed(tmp_path, mutation, key, expected):
    raw = copy.deepcopy(BASE)
    mutation(raw)
    path = write(tmp_path, raw)
    line = first_line_of_error(path)
    assert line.startswith(f"{path}: {key}: "), line
    for text in expected:
        assert text in line, f"{text!r} not in {line!r}"


def test_malformed_case_ids_are_unique_and_numerous():
    ids = [c[0] for c in MALFORMED]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 25


def test_every_problem_is_reported_on_its_own_line(tmp_path):
    raw = copy.deepcopy(BASE)
    raw["models"] = ["llama-3.1-8b", "no-such-model", {"name": "qwen2.5-32b", "layouts": ["tp3"]}]
    raw["workloads"][0]["osl"] = [200000]
    path = write(tmp_path, raw)
    with pytest.raises(SpecError) as caught:
        load_campaign(path)
    lines = caught.value.lines
    assert any(line.startswith(f"{path}: models[1].name: unknown model 'no-such-model'") for line in lines), lines
    assert any(line.startswith(f"{path}: models[2].layouts[0]: 'tp3'") for line in lines), lines
    assert any(line.startswith(f"{path}: workloads[0].osl[0]: ") and "llama-3.1-8b" in line for line in lines), lines
    assert str(caught.value) == "\n".join(lines)


def test_a_campaign_wide_problem_is_reported_once(tmp_path):
    raw = copy.deepcopy(BASE)
    raw["workloads"].append({"name": "control", "pairs": [[2048, 128]]})
    raw["engine"] = {"max_num_tokens": 8}
    path = write(tmp_path, raw)
    with pytest.raises(SpecError) as caught:
        load_campaign(path)
    assert caught.value.lines == [f"{path}: engine.max_num_tokens: 8 is below kv_block_size 16"]


def test_union_branch_noise_is_not_reported(tmp_path):
    """A layout sweep with a typo must not also claim 'layouts: Input should be a valid list'."""
    raw = {**copy.deepcopy(BASE), "layouts": {"gpus": [1, 2], "maxpp": 2}}
    path = write(tmp_path, raw)
    with pytest.raises(SpecError) as caught:
        load_campaign(path)
    assert len(caught.value.lines) == 1, caught.value.lines


# ------------------------------------------------------------------------------------------- file-level errors


def test_invalid_yaml_names_line_number(tmp_path):
    path = write(tmp_path, "name: t\nhardware: h200-sxm\nmodels: [llama-3.1-8b\nlayouts: [dp1]\n")
    line = first_line_of_error(path)
    assert line.startswith(f"{path}: not valid YAML (line 4, column "), line


def test_yaml_bad_indentation_names_line_number(tmp_path):
    path = write(tmp_path, "name: t\nhardware:\n  name: h200-sxm\n   nodes: 2\n")
    line = first_line_of_error(path)
    assert "not valid YAML (line 4" in line, line


def test_duplicate_key_is_an_error_naming_both_lines(tmp_path):
    path = write(tmp_path, "name: a\nhardware: h200-sxm\nname: t\nmodels: [llama-3.1-8b]\nlayouts: [dp1]\n"
                           "workloads: [{name: w, isl: 8, osl: 8}]\n")
    line = first_line_of_error(path)
    assert line == f"{path}: not valid YAML (line 3, column 1): key 'name' is given twice (first on line 1)", line
    nested = write(tmp_path, "name: t\nhardware: {name: h200-sxm, nodes: 1, nodes: 2}\n", "nested.yaml")
    assert "key 'nodes' is given twice" in first_line_of_error(nested)


def test_yaml_merge_keys_may_still_override(tmp_path):
    text = ("base: &w {name: w, isl: 8, osl: [8]}\nname: t\nhardware: h200-sxm\nmodels: [llama-3.1-8b]\n"
            "layouts: [dp1]\nworkloads:\n  - <<: *w\n    isl: 16\n")
    path = write(tmp_path, text)
    assert "base" in first_line_of_error(path)  # an unknown key, not a duplicate: the merge itself is fine


@pytest.mark.parametrize("content", [bytes(range(256)), "name: caf\xe9\n".encode("latin-1"), b"\xff\xfe\x00n"],
                         ids=["binary", "latin-1", "utf-16-bom"])
def test_a_file_that_is_not_utf8_text_is_one_line(tmp_path, content):
    path = tmp_path / "campaign.yaml"
    path.write_bytes(content)
    line = first_line_of_error(path)
    assert "is not UTF-8 text" in line and "save it as UTF-8 YAML" in line, line


def test_control_characters_are_one_line(tmp_path):
    path = write(tmp_path, "name: a\x00b\n")
    assert first_line_of_error(path).endswith("the character '\\x00' (at character 8) is not allowed in a YAML file")


def test_top_level_list_is_rejected(tmp_path):
    path = write(tmp_path, "- name: t\n- hardware: h200-sxm\n")
    line = first_line_of_error(path)
    assert "must be a mapping" in line and "not list" in line, line
    assert "name, hardware, models" in line


def test_empty_file_is_rejected(tmp_path):
    path = write(tmp_path, "# nothing here\n")
    line = first_line_of_error(path)
    assert "must be a mapping" in line and "empty file" in line, line


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    line = first_line_of_error(path)
    assert line == f"{path}: cannot read the campaign file (No such file or directory)"


# ------------------------------------------------------------------------------------------- valid specs


def test_demo_campaign_loads():
    campaign = load_campaign(REPO / "config" / "demo.yaml")
    assert campaign.name == "demo"
    assert campaign.hardware.name == "h200-sxm"
    assert campaign.spec.hardware.nodes == 2
    assert campaign.spec.backend == "sim"
    assert list(campaign.models) == ["llama-3.1-8b", "qwen2.5-32b", "qwen3-32b", "llama-3.3-70b", "qwen3-30b-a3b",
                                     "llama-3.1-405b", "deepseek-r1"]
    assert campaign.layouts["llama-3.1-405b"] == LayoutSweep(gpus=[8, 16])
    assert campaign.layouts["deepseek-r1"].expert_parallel == [False, True]
    reasoning = campaign.spec.workloads[0]
    assert [o.max_length for o in reasoning.osl] == [1024, 2048, 4096, 8192, 16384, 32768]
    assert campaign.config_hash and len(campaign.config_hash) == 16


def test_shorthand_forms(tmp_path):
    path = write(tmp_path, """
name: shorthand
hardware: h200-sxm
precision: fp8/fp8
models: [llama-3.1-8b]
layouts: [dp8, dp2tp4, tp4pp2]
arrival: offline
workloads:
  - name: sweep
    isl: 1024
    osl: [1024, 4096]
  - name: single
    isl: 256
    osl: 2048
""")
    campaign = load_campaign(path)
    spec = campaign.spec
    assert spec.hardware.name == "h200-sxm" and spec.hardware.nodes == 1
    assert [(p.weights, p.kv) for p in spec.precision] == [("fp8", "fp8")]
    assert spec.precision[0].label == "fp8-kvfp8"
    assert spec.arrival.mode == "offline" and spec.arrival.expand()[0].label == "off"
    assert campaign.layouts["llama-3.1-8b"] == [Layout(dp=8), Layout(dp=2, tp=4), Layout(tp=4, pp=2)]
    sweep, single = spec.workloads
    assert [(i.max_length, o.max_length) for i, o in sweep.length_pairs()] == [(1024, 1024), (1024, 4096)]
    assert [(i.max_length, o.max_length) for i, o in single.length_pairs()] == [(256, 2048)]


def test_precision_without_kv_defaults_to_bf16_kv(tmp_path):
    raw = {**copy.deepcopy(BASE), "precision": ["bf16", "fp8"]}
    campaign = load_campaign(write(tmp_path, raw))
    assert [(p.weights, p.kv) for p in campaign.spec.precision] == [("bf16", "bf16"), ("fp8", "bf16")]


def test_length_distribution(tmp_path):
    raw = copy.deepcopy(BASE)
    raw["workloads"][0]["osl"] = [8192, {"dist": "lognormal", "median": 6000, "sigma": 0.9, "cap": 32768}]
    campaign = load_campaign(write(tmp_path, raw))
    fixed, lognormal = campaign.spec.workloads[0].osl
    assert fixed.dist == "fixed" and fixed.value == 8192
    assert lognormal.dist == "lognormal" and lognormal.median == 6000 and lognormal.sigma == 0.9
    assert lognormal.max_length == 32768           # the context check uses the cap
    assert lognormal.label == "LN6000s0.9c32768"


def test_lognormal_cap_is_checked_against_context(tmp_path):
    raw = copy.deepcopy(BASE)
    raw["models"] = ["qwen3-32b"]                 # 40960-token context
    raw["workloads"][0]["osl"] = {"dist": "lognormal", "median": 6000, "sigma": 0.9, "cap": 65536}
    line = first_line_of_error(write(tmp_path, raw))
    assert "workloads[0].osl[0]: isl+osl = 1024+65536" in line and "40960" in line, line


def test_swept_arrival_and_engine(tmp_path):
    raw = copy.deepcopy(BASE)
    raw["arrival"] = {"mode": "concurrency", "concurrency": [16, 64]}
    raw["engine"] = {"max_num_seqs": [256, 1024], "router": ["round_robin", "least_loaded"]}
    campaign = load_campaign(write(tmp_path, raw))
    assert [a.label for a in campaign.spec.arrival.expand()] == ["c16", "c64"]
    knobs = campaign.spec.engine.expand()
    assert {(k.max_num_seqs, k.router) for k in knobs} == {
        (256, "round_robin"), (256, "least_loaded"), (1024, "round_robin"), (1024, "least_loaded")}


def test_model_from_hf_config_path(tmp_path):
    raw = copy.deepcopy(BASE)
    raw["models"] = [str(HF_DATA / "llama-3.1-8b-instruct.json")]
    campaign = load_campaign(write(tmp_path, raw))
    (model,) = campaign.models.values()
    assert model.name == "llama-3.1-8b-instruct"
    assert (model.num_layers, model.num_attention_heads, model.num_kv_heads) == (32, 32, 8)


def test_model_from_relative_hf_config_path(tmp_path):
    """A relative config.json path is read relative to the campaign file, not the working directory."""
    (tmp_path / "models").mkdir()
    shutil.copy(HF_DATA / "tiny-llama.json", tmp_path / "models" / "tiny-llama.json")
    raw = copy.deepcopy(BASE)
    raw["models"] = [{"name": "models/tiny-llama.json", "layouts": ["dp2", "tp8"]}]
    raw["workloads"][0]["osl"] = [512]
    campaign = load_campaign(write(tmp_path, raw))
    model = campaign.models["models/tiny-llama.json"]
    assert model.name == "tiny-llama" and model.max_context == 2048


def test_hf_config_model_is_checked_like_a_catalog_model(tmp_path):
    raw = copy.deepcopy(BASE)
    raw["models"] = [str(HF_DATA / "tiny-llama.json")]   # 8 heads, 2048-token context
    raw["layouts"] = ["tp16"]
    raw["hardware"] = {"name": "h200-sxm", "nodes": 2}
    line = first_line_of_error(write(tmp_path, raw))
    assert "layouts[0]: 'tp16'" in line and "8 attention heads" in line and "allowed tp: 1, 2, 4, 8" in line, line


def test_proxy_layers_reach_the_cells(tmp_path):
    from infscale.campaign.plan import plan_campaign

    raw = copy.deepcopy(BASE)
    raw["models"] = ["llama-3.1-8b", {"name": "qwen3-8b", "proxy_layers": 6}]
    raw["layouts"] = ["tp2", "pp2"]
    planned = plan_campaign(load_campaign(write(tmp_path, raw)))
    proxies: dict[str, set] = {}
    for item in planned:
        proxies.setdefault(item.cell.model, set()).add(item.cell.proxy_layers)
    assert proxies == {"llama-3.1-8b": {None}, "qwen3-8b": {6}}
