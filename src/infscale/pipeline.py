"""What the Snakefile needs to know about a campaign: its files, its bench jobs and each job's cell set.

Kept here (not in the Snakefile) so the rules stay thin and this logic is unit-tested without Snakemake.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from infscale.campaign import Campaign, SpecError, load_campaign
from infscale.campaign.plan import PlannedCell, plan_campaign

PACKINGS = ("auto", "layout", "model")


@dataclass
class CampaignRun:
    campaign_file: Path
    results_root: Path
    packing: str
    campaign: Campaign = field(init=False)
    planned: list[PlannedCell] = field(init=False)

    def __post_init__(self) -> None:
        if self.packing not in PACKINGS:
            raise SpecError([f"packing: '{self.packing}' is not one of {', '.join(PACKINGS)}"])
        self.campaign = load_campaign(self.campaign_file)
        if self.packing == "auto":
            # A GPU backend needs one allocation per layout; the sim backend needs no GPU, so one job per
            # model saves process start-ups.
            self.packing = "model" if self.campaign.spec.backend == "sim" else "layout"
        self.planned = plan_campaign(self.campaign, self.packing)

    def cli_arguments(self) -> list[str]:
        """The campaign's arguments to each `infscale` step of the workflow, one list item per argument (the
        Snakefile quotes them for the shell). Values are attached with `=`, and a campaign path that starts with
        `-` gets `./`, so no file name is ever read as an option."""
        campaign = str(self.campaign_file)
        campaign = f"./{campaign}" if campaign.startswith("-") else campaign
        return [campaign, f"--results-root={self.results_root}", f"--packing={self.packing}"]

    def require_feasible(self) -> None:
        """A campaign none of whose cells can run is an error, not a run that measures nothing."""
        if any(item.feasible for item in self.planned):
            return
        reasons = Counter(item.reason for item in self.planned)
        reason, count = reasons.most_common(1)[0] if reasons else ("no cell planned", 0)
        raise SpecError([f"{self.campaign_file}: none of the {len(self.planned)} planned cells is feasible "
                         f"({count} because: {reason}); nothing to measure"])

    def check_workflow_paths(self) -> None:
        """Snakemake reads `{...}` in a file name as a wildcard: refuse such a campaign path or results root with
        its name, rather than fail later on a wildcard error about rule `all`."""
        for key, value in (("campaign", self.campaign_file), ("results_root", self.results_root)):
            if "{" in str(value) or "}" in str(value):
                raise SpecError([f"{key}: '{value}' holds '{{' or '}}', which Snakemake reads as a wildcard; "
                                 "choose a path without braces"])

    @property
    def results_dir(self) -> Path:
        return self.results_root / self.campaign.name

    @property
    def plan_file(self) -> Path:
        return self.results_dir / "plan.parquet"

    @property
    def merged_file(self) -> Path:
        return self.results_dir / "cells.parquet"

    @property
    def summary_file(self) -> Path:
        return self.results_dir / "summary.md"

    @property
    def fits_file(self) -> Path:
        return self.results_dir / "fits.parquet"

    @property
    def claims_file(self) -> Path:
        return self.results_dir / "claims.parquet"

    @property
    def figures_dir(self) -> Path:
        return self.results_dir / "figures"

    @property
    def figures_manifest(self) -> Path:
        """Written last by `infscale figures`: the figures drawn and why the others were skipped."""
        return self.figures_dir / "figures.json"

    @property
    def report_file(self) -> Path:
        return self.results_dir / "report.html"

    def validation_files(self) -> list[Path]:
        """`infscale validate`'s tables (one per hardware profile predicted with), if any."""
        return sorted(self.results_dir.glob("validation*.parquet"))

    def job_summary(self, job: str) -> Path:
        """Written by the bench job when all its cells are done: their summary rows."""
        return self.results_dir / "bench" / f"{job}.parquet"

    def jobs(self) -> dict[str, list[PlannedCell]]:
        """Bench jobs with at least one feasible cell, each with its feasible cells."""
        grouped: dict[str, list[PlannedCell]] = defaultdict(list)
        for item in self.planned:
            if item.feasible:
                grouped[item.job].append(item)
        return dict(grouped)

    def write_launcher_settings(self, raw: object) -> Path:
        """Validate the launcher settings (and, for Slurm, check them against the cluster), then store them as
        JSON under the results directory for the bench jobs; rewritten only when they change."""
        from infscale.launch.settings import check_against_cluster, load_launcher_settings

        settings = load_launcher_settings(raw, "launcher settings")
        check_against_cluster(settings, "launcher settings")
        path = self.results_dir / "launcher.json"
        text = settings.model_dump_json(indent=1)
        if not path.exists() or path.read_text() != text:
            from infscale.results.io import write_text_atomic

            write_text_atomic(path, text)
        return path

    def merge(self, repair: bool = False):  # -> polars.DataFrame
        """The merged cells (analysis/merge.py), read through the bench jobs' summary files where they exist;
        with `repair`, damaged cell files are moved aside and stale job summaries removed (check_cells)."""
        from infscale.analysis.merge import merge_cells

        return merge_cells(self.planned, self.results_dir, self.campaign.hardware.gpus_per_node,
                           [self.job_summary(job) for job in self.jobs()], repair)

    def check_cells(self, repair: bool = False):  # -> results.integrity.CellCheck
        """Check every feasible cell's file and the bench jobs' summaries (results/integrity.py). The Snakefile
        runs this with `repair` before building the DAG: a damaged file is moved to damaged/, a job whose summary
        lists a cell no longer intact loses that summary, so Snakemake runs the job again, a file of a cell no
        longer planned goes to superseded/, and a planned cell's file found there comes back to cells/."""
        from infscale.results.integrity import check_cells

        expected = {item.cell.id: (item.cell.spec_hash, item.cell.spec_json)
                    for items in self.jobs().values() for item in items}
        planned = {item.cell.id: item.cell.spec_json for item in self.planned} if repair else None
        return check_cells(self.results_dir, expected, [self.job_summary(job) for job in self.jobs()], repair, planned)

    def job_signature(self, job: str) -> str:
        """Changes exactly when the job's set of cells changes (cell ids carry their spec hash)."""
        ids = sorted(item.cell.id for item in self.jobs().get(job, []))
        return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def check_config_files(paths: list) -> None:
    """Snakemake reads its config files (e.g. profiles/slurm/settings.yaml) with a loader that keeps the last of
    a key given twice; read them again strictly so such a file is an error naming the key."""
    from infscale.yamlfile import YamlFileError, read_yaml

    for path in paths:
        try:
            read_yaml(path, "config file")
        except YamlFileError as err:
            raise SpecError([str(err)]) from None


