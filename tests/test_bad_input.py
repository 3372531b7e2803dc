"""Bad input is a clear error, never a traceback, a hang or a silent "yes".

The first part holds the inputs that once failed that way (issue 17), each with the key or flag its one-line error
must name. The second part is a property-based fuzz test (hypothesis, fixed seed) of campaign files and command
lines: every generated input must end in success or a clear error within a time limit.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from infscale.cli import main

REPO = Path(__file__).resolve().parents[1]
CAMPAIGN: dict[str, Any] = {"name": "bad", "backend": "sim", "hardware": "h200-sxm", "models": ["llama-3.1-8b"],
                            "layouts": ["dp1", "tp2"], "requests": 8,
                            "workloads": [{"name": "w", "isl": 64, "osl": [64, 128]}]}


class Hang(Exception):
    """The command ran past its time limit."""


def _alarm(signum, frame):
    raise Hang()


def run_cli(argv: list[str], limit_s: int = 20) -> tuple[int, str, str]:
    """`infscale ARGV` in this process: (exit status, stdout, stderr). An exception escaping main (what a user
    sees as a traceback) fails the test, and so does running past `limit_s`."""
    out, err = io.StringIO(), io.StringIO()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(limit_s)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = main(argv)
    except Hang:
        pytest.fail(f"infscale {' '.join(argv)[:300]}: still running after {limit_s} s")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return status, out.getvalue(), err.getvalue()


def one_line_error(argv: list[str], status: int = 2) -> str:
    code, _, err = run_cli(argv)
    lines = err.strip().splitlines()
    assert code == status and len(lines) == 1, (code, err)
    return lines[0]


def campaign_file(tmp_path: Path, **changes: Any) -> Path:
    raw = {**copy.deepcopy(CAMPAIGN), **changes}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# --------------------------------------------------------------------------------------- the known cases

PREDICT = ["predict", "--model", "llama-3.1-8b", "--isl", "64", "--osl", "64"]
RECOMMEND = ["recommend", "--model", "llama-3.1-8b", "--isl", "64", "--osl", "64"]


@pytest.mark.parametrize(("argv", "named"), [
    (PREDICT + ["--requests", "abc"], "argument --requests: expected a whole number ≥ 1 or 'auto' (got 'abc')"),
    (PREDICT + ["--requests", "0"], "argument --requests"),
    (PREDICT + ["--requests", "1e3"], "argument --requests"),
    (PREDICT + ["--arrival", "concurrency:x"], "argument --arrival: expected offline, concurrency:N"),
    (PREDICT + ["--arrival", "concurrency"], "argument --arrival"),
    (PREDICT + ["--arrival", "poisson:inf"], "argument --arrival"),
    (PREDICT + ["--arrival", "offline:3"], "argument --arrival"),
    (PREDICT + ["--isl", "-1"], "argument --isl: expected a whole number ≥ 1"),
    (PREDICT + ["--kv-memory-fraction", "nan"], "argument --kv-memory-fraction: expected a finite number > 0"),
    (PREDICT + ["--dp", "1000000000"], "--dp × --tp × --pp: 1000000000 GPUs exceed the 8192"),
    (PREDICT + ["--seed", str(2**70)], "seed: Input should be less than or equal to"),
    (RECOMMEND + ["--gpus", "1000000"], "--gpus: 1000000 GPUs exceed the 8192 of 1024 nodes of h200-sxm"),
    (RECOMMEND + ["--gpus", "8", "--requests", "x"], "argument --requests"),
    (RECOMMEND + ["--gpus", "8", "--ttft-p99-ms", "nan"], "argument --ttft-p99-ms"),
    (RECOMMEND + ["--gpus", "8", "--measured", "/nonexistent.parquet"], "--measured: /nonexistent.parquet: not a "
     "readable Parquet file"),
    (RECOMMEND + ["--gpus", "8", "--measured", str(REPO / "README.md")], "--measured:"),
    (["status", "config/demo.yaml", "--watch", "-1"], "argument --watch"),
    (["engines", "gc", "--cache", ".", "--budget-gb", "nan"], "argument --budget-gb"),
    (["calibrate", "--hardware", "h100-sxm", "--microbench", "x.json", "--name", "n", "--out", ""], "argument --out"),
], ids=lambda value: " ".join(value[-2:]) if isinstance(value, list) else None)
def test_bad_arguments_are_one_line_naming_the_flag(argv, named):
    assert named in one_line_error(argv)


def test_measured_file_without_the_merged_columns_is_refused(tmp_path):
    import polars as pl

    table = tmp_path / "other.parquet"
    pl.DataFrame({"x": [1]}).write_parquet(table)
    line = one_line_error(RECOMMEND + ["--gpus", "8", "--measured", str(table)])
    assert "not a merged cells.parquet (no column" in line


def test_a_layout_sweep_beyond_the_target_is_refused_before_enumerating(tmp_path):
    line = one_line_error(["plan", str(campaign_file(tmp_path, layouts={"gpus": [10**9]}))])
    assert "layouts.gpus[0]: 1000000000 GPUs exceed the target's 8" in line


def test_a_campaign_without_a_feasible_cell_is_an_error_not_an_empty_success(tmp_path):
    config = campaign_file(tmp_path, models=["llama-3.1-405b"], layouts=["dp1"])  # 405B in one GPU: OOM
    code, out, err = run_cli(["plan", str(config), "--results-root", str(tmp_path / "results")])
    assert code == 2 and "dp1tp1pp1" in out  # the table still shows each cell's reason
    assert err.startswith(f"{config}: none of the 2 planned cells is feasible (2 because: ") and \
        err.strip().endswith("; nothing to measure") and len(err.strip().splitlines()) == 1, err
    code, _, err = run_cli(["run", str(config), "--results-root", str(tmp_path / "results")])
    assert code == 2 and "none of the 2 planned cells is feasible" in err
    assert not (tmp_path / "results" / "bad" / "cells").exists()


def test_an_unwritable_results_root_is_one_line(tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the results root should be\n")
    line = one_line_error(["plan", str(campaign_file(tmp_path)), "--results-root", str(blocker), "--write"], 1)
    assert line.startswith("infscale plan: ") and str(blocker) in line and "Not a directory" in line
    assert blocker.read_text() == "a file where the results root should be\n"
    if os.geteuid() != 0:  # root writes anywhere: the mode test means something for other users only
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        line = one_line_error(["plan", str(campaign_file(tmp_path)), "--results-root", str(locked), "--write"], 1)
        assert "Permission denied" in line


def test_braces_in_the_results_root_are_refused_for_the_workflow(tmp_path):
    line = one_line_error(["run", str(campaign_file(tmp_path)), "--results-root", str(tmp_path / "r{x}")])
    assert "results_root:" in line and "wildcard" in line


def test_a_closed_pipe_ends_quietly():
    """`infscale predict … | head -1`: the reader is gone before infscale writes; no traceback, no complaint."""
    process = subprocess.Popen([sys.executable, "-m", "infscale", *PREDICT, "--requests", "8"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # the reader left
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 1
    assert stderr == "", stderr


def test_duplicate_keys_in_launcher_settings_and_profiles_are_errors(tmp_path):
    from infscale.calibration import ProfileError, load_profile
    from infscale.campaign import SpecError
    from infscale.launch.settings import load_launcher_settings

    settings = tmp_path / "settings.yaml"
    settings.write_text("executor: debug\nslurm: {partition: a, partition: b}\n")
    with pytest.raises(SpecError, match=r"line 2, column 23\): key 'partition' is given twice \(first on line 2\)"):
        load_launcher_settings(settings, "launcher")
    profile = tmp_path / "profile.yaml"
    profile.write_text("name: p\nhardware: h100-sxm\nname: q\n")
    with pytest.raises(ProfileError, match="key 'name' is given twice"):
        load_profile(profile)
    config = campaign_file(tmp_path, hardware={"name": "h200-sxm", "profile": str(profile)})
    assert "hardware.profile: " in one_line_error(["plan", str(config)])


def test_a_config_file_with_a_key_twice_stops_the_workflow(tmp_path):
    """Snakemake reads --configfile itself (the last of two keys wins); the Snakefile reads it again strictly."""
    settings = tmp_path / "settings.yaml"
    settings.write_text("launcher:\n  executor: debug\n  executor: slurm\n")
    result = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "-n",
                             "--directory", str(tmp_path), "--configfile", str(settings), "--config",
                             f"campaign={campaign_file(tmp_path)}", f"results_root={tmp_path / 'results'}"],
                            capture_output=True, text=True, timeout=300)
    printed = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"{settings}: not valid YAML (line 3, column 3): key 'executor' is given twice" in printed


# --------------------------------------------------------------------------------------- ae verify


def fake_bundle(tmp_path: Path, entries: list[dict[str, Any]]) -> Path:
    bundle = tmp_path / "bundle"
    bundle.mkdir(exist_ok=True)
    (bundle / "manifest.json").write_text(json.dumps({"manifest_version": "1.0", "files": entries}))
    return bundle


def entry_for(path: Path, name: str) -> dict[str, Any]:
    data = path.read_bytes()
    return {"path": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.parametrize("name", ["../../../../etc/passwd", "/etc/passwd", "results/../../secret", ""])
def test_ae_verify_refuses_manifest_paths_outside_the_bundle(tmp_path, name):
    outside = tmp_path / "secret"
    outside.write_text("not part of any bundle\n")
    target = Path("/etc/passwd") if "passwd" in name else outside
    bundle = fake_bundle(tmp_path, [entry_for(target, name)])
    line = one_line_error(["ae", "verify", str(bundle)])
    assert "files[0].path" in line and "points outside the bundle" in line


def test_ae_verify_refuses_a_symlink_that_leaves_the_bundle(tmp_path):
    outside = tmp_path / "secret"
    outside.write_text("not part of any bundle\n")
    bundle = fake_bundle(tmp_path, [entry_for(outside, "data/cells.parquet")])
    (bundle / "data").mkdir()
    (bundle / "data" / "cells.parquet").symlink_to(outside)
    assert "points outside the bundle" in one_line_error(["ae", "verify", str(bundle)])


def test_ae_verify_refuses_malformed_entries(tmp_path):
    bundle = fake_bundle(tmp_path, [{"path": "a.txt", "size": "12"}])
    assert "files[0]: expected {path: text, size: integer, sha256: text}" in one_line_error(["ae", "verify",
                                                                                             str(bundle)])


def test_ae_verify_still_accepts_a_bundle_of_its_own_files(tmp_path):
    bundle = fake_bundle(tmp_path, [])
    (bundle / "results").mkdir()
    (bundle / "results" / "a.txt").write_text("a\n")
    fake_bundle(tmp_path, [entry_for(bundle / "results" / "a.txt", "results/a.txt")])
    code, out, _ = run_cli(["ae", "verify", str(bundle)])
    assert code == 0 and "OK: 1 files in the manifest" in out


# --------------------------------------------------------------------------------------- fuzzing
# Fixed seed (derandomize) so CI tries the same inputs each run; no example database. The counts are asserted so
# the docs can say how many inputs were tried (docs/architecture.md, "Bad input").

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

CAMPAIGN_EXAMPLES = 500
CLI_EXAMPLES = 300
FUZZ = settings(derandomize=True, database=None, deadline=None, print_blob=True,
                suppress_health_check=list(HealthCheck))

# Valid campaigns that between them use every key of the schema: the mutations start from these.
BASES: list[dict[str, Any]] = [
    {"name": "fuzz-a", "description": "explicit layouts", "backend": "sim",
     "hardware": {"name": "h200-sxm", "nodes": 2}, "models": ["llama-3.1-8b", "qwen2.5-32b"],
     "precision": ["bf16", "fp8/fp8"], "layouts": ["dp1", "tp2", "dp2tp2pp2"], "requests": 16, "seed": 3,
     "arrival": {"mode": "concurrency", "concurrency": [4, 8]},
     "engine": {"max_num_seqs": [64, 128], "max_num_tokens": 4096, "kv_memory_fraction": 0.9,
                "kv_block_size": 32, "router": "least_loaded", "pp_microbatches": 0},
     "workloads": [{"name": "reason", "isl": 256, "osl": [512, 1024]},
                   {"name": "pairs", "pairs": [[1024, 128], [64, 64]], "requests": 8, "arrival": "offline",
                    "engine": {"max_num_seqs": 32}}]},
    {"name": "fuzz-b", "backend": "torch", "hardware": "h100-sxm",
     "models": [{"name": "llama-3.1-8b", "precision": "bf16", "layouts": {"gpus": [1, 2, 4], "max_pp": 2},
                 "proxy_layers": 4},
                {"name": "qwen3-30b-a3b", "layouts": {"gpus": [8], "expert_parallel": [False, True]}}],
     "layouts": ["dp1"], "requests": "auto", "requests_per_slot": 2, "min_requests": 4, "max_requests": 64,
     "arrival": {"mode": "poisson", "rate": [2.5, 10]},
     "workloads": [{"name": "dist", "isl": {"dist": "normal", "mean": 200, "std": 50, "cap": 400, "min": 8},
                    "osl": [{"dist": "lognormal", "median": 300, "sigma": 0.5, "cap": 2000}, 128]}]},
]

ODD_VALUES = st.one_of(
    st.sampled_from([True, False, None, 0, -1, 1, 3, 2**31, 2**63, 2**64, 2**70, -(2**70), 10**9, 1e308, -0.0, 0.5,
                     float("inf"), float("-inf"), float("nan"), "", "auto", "x" * 300, "dp1", "tp3", "pp0", "fp8",
                     "int4", "poisson", "concurrency", "normal", "☃", "a\x00b", "\ud7ff", [], {}, [0], [1, 2],
                     [[1, 2, 3]], {"gpus": [10**9]}, {"gpus": [1024]}, {"dist": "fixed"}, b"\xff\xfe\x00"]),
    st.integers(), st.floats(), st.text(max_size=20), st.binary(max_size=12),
    st.lists(st.integers(min_value=-3, max_value=10**6), max_size=3),
    st.dictionaries(st.text(max_size=6), st.integers(min_value=-3, max_value=100), max_size=2),
)


def key_paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every place in a nested dict/list a mutation can hit."""
    paths = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            paths += key_paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            paths += key_paths(item, (*prefix, index))
    return paths


