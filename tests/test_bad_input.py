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