# ------------------------------------------------------------------------------------- the analysis steps
# One function per derived file, shared by the command line (`infscale merge / fit / claims`) and
# `infscale ae regenerate`, so a regenerated table comes from exactly the code that wrote the original.


def write_merge(run: CampaignRun):  # -> polars.DataFrame
    """Merge the cell files into `cells.parquet` and write `summary.md`; returns the merged cells."""
    from infscale.analysis.merge import write_merged
    from infscale.analysis.summary import summary_markdown
    from infscale.results.io import write_text_atomic

    frame = run.merge(repair=True)
    write_merged(frame, run.merged_file, run.campaign.config_hash)
    text = summary_markdown(frame, run.campaign.name, run.campaign.spec.backend, run.campaign.hardware.name,
                            run.campaign.hardware.gpus_per_node)
    write_text_atomic(run.summary_file, text)
    return frame


def write_fits(run: CampaignRun, merged):  # -> polars.DataFrame
    """Fit the scaling laws to the merged cells and write `fits.parquet`; returns the fits."""
    from infscale.analysis.fits import fit_campaign
    from infscale.results.io import write_table_atomic

    fits = fit_campaign(merged)
    write_table_atomic(fits.to_arrow(), run.fits_file, {b"infscale.config_hash": run.campaign.config_hash.encode()})
    return fits


def write_claims(run: CampaignRun, merged) -> str:
    """Check the claims on the merged cells (with `fits.parquet` when there is one); write `claims.parquet` and
    `claims.md`; returns the markdown."""
    import polars as pl

    from infscale.analysis.claims import check_claims, claims_markdown
    from infscale.results.io import write_table_atomic, write_text_atomic

    fits = pl.read_parquet(run.fits_file) if run.fits_file.exists() else None
    params = {arch.name: float(arch.param_counts().total) for arch in run.campaign.models.values()}
    verdicts = check_claims(merged, params, fits)
    table = pl.DataFrame([v.row() for v in verdicts])
    write_table_atomic(table.to_arrow(), run.claims_file,
                       {b"infscale.config_hash": run.campaign.config_hash.encode()})
    text = claims_markdown(verdicts, run.campaign.name)
    write_text_atomic(run.claims_file.with_suffix(".md"), text)
    return text


def write_figures(run: CampaignRun, merged) -> list:  # -> list[analysis.figures.FigureResult]
    """Draw the campaign's figures into `figures/` (with `figures.json`); returns what was drawn or skipped.
    No fits.parquet: the figures fit their USL curves themselves, so the workflow draws them while `fit` runs."""
    from infscale.analysis.figures import read_validation, render_figures

    campaign = run.campaign
    kind = "predicted" if campaign.spec.backend == "sim" else "measured"
    params = {arch.name: float(arch.param_counts().total) for arch in campaign.models.values()}
    return render_figures(merged, run.figures_dir, validation=read_validation(run.validation_files()),
                          title=f"campaign {campaign.name}: {campaign.spec.backend} backend on "
                                f"{campaign.hardware.name} ({kind})", model_params=params, workers=2)