WORDS = sorted({leaf for base in BASES for leaf in json.dumps(base).replace('"', " ").replace(",", " ").split()
                if leaf.isidentifier() or "-" in leaf or "/" in leaf})


def nearby(draw, current: Any) -> Any:
    """A value of the same kind as `current`, often still valid: the fuzz also reaches the planner."""
    if isinstance(current, bool):
        return not current
    if isinstance(current, int):
        return draw(st.sampled_from([current * 2, current // 2, current + 1, current - 1, current * 1024, 0, -current]))
    if isinstance(current, float):
        return draw(st.sampled_from([current * 2, current / 2, current * 1e6, 0.0, -current, 1.0]))
    if isinstance(current, str):
        return draw(st.sampled_from(WORDS))
    if isinstance(current, list):
        return draw(st.sampled_from([current * 2, current[:1], current[::-1], []]))
    return current


def mutate(raw: Any, path: tuple, action: str, value: Any) -> Any:
    """`raw` with the item at `path` replaced, deleted, or given an extra (unknown) key."""
    if not path:
        return value
    parent = raw
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    if action == "delete":
        del parent[last]
    elif action == "extra" and isinstance(parent[last], dict):
        parent[last]["unknwn_key"] = value
    else:
        parent[last] = value
    return raw


@st.composite
def campaign_texts(draw) -> bytes:
    """A campaign file: a valid one with up to three mutations (odd values, or values of the same kind that may
    still be valid), and sometimes its YAML text damaged byte-wise."""
    raw = copy.deepcopy(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        paths = key_paths(raw)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        action = draw(st.sampled_from(["nearby", "nearby", "replace", "delete", "extra"]))
        if action == "nearby":
            current = raw
            for key in path:
                current = current[key]
            value = nearby(draw, current)
        else:
            value = draw(ODD_VALUES)
        raw = mutate(raw, path, action, copy.deepcopy(value))
    text = yaml.safe_dump(raw, allow_unicode=True).encode("utf-8", "surrogatepass")
    damage = draw(st.sampled_from(["none", "none", "none", "bytes", "truncate", "duplicate-line"]))
    if damage == "bytes":
        at = draw(st.integers(min_value=0, max_value=len(text)))
        text = text[:at] + draw(st.binary(min_size=1, max_size=8)) + text[at:]
    elif damage == "truncate":
        text = text[:draw(st.integers(min_value=0, max_value=len(text)))]
    elif damage == "duplicate-line":
        lines = text.splitlines(keepends=True)
        line = draw(st.sampled_from(lines)) if lines else b""
        text = text + line
    return text


def assert_success_or_clear_error(argv: list[str], status: int, out: str, err: str, source: str | None = None) -> None:
    """Exit 0, or 1/2 with the reason: on stderr (each line starting with the campaign file, when one is given), or
    as the verdict on stdout (`ae compare`/`ae verify` exit 1 when the files disagree)."""
    assert status in (0, 1, 2), (argv, status, err)
    assert "Traceback" not in err, (argv, err)
    lines = err.strip().split("\n")  # (a path given with control characters is echoed as given)
    if status != 0:
        assert err.strip() or (status == 1 and out.strip()), f"{argv}: exit {status} without saying why"
        if source is not None:  # a campaign file's problems: one printable line each, naming the file
            assert all(line.startswith((source, "infscale")) and line.isprintable() for line in lines), (argv, lines)


def test_fuzzed_campaign_files_plan_or_fail_clearly(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz-campaigns")
    config, results = folder / "campaign.yaml", folder / "results"
    tried: list[int] = []

    @settings(FUZZ, max_examples=CAMPAIGN_EXAMPLES)
    @given(text=campaign_texts(), write=st.booleans(), per_cell=st.booleans())
    def one(text: bytes, write: bool, per_cell: bool) -> None:
        tried.append(1)
        config.write_bytes(text)
        argv = ["plan", str(config), "--results-root", str(results)] + ["--write"] * write + ["--cells"] * per_cell
        status, out, err = run_cli(argv, limit_s=20)
        assert_success_or_clear_error(argv, status, out, err, str(config))

    one()
    assert len(tried) >= CAMPAIGN_EXAMPLES


REFERENCE = REPO / "results" / "reference"
PROFILE = REFERENCE / "profiles" / "h100-sxm.torch.2026-11-27c.yaml"
FLAG_VALUES = st.one_of(
    st.sampled_from(["", "0", "-1", "1", "8", "auto", "nan", "inf", "-inf", "1e3", "0.5", str(2**70), "10000001",
                     "1000000000000", "abc", "☃", "concurrency:", "poisson:0", "offline:1", "tp3", "int4", "nope",
                     "/nonexistent", "-", "--json", "x=nan", str(REPO / "README.md"), str(REPO / "config"),
                     str(PROFILE)]),
    st.text(st.characters(exclude_characters="\x00"), max_size=12),  # no argument can hold a NUL byte
    # numbers up to 10^4, and the huge ones above: valid request counts near the 10^6 limit are honest work of a
    # minute or more (a million requests simulated), not what the time limit is there to catch
    st.integers(min_value=-10, max_value=10**4).map(str))
# Values a user would plausibly give (valid or at the edge): drawn most of the time, so the fuzz reaches past
# argument parsing into the commands themselves. Nothing here lets a command write into the repository.
PLAUSIBLE: dict[str, list[str]] = {
    "--model": ["llama-3.1-8b", "qwen2.5-32b", "qwen3-30b-a3b", str(REPO / "tests" / "data" / "hf" /
                                                                  "llama-3.1-8b-instruct.json")],
    "--hardware": ["h200-sxm", "h100-sxm"], "--precision": ["bf16", "fp8", "fp8/fp8"],
    "--dp": ["1", "2", "8"], "--tp": ["1", "2", "4", "8"], "--pp": ["1", "2"], "--ep": ["1", "2"],
    "--isl": ["1", "64", "1024", "131072"], "--osl": ["1", "64", "2048"], "--gpus": ["1", "2", "8", "16"],
    "--requests": ["auto", "1", "16"], "--arrival": ["offline", "concurrency:4", "poisson:2.5"],
    "--max-num-seqs": ["1", "64", "256"], "--max-num-tokens": ["16", "8192"], "--kv-memory-fraction": ["0.5", "1"],
    "--kv-block-size": ["16", "64"], "--router": ["round_robin", "least_loaded"], "--seed": ["0", "7"],
    "--ttft-p99-ms": ["100", "2000"], "--tpot-p99-ms": ["5", "40"], "--profile": [str(PROFILE)],
    "--measured": [str(REFERENCE / "gpu-node" / "cells.parquet"), str(REFERENCE / "gpu-node" / "fits.parquet"),
                   str(REPO / "README.md")],
    "--results-root": ["results", "r"], "--packing": ["auto", "layout", "model"],
    "--validation": [str(REFERENCE / "gpu-node" / "validation.parquet"), str(REFERENCE / "gpu-node" / "cells.parquet"),
                     str(REPO / "README.md")],
    "--out": ["out", "out/x.yaml", "", "."], "--engine": ["torch"], "--name": ["fuzz"],
    "--microbench": [str(REFERENCE / "profiles" / "h100-sxm-x4.2026-11-27c.microbench.json"),
                     str(REFERENCE / "profiles" / "h100-sxm.torch.2026-11-27c.yaml")],
    "--roofline": [str(REFERENCE / "profiles" / "h100-sxm-x4.2026-11-27.torch_decode_roofline.json")],
    "--moe-block": [str(REFERENCE / "profiles" / "h100-sxm-x4.2026-11-27.moe-block.json")],
    "--cache": ["cache"], "--budget-gb": ["0", "1.5"], "--keep": ["", "abc"], "--target": ["cpu", "1gpu"],
    "--osl-max": ["64", "1024"], "--max-requests": ["1", "16"], "--tol": ["output_tok_s=0.1", "ttft_ms_p50=0"],
    "--match": ["spec", "shape"],
    # not the demo: `extrapolate` predicts all its 1,029 cells, honest work that takes longer than the time limit
    "CONFIG": [str(REPO / "config" / "gpu-node.yaml"), str(REPO / "config" / "h100-node.yaml"), "small.yaml"],
    "ACTION": ["list", "gc"], "PATH": [str(REFERENCE / "gpu-node"), str(REFERENCE / "gpu-node-pipelined")],
}
COMMANDS: dict[tuple[str, ...], list[str]] = {
    ("predict",): ["--model", "--isl", "--osl", "--hardware", "--precision", "--dp", "--tp", "--pp", "--ep",
                   "--requests", "--arrival", "--max-num-seqs", "--max-num-tokens", "--kv-memory-fraction",
                   "--kv-block-size", "--router", "--seed", "--profile", "--json"],
    ("recommend",): ["--model", "--gpus", "--isl", "--osl", "--hardware", "--precision", "--requests",
                     "--max-num-seqs", "--ttft-p99-ms", "--tpot-p99-ms", "--profile", "--measured", "--json"],
    ("plan", "CONFIG"): ["--results-root", "--packing", "--cells"],
    ("status", "CONFIG"): ["--results-root", "--packing"],
    ("summary", "CONFIG"): ["--results-root"],
    ("validate", "CONFIG"): ["--results-root", "--profile"],
    ("extrapolate", "CONFIG"): ["--validation", "--profile", "--out"],
    ("calibrate",): ["--hardware", "--microbench", "--name", "--out", "--engine", "--roofline", "--moe-block"],
    ("engines", "ACTION"): ["--cache", "--budget-gb", "--keep"],
    ("ae", "verify", "PATH"): [],
    ("ae", "reduce", "CONFIG"): ["--target", "--osl-max", "--max-requests"],
    ("ae", "compare", "PATH", "PATH"): ["--tol", "--match", "--json"],
}
REQUIRED = {"predict": 3, "recommend": 4, "calibrate": 4}  # the first N flags of these commands are required


@st.composite
def command_lines(draw) -> list[str]:
    """A command with its words and some of its flags; values mostly plausible, otherwise anything."""
    def value(name: str) -> str:
        return draw(st.sampled_from(PLAUSIBLE[name])) if draw(st.integers(0, 9)) < 7 else draw(FLAG_VALUES)

    words, flags = draw(st.sampled_from(list(COMMANDS.items())))
    argv = [value(word) if word.isupper() else word for word in words]
    required = flags[:REQUIRED.get(words[0], 0)]
    chosen = [f for f in required if draw(st.integers(0, 9)) < 9]
    chosen += draw(st.lists(st.sampled_from(flags), max_size=5, unique=True)) if flags else []
    for flag in dict.fromkeys(chosen):
        if flag in ("--json", "--cells"):
            argv.append(flag)
            continue
        given = value(flag)
        argv += [f"{flag}={given}"] if given.startswith("-") else [flag, given]
    return argv


def files_of(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def test_fuzzed_command_lines_succeed_or_fail_clearly(tmp_path_factory, monkeypatch):
    folder = tmp_path_factory.mktemp("fuzz-cli")
    monkeypatch.chdir(folder)  # relative paths (results, out, cache) land here
    (folder / "small.yaml").write_text(yaml.safe_dump(CAMPAIGN))
    (folder / "cache").mkdir()
    reference = files_of(REFERENCE)
    tried: list[int] = []

    @settings(FUZZ, max_examples=CLI_EXAMPLES)
    @given(argv=command_lines())
    def one(argv: list[str]) -> None:
        tried.append(1)
        status, out, err = run_cli(argv, limit_s=30)
        assert_success_or_clear_error(argv, status, out, err)

    one()
    assert len(tried) >= CLI_EXAMPLES
    assert files_of(REFERENCE) == reference  # the committed results were only read
