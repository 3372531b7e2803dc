"""The `infscale` command line: plan, predict, bench, merge, summary, run."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from infscale.campaign import SpecError
from infscale.campaign.spec import MAX_NODES


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error: `infscale predict: argument --isl: … (see infscale predict --help)`."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _whole(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number ≥ {least} (got {text!r})") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"expected a whole number ≥ {least} (got {text!r})")
    return value


def _count(text: str) -> int:
    """A count: a whole number, 1 or more."""
    return _whole(text, 1)


def _natural(text: str) -> int:
    return _whole(text, 0)


def _finite(text: str, zero_allowed: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and (value > 0 or (zero_allowed and value == 0))):
        raise argparse.ArgumentTypeError(f"expected a finite number {'≥' if zero_allowed else '>'} 0 (got {text!r})")
    return value


def _positive(text: str) -> float:
    """A finite number above 0 (a time, a size)."""
    return _finite(text, zero_allowed=False)


def _non_negative(text: str) -> float:
    return _finite(text, zero_allowed=True)


def _output_file(text: str) -> Path:
    """A file to write: a name, not a folder."""
    if not text.strip() or text.endswith("/") or Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"expected the path of a file to write, not a folder (got {text!r})")
    return Path(text)


def _requests(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return _count(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a whole number ≥ 1 or 'auto' (got {text!r})") from None


def _arrival(text: str) -> dict[str, object]:
    """offline | concurrency:N | poisson:RATE, as the campaign file's `arrival:` mapping."""
    mode, sep, value = text.partition(":")
    try:
        if mode == "offline" and not sep:
            return {"mode": "offline"}
        if mode == "concurrency":
            return {"mode": mode, "concurrency": _count(value)}
        if mode == "poisson":
            return {"mode": mode, "rate": _positive(value)}
    except argparse.ArgumentTypeError:
        pass
    raise argparse.ArgumentTypeError(f"expected offline, concurrency:N (N ≥ 1) or poisson:RATE (requests per "
                                     f"second > 0) (got {text!r})")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="infscale", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    plan = commands.add_parser("plan", help="expand a campaign into cells, with verdicts and GPU-hours")
    _campaign_args(plan)
    plan.add_argument("--write", action="store_true", help="write results/<campaign>/plan.parquet")
    plan.add_argument("--cells", action="store_true", help="list every cell, not one row per layout")
    plan.add_argument("--quiet", action="store_true", help="print nothing but errors")

    predict = commands.add_parser("predict", help="predict one cell with the sim backend")
    predict.add_argument("--model", required=True, help="catalog name or path to a Hugging Face config.json")
    predict.add_argument("--hardware", default="h200-sxm")
    predict.add_argument("--precision", default="bf16", help="weights[/kv], e.g. bf16, fp8, fp8/fp8")
    for name in ("dp", "tp", "pp", "ep"):
        predict.add_argument(f"--{name}", type=_count, default=1)
    predict.add_argument("--isl", type=_count, required=True)
    predict.add_argument("--osl", type=_count, required=True)
    predict.add_argument("--requests", type=_requests, default="auto", help="a number, or 'auto' "
                         "(4 × max concurrency)")
    predict.add_argument("--arrival", type=_arrival, default="offline", help="offline | concurrency:N | "
                         "poisson:RATE")
    predict.add_argument("--max-num-seqs", type=_count)
    predict.add_argument("--max-num-tokens", type=_count)
    predict.add_argument("--kv-memory-fraction", type=_positive)
    predict.add_argument("--kv-block-size", type=_count)
    predict.add_argument("--router", choices=("round_robin", "least_loaded"))
    predict.add_argument("--scheduler-policy", choices=("guaranteed_no_evict", "max_utilization"),
                         help="KV capacity scheduling (default: the engine's own)")
    predict.add_argument("--engine", choices=("trtllm", "torch"),
                         help="the engine the prediction stands for: trtllm composes iterations from measured "
                         "TensorRT-LLM operator latencies and schedules as trtllm-bench does; torch (as when left "
                         "out) is the roofline model with the catalog's or --profile's constants")
    predict.add_argument("--seed", type=_natural, default=0)
    predict.add_argument("--profile", type=Path, help="hardware profile (infscale calibrate) instead of the "
                         "catalog's efficiency constants")
    predict.add_argument("--json", action="store_true", help="print one JSON object")

    rec = commands.add_parser("recommend", help="rank the DP×TP×PP layouts of a GPU budget for a model and workload")
    rec.add_argument("--model", required=True, help="catalog name or path to a Hugging Face config.json")
    rec.add_argument("--gpus", type=_count, required=True)
    rec.add_argument("--hardware", default="h200-sxm")
    rec.add_argument("--precision", default="bf16")
    rec.add_argument("--isl", type=_count, required=True)
    rec.add_argument("--osl", type=_count, required=True)
    rec.add_argument("--requests", type=_requests, default="auto")
    rec.add_argument("--max-num-seqs", type=_count, default=256)
    rec.add_argument("--ttft-p99-ms", type=_positive, help="SLO: rank by goodput of requests whose TTFT is within it")
    rec.add_argument("--tpot-p99-ms", type=_positive, help="SLO: … and whose TPOT is within it")
    rec.add_argument("--profile", type=Path, help="hardware profile for the predictions (infscale calibrate)")
    rec.add_argument("--measured", type=Path, help="a merged cells.parquet: its measured cells replace predictions")
    rec.add_argument("--json", action="store_true")

    bench = commands.add_parser("bench", help="run one bench job of a campaign (skips cells already measured)")
    _campaign_args(bench)
    bench.add_argument("--job", required=True)
    bench.add_argument("--launcher", type=Path, help="launcher settings (YAML/JSON); default: run in this process")

    engine = commands.add_parser("engine", help="build (or find in the cache) one TensorRT-LLM engine of the "
                                 "campaign (the workflow's engine rule; trtllm backend, engine flow)")
    _campaign_args(engine)
    engine.add_argument("--engine", required=True, help="engine label (results/<c>/engines/<label>.json)")
    engine.add_argument("--launcher", type=Path, help="launcher settings (YAML/JSON) with the trtllm section")

    status = commands.add_parser("status", help="cells done/pending/failed per bench job, with Slurm job states")
    _campaign_args(status)
    status.add_argument("--watch", type=_positive, metavar="SECONDS", help="refresh until every cell is done")

    merge = commands.add_parser("merge", help="merge the campaign's cell files; write cells.parquet, summary.md")
    _campaign_args(merge)

    fit = commands.add_parser("fit", help="fit scaling laws (USL, power law, the OSL capacity knee) to the merged "
                              "cells; write fits.parquet")
    _campaign_args(fit)

    claims = commands.add_parser("claims", help="check the paper's claims C1–C12 on the merged cells; write "
                                 "claims.parquet and claims.md")
    _campaign_args(claims)

    figures = commands.add_parser("figures", help="draw the campaign's figures (PNG + SVG) into "
                                  "results/<campaign>/figures/, with figures.json listing them")
    _campaign_args(figures)

    export = commands.add_parser("export", help="write the campaign's results as flat Parquet tables for other "
                                 "tools: cells, requests, series, telemetry (docs/results.md)")
    _campaign_args(export)
    export.add_argument("--out", type=Path, help="folder for the tables (default: results/<campaign>/export)")

    report = commands.add_parser("report", help="write results/<campaign>/report.html: figures, summary, claims, "
                                 "fits and provenance in one self-contained file")
    _campaign_args(report)
    report.add_argument("--out", type=_output_file,
                        help="where to write the report (default: results/<campaign>/report.html)")

    validate = commands.add_parser("validate", help="predict every measured cell with the sim backend; write "
                                   "validation.parquet and validation.md with the errors")
    _campaign_args(validate)
    validate.add_argument("--profile", type=Path, help="hardware profile (infscale calibrate) to predict with")

    extra = commands.add_parser("extrapolate", help="predict every cell of a campaign with error bands taken from "
                                "a validation table (cells nobody has measured: 8 GPUs, two nodes)")
    extra.add_argument("config", type=Path, help="campaign file (config/*.yaml)")
    extra.add_argument("--validation", type=Path, required=True, help="validation.*.parquet of infscale validate "
                       "(the measured cells whose errors give the bands)")
    extra.add_argument("--profile", type=Path, help="hardware profile to predict with (use the validation's)")
    extra.add_argument("--out", type=Path, help="folder for predictions.parquet/.md (default: "
                       "results/predicted/<campaign>)")
    extra.add_argument("--replace", action="store_true", help="replace predictions already recorded there")

    mb = commands.add_parser("microbench", help="measure the calibration microbenchmarks (memory, GEMM, attention, "
                             "collectives) into microbench.json; never replaces one on disk")
    mb.add_argument("config", type=Path, nargs="?", help="campaign file: measure its hardware's GPU counts and dense "
                    "models into results/<campaign>/calibration/<hardware>/microbench.json")
    mb.add_argument("--results-root", type=Path, default=Path("results"))
    mb.add_argument("--packing", default="auto", choices=("auto", "layout", "model"), help=argparse.SUPPRESS)
    mb.add_argument("--out", type=Path, help="without a campaign: the folder for microbench.json")
    mb.add_argument("--gpus", type=_count, nargs="+", metavar="N", help="rank counts of the collectives (default: "
                    "the campaign's, else 2; 1 measures none)")
    mb.add_argument("--models", nargs="+", help="catalog models of the GEMM shapes, the first also of attention "
                    "(default: the campaign's dense models, else llama-3.1-8b)")
    mb.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"),
                    help="auto: CUDA when present, else the CPU (small sizes, gloo)")
    mb.add_argument("--launcher", type=Path, help="launcher settings (YAML/JSON): run it as a debug / local / "
                    "slurm job like the bench jobs; default: in this process")

    calibrate = commands.add_parser("calibrate", help="write a hardware profile from GPU benchmark outputs, "
                                    "optionally fitting the engine constants on measured cells")
    calibrate.add_argument("--hardware", required=True, help="catalog hardware the profile refines, e.g. h100-sxm")
    calibrate.add_argument("--engine", default="torch", help="engine whose iterations the profile describes")
    calibrate.add_argument("--microbench", type=Path, required=True, help="infscale microbench's microbench.json "
                           "(or benchmarks/gpu_microbench.py output)")
    calibrate.add_argument("--roofline", type=Path, help="benchmarks/torch_decode_roofline.py output (optional: "
                           "the decode-step HBM efficiency and the graphed all-reduce latency)")
    calibrate.add_argument("--moe-block", type=Path, help="benchmarks/gpu_fastpath_checks.py --part moe output "
                           "(the fixed cost per MoE layer)")
    calibrate.add_argument("--fit", type=Path, metavar="CONFIG", help="campaign whose measured cells the engine "
                           "constants are fitted on")
    calibrate.add_argument("--results-root", type=Path, default=Path("results"))
    calibrate.add_argument("--train-models", default="", help="comma-separated models of --fit to fit on "
                           "(the others are held out)")
    calibrate.add_argument("--name", required=True, help="profile name, e.g. h100-sxm.torch.2026-11-27")
    calibrate.add_argument("--out", type=_output_file, required=True)

    engines = commands.add_parser("engines", help="list or garbage-collect a TensorRT-LLM engine cache")
    engines.add_argument("action", choices=("list", "gc"))
    engines.add_argument("--cache", type=Path, required=True, help="the engine cache directory (trtllm.engine_cache)")
    engines.add_argument("--budget-gb", type=_non_negative,
                         help="gc: delete least recently used engines beyond this size")
    engines.add_argument("--keep", default="", help="gc: comma-separated engine digests never to delete")

    summary = commands.add_parser("summary", help="print the campaign summary")
    _campaign_args(summary)

    ae = commands.add_parser("ae", help="artifact evaluation: bundle a campaign, verify or regenerate a bundle, "
                             "derive a reduced-scale profile, compare a rerun with a reference")
    ae_commands = ae.add_subparsers(dest="ae_command", required=True)
    ae_bundle = ae_commands.add_parser("bundle", help="write <out>/<campaign>-ae/ and its .tar.gz: config, plan, "
                                       "cells, fits, claims, figures, report, lock file, profiles, manifest")
    _campaign_args(ae_bundle)
    ae_bundle.add_argument("--out", type=Path, default=Path("artifacts"), help="where the bundle goes")
    ae_bundle.add_argument("--profiles", type=Path, help="directory of hardware profiles to include (those named "
                           "after the campaign's GPU); default: the checkout's results/reference/profiles")
    ae_bundle.add_argument("--container-digest", help="digest of the container image the campaign ran in")
    ae_bundle.add_argument("--tol", action="append", default=[], metavar="METRIC=REL",
                           help="tolerance band stated in the bundle, e.g. output_tok_s=0.05 (repeatable; "
                           "default: infscale.ae.compare.DEFAULT_TOLERANCES)")
    ae_verify = ae_commands.add_parser("verify", help="check every file of a bundle against its manifest")
    ae_verify.add_argument("bundle", type=Path)
    ae_regen = ae_commands.add_parser("regenerate", help="rebuild fits, claims (figures, report) from a bundle's "
                                      "cells, no GPU; check them against the bundled ones (tables: floats "
                                      "within --rel-tol, the rest exactly)")
    ae_regen.add_argument("bundle", type=Path)
    ae_regen.add_argument("--out", type=Path, help="default: BUNDLE/regenerated")
    ae_regen.add_argument("--rel-tol", type=_relative_tolerance, default=None, metavar="REL",
                          help="relative tolerance of the tables' floats (integers and strings compare exactly); "
                          "default 1e-9 (infscale.ae.tables.REL_TOL)")
    ae_reduce = ae_commands.add_parser("reduce", help="derive a reduced-scale campaign (CPU with the sim backend, "
                                       "or one GPU) and print its expected wall time")
    ae_reduce.add_argument("config", type=Path)
    ae_reduce.add_argument("--target", choices=("cpu", "1gpu"), default="cpu")
    ae_reduce.add_argument("--osl-max", type=_count, default=1024, help="1gpu: longest OSL kept")
    ae_reduce.add_argument("--max-requests", type=_count, default=16, help="1gpu: requests per cell at most")
    ae_reduce.add_argument("--out", type=_output_file, help="campaign file to write (default: print it)")
    ae_compare = ae_commands.add_parser("compare", help="match cells by spec; per metric, which are within the "
                                        "tolerance band; whether each claim's verdict is the same")
    ae_compare.add_argument("reference", type=Path, help="a bundle, or a results directory with cells.parquet")
    ae_compare.add_argument("new", type=Path, help="a bundle, or a results directory with cells.parquet")
    ae_compare.add_argument("--tol", action="append", default=[], metavar="METRIC=REL",
                            help="relative tolerance of a metric (repeatable), on top of the reference bundle's "
                            "band (tolerances.json) or the default band; a metric not in the band is added")
    ae_compare.add_argument("--match", choices=("spec", "shape"), default="spec",
                            help="spec: the cell's spec hash; shape: model × precision × layout × workload × "
                            "ISL × OSL × arrival (a rerun on other hardware or another backend)")
    ae_compare.add_argument("--json", action="store_true", help="print one JSON object")

    run = commands.add_parser("run", help="drive the whole campaign through Snakemake and print the summary; "
                              "refuses while another live driver holds the campaign, takes over from a dead one")
    run.add_argument("config", type=Path)
    run.add_argument("--profile", default="profiles/local", help="Snakemake profile directory")
    run.add_argument("--settings", type=Path, help="extra Snakemake config file (e.g. launcher settings)")
    run.add_argument("--results-root", type=Path, default=Path("results"))
    run.add_argument("--directory", type=Path, help="Snakemake working directory (default: here)")
    run.set_defaults(snakemake_args=[])  # anything after `--` is passed on to snakemake

    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1:]
    try:  # argparse exits on a bad argument (one line, exit 2) or --help (exit 0): return its status instead
        args = parser.parse_args(argv)
        if passthrough:
            if args.command != "run":
                parser.error("arguments after -- are passed to snakemake by `infscale run` only")
            args.snakemake_args = passthrough
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else 2
    from infscale.opdata import OperatorDataError

    try:
        status = COMMANDS[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handlers below
        return status
    except SpecError as err:
        print(err, file=sys.stderr)
        return 2
    except OperatorDataError as err:  # the trtllm engine model without its measured tables
        print(f"infscale {args.command}: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `infscale predict … | head -1`: the reader left; stop quietly
        _stdout_to_devnull()
        return 1
    except OSError as err:  # an unwritable results root, a full disk: the file and the reason, no traceback
        where = f"{err.filename}: " if err.filename else ""
        print(f"infscale {args.command}: {where}{err.strerror or err}", file=sys.stderr)
        return 1


def _stdout_to_devnull() -> None:
    """After a broken pipe, point stdout at /dev/null so the interpreter's last flush does not complain."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout is no file (captured in tests): nothing to redirect
        pass


def _campaign_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="campaign file (config/*.yaml)")
    parser.add_argument("--results-root", type=Path, default=Path("results"))
    parser.add_argument("--packing", default="auto", choices=("auto", "layout", "model"),
                        help="bench job per layout (GPU backends) or per model; auto: model for sim, else layout")


def _relative_tolerance(text: str) -> float:
    try:
        return _non_negative(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a relative tolerance of 0 or more, e.g. 1e-9") from None


def _campaign_run(args: argparse.Namespace):
    from infscale.pipeline import CampaignRun

    return CampaignRun(args.config, args.results_root, args.packing)


# ------------------------------------------------------------------------------------------------- commands


def cmd_plan(args: argparse.Namespace) -> int:
    from infscale.campaign.plan import write_plan

    run = _campaign_run(args)
    if args.write:
        write_plan(run.planned, run.campaign.hardware.gpus_per_node, run.plan_file)
    if not args.quiet:
        from infscale.reports import print_plan

        print_plan(run, per_cell=args.cells)
    run.require_feasible()  # after the table, which shows each cell's reason
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from infscale.launch.driver import JobFailed, drive_job
    from infscale.launch.registry import LockHeld
    from infscale.launch.runner import job_outcomes, write_job_summary
    from infscale.launch.settings import check_against_cluster, load_launcher_settings

    run = _campaign_run(args)
    jobs = run.jobs()
    if args.job not in jobs:
        print(f"{args.config}: no bench job '{args.job}' in campaign '{run.campaign.name}'; "
              f"jobs: {', '.join(sorted(jobs)) or 'none'}", file=sys.stderr)
        return 2
    settings = load_launcher_settings(args.launcher, str(args.launcher or "launcher"))
    check_against_cluster(settings, str(args.launcher))
    reused = _cells_on_disk(run, args.job)  # measured by earlier runs: the job skips them
    try:
        drive_job(run, args.job, settings, log=lambda line: print(line, flush=True))
    except (JobFailed, LockHeld) as err:
        print(err, file=sys.stderr)
        return 1  # no job summary: the job is not complete and Snakemake will run it again
    outcomes = job_outcomes(run.jobs()[args.job], run.results_dir)
    write_job_summary(run.job_summary(args.job), args.job, outcomes)
    print(f"{args.job}: all {len(outcomes)} cells on disk: {len(outcomes) - len(reused)} measured now, "
          f"{len(reused)} reused from earlier runs")
    return 0


def _cells_on_disk(run, job: str) -> set[str]:
    from infscale.results.integrity import VALID, check_cell_file
    from infscale.results.io import cell_file

    cells = run.jobs()[job]
    return {p.cell.id for p in cells
            if check_cell_file(cell_file(run.results_dir, p.cell.id), p.cell.spec_hash,
                               p.cell.spec_json).state == VALID}


def cmd_engine(args: argparse.Namespace) -> int:
    from infscale.launch.engines import drive_engine
    from infscale.launch.settings import check_against_cluster, load_launcher_settings

    run = _campaign_run(args)
    settings = load_launcher_settings(args.launcher, str(args.launcher or "launcher"))
    check_against_cluster(settings, str(args.launcher))
    try:
        pointer = drive_engine(run, args.engine, settings)
    except Exception as err:  # the build job's own error, with its last line
        print(f"engine {args.engine}: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    print(f"engine {args.engine}: {pointer['engine_dir']}")
    return 0


def cmd_microbench(args: argparse.Namespace) -> int:
    """`infscale microbench --out DIR …` or `infscale microbench CONFIG` (the `microbench` rule): one measurement,
    never over one on disk (then it says so and exits 0, so the rule is idempotent); a failed job exits 1."""
    from infscale.catalog import CatalogError, get_model
    from infscale.launch.microbench import (
        DEFAULT_MODEL,
        RESULT,
        MicrobenchJob,
        calibration_dir,
        campaign_targets,
        drive_microbench,
        failure_line,
        job_gpus,
    )
    from infscale.launch.settings import check_against_cluster, load_launcher_settings

    if (args.config is None) == (args.out is None):
        print("infscale microbench: give a campaign file (CONFIG) or --out DIR, not both", file=sys.stderr)
        return 2
    if args.config is not None:
        from infscale.launch.driver import slurm_job_name

        run = _campaign_run(args)
        worlds, models = campaign_targets(run)
        out = calibration_dir(run)
        what = f"{run.campaign.name} on {run.campaign.hardware.name}"
        name = slurm_job_name(run.campaign.name, f"microbench.{run.campaign.hardware.name}")
        folder = run.results_dir / "jobs" / "submitit"
        needs_gpu = run.campaign.spec.backend != "sim"
    else:
        worlds, models, out, what = [2], [DEFAULT_MODEL], args.out, str(args.out)
        name, folder, needs_gpu = "infscale.microbench", args.out / "submitit", True
    worlds = sorted(set(args.gpus)) if args.gpus else worlds
    models = args.models or models
    if any(w < 1 for w in worlds):
        print(f"--gpus: {worlds}: rank counts are 1 or more", file=sys.stderr)
        return 2
    try:
        for model in models:
            get_model(model)
    except CatalogError as err:
        print(f"--models: {err}", file=sys.stderr)
        return 2
    target = out / RESULT
    if target.exists():
        print(f"{target} exists; a measurement is never overwritten (move it away to measure again)")
        return 0
    settings = load_launcher_settings(args.launcher, str(args.launcher or "launcher"))
    check_against_cluster(settings, str(args.launcher))
    collectives = ", ".join(map(str, [w for w in worlds if w > 1])) or "no"
    print(f"microbench {what}: collectives on {collectives} rank(s), GEMM shapes of {', '.join(models)}, "
          f"device {args.device}, {settings.executor} executor", flush=True)
    job = MicrobenchJob(str(out.resolve()), worlds, models, args.device)
    gpus = job_gpus(worlds, args.device, needs_gpu)
    try:
        written = drive_microbench(job, settings, folder.resolve(), name, gpus, log=lambda s: print(s, flush=True))
    except Exception as err:  # the job's own error (submitit's FailedJobError carries its traceback)
        if target.exists():  # written, then something after it failed: the measurement stands
            print(f"microbench: {type(err).__name__} after {target} was written: {err}", file=sys.stderr)
            return 0
        print(f"microbench {what}: failed: {failure_line(err)}", file=sys.stderr)
        if failure_line(err) not in f"{type(err).__name__}: {err}".splitlines()[0]:
            print(f"{type(err).__name__}: {err}", file=sys.stderr)  # the job's traceback and log paths
        return 1
    print(f"wrote {written}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from infscale.reports import print_status

    run = _campaign_run(args)
    while True:
        complete = print_status(run)
        if complete or not args.watch:
            return 0
        time.sleep(args.watch)


def cmd_merge(args: argparse.Namespace) -> int:
    from infscale.pipeline import write_merge

    run = _campaign_run(args)
    frame = write_merge(run)
    print(f"merged {frame.height} cells into {run.merged_file}")
    _warn_file_problems(frame, run.summary_file)
    return 0


def _warn_file_problems(frame, summary_file: Path) -> bool:
    """One line on stderr when merged cells have a missing, damaged or misnamed file; True when any has."""
    from infscale.results.schemas import FILE_PROBLEMS

    counts = dict(frame.group_by("status").len().iter_rows())
    if not any(counts.get(status) for status in FILE_PROBLEMS):
        return False
    print("warning: cell files need attention: " + ", ".join(f"{counts.get(s, 0)} {s}" for s in FILE_PROBLEMS)
          + f" (listed in {summary_file}); rerun the campaign to measure the missing and damaged cells again",
          file=sys.stderr)
    return True


def _read_merged(run):  # -> polars.DataFrame | None
    """The merged cells the analysis commands start from; None (and why, on stderr) before the first merge."""
    from infscale.results.tables import read_cells

    if not run.merged_file.exists():
        print(f"{run.merged_file} does not exist yet; run `infscale merge` first", file=sys.stderr)
        return None
    return read_cells(run.merged_file)


def cmd_export(args: argparse.Namespace) -> int:
    from infscale.results.tables import export

    run = _campaign_run(args)
    if not run.merged_file.exists():
        print(f"{run.merged_file} does not exist yet; run `infscale merge` first", file=sys.stderr)
        return 1
    import polars as pl

    for kind, path in export(run.results_dir, args.out or run.results_dir / "export").items():
        print(f"{kind:<10} {pl.scan_parquet(path).select(pl.len()).collect().item():>10,} rows  {path}")
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    from infscale.pipeline import write_fits

    run = _campaign_run(args)
    merged = _read_merged(run)
    if merged is None:
        return 1
    fits = write_fits(run, merged)
    laws = dict(fits.group_by("law").len().iter_rows()) if fits.height else {}
    print(f"{fits.height} fits ({', '.join(f'{n} {law}' for law, n in sorted(laws.items())) or 'none'}) "
          f"written to {run.fits_file}")
    return 0


def cmd_claims(args: argparse.Namespace) -> int:
    from infscale.pipeline import write_claims

    run = _campaign_run(args)
    merged = _read_merged(run)
    if merged is None:
        return 1
    print(write_claims(run, merged))
    return 0


def cmd_figures(args: argparse.Namespace) -> int:
    from infscale.pipeline import write_figures

    run = _campaign_run(args)
    merged = _read_merged(run)
    if merged is None:
        return 1
    results = write_figures(run, merged)
    drawn = [r.name for r in results if not r.skipped]
    print(f"{len(drawn)} figures in {run.figures_dir}: {', '.join(drawn) or 'none'}")
    for result in results:
        if result.skipped:
            print(f"  {result.name} not drawn: {result.skipped}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from infscale.analysis.report import write_report

    run = _campaign_run(args)
    try:
        path = write_report(run, args.out)
    except FileNotFoundError as err:
        print(err, file=sys.stderr)
        return 1
    print(f"report written to {path}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from infscale.analysis.validate import validate, validation_markdown
    from infscale.calibration import ProfileError, campaign_with_profile
    from infscale.results.io import write_table_atomic, write_text_atomic

    run = _campaign_run(args)
    campaign, profile = run.campaign, None
    if args.profile:
        try:
            campaign, profile = campaign_with_profile(campaign, args.profile)
        except ProfileError as err:
            print(f"--profile: {err}", file=sys.stderr)
            return 2
    merged = run.merge()
    frame = validate(campaign, run.planned, merged, profile.fitted_on if profile else [])
    if frame.is_empty():
        print(f"{run.results_dir}: no measured cell to validate against", file=sys.stderr)
        return 1
    stem = f"validation.{profile.name}" if profile else "validation"
    write_table_atomic(frame.to_arrow(), run.results_dir / f"{stem}.parquet")
    text = validation_markdown(frame, campaign.name, campaign.hardware.name, profile.name if profile else None)
    write_text_atomic(run.results_dir / f"{stem}.md", text)
    print(text)
    return 0


def cmd_extrapolate(args: argparse.Namespace) -> int:
    import datetime

    import polars as pl

    from infscale.analysis.extrapolate import (
        ExtrapolationError,
        ValidationScope,
        error_bands,
        extrapolate,
        predictions_markdown,
    )
    from infscale.calibration import ProfileError, campaign_with_profile
    from infscale.campaign import load_campaign
    from infscale.campaign.plan import plan_campaign
    from infscale.results.io import write_table_atomic, write_text_atomic

    campaign, profile = load_campaign(args.config), None
    out = args.out or Path("results") / "predicted" / campaign.name
    target = out / "predictions.parquet"
    if target.exists() and not args.replace:
        print(f"{target} exists (predictions recorded {datetime.datetime.fromtimestamp(target.stat().st_mtime):%F %T}"
              f"); pass --replace to replace them", file=sys.stderr)
        return 2
    if not args.validation.is_file():
        print(f"--validation: {args.validation} is not a file", file=sys.stderr)
        return 2
    try:
        if args.profile:
            campaign, profile = campaign_with_profile(campaign, args.profile)
    except ProfileError as err:
        print(f"--profile: {err}", file=sys.stderr)
        return 2
    try:
        validation = pl.read_parquet(args.validation)
        bands = error_bands(validation)
    except (ExtrapolationError, pl.exceptions.PolarsError) as err:
        print(f"--validation: {args.validation}: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    recorded = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    table = extrapolate(campaign, plan_campaign(campaign), bands, args.validation.name,
                        profile.name if profile else None, ValidationScope.of(validation))
    write_table_atomic(table.to_arrow(), target, {b"infscale.config_hash": campaign.config_hash.encode(),
                                                  b"infscale.recorded_at": recorded.encode()})
    text = predictions_markdown(table, campaign.name, bands, args.validation.name, profile.name if profile else None,
                                recorded)
    write_text_atomic(out / "predictions.md", text)
    print(f"{table.height} cells predicted with bands from {bands['output_tok_s'].cells} validation cells; "
          f"written to {target} and predictions.md")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from infscale.calibration import (
        ProfileError,
        fit_engine_constants,
        from_microbenchmarks,
        make_profile,
        read_json,
        with_efficiency,
        with_hardware,
        write_profile,
    )
    from infscale.catalog import CatalogError, get_hardware

    try:
        hardware = get_hardware(args.hardware)
    except CatalogError as err:
        print(f"--hardware: {err}", file=sys.stderr)
        return 2
    try:
        moe_block = read_json(args.moe_block) if args.moe_block else None
        roofline = read_json(args.roofline) if args.roofline else None
        efficiency, sources = from_microbenchmarks(hardware, read_json(args.microbench), roofline, moe_block)
        fitted_on: list[str] = []
        if args.fit:
            from infscale.pipeline import CampaignRun

            train = [m for m in args.train_models.split(",") if m]
            if not train:
                print("--fit needs --train-models (the models to fit on; the others are held out)", file=sys.stderr)
                return 2
            run = CampaignRun(args.fit, args.results_root, "auto")
            measured_on = with_efficiency(hardware, efficiency)
            fitted, fit_sources, fitted_on, rms = fit_engine_constants(
                with_hardware(run.campaign, measured_on), run.planned, run.merge(), measured_on, train)
            efficiency.update(fitted)
            sources.update(fit_sources)
        profile = make_profile(args.name, hardware, args.engine, efficiency, sources,
                               [p for p in (args.microbench, args.roofline, args.moe_block) if p and p.exists()],
                               fitted_on)
    except (ProfileError, CatalogError) as err:
        print(err, file=sys.stderr)
        return 2
    write_profile(profile, args.out)
    for field, value in profile.efficiency.items():
        print(f"{field:<26} {value:.4g}   ({profile.sources[f'efficiency.{field}'][:100]}…)")
    print(f"wrote {args.out}")
    return 0


def cmd_engines(args: argparse.Namespace) -> int:
    from infscale.backends.trtllm.cache import EngineCache, EngineCacheError

    if not args.cache.is_dir():
        print(f"--cache: {args.cache} is not a directory", file=sys.stderr)
        return 2
    cache = EngineCache(args.cache)
    if args.action == "list":
        for manifest in cache.list_engines():
            key = manifest.get("key", {})
            print(f"{Path(manifest['path']).name}  {manifest.get('total_bytes', 0) / 2**30:8.1f} GiB  "
                  f"last used {manifest['last_used']}  TensorRT-LLM {key.get('trtllm_version', '?')}  "
                  f"{key.get('gpu_name', '?')}")
        return 0
    if args.budget_gb is None or args.budget_gb < 0:
        print("gc needs --budget-gb (a size in GiB, 0 or more)", file=sys.stderr)
        return 2
    try:
        removed = cache.gc(int(args.budget_gb * 2**30), {k for k in args.keep.split(",") if k})
    except EngineCacheError as err:
        print(err, file=sys.stderr)
        return 1
    for item in removed:
        print(f"removed {item.path} ({item.bytes / 2**30:.1f} GiB, {item.reason})")
    print(f"{len(removed)} removed")
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    run = _campaign_run(args)
    if not run.summary_file.exists():
        print(f"{run.summary_file} does not exist yet; run the campaign first", file=sys.stderr)
        return 1
    print(run.summary_file.read_text())
    check = run.check_cells()  # the files now, which may have changed since summary.md was written
    if check.problems:
        print(f"warning: cell files need attention now: {check.counts()}; rerun the campaign to measure the "
              "missing and damaged cells again", file=sys.stderr)
        for line in check.lines():
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from infscale.launch.registry import LockHeld, driver_lock
    from infscale.launch.snakemake_lock import stale_lock
    from infscale.pipeline import CampaignRun

    run = CampaignRun(args.config, args.results_root, "auto")
    run.check_workflow_paths()
    run.require_feasible()
    snakefile = Path(__file__).resolve().parents[2] / "Snakefile"
    workdir = args.directory or Path.cwd()
    base = [sys.executable, "-m", "snakemake", "--snakefile", str(snakefile), "--directory", str(workdir),
            "--profile", str(args.profile)]
    # The campaign and results root go to snakemake in a config file, not as --config KEY=VALUE, which strips
    # quotes and reads the value as YAML (a path with ': ' or ' #' would not arrive as written).
    from infscale.results.io import write_text_atomic

    paths = run.results_dir / "run-config.json"  # beside launcher.json; jobs/*.json are registry records
    write_text_atomic(paths, json.dumps({"campaign": str(args.config.resolve()),
                                         "results_root": str(args.results_root.resolve())}, indent=1))
    config = ["--configfile", *([str(args.settings.resolve())] if args.settings else []), str(paths.resolve())]
    extra = list(args.snakemake_args)
    say = lambda line: print(f"infscale run: {line}", file=sys.stderr)  # noqa: E731
    try:
        with driver_lock(run.results_dir / "jobs" / "driver.lock", f"campaign {run.campaign.name}", log=say):
            if stale_lock(workdir):  # refuses (LockHeld) while a live snakemake holds it: launch/snakemake_lock.py
                subprocess.call([*base, *config, "--unlock"], stdout=subprocess.DEVNULL)
                say(f"removed the Snakemake lock of {workdir}: the snakemake that held it is gone")
            # --rerun-incomplete: a driver killed mid-run leaves its jobs' outputs marked incomplete; every infscale
            # output is written atomically (complete or absent) and its job is safe to run again
            status = subprocess.call([*base, *config, "--rerun-incomplete", *extra], preexec_fn=_stop_with(os.getpid()))
    except LockHeld as err:
        print(err, file=sys.stderr)
        return 1
    if status == 0 and run.summary_file.exists():
        print(run.summary_file.read_text())
    return status


def _stop_with(parent: int):
    """For the Snakemake child of `infscale run` (preexec_fn): SIGTERM when `parent` dies, even by SIGKILL (Linux
    prctl PR_SET_PDEATHSIG), so that no workflow goes on unwatched; Snakemake then finishes its running jobs and
    exits, releasing its lock."""
    def arm() -> None:
        if sys.platform == "linux":
            import ctypes
            import signal

            ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
            if os.getppid() != parent:  # the parent died before the signal was armed
                os._exit(1)
    return arm


def cmd_ae(args: argparse.Namespace) -> int:
    """The `infscale ae` subcommands; a bad bundle or input is one line on stderr and exit 2."""
    from infscale.ae.compare import CompareError
    from infscale.ae.manifest import BundleError

    try:
        return AE_COMMANDS[args.ae_command](args)
    except (BundleError, CompareError) as err:
        print(err, file=sys.stderr)
        return 2


def cmd_ae_bundle(args: argparse.Namespace) -> int:
    from infscale.ae.bundle import make_bundle
    from infscale.ae.compare import DEFAULT_TOLERANCES, parse_tolerance_overrides

    tolerances = {**DEFAULT_TOLERANCES, **parse_tolerance_overrides(args.tol)}
    bundle = make_bundle(args.config, args.results_root, args.out, packing=args.packing,
                         profiles_dir=args.profiles, container_digest=args.container_digest, tolerances=tolerances)
    print(f"{bundle.directory}: {bundle.files} files, {bundle.bytes / 2**20:.1f} MiB (manifest.json, ARTIFACT.md)")
    print(f"{bundle.tarball}: {bundle.tarball.stat().st_size / 2**20:.1f} MiB")
    if bundle.git_tree_dirty:
        print(f"warning: the code has uncommitted changes on top of commit {bundle.git_commit}; ARTIFACT.md and "
              "manifest.json (git_tree_dirty) say so. Commit them and bundle again to give reviewers a commit that "
              "is the code", file=sys.stderr)
    return 0


def cmd_ae_verify(args: argparse.Namespace) -> int:
    from infscale.ae.manifest import verify_bundle

    result = verify_bundle(args.bundle)
    print("\n".join(result.lines()))
    return 0 if result.ok else 1


def cmd_ae_regenerate(args: argparse.Namespace) -> int:
    from infscale.ae.regenerate import regenerate
    from infscale.ae.tables import REL_TOL

    result = regenerate(args.bundle, args.out, REL_TOL if args.rel_tol is None else args.rel_tol)
    print("\n".join(result.lines()))
    return 0 if result.ok else 1


def cmd_ae_reduce(args: argparse.Namespace) -> int:
    from infscale.ae.reduce import format_duration, reduce_campaign

    try:
        reduced = reduce_campaign(args.config, args.target, args.osl_max, args.max_requests)
    except SpecError:
        raise
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    # the expected wall time first, before the campaign file
    print(f"{reduced.raw['name']}: {reduced.cells} cells, expected wall time about "
          f"{format_duration(reduced.expected_s)} "
          f"({'CPU only, sim backend' if args.target == 'cpu' else 'one GPU, torch backend'})", file=sys.stderr)
    for note in reduced.notes:
        print(f"  {note}", file=sys.stderr)
    text = reduced.yaml_text(str(args.config))
    if args.out is None:
        print(text)
        return 0
    if args.out.exists():
        print(f"--out {args.out}: exists; not overwritten", file=sys.stderr)
        return 2
    from infscale.results.io import write_text_atomic

    write_text_atomic(args.out, text)
    print(f"wrote {args.out}; run it with: snakemake --profile profiles/local --config campaign={args.out}",
          file=sys.stderr)
    return 0


def cmd_ae_compare(args: argparse.Namespace) -> int:
    from infscale.ae.compare import DEFAULT_TOLERANCES, compare, load_side, parse_tolerance_overrides

    reference, new = load_side(args.reference), load_side(args.new)
    band = None
    if args.tol:  # on top of the reference bundle's stated band, else the default one
        band = {**(reference.tolerances or DEFAULT_TOLERANCES), **parse_tolerance_overrides(args.tol)}
    result = compare(reference, new, band, args.match)
    if args.json:
        print(json.dumps(result.to_dict(), default=float))
    else:
        print("\n".join(result.lines()))
    return 0 if result.ok else 1


AE_COMMANDS = {"bundle": cmd_ae_bundle, "verify": cmd_ae_verify, "regenerate": cmd_ae_regenerate,
               "reduce": cmd_ae_reduce, "compare": cmd_ae_compare}


def cmd_recommend(args: argparse.Namespace) -> int:
    import dataclasses

    from infscale.analysis.recommend import budget_campaign, format_ms, recommend, why

    limit = _gpu_limit(args.hardware, "recommend")
    if args.gpus > limit:
        print(f"--gpus: {args.gpus} GPUs exceed the {limit} of {MAX_NODES} nodes of {args.hardware} "
              f"(allowed: 1 to {limit})", file=sys.stderr)
        return 2
    measured = None
    if args.measured:
        measured = _read_measured(args.measured)
        if measured is None:
            return 2
    campaign = budget_campaign(args.model, args.gpus, args.hardware, args.isl, args.osl, args.requests,
                               args.precision, args.max_num_seqs)
    if args.profile:
        from infscale.calibration import ProfileError, campaign_with_profile

        try:
            campaign, _ = campaign_with_profile(campaign, args.profile)
        except ProfileError as err:
            raise SpecError([f"infscale recommend: --profile: {err}"]) from None
    options = recommend(campaign, args.ttft_p99_ms, args.tpot_p99_ms, measured)
    reason = why(options, args.osl, args.ttft_p99_ms, args.tpot_p99_ms)
    if args.json:
        print(json.dumps({"options": [dataclasses.asdict(o) for o in options], "why": reason}, default=float))
        return 0
    from rich.console import Console
    from rich.table import Table

    slo = args.ttft_p99_ms is not None or args.tpot_p99_ms is not None
    model = next(iter(campaign.models.values())).name
    table = Table(title=f"{model} on {args.gpus} × {args.hardware}, ISL {args.isl} / OSL {args.osl}"
                  + (" — ranked by goodput under the SLOs" if slo else " — ranked by output throughput"))
    columns = ["rank", "layout", "tok/s", "tok/s/GPU", "TTFT p99", "TPOT p99", "seqs/replica", "from"]
    if slo:
        columns[2:2] = ["goodput tok/s", "SLO met"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("layout", "from") else "right")
    for rank, o in enumerate(options, 1):
        if not o.feasible:
            table.add_row("—", o.layout, *["—"] * (len(columns) - 3), f"infeasible: {o.reason}")
            continue
        values = [str(rank), o.layout]
        if slo:
            values += [f"{o.goodput_tok_s:,.0f}", f"{o.slo_met_share:.0%}"]
        values += [f"{o.output_tok_s:,.0f}", f"{o.output_tok_s_per_gpu:,.0f}", format_ms(o.ttft_ms_p99),
                   format_ms(o.tpot_ms_p99), str(o.per_replica_sequences), o.source]
        table.add_row(*values)
    console = Console(width=200)
    console.print(table)
    console.print(f"why: {reason}")
    return 0


def _gpu_limit(hardware: str, command: str) -> int:
    """The most GPUs a layout may use on `hardware`: MAX_NODES whole nodes."""
    from infscale.catalog import CatalogError, get_hardware

    try:
        return MAX_NODES * get_hardware(hardware).gpus_per_node
    except CatalogError as err:
        raise SpecError([f"infscale {command}: --hardware: {err}"]) from None


def _read_measured(path: Path):  # -> polars.DataFrame | None
    """`recommend --measured`: a merged cells.parquet with the columns the recommendation matches on; None (and
    why, on stderr) otherwise."""
    import polars as pl

    needed = {"status", "model", "hardware", "layout", "isl_max", "osl_max", "predicted", "output_tok_s",
              "output_tok_s_per_gpu", "ttft_ms_p99", "tpot_ms_p99"}
    from infscale.results.tables import read_cells

    try:
        frame = read_cells(path)  # a table of an older schema is upgraded
    except (OSError, pl.exceptions.PolarsError) as err:
        reason = getattr(err, "strerror", None) or str(err).splitlines()[0]
        print(f"--measured: {path}: not a readable Parquet file of merged cells ({reason})", file=sys.stderr)
        return None
    missing = sorted(needed - set(frame.columns))
    if missing:
        print(f"--measured: {path}: not a merged cells.parquet (no column {', '.join(missing)})", file=sys.stderr)
        return None
    return frame


def cmd_predict(args: argparse.Namespace) -> int:
    from infscale.backends.sim.backend import SimBackend
    from infscale.campaign import campaign_from_dict
    from infscale.campaign.plan import plan_campaign

    engine = {k: v for k, v in {
        "max_num_seqs": args.max_num_seqs, "max_num_tokens": args.max_num_tokens,
        "kv_memory_fraction": args.kv_memory_fraction, "kv_block_size": args.kv_block_size,
        "router": args.router, "scheduler_policy": args.scheduler_policy,
    }.items() if v is not None}
    layout = f"dp{args.dp}tp{args.tp}pp{args.pp}" + (f"ep{args.ep}" if args.ep > 1 else "")
    gpus = args.dp * args.tp * args.pp
    limit = _gpu_limit(args.hardware, "predict")
    if gpus > limit:
        print(f"--dp × --tp × --pp: {gpus} GPUs exceed the {limit} of {MAX_NODES} nodes of {args.hardware} "
              f"(allowed: 1 to {limit})", file=sys.stderr)
        return 2
    gpus_per_node = limit // MAX_NODES
    raw = {
        "name": "predict", "backend": "sim",
        "hardware": {"name": args.hardware, "nodes": max(1, math.ceil(gpus / gpus_per_node))},
        "models": [args.model], "precision": [args.precision], "layouts": [layout],
        "workloads": [{"name": "predict", "isl": args.isl, "osl": args.osl, "requests": args.requests,
                       "arrival": args.arrival}],
        "engine": engine, "seed": args.seed,
    }
    if args.engine:
        raw["sim"] = {"engine": args.engine}
    campaign = campaign_from_dict(raw, source="infscale predict")
    profile_name = None
    if args.profile:
        from infscale.calibration import ProfileError, campaign_with_profile

        try:
            campaign, profile = campaign_with_profile(campaign, args.profile)
        except ProfileError as err:
            raise SpecError([f"infscale predict: --profile: {err}"]) from None
        profile_name = profile.name
    (item,) = plan_campaign(campaign)
    result: dict[str, object] = {
        "cell_id": item.cell.id, "feasible": item.feasible, "reason": item.reason,
        "kv_capacity_tokens": item.memory.kv_tokens_per_replica, "max_concurrency": item.max_concurrency,
        "weights_gib_per_gpu": round(item.memory.weights_bytes_per_gpu / 2**30, 3),
        "requests": item.cell.requests, "predicted": True, "profile": profile_name,
        "engine": campaign.sim_engine or "roofline", "operator_data": _operator_data(campaign),
        "max_num_seqs": item.cell.engine.max_num_seqs, "max_num_tokens": item.cell.engine.max_num_tokens,
    }
    if item.feasible:
        measured = SimBackend().measure(item.cell, None, campaign)  # type: ignore[arg-type]
        result.update({k: v for k, v in measured.summary.items()})
    else:
        for key in ("output_tok_s", "output_tok_s_per_gpu", "ttft_ms_p50", "tpot_ms_p50"):
            result[key] = None
    if args.json:
        print(json.dumps(result, default=float))
    else:
        width = max(len(k) for k in result)
        for key, value in result.items():
            shown = f"{value:,.3f}" if isinstance(value, float) else value
            print(f"{key:<{width}}  {shown}")
    return 0


def _operator_data(campaign) -> str | None:
    """The measured data a trtllm-engine prediction composes (None for the roofline model)."""
    if campaign.sim_engine != "trtllm":
        return None
    from infscale.opdata import data_version

    return data_version()


COMMANDS = {
    "plan": cmd_plan, "predict": cmd_predict, "bench": cmd_bench, "merge": cmd_merge, "summary": cmd_summary,
    "run": cmd_run, "status": cmd_status, "validate": cmd_validate,
    "calibrate": cmd_calibrate, "microbench": cmd_microbench, "engines": cmd_engines, "fit": cmd_fit,
    "claims": cmd_claims, "engine": cmd_engine, "recommend": cmd_recommend, "ae": cmd_ae,
    "extrapolate": cmd_extrapolate, "figures": cmd_figures, "report": cmd_report, "export": cmd_export,
}

if __name__ == "__main__":
    sys.exit(main())
