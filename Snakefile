# infscale campaign DAG: plan -> [engine: trtllm engine flow] -> bench (one job per layout group, or per model
# locally) -> merge + summary -> fit -> claims, figures -> report (report.html, the last rule); `ae_bundle`
# (not in `all`) packs it all for artifact evaluation; `calibration` (not in `all`) measures the campaign's hardware
# with the microbenchmarks and writes a hardware profile from them.
# Run:  snakemake --profile profiles/local --config campaign=config/demo.yaml
# All logic lives in src/infscale; the rules only call the `infscale` command line.
# Shell safety: every value that comes from the command line or a file (campaign path, results root, launcher
# file, log and output paths) reaches the shell quoted: {x:q} in the rules, shlex.join for the argument lists here.

import re
import shlex
import sys
from pathlib import Path

from infscale.launch.engines import engine_flow, engines_of_job
from infscale.pipeline import CampaignRun, check_config_files

check_config_files(workflow.configfiles)

CAMPAIGN = CampaignRun(
    campaign_file=Path(config.get("campaign", "config/demo.yaml")),
    results_root=Path(config.get("results_root", "results")),
    packing=config.get("packing", "auto"),
)
CAMPAIGN.check_workflow_paths()
CAMPAIGN.require_feasible()
RESULTS = CAMPAIGN.results_dir
# Every measured cell file is checked before the DAG is built (results/integrity.py), on a dry run too: a damaged
# one is moved to damaged/, a misnamed one is refused, and a bench job whose summary lists a cell no longer intact
# loses that summary, so that its job runs again and measures what is missing.
for line in CAMPAIGN.check_cells(repair=True).lines():
    print(f"infscale: {line}", file=sys.stderr)
# `infscale` in the config overrides the command (split into words, never run as shell syntax)
INFSCALE = shlex.join(shlex.split(config["infscale"]) if "infscale" in config else [sys.executable, "-m", "infscale"])
COMMON = shlex.join(CAMPAIGN.cli_arguments())
# Launcher settings (profiles/slurm/settings.yaml's `launcher:` block): validated, and checked against the
# cluster, before anything is submitted; the bench jobs read them from a file in the results directory.
LAUNCHER_FILE = CAMPAIGN.write_launcher_settings(config.get("launcher"))
ENGINE_FLOW = CAMPAIGN.campaign.spec.backend == "trtllm" and engine_flow(config.get("launcher"))

include: "workflow/rules/plan.smk"
include: "workflow/rules/bench.smk"
include: "workflow/rules/analyze.smk"
include: "workflow/rules/ae.smk"
include: "workflow/rules/calibrate.smk"


rule all:
    input:
        # every bench job's summary is a target itself: one that the cell check removed (above) is made again
        # even though the merged table downstream of it is still there
        [CAMPAIGN.job_summary(job) for job in CAMPAIGN.jobs()],
        CAMPAIGN.merged_file,
        CAMPAIGN.summary_file,
        CAMPAIGN.fits_file,
        CAMPAIGN.claims_file,
        CAMPAIGN.figures_manifest,
        CAMPAIGN.report_file,


onsuccess:
    if CAMPAIGN.summary_file.exists():
        print(CAMPAIGN.summary_file.read_text())
