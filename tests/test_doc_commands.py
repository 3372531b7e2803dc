"""Every shell command shown in README.md and docs/*.md is run, dry-run or parsed, so a documented command that no
longer works fails CI.

Commands are the lines of the ```bash blocks (a trailing `\\` continues a line; `# …` starts a comment). Each one
must be classified in FORMS below, which says how the test takes it:

- run:      run as written, in a sandbox copy of the checkout (config/, profiles/, the workflow, results/reference,
            the lock files; .venv linked), one sandbox per document, the commands in the document's order;
            `config/my.yaml` there is a tiny sim campaign named my-study.
- dry-run:  a Snakemake command for a cluster or a GPU: run with `-n`; the sandbox's Slurm profile has
            `executor: debug`, so no cluster is asked.
- parse:    an `infscale` command that needs a cluster or runs for long: its arguments are parsed by the real
            parser, the command itself is not called.
- synopsis: a usage line with [optional] parts and PLACEHOLDERS: every flag in it must be one the command knows
            (its --help), and the line without the optional parts must parse.
- make:     `make -n TARGET` must succeed, and each Snakemake line of the recipe is dry-run.
- script:   `bash SCRIPT SUBCOMMAND`: the script must pass `bash -n` and handle that subcommand (never run: it
            starts or stops the machine's Slurm cluster).
- collect:  a pytest command: run with `--collect-only`.

A command in a document that FORMS does not know fails the test until it is classified; so does an entry of FORMS
that no document shows any more. For commands in OUTPUT_CHECKED, the `# …` lines right under the command in the
document are its expected output: each must be a line the command prints (lines with `…` are skipped).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import polars as pl
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
pytestmark = pytest.mark.workflow

FORMS: dict[str, str] = {
    # README.md
    "make demo": "make",
    "make test": "make",
    ".venv/bin/infscale plan config/demo.yaml": "run",
    ".venv/bin/infscale plan config/demo.yaml --cells": "run",
    ".venv/bin/infscale predict --model llama-3.1-8b --hardware h200-sxm --precision fp8 --tp 1 --pp 1 --dp 1 "
    "--isl 128 --osl 2048 --requests 2000 --json": "run",
    ".venv/bin/infscale predict --engine trtllm --model llama-3.3-70b --hardware h100-sxm --precision fp8/fp8 "
    "--tp 1 --isl 1024 --osl 1024 --arrival concurrency:16": "run",
    ".venv/bin/snakemake --profile profiles/local --config campaign=config/my.yaml": "run",
    ".venv/bin/infscale summary config/my.yaml": "run",
    ".venv/bin/infscale figures config/my.yaml": "run",
    ".venv/bin/infscale report config/my.yaml": "run",
    ".venv/bin/infscale export config/my.yaml": "run",
    ".venv/bin/snakemake --profile profiles/local calibration --config campaign=config/my.yaml": "dry-run",
    ".venv/bin/infscale run config/my.yaml --profile profiles/slurm --settings profiles/slurm/settings.yaml": "parse",
    ".venv/bin/infscale status config/my.yaml --packing layout --watch 30": "parse",
    ".venv/bin/infscale recommend --model qwen2.5-32b --gpus 8 --hardware h200-sxm --isl 1024 --osl 16384 "
    "[--tpot-p99-ms 40] [--ttft-p99-ms 2000] [--profile results/reference/profiles/…yaml] "
    "[--measured cells.parquet]": "synopsis",
    ".venv/bin/infscale merge config/gpu-node.yaml --results-root results/reference": "run",
    ".venv/bin/infscale validate config/gpu-node.yaml --results-root results/reference": "run",
    ".venv/bin/infscale validate config/gpu-node.yaml --results-root results/reference --profile "
    "results/reference/profiles/h100-sxm.torch.2026-11-27c.yaml": "run",
    ".venv/bin/infscale extrapolate config/h100-node.yaml --out results/predicted/h100-node.27c --validation "
    "results/reference/gpu-node/validation.h100-sxm.torch.2026-11-27c.parquet --profile "
    "results/reference/profiles/h100-sxm.torch.2026-11-27c.yaml": "run",
    ".venv/bin/infscale ae bundle config/gpu-node.yaml --results-root results/reference --out artifacts": "run",
    ".venv/bin/infscale ae verify artifacts/gpu-node-ae": "run",
    ".venv/bin/infscale ae regenerate artifacts/gpu-node-ae": "run",
    ".venv/bin/infscale ae reduce config/gpu-node.yaml --target cpu --out gpu-node-cpu.yaml": "run",
    ".venv/bin/infscale ae compare REFERENCE NEW": "synopsis",
    # docs/artifact-evaluation.md
    "infscale ae bundle config/gpu-node.yaml --results-root results/reference --out artifacts": "run",
    "snakemake --profile profiles/local ae_bundle --config campaign=config/my.yaml": "run",
    "snakemake --profile profiles/local ae_bundle --config campaign=config/gpu-node.yaml "
    "results_root=results/reference ae_existing=true ae_out=artifacts": "run",
    "infscale ae verify artifacts/gpu-node-ae": "run",
    "infscale ae regenerate artifacts/gpu-node-ae": "run",
    "infscale ae reduce config/gpu-node.yaml --target cpu": "run",
    "infscale ae reduce config/gpu-node.yaml --target 1gpu": "run",
    "infscale ae compare REFERENCE NEW [--tol METRIC=REL ...] [--match spec|shape] [--json]": "synopsis",
    "infscale ae reduce config/gpu-node.yaml --target cpu --out gpu-node-cpu.yaml": "run",
    "snakemake --profile profiles/local --config campaign=gpu-node-cpu.yaml results_root=ref": "run",
    "infscale ae bundle gpu-node-cpu.yaml --results-root ref --out artifacts": "run",
    "snakemake --profile profiles/local --config campaign=gpu-node-cpu.yaml results_root=rerun": "run",
    "infscale ae compare artifacts/gpu-node-cpu-ae rerun/gpu-node-cpu": "run",
    # docs/local-slurm.md
    "bash scripts/local-slurm.sh up": "script",
    "bash scripts/local-slurm.sh status": "script",
    "INFSCALE_REQUIRE_SLURM=1 python -m pytest tests/slurm -q": "collect",
    "bash scripts/local-slurm.sh down": "script",
    # docs/perfmodel.md
    ".venv/bin/infscale predict --model llama-3.1-8b --hardware h200-sxm --tp 1 --isl 1024 --osl 16384 --json": "run",
    ".venv/bin/infscale predict --model qwen2.5-32b --hardware h200-sxm --tp 4 --isl 1024 --osl 16384 --json": "run",
    ".venv/bin/infscale predict --model llama-3.1-8b --hardware h200-sxm --dp 8 --isl 1024 --osl 16384 --json": "run",
    # docs/results.md (the demo's results are not in the sandbox: the export itself runs for config/my.yaml above)
    ".venv/bin/infscale export config/demo.yaml": "parse",
    # docs/slurm.md
    "snakemake --profile profiles/slurm calibration --config campaign=config/my.yaml": "dry-run",
}
OUTPUT_CHECKED = {
    "infscale ae bundle config/gpu-node.yaml --results-root results/reference --out artifacts",
    "infscale ae verify artifacts/gpu-node-ae",
    "infscale ae reduce config/gpu-node.yaml --target cpu",
    "infscale ae reduce config/gpu-node.yaml --target 1gpu",
    "infscale ae compare artifacts/gpu-node-cpu-ae rerun/gpu-node-cpu",
}
# a line of an untagged block that starts with one of these is a command the test would not see: tag the block bash
COMMAND_WORDS = (".venv/bin/", "infscale ", "snakemake ", "make ", "bash ", "python ")
# the sandbox's campaign `config/my.yaml` (the docs' example name): small enough to run in seconds
MY_CAMPAIGN = {"name": "my-study", "backend": "sim", "hardware": "h200-sxm", "models": ["llama-3.1-8b"],
               "layouts": ["dp1", "tp2"], "requests": 16, "workloads": [{"name": "w", "isl": 128, "osl": [128, 256]}]}
SANDBOX_COPIES = ["config", "profiles", "workflow", "Snakefile", "scripts", "Makefile", "envs", "constraints.txt",
                  "pyproject.toml", "results/reference"]


@dataclass
class DocCommand:
    doc: str
    line: int
    text: str                      # words joined by single spaces, comment removed
    output: list[str] = field(default_factory=list)  # the `# …` lines right under it


def untagged_commands(path: Path) -> list[str]:
    """Lines of blocks not tagged bash that start like a command (diagrams indent theirs)."""
    text = path.read_text()
    return [f"{path.name}: {line}" for block in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
            if block.group(1) not in ("bash", "sh", "shell")
            for line in block.group(2).splitlines() if line.startswith(COMMAND_WORDS)]


def doc_commands(path: Path) -> list[DocCommand]:
    """The commands of a document's ```bash blocks, in order."""
    text = path.read_text()
    commands: list[DocCommand] = []
    for block in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.MULTILINE | re.DOTALL):
        language, body = block.group(1), block.group(2)
        first_line = text[:block.start()].count("\n") + 2
        if language not in ("bash", "sh", "shell"):
            continue
        logical: list[tuple[int, str]] = []
        pending = ""
        for offset, line in enumerate(body.splitlines()):
            if pending:
                pending += " " + line.strip()
            else:
                start, pending = first_line + offset, line.strip()
            if pending.endswith("\\"):
                pending = pending[:-1]
                continue
            logical.append((start, pending))
            pending = ""
        last: DocCommand | None = None
        for number, line in logical:
            if not line:
                last = None
            elif line.startswith("#"):
                if last is not None:
                    last.output.append(line.lstrip("#").strip())
            else:
                last = DocCommand(path.name, number, " ".join(shlex.split(line, comments=True)))
                commands.append(last)
    return commands


