"""`infscale ae bundle CAMPAIGN`: everything a reviewer needs, in one directory and one tarball.

```
<out>/<campaign>-ae/
  ARTIFACT.md                 claims → figures → the command that regenerates each; hardware, software, durations
  manifest.json               every other file with its size and SHA-256 (infscale ae verify)
  tolerances.json             the relative tolerance band per metric that `infscale ae compare` applies
  config/<campaign file>      the campaign file, byte for byte
  reduced/<campaign>-cpu.yaml (and -1gpu.yaml) reduced-scale reproduction profiles (infscale ae reduce)
  results/<campaign>/         the results directory: plan.parquet (written from the campaign file), cells/ (every
                              cell's Parquet), failures/, cells.parquet, summary.md, fits.parquet, claims.parquet,
                              claims.md, validation*, figures/, report.html, PROVENANCE.md, logs/ — whatever exists;
                              not jobs/ (registry, locks, Slurm folders), damaged/ (unreadable files moved aside)
                              nor launcher.json and run-config.json (this cluster's settings, this machine's paths)
  environment/                constraints.txt (the lock file), pyproject.toml, envs/ (container definitions),
                              container.txt (the image digest, when one was used)
  profiles/                   the hardware profiles of the campaign's GPU (results/reference/profiles)
<out>/<campaign>-ae.tar.gz    the same directory, packed reproducibly (sorted, no owners, fixed times)
```

Results are only read: nothing under the results directory is written, and an existing bundle is never replaced.
"""

from __future__ import annotations

import gzip
import io
import json
import shutil
import tarfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import infscale
from infscale.ae.compare import DEFAULT_TOLERANCES, TOLERANCES_NAME, tolerance_document
from infscale.ae.manifest import MANIFEST_NAME, MANIFEST_VERSION, BundleError, file_entries

REPO_ROOT = Path(infscale.__file__).resolve().parents[2]   # the checkout (src layout)
SKIP_DIRS = {"jobs", "damaged"}     # machine-specific: job registry, locks, submitit folders; damaged files
                                     # moved aside (logs/cell-check.log, bundled, says what happened to them)
# this cluster's settings and this machine's paths; the plan is rewritten from the config
SKIP_FILES = {"launcher.json", "run-config.json", "plan.parquet"}
REQUIRED = ("cells.parquet", "fits.parquet", "claims.parquet")


@dataclass
class Bundle:
    directory: Path
    tarball: Path
    files: int
    bytes: int
    git_commit: str | None = None     # the commit of the code that bundled (without `-dirty`)
    git_tree_dirty: bool = False      # its working tree had uncommitted changes (ARTIFACT.md says so)


def bundle_name(campaign: str) -> str:
    return f"{campaign}-ae"


def _copy_results(src: Path, dst: Path) -> None:
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if rel.parts[0] in SKIP_DIRS or any(p.startswith(".") for p in rel.parts) or path.name.endswith(".tmp"):
            continue
        if path.is_dir() or path.is_symlink() or (len(rel.parts) == 1 and rel.name in SKIP_FILES):
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dst / rel)


def _profiles(profiles_dir: Path | None, hardware: str) -> list[Path]:
    """The profiles (and their PROVENANCE.md) whose file name starts with the campaign's hardware name."""
    if profiles_dir is None or not profiles_dir.is_dir():
        return []
    picked = [p for p in sorted(profiles_dir.iterdir()) if p.is_file() and p.name.startswith(hardware)]
    if picked and (profiles_dir / "PROVENANCE.md").is_file():
        picked.append(profiles_dir / "PROVENANCE.md")
    return picked


