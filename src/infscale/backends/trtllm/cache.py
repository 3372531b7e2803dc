"""A content-addressed cache of TensorRT-LLM engines on a (possibly shared: NFS, Lustre) path.

An engine build takes minutes and tens to hundreds of GB, so every engine of a campaign is built exactly once and
reused by all its Slurm jobs and reruns. The layout under `root`:

    <label>/                          a complete engine; `manifest.json` is written last, before the rename
    .<label>.lock                     held while <label> is built (O_CREAT|O_EXCL; JSON: host, pid, started_at, ...)
    .<label>.tmp-<host>-<pid>/        a build in progress; renamed to <label>/ once the manifest is written
    .<label>.trash-<host>-<pid>-<n>/  being deleted (gc, failed builds); anything may remove it
    .<label>.invalid-<host>-<pid>-<n>/  a <label>/ that was not a complete engine, moved aside before a rebuild

Why so: `os.rename` of a directory is atomic on POSIX and on NFS/Lustre, so a reader sees either no engine or a
complete one; O_EXCL creation is atomic on NFSv3+ and Lustre, where fcntl locks across nodes are not reliable. A
builder refreshes its lock's mtime (heartbeat), so a lock is stale when its holder is gone (same host, pid no longer
running) or the heartbeat stopped for `stale_after_s`. Should two builders ever race anyway (a takeover of a live but
frozen holder), the second rename fails on the existing engine and its copy is dropped: at worst a wasted build, never
a mixed engine. Nothing here imports tensorrt_llm: the build is an injected callable.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
DEFAULT_WAIT_TIMEOUT_S = 3 * 3600.0   # longer than any engine build we expect; a Slurm job limit usually ends it first
DEFAULT_POLL_S = 5.0                  # gentle on a shared metadata server
DEFAULT_STALE_AFTER_S = 1800.0        # a lock whose heartbeat stopped this long ago is abandoned

_TMP_RE = re.compile(r"^\.(?P<label>.+)\.tmp-(?P<host>.+)-(?P<pid>\d+)$")
_LOCK_RE = re.compile(r"^\.(?P<label>.+)\.lock$")
_TRASH_RE = re.compile(r"^\.(?P<label>.+)\.(?:trash|invalid)-.+$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_counter = itertools.count()


class EngineCacheError(RuntimeError):
    """The engine cache cannot give an engine: a wait timed out, a builder misbehaved, the cache is inconsistent."""


def _safe(text: str) -> str:
    """A file-name-safe form of `text` (hostnames, model names)."""
    return _UNSAFE.sub("_", text).strip("._") or "x"


def _canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal values give equal bytes, whatever the dict order."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def hash_model_config(config: Mapping[str, Any]) -> str:
    """sha256 of a model's config (e.g. the HF config.json as a dict), independent of key order: `model_config_hash`."""
    return hashlib.sha256(_canonical_json(config).encode()).hexdigest()