def test_every_documented_command_is_classified_and_every_entry_is_documented():
    assert not [line for doc in DOCS for line in untagged_commands(doc)], "tag these blocks ```bash"
    shown_commands = [command for doc in DOCS for command in doc_commands(doc)]
    unknown = [f"{c.doc}:{c.line}: {c.text}" for c in shown_commands if c.text not in FORMS]
    assert not unknown, "classify these commands in FORMS (tests/test_doc_commands.py):\n" + "\n".join(unknown)
    shown = {c.text for c in shown_commands}
    stale = [text for text in FORMS if text not in shown]
    assert not stale, f"FORMS entries no document shows any more: {stale}"
    assert OUTPUT_CHECKED <= shown


def make_sandbox(folder: Path) -> dict[str, str]:
    """A copy of what the commands read (and may write), and the environment to run them in."""
    for name in SANDBOX_COPIES:
        source, target = REPO / name, folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy2(source, target)
    (folder / ".venv").symlink_to(REPO / ".venv")
    (folder / "config" / "my.yaml").write_text(yaml.safe_dump(MY_CAMPAIGN))
    settings = folder / "profiles" / "slurm" / "settings.yaml"
    raw = yaml.safe_load(settings.read_text())
    raw["launcher"]["executor"] = "debug"  # dry-runs ask no cluster
    settings.write_text(yaml.safe_dump(raw))
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def infscale_argv(text: str) -> list[str]:
    words = shlex.split(text)
    assert words[0] in ("infscale", ".venv/bin/infscale"), text
    return words[1:]