def _tar(directory: Path, tarball: Path) -> None:
    """Sorted members, no owners, fixed mtimes: the same directory packs to the same bytes."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in [directory, *sorted(directory.rglob("*"))]:
            info = tar.gettarinfo(str(path), arcname=str(Path(directory.name) / path.relative_to(directory)))
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            if path.is_file():
                with open(path, "rb") as handle:
                    tar.addfile(info, handle)
            else:
                tar.addfile(info)
    tmp = tarball.with_name(f".{tarball.name}.tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as packed:
        packed.write(buffer.getvalue())
    tmp.replace(tarball)


def make_bundle(campaign_file: Path, results_root: Path, out: Path, *, packing: str = "auto",
                profiles_dir: Path | None = None, container_digest: str | None = None,
                tolerances: dict[str, float] | None = None, repo_root: Path = REPO_ROOT) -> Bundle:
    """Write `<out>/<campaign>-ae/` and `<out>/<campaign>-ae.tar.gz` (see the module doc)."""
    from infscale.ae.artifact import artifact_markdown
    from infscale.ae.reduce import reduce_campaign
    from infscale.campaign.plan import write_plan
    from infscale.pipeline import CampaignRun
    from infscale.results.provenance import git_commit, split_commit
    from infscale.results.schemas import SCHEMA_VERSION

    run = CampaignRun(Path(campaign_file), Path(results_root), packing)
    name = run.campaign.name
    commit, dirty = split_commit(git_commit())
    missing = [f for f in REQUIRED if not (run.results_dir / f).is_file()]
    if missing:
        raise BundleError(f"{run.results_dir}: {', '.join(missing)} missing; run the campaign's analysis first "
                          f"(infscale merge, fit, claims {campaign_file} --results-root {results_root})")
    check = run.check_cells()  # read only: a bundle never holds a merged table its cell files no longer back
    if check.problems:
        raise BundleError(f"{run.results_dir}: cell files need attention ({check.counts()}: "
                          f"{check.lines()[0]}); rerun the campaign first")
    if Path(out).resolve().is_relative_to(run.results_dir.resolve()):
        raise BundleError(f"--out {out}: inside the results directory {run.results_dir}; choose a folder outside it")
    directory = Path(out) / bundle_name(name)
    tarball = Path(out) / f"{bundle_name(name)}.tar.gz"
    for path in (directory, tarball):
        if path.exists():
            raise BundleError(f"{path} already exists; a bundle is never overwritten (remove it or use another --out)")
    staging = Path(out) / f".{bundle_name(name)}.partial"   # renamed into place only when complete
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        (staging / "config").mkdir()
        config_rel = f"config/{Path(campaign_file).name}"
        shutil.copy2(campaign_file, staging / config_rel)
        results_rel = f"results/{name}"
        _copy_results(run.results_dir, staging / results_rel)
        write_plan(run.planned, run.campaign.hardware.gpus_per_node, staging / results_rel / "plan.parquet")

        reduced_files = []
        for target in ("cpu", "1gpu"):
            try:
                reduced = reduce_campaign(Path(campaign_file), target)
            except ValueError as err:  # e.g. no model of the campaign fits on one GPU: no 1-GPU profile
                reduced_files.append((target, None, 0.0, str(err)))
                continue
            path = staging / "reduced" / f"{name}-{target}.yaml"
            path.parent.mkdir(exist_ok=True)
            path.write_text(reduced.yaml_text(config_rel))
            reduced_files.append((target, path.relative_to(staging).as_posix(), reduced.expected_s, reduced.cells))

        env = staging / "environment"
        env.mkdir()
        lock = repo_root / "constraints.txt"
        for src in (lock, repo_root / "pyproject.toml"):
            if src.is_file():
                shutil.copy2(src, env / src.name)
        if (repo_root / "envs").is_dir():
            shutil.copytree(repo_root / "envs", env / "envs")
        if container_digest:
            (env / "container.txt").write_text(container_digest.strip() + "\n")

        profiles = _profiles(profiles_dir or repo_root / "results" / "reference" / "profiles",
                             run.campaign.hardware.name)
        for src in profiles:
            (staging / "profiles").mkdir(exist_ok=True)
            shutil.copy2(src, staging / "profiles" / src.name)

        band = dict(tolerances or DEFAULT_TOLERANCES)
        (staging / TOLERANCES_NAME).write_text(tolerance_document(band))

        manifest: dict[str, object] = {
            "manifest_version": MANIFEST_VERSION,
            "results_schema_version": SCHEMA_VERSION,
            "infscale_version": infscale.__version__,
            "git_commit": commit,
            "git_tree_dirty": dirty,
            "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "campaign": name,
            "campaign_file": config_rel,
            "config_hash": run.campaign.config_hash,
            "backend": run.campaign.spec.backend,
            "hardware": run.campaign.hardware.name,
            "results_dir": results_rel,
            "lock_file": "environment/constraints.txt" if lock.is_file() else None,
            "container_digest": container_digest,
        }
        (staging / "ARTIFACT.md").write_text(artifact_markdown(staging, manifest, band, reduced_files))
        manifest["files"] = file_entries(staging)
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")
        staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _tar(directory, tarball)
    entries = manifest["files"]
    return Bundle(directory, tarball, len(entries), sum(int(e["size"]) for e in entries),  # type: ignore[union-attr]
                  commit, dirty)
