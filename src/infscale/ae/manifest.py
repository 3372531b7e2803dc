"""The bundle manifest: every file of an artifact bundle with its size and SHA-256, and `verify`.

`manifest.json` sits at the bundle's root and lists every other file of the bundle (not itself). Its
`manifest_version` says how to read it; a bundle written by a newer infscale (a higher major version, or cell files
of a newer results schema) is refused with both versions named rather than half-read.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = "1.0"
REGENERATED_DIR = "regenerated"   # `infscale ae regenerate` writes here by default: not part of the bundle


class BundleError(ValueError):
    """A bundle that cannot be used: no manifest, an unreadable one, or one from a newer infscale."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def bundle_files(root: Path) -> list[str]:
    """Every regular file under `root` except the manifest itself, as sorted POSIX paths relative to `root`."""
    root = Path(root)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and not p.is_symlink() and p.relative_to(root).as_posix() != MANIFEST_NAME)


def file_entries(root: Path) -> list[dict[str, object]]:
    root = Path(root)
    return [{"path": rel, "size": (root / rel).stat().st_size, "sha256": sha256_file(root / rel)}
            for rel in bundle_files(root)]


def _major(version: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        raise BundleError(f"unreadable version '{version}'") from None


def read_manifest(bundle: Path, same_schema: bool = False) -> dict:
    """The manifest of a bundle directory, after checking that this infscale can read the bundle (its result
    files' schema major among those it reads; with `same_schema`, the one it writes: regenerating tables that
    must come out equal)."""
    from infscale.results.schemas import READABLE_MAJORS, SCHEMA_VERSION

    path = Path(bundle) / MANIFEST_NAME
    if not Path(bundle).is_dir():
        raise BundleError(f"{bundle}: not a directory (unpack the .tar.gz first: tar xzf BUNDLE.tar.gz)")
    if not path.is_file():
        raise BundleError(f"{bundle}: no {MANIFEST_NAME}; not an infscale artifact bundle")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise BundleError(f"{path}: not readable as JSON ({err})") from None
    if not isinstance(manifest, dict) or "files" not in manifest or "manifest_version" not in manifest:
        raise BundleError(f"{path}: not an infscale manifest (needs manifest_version and files)")
    version = str(manifest["manifest_version"])
    if _major(version) > _major(MANIFEST_VERSION):
        raise BundleError(f"{path}: manifest version {version} is newer than this infscale reads "
                          f"({MANIFEST_VERSION}); use the infscale release that wrote the bundle "
                          f"({manifest.get('infscale_version', 'unknown')})")
    schema = str(manifest.get("results_schema_version", ""))
    if schema and same_schema and str(_major(schema)) in READABLE_MAJORS and _major(schema) != _major(SCHEMA_VERSION):
        raise BundleError(f"{path}: the bundle's tables were written under results schema {schema}; this infscale "
                          f"writes schema {SCHEMA_VERSION}, so its regenerated tables cannot equal them: regenerate "
                          f"with the infscale release that wrote the bundle "
                          f"({manifest.get('infscale_version', 'unknown')}); verify and compare read it as it is")
    if schema and str(_major(schema)) not in READABLE_MAJORS:
        raise BundleError(f"{path}: the bundle's result files have schema version {schema}, which this infscale "
                          f"(results schema {SCHEMA_VERSION}) cannot read; use the infscale release that wrote "
                          f"the bundle ({manifest.get('infscale_version', 'unknown')})")
    _check_entries(Path(bundle), path, manifest["files"])
    return manifest


def _check_entries(bundle: Path, path: Path, files: object) -> None:
    """Every manifest entry names a file inside the bundle (a relative path with no `..`, through no symlink that
    leaves it) and gives its size and SHA-256; anything else is refused, never followed."""
    if not isinstance(files, list):
        raise BundleError(f"{path}: files: expected a list of {{path, size, sha256}} entries")
    root = bundle.resolve()
    for i, entry in enumerate(files):
        if not (isinstance(entry, dict) and isinstance(entry.get("path"), str) and isinstance(entry.get("size"), int)
                and not isinstance(entry.get("size"), bool) and isinstance(entry.get("sha256"), str)):
            raise BundleError(f"{path}: files[{i}]: expected {{path: text, size: integer, sha256: text}}")
        rel = entry["path"]
        parts = rel.split("/")
        inside = (rel and not rel.startswith("/") and "\\" not in rel and ".." not in parts and "" not in parts
                  and (root / rel).resolve().is_relative_to(root))
        if not inside:
            raise BundleError(f"{path}: files[{i}].path: {rel!r} points outside the bundle; a manifest lists only "
                              "the bundle's own files, by relative paths without '..'")


@dataclass
class Verification:
    bundle: Path
    checked: int = 0
    missing: list[str] = field(default_factory=list)
    altered: list[str] = field(default_factory=list)   # size or SHA-256 differs
    extra: list[str] = field(default_factory=list)     # on disk, not in the manifest

    @property
    def ok(self) -> bool:
        return not (self.missing or self.altered or self.extra)

    def lines(self) -> list[str]:
        out = [f"missing: {p}" for p in self.missing] + [f"altered: {p}" for p in self.altered] + \
              [f"not in the manifest: {p}" for p in self.extra]
        verdict = "OK" if self.ok else "FAILED"
        out.append(f"{self.bundle}: {verdict}: {self.checked} files in the manifest, {len(self.missing)} missing, "
                   f"{len(self.altered)} altered, {len(self.extra)} not in the manifest")
        return out


def verify_bundle(bundle: Path) -> Verification:
    """Recompute every file's SHA-256 and compare with the manifest, naming each missing, altered or extra file."""
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    result = Verification(bundle)
    listed: set[str] = set()
    for entry in manifest["files"]:
        rel = str(entry["path"])
        listed.add(rel)
        result.checked += 1
        path = bundle / rel
        if not path.is_file():
            result.missing.append(rel)
        elif path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
            result.altered.append(rel)
    result.extra = [rel for rel in bundle_files(bundle)
                    if rel not in listed and not rel.startswith(f"{REGENERATED_DIR}/")]
    return result