@dataclass(frozen=True, kw_only=True)
class EngineKey:
    """Everything that changes a TensorRT-LLM engine; equal keys share one engine directory.

    `extra` holds the other build flags (plugins, beam width, ...) as JSON values; it is stored sorted and read-only,
    and is left out of `hash()` only (dicts are unhashable), never out of equality or the digest.
    """

    model: str                          # readable name, e.g. "meta-llama/Llama-3.1-8B"; in the label and the digest
    model_config_hash: str              # hash_model_config(config.json): same name, other weights/config -> other key
    weight_dtype: str
    kv_dtype: str
    quantization: str | None = None     # e.g. "fp8", "w4a16_awq"; None for none
    tp: int
    pp: int
    max_batch_size: int
    max_num_tokens: int
    max_seq_len: int
    trtllm_version: str
    gpu_name: str                       # engines are specific to the GPU model (e.g. "NVIDIA H100 80GB HBM3")
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        for name in ("model", "model_config_hash", "weight_dtype", "kv_dtype", "trtllm_version", "gpu_name"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"EngineKey.{name} must be a non-empty string, got {value!r}")
        if self.quantization is not None and (not isinstance(self.quantization, str) or not self.quantization):
            raise ValueError(f"EngineKey.quantization must be None or a non-empty string, got {self.quantization!r}")
        for name in ("tp", "pp", "max_batch_size", "max_num_tokens", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"EngineKey.{name} must be a positive int, got {value!r}")
        if not isinstance(self.extra, Mapping) or not all(isinstance(k, str) for k in self.extra):
            raise ValueError(f"EngineKey.extra must be a mapping with string keys, got {self.extra!r}")
        try:
            canonical = json.loads(_canonical_json(dict(self.extra)))
        except (TypeError, ValueError) as err:
            raise ValueError(f"EngineKey.extra must hold JSON values (no NaN/inf): {err}") from None
        # A sorted, read-only copy: later changes to the caller's dict cannot change this key.
        object.__setattr__(self, "extra", MappingProxyType(dict(sorted(canonical.items()))))

    def as_dict(self) -> dict[str, Any]:
        """All fields as plain JSON values (what the digest hashes and the manifest records)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["extra"] = dict(self.extra)
        return out

    def digest(self) -> str:
        """First 16 hex chars of the sha256 of the canonical JSON of every field."""
        return hashlib.sha256(_canonical_json(self.as_dict()).encode()).hexdigest()[:16]

    def label(self) -> str:
        """A readable, unique directory name, e.g. `llama-3.1-8b.bf16.tp4pp1.0123abcd`."""
        model = _safe(self.model.rstrip("/").rsplit("/", 1)[-1].lower())[:64]
        return f"{model}.{_safe(self.weight_dtype.lower())}.tp{self.tp}pp{self.pp}.{self.digest()[:8]}"


@dataclass(frozen=True)
class LockInfo:
    """What a lock file says about its holder (fields None where the file is still being written or is damaged)."""

    path: Path
    host: str | None
    pid: int | None
    started_at: float | None
    token: str | None
    proc_start: str | None
    pid_ns: str | None
    mtime: float             # refreshed by the holder's heartbeat
    inode: int

    def describe(self) -> str:
        started = (datetime.fromtimestamp(self.started_at, timezone.utc).isoformat(timespec="seconds")
                   if self.started_at is not None else "unknown time")
        return f"host {self.host or '?'} pid {self.pid if self.pid is not None else '?'} (since {started})"


@dataclass(frozen=True)
class Removed:
    """One thing `gc` removed: an engine (reason "lru") or leftovers ("dead-build", "trash")."""

    path: Path
    bytes: int
    reason: str


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks) of a local process from /proc, or None where /proc has no such entry."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()      # the command name may hold spaces and parentheses
    return (fields[0], fields[19]) if len(fields) > 19 else None


def _pid_namespace() -> str | None:
    """This process's pid namespace (containers on one host may not see each other's pids), where /proc tells it."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _pid_alive(pid: int, proc_start: str | None) -> bool:
    """Whether a process of this host is running; a zombie, or a reused pid (other start time), counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass                                          # exists, owned by someone else
    stat = _proc_stat(pid)
    if stat is None:
        return True                                   # no /proc (or it vanished just now): trust kill(0)
    state, start = stat
    if state in ("Z", "X"):
        return False
    return proc_start is None or proc_start == start


def _tree_bytes(path: Path) -> int:
    """Apparent size of everything under `path` (what gc reports for leftovers); races with deleters are ignored."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def _fsync_dir(path: Path) -> None:
    """Make a rename durable (best effort: some network filesystems refuse fsync on directories)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _Heartbeat:
    """Refreshes the mtime of a held lock, so that waiters on other nodes can tell a live long build from a dead one."""

    def __init__(self, lock_path: Path, token: str, interval_s: float) -> None:
        self._path, self._token, self._interval = lock_path, token, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"engine-lock-heartbeat:{lock_path.name}", daemon=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                still_ours = json.loads(self._path.read_text()).get("token") == self._token
            except (OSError, ValueError):
                still_ours = False
            if not still_ours:
                log.warning("engine lock %s was taken over by another process while this build runs; the build goes "
                            "on, and the first complete engine wins", self._path)
                return
            try:
                os.utime(self._path)
            except OSError as err:
                log.warning("cannot refresh engine lock %s (%s); others may take it over", self._path, err)


class EngineCache:
    """Engines under `root`, one directory per `EngineKey`; see the module docstring for the layout and the protocol.

    `stale_after_s`: a lock whose heartbeat (mtime) is older than this is abandoned and taken over, whatever its host.
    Run long builds so that the interpreter keeps running Python threads (e.g. `trtllm-build` in a subprocess):
    the heartbeat is a thread.
    """

    def __init__(self, root: Path | str, *, stale_after_s: float = DEFAULT_STALE_AFTER_S,
                 heartbeat_s: float | None = None) -> None:
        if stale_after_s <= 0:
            raise ValueError(f"stale_after_s must be positive, got {stale_after_s}")
        self.root = Path(root)
        self.stale_after_s = float(stale_after_s)
        self.heartbeat_s = float(heartbeat_s) if heartbeat_s is not None else min(60.0, self.stale_after_s / 6)
        if not 0 < self.heartbeat_s < self.stale_after_s:
            raise ValueError(f"heartbeat_s must be in (0, stale_after_s={self.stale_after_s}), got {heartbeat_s}")
        self.host = _safe(socket.gethostname())
        self.pid_ns = _pid_namespace()

    # ------------------------------------------------------------------ paths

    def path_for(self, key: EngineKey) -> Path:
        return self.root / key.label()

    def _lock_path(self, label: str) -> Path:
        return self.root / f".{label}.lock"

    def _tmp_path(self, label: str, host: str, pid: int) -> Path:
        return self.root / f".{label}.tmp-{host}-{pid}"

    def _aside_path(self, label: str, kind: str) -> Path:
        return self.root / f".{label}.{kind}-{self.host}-{os.getpid()}-{next(_counter)}"

    # ------------------------------------------------------------------ lookup

    def _read_manifest(self, engine_dir: Path) -> dict[str, Any] | None:
        try:
            return json.loads((engine_dir / MANIFEST).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            log.warning("engine manifest %s is unreadable (%s); treating the engine as absent", engine_dir / MANIFEST,
                        err)
            return None

    def _check(self, engine_dir: Path, manifest: dict[str, Any] | None, digest: str | None) -> str | None:
        """Why `engine_dir` is not a complete engine (of `digest`, if given), or None when it is."""
        if manifest is None:
            return f"{engine_dir / MANIFEST} is missing or unreadable"
        if digest is not None and manifest.get("digest") != digest:
            return f"{engine_dir / MANIFEST} has digest {manifest.get('digest')!r}, expected {digest!r}"
        try:
            files = [(str(f["path"]), int(f["bytes"])) for f in manifest["files"]]
        except (KeyError, TypeError, ValueError):
            return f"{engine_dir / MANIFEST} has no valid file list"
        for rel, size in files:            # one stat per file: catches truncated copies and deleted files, cheaply
            try:
                actual = os.stat(engine_dir / rel).st_size
            except OSError:
                return f"{engine_dir / rel} is listed in the manifest but missing"
            if actual != size:
                return f"{engine_dir / rel} has {actual} bytes, the manifest says {size}"
        return None

    def _touch(self, engine_dir: Path) -> None:
        """Mark an engine as used now (the manifest's mtime is its last-used time, for gc)."""
        try:
            os.utime(engine_dir / MANIFEST)
        except OSError as err:            # a read-only cache still serves engines; gc order just gets coarser
            log.debug("cannot record use of %s: %s", engine_dir, err)

    def lookup(self, key: EngineKey) -> Path | None:
        """The engine directory of `key` if complete (manifest present, digest and file sizes match), else None."""
        path = self.path_for(key)
        if not path.exists():
            return None
        problem = self._check(path, self._read_manifest(path), key.digest())
        if problem is not None:
            log.warning("engine %s is not usable: %s", path, problem)
            return None
        self._touch(path)
        return path

    # ------------------------------------------------------------------ locks

    def _read_lock(self, lock_path: Path) -> LockInfo | None:
        """The lock's holder, or None if there is no lock. A lock still being written reads as holder unknown."""
        try:
            with open(lock_path, "rb") as fh:
                st = os.fstat(fh.fileno())
                raw = fh.read()
        except FileNotFoundError:
            return None
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
        except ValueError:
            data = {}

        def typed(name: str, kind: type | tuple[type, ...]) -> Any:
            value = data.get(name)
            return value if isinstance(value, kind) and not isinstance(value, bool) else None

        started = typed("started_at", (int, float))
        return LockInfo(path=lock_path, host=typed("host", str), pid=typed("pid", int),
                        started_at=float(started) if started is not None else None, token=typed("token", str),
                        proc_start=typed("proc_start", str), pid_ns=typed("pid_ns", str),
                        mtime=st.st_mtime, inode=st.st_ino)

    def _stale_reason(self, info: LockInfo) -> str | None:
        """Why the lock's holder is considered gone, or None while it may still be building."""
        same_pids = info.host == self.host and info.pid is not None and info.pid_ns in (None, self.pid_ns)
        if same_pids and not _pid_alive(info.pid, info.proc_start):
            return f"its holder pid {info.pid} no longer runs on this host ({self.host})"
        age = time.time() - info.mtime
        if info.token is None and age > min(60.0, self.stale_after_s):
            # A lock is written within milliseconds of its creation: its creator died in between.
            return f"it has had no valid content for {age:.0f} s"
        if age > self.stale_after_s:
            return f"it was last refreshed {age:.0f} s ago (stale after {self.stale_after_s:.0f} s)"
        return None

    def _try_lock(self, label: str, purpose: str) -> str | None:
        """Create the lock of `label` atomically; its token if we now hold it, None if someone else does."""
        lock_path = self._lock_path(label)
        try:
            fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return None
        except OSError as err:
            raise EngineCacheError(f"cannot create engine lock {lock_path}: {err}") from err
        token = uuid.uuid4().hex
        stat = _proc_stat(os.getpid())
        info = {"host": self.host, "pid": os.getpid(), "started_at": time.time(), "started_at_iso": _now_iso(),
                "token": token, "purpose": purpose, "proc_start": stat[1] if stat else None, "pid_ns": self.pid_ns}
        try:
            os.write(fd, json.dumps(info).encode())
            os.fsync(fd)
        except OSError as err:
            os.close(fd)
            self._unlink_if_ours(lock_path, None)
            raise EngineCacheError(f"cannot write engine lock {lock_path}: {err}") from err
        os.close(fd)
        return token

    def _unlink_if_ours(self, lock_path: Path, token: str | None) -> None:
        """Release a lock, unless it was taken over meanwhile (then it is someone else's to release)."""
        info = self._read_lock(lock_path)
        if info is None:
            log.warning("engine lock %s vanished before its release (taken over as stale?)", lock_path)
            return
        if token is not None and info.token != token:
            log.warning("engine lock %s now belongs to %s; leaving it", lock_path, info.describe())
            return
        try:
            os.unlink(lock_path)
        except FileNotFoundError:
            pass

    def _break_stale(self, info: LockInfo, reason: str) -> bool:
        """Remove the stale lock `info` (and its dead builder's temp dir). False if the lock changed meanwhile.

        The lock is first renamed to a private name and checked to be the one judged stale, so two processes taking
        over at once cannot remove a fresh lock that a third one just created.
        """
        grave = self._aside_path(info.path.name.removeprefix(".").removesuffix(".lock"), "trash")
        try:
            os.rename(info.path, grave)
        except FileNotFoundError:
            return False
        moved = self._read_lock(grave)
        if moved is None or (moved.inode, moved.token) != (info.inode, info.token):
            # We grabbed a lock made after our check: put it back (link fails if yet another lock appeared).
            try:
                os.link(grave, info.path)
            except OSError as err:
                log.warning("could not restore engine lock %s from %s: %s", info.path, grave, err)
            grave.unlink(missing_ok=True)
            return False
        grave.unlink(missing_ok=True)
        log.warning("taking over engine lock %s of %s: %s", info.path, info.describe(), reason)
        match = _LOCK_RE.match(info.path.name)
        if match and info.host and info.pid is not None:
            self._remove_tree(self._tmp_path(match["label"], _safe(info.host), info.pid), match["label"])
        return True

    # ------------------------------------------------------------------ build

    def _remove_tree(self, path: Path, label: str) -> int:
        """Delete a directory: rename it aside first (atomic, so nobody sees it half gone), then rmtree. Its bytes."""
        trash = self._aside_path(label, "trash")
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return 0
        size = _tree_bytes(trash)
        shutil.rmtree(trash, ignore_errors=True)
        if trash.exists():                 # e.g. NFS .nfsXXXX files of engines still open somewhere
            log.warning("could not delete all of %s (files still open?); gc will retry", trash)
        return size

    def _build(self, key: EngineKey, build: Callable[[Path], None], token: str) -> Path:
        """Build `key` while holding its lock: temp dir, builder, manifest last, atomic rename."""
        label, final = key.label(), self.path_for(key)
        if final.exists():
            manifest = self._read_manifest(final)
            if manifest is not None and manifest.get("digest") not in (None, key.digest()):
                raise EngineCacheError(
                    f"{final} holds the engine of another key (digest {manifest.get('digest')}, wanted "
                    f"{key.digest()}): an 8-hex-char label collision; move one of them away by hand")
            aside = self._aside_path(label, "invalid")
            log.warning("%s is not a complete engine (%s); moving it to %s and rebuilding", final,
                        self._check(final, manifest, key.digest()), aside)
            try:
                os.rename(final, aside)
            except OSError as err:
                raise EngineCacheError(f"cannot move the incomplete engine {final} aside to {aside}: {err}") from err
        tmp = self._tmp_path(label, self.host, os.getpid())
        self._remove_tree(tmp, label)      # an earlier attempt of this very process (or of a dead one with our pid)
        tmp.mkdir(parents=False)
        try:
            start = time.monotonic()
            with _Heartbeat(self._lock_path(label), token, self.heartbeat_s):
                build(tmp)
            seconds = time.monotonic() - start
            self._write_manifest(key, tmp, seconds)
            _fsync_dir(tmp)
            try:
                os.rename(tmp, final)
            except OSError as err:
                if self.lookup(key) is not None:   # a builder that took our lock over finished first: use its engine
                    log.warning("engine %s appeared during this build; dropping this copy", final)
                    self._remove_tree(tmp, label)
                    return final
                raise EngineCacheError(f"cannot rename the built engine {tmp} to {final}: {err}") from err
        except BaseException:
            self._remove_tree(tmp, label)  # nothing half built may look usable; the error goes to the caller
            raise
        _fsync_dir(self.root)
        log.info("built engine %s in %.0f s", final, seconds)
        return final

    def _write_manifest(self, key: EngineKey, engine_dir: Path, build_seconds: float) -> None:
        files: list[dict[str, Any]] = []
        for dirpath, dirs, names in os.walk(engine_dir):
            dirs.sort()
            for name in sorted(names):
                full = Path(dirpath, name)
                rel = full.relative_to(engine_dir).as_posix()
                if full.is_symlink():
                    raise EngineCacheError(
                        f"the engine builder left a symlink {full} -> {os.readlink(full)}; an engine directory must "
                        f"be self-contained to be shared across nodes")
                if rel == MANIFEST:
                    raise EngineCacheError(f"the engine builder wrote {full}; that name is reserved for the cache")
                files.append({"path": rel, "bytes": full.stat().st_size})
        if not files:
            raise EngineCacheError(f"the engine builder wrote no files into {engine_dir}")
        manifest = {
            "format": MANIFEST_FORMAT, "label": key.label(), "digest": key.digest(), "key": key.as_dict(),
            "files": files, "total_bytes": sum(f["bytes"] for f in files), "build_seconds": round(build_seconds, 3),
            "created_at": _now_iso(), "host": self.host, "pid": os.getpid(),
        }
        with open(engine_dir / MANIFEST, "w") as fh:
            json.dump(manifest, fh, indent=2, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())

    def get_or_build(self, key: EngineKey, build: Callable[[Path], None], *,
                     wait_timeout_s: float = DEFAULT_WAIT_TIMEOUT_S, poll_s: float = DEFAULT_POLL_S) -> Path:
        """The engine of `key`, built by `build(empty_dir)` only if no complete one exists and nobody builds it.

        Waits (polling every `poll_s`) while another process holds the key's lock; takes a stale lock over; raises
        EngineCacheError after `wait_timeout_s` of waiting. An exception of `build` propagates after cleanup.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        label = key.label()
        lock_path = self._lock_path(label)
        started = time.monotonic()
        while True:
            found = self.lookup(key)
            if found is not None:
                return found
            token = self._try_lock(label, "build")
            if token is not None:
                try:
                    found = self.lookup(key)           # finished between our lookup and our lock
                    return found if found is not None else self._build(key, build, token)
                finally:
                    self._unlink_if_ours(lock_path, token)
            info = self._read_lock(lock_path)
            if info is None:
                continue                               # released just now: look again
            reason = self._stale_reason(info)
            if reason is not None:
                self._break_stale(info, reason)
                continue
            waited = time.monotonic() - started
            if waited > wait_timeout_s:
                raise EngineCacheError(
                    f"timed out after {waited:.1f} s (wait_timeout_s={wait_timeout_s}) waiting for engine {label}: "
                    f"lock {lock_path} is held by {info.describe()}, last refreshed "
                    f"{time.time() - info.mtime:.0f} s ago. If that build is dead, delete the lock file.")
            time.sleep(min(poll_s, max(0.0, wait_timeout_s - waited) + 0.001))

    # ------------------------------------------------------------------ inventory and gc

    def _entries(self) -> Iterator[os.DirEntry[str]]:
        try:
            with os.scandir(self.root) as it:
                yield from sorted(it, key=lambda e: e.name)
        except FileNotFoundError:
            return

    def _complete(self) -> list[tuple[Path, dict[str, Any], float]]:
        """(path, manifest, last used) of every complete engine under root."""
        out = []
        for entry in self._entries():
            if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                continue
            path = Path(entry.path)
            manifest = self._read_manifest(path)
            problem = self._check(path, manifest, None)
            if problem is None and manifest is not None and manifest.get("label") != entry.name:
                problem = f"{path / MANIFEST} is for label {manifest.get('label')!r}"
            if problem is not None:
                log.warning("ignoring %s, not a complete engine: %s", path, problem)
                continue
            try:
                last_used = os.stat(path / MANIFEST).st_mtime
            except OSError:
                continue
            out.append((path, manifest, last_used))
        return out

    def list_engines(self) -> list[dict[str, Any]]:
        """The manifests of all complete engines, by label; each with `path` and `last_used` (UTC ISO) added."""
        return [{**manifest, "path": str(path),
                 "last_used": datetime.fromtimestamp(last_used, timezone.utc).isoformat(timespec="seconds")}
                for path, manifest, last_used in self._complete()]

    def gc(self, budget_bytes: int, keep: set[str] | frozenset[str] = frozenset()) -> list[Removed]:
        """Delete least-recently-used engines until complete engines total at most `budget_bytes`.

        Never deletes an engine whose lock is held or whose digest is in `keep` (pass the digests the running
        campaign needs: gc cannot see readers of an engine). Also deletes temp dirs of dead builders, stale locks and
        trash. Returns what was removed, in order; logs a warning when the budget cannot be met.
        """
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        removed: list[Removed] = []
        # Leftovers first: locks of dead builders, their temp dirs, trash of interrupted deletions.
        for entry in self._entries():
            if (match := _LOCK_RE.match(entry.name)) is not None:
                info = self._read_lock(Path(entry.path))
                if info is not None and (reason := self._stale_reason(info)) is not None:
                    tmp = (self._tmp_path(match["label"], _safe(info.host), info.pid)
                           if info.host and info.pid is not None else None)
                    size = _tree_bytes(tmp) if tmp is not None and tmp.exists() else 0
                    if self._break_stale(info, reason) and size:
                        removed.append(Removed(tmp, size, "dead-build"))
        for entry in self._entries():
            path = Path(entry.path)
            if (match := _TMP_RE.match(entry.name)) is not None:
                info = self._read_lock(self._lock_path(match["label"]))
                if info is not None and (info.host, info.pid) == (match["host"], int(match["pid"])):
                    continue                             # its builder holds the lock (not stale: broken just above)
                removed.append(Removed(path, self._remove_tree(path, match["label"]), "dead-build"))
            elif (match := _TRASH_RE.match(entry.name)) is not None:
                if entry.is_dir(follow_symlinks=False):
                    size = _tree_bytes(path)
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    size = 0
                    path.unlink(missing_ok=True)
                removed.append(Removed(path, size, "trash"))
        # Then engines, least recently used first.
        engines = sorted(self._complete(), key=lambda e: e[2])
        total = sum(int(m["total_bytes"]) for _, m, _ in engines)
        for path, manifest, _ in engines:
            if total <= budget_bytes:
                break
            if manifest["digest"] in keep:
                continue
            token = self._try_lock(path.name, "gc")
            if token is None:
                log.info("gc: keeping %s, its lock %s is held", path, self._lock_path(path.name))
                continue
            try:
                self._remove_tree(path, path.name)
            finally:
                self._unlink_if_ours(self._lock_path(path.name), token)
            size = int(manifest["total_bytes"])
            total -= size
            removed.append(Removed(path, size, "lru"))
        if total > budget_bytes:
            log.warning("gc: complete engines under %s still take %d bytes, over the budget of %d (the rest is "
                        "kept or locked)", self.root, total, budget_bytes)
        return removed