def parse_only(argv: list[str]) -> int:
    """The real argument parser on `argv`; no command runs."""
    from infscale import cli

    with mock.patch.dict(cli.COMMANDS, {name: (lambda args: 0) for name in cli.COMMANDS}):
        return cli.main(argv)


def check_synopsis(text: str) -> None:
    words = shlex.split(text)
    optional, required, depth = [], [], 0
    for word in words:
        depth += word.count("[")
        (optional if depth else required).append(word.strip("[]"))
        depth -= word.count("]")
    argv = infscale_argv(" ".join(shlex.quote(w) for w in required))
    assert parse_only(argv) == 0, text
    subcommand = [w for w in argv if not w.startswith("-")][:2 if argv[0] == "ae" else 1]
    helped = subprocess.run([sys.executable, "-m", "infscale", *subcommand, "--help"], capture_output=True,
                            text=True, timeout=120)
    for flag in (w.split("=")[0] for w in optional if w.startswith("--")):
        assert re.search(rf"(^|\s){re.escape(flag)}\b", helped.stdout), f"{text}: {flag} is not in --help"


def run_in(sandbox: Path, env: dict[str, str], command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, shell=True, cwd=sandbox, env=env, capture_output=True, text=True, timeout=600)


def take(command: DocCommand, sandbox: Path, env: dict[str, str]) -> None:
    form, where = FORMS[command.text], f"{command.doc}:{command.line}: {command.text}"
    if form == "run":
        result = run_in(sandbox, env, command.text)
        assert result.returncode == 0, f"{where}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        if command.text in OUTPUT_CHECKED:
            printed = {line.strip() for line in (result.stdout + result.stderr).splitlines()}
            for expected in command.output:
                assert "…" in expected or expected in printed, f"{where}: the document shows '{expected}'; " \
                    f"the command printed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    elif form == "dry-run":
        result = run_in(sandbox, env, f"{command.text} -n")
        assert result.returncode == 0, f"{where}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    elif form == "parse":
        assert parse_only(infscale_argv(command.text)) == 0, where
    elif form == "synopsis":
        check_synopsis(command.text)
    elif form == "make":
        target = shlex.split(command.text)[1]
        result = run_in(sandbox, env, f"make -n {target}")
        assert result.returncode == 0 and result.stdout.strip(), f"{where}\n{result.stderr}"
        for line in result.stdout.splitlines():
            if line.strip().startswith(".venv/bin/snakemake"):
                dry = run_in(sandbox, env, f"{line.strip()} -n")
                assert dry.returncode == 0, f"{where}: {line}\n{dry.stdout[-3000:]}\n{dry.stderr[-3000:]}"
    elif form == "script":
        words = shlex.split(command.text)
        script = sandbox / words[1]
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, where
        assert re.search(rf"^\s*(\S+\|)*{re.escape(words[2])}(\|\S+)*\)", script.read_text(), re.MULTILINE), \
            f"{where}: {words[1]} has no '{words[2]})' case"
    elif form == "collect":
        result = subprocess.run(f"{command.text} --collect-only", shell=True, cwd=REPO, env=env, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, f"{where}\n{result.stdout[-3000:]}"
    else:
        raise AssertionError(f"{where}: unknown form {form!r}")


@pytest.mark.parametrize("doc", [d for d in DOCS if doc_commands(d)], ids=lambda d: d.name)
def test_documented_commands_work(doc: Path, tmp_path: Path) -> None:
    env = make_sandbox(tmp_path)
    failed = []
    for command in doc_commands(doc):
        if command.text in FORMS:  # an unclassified one fails the classification test
            try:
                take(command, tmp_path, env)
            except (AssertionError, subprocess.TimeoutExpired) as err:  # go on: report every failing command
                failed.append(str(err))
    assert not failed, "\n\n".join(failed)


# ------------------------------------------------------------------------------ numbers quoted in the docs


def test_numbers_in_the_readme_match_the_files_they_come_from():
    """The measured-cell count and the profile's median errors in the README are those of the committed tables."""
    readme = (REPO / "README.md").read_text()
    cells = pl.read_parquet(REPO / "results" / "reference" / "gpu-node" / "cells.parquet")
    measured, planned = int((cells["status"] == "ok").sum()), cells.height
    assert f"{measured} measured cells of a" in readme and f"{measured} of {planned} cells measured" in readme
    table = (REPO / "results" / "reference" / "gpu-node" / "validation.h100-sxm.torch.2026-11-27c.md").read_text()

    def median(cells_row: str, metric: str) -> str:
        found = re.search(rf"^\| {cells_row} \| {re.escape(metric)} \| (\d+) \| ([\d.]+)% \|", table, re.MULTILINE)
        assert found, (cells_row, metric)
        return found.group(1), found.group(2)

    (n_all, throughput), (_, tpot) = median("all", "output tok/s"), median("all", "TPOT p50 ms")
    (_, held_throughput), (_, held_tpot) = median("held out", "output tok/s"), median("held out", "TPOT p50 ms")
    assert (f"median error over the {n_all} measured cells: throughput {throughput} %, TPOT p50 {tpot} %; "
            f"held-out models {held_throughput} % / {held_tpot} %") in readme
