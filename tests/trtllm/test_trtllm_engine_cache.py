"""The TensorRT-LLM engine cache: hits, misses, failed and killed builds, concurrent builders in real processes, gc.

No TensorRT-LLM here: the builders are stand-ins that write a few files (and, across processes, append a line to a
counter file so that the test can count builds).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from infscale.backends.trtllm import cache as cache_mod
from infscale.backends.trtllm.cache import EngineCache, EngineCacheError, EngineKey, hash_model_config

SRC = Path(cache_mod.__file__).resolve().parents[3]

# A builder in another process: waits for the "go" file (so that all start together), then get_or_build.
WORKER = r"""
import json, os, sys, time
from pathlib import Path
from infscale.backends.trtllm.cache import EngineCache, EngineKey

root, counter, go, started, sleep_s, key_json = sys.argv[1:7]
built = False

def build(d: Path) -> None:
    global built
    built = True
    with open(counter, "a") as fh:
        fh.write(f"{os.getpid()}\n")
    (d / "rank0.engine").write_bytes(b"e" * 1000)
    Path(started).touch()
    time.sleep(float(sleep_s))
    (d / "config.json").write_text("{}")

while not os.path.exists(go):
    time.sleep(0.005)
path = EngineCache(root).get_or_build(EngineKey(**json.loads(key_json)), build, wait_timeout_s=30, poll_s=0.02)
print(json.dumps({"path": str(path), "built": built}))
"""


def make_key(**changes) -> EngineKey:
    fields = dict(model="meta-llama/Llama-3.1-8B", model_config_hash=hash_model_config({"hidden_size": 4096}),
                  weight_dtype="bf16", kv_dtype="fp8", quantization=None, tp=4, pp=1, max_batch_size=256,
                  max_num_tokens=8192, max_seq_len=16384, trtllm_version="0.20.0", gpu_name="NVIDIA H100 80GB HBM3",
                  extra={"gemm_plugin": "auto", "use_paged_context_fmha": True})
    fields.update(changes)
    return EngineKey(**fields)


class Builder:
    """An in-process stand-in builder that counts its calls."""

    def __init__(self, size: int = 1000, fail: BaseException | None = None, sleep_s: float = 0.0) -> None:
        self.size, self.fail, self.sleep_s = size, fail, sleep_s
        self.calls = 0

    def __call__(self, engine_dir: Path) -> None:
        self.calls += 1
        (engine_dir / "rank0.engine").write_bytes(b"x" * self.size)
        if self.fail is not None:
            raise self.fail
        time.sleep(self.sleep_s)
        (engine_dir / "config.json").write_text("{}")


def write_lock(root: Path, key: EngineKey, host: str, pid: int, age_s: float = 0.0) -> Path:
    """A lock file in the documented format, as another holder would write it."""
    lock = root / f".{key.label()}.lock"
    lock.write_text(json.dumps({"host": host, "pid": pid, "started_at": time.time() - age_s, "token": f"t{pid}"}))
    if age_s:
        then = time.time() - age_s
        os.utime(lock, (then, then))
    return lock


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def spawn_worker(tmp_path: Path, key: EngineKey, sleep_s: float, name: str) -> tuple[subprocess.Popen, Path]:
    started = tmp_path / f"started-{name}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    args = [sys.executable, "-c", WORKER, str(tmp_path / "cache"), str(tmp_path / "builds.txt"), str(tmp_path / "go"),
            str(started), str(sleep_s), json.dumps(key.as_dict())]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), started


def set_last_used(path: Path, when: float) -> None:
    os.utime(path / "manifest.json", (when, when))


# ---------------------------------------------------------------------------------------------------- keys


def test_digest_changes_with_every_field() -> None:
    base = make_key()
    changes = dict(model="Qwen/Qwen2.5-7B", model_config_hash=hash_model_config({"hidden_size": 4097}),
                   weight_dtype="fp16", kv_dtype="bf16", quantization="fp8", tp=2, pp=2, max_batch_size=128,
                   max_num_tokens=4096, max_seq_len=8192, trtllm_version="0.21.0", gpu_name="NVIDIA H200",
                   extra={"gemm_plugin": "auto", "use_paged_context_fmha": False})
    # Every field is covered: a field added to EngineKey without a case here fails this test.
    assert set(changes) == {f.name for f in dataclasses.fields(EngineKey)}
    digests = {base.digest()}
    for name, value in changes.items():
        changed = dataclasses.replace(base, **{name: value})
        assert changed.digest() != base.digest(), name
        digests.add(changed.digest())
    for extra in ({}, {"gemm_plugin": "auto"}, {"gemm_plugin": "auto", "use_paged_context_fmha": 1},
                  {"gemm_plugin": "auto", "use_paged_context_fmha": "True"},
                  {"gemm_plugin": "auto", "use_paged_context_fmha": True, "max_beam_width": 1}):
        digests.add(dataclasses.replace(base, extra=extra).digest())
    assert len(digests) == 1 + len(changes) + 5
    assert all(len(d) == 16 and int(d, 16) >= 0 for d in digests)


def test_digest_ignores_dict_order_and_is_pinned() -> None:
    a = make_key(extra={"b": 2, "a": {"y": 1, "x": [1, 2]}})
    b = make_key(extra={"a": {"x": [1, 2], "y": 1}, "b": 2})
    assert a == b and hash(a) == hash(b) and a.digest() == b.digest()
    assert list(a.extra) == ["a", "b"]
    assert hash_model_config({"a": 1, "b": 2}) == hash_model_config({"b": 2, "a": 1})
    # The canonical form is part of the cache format: changing it would orphan every engine already built.
    assert make_key().digest() == "46d30323eb9691db"
    assert make_key().label() == "llama-3.1-8b.bf16.tp4pp1.46d30323"


def test_key_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="tp"):
        make_key(tp=0)
    with pytest.raises(ValueError, match="gpu_name"):
        make_key(gpu_name="")
    with pytest.raises(ValueError, match="extra"):
        make_key(extra={"x": float("nan")})
    caller_dict = {"k": 1}
    key = make_key(extra=caller_dict)
    caller_dict["k"] = 2
    assert key.extra["k"] == 1


# ---------------------------------------------------------------------------------------------------- hit and miss


def test_miss_builds_once_then_hits(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    key, builder = make_key(), Builder(size=1234)
    assert cache.lookup(key) is None
    path = cache.get_or_build(key, builder, poll_s=0.01)
    assert builder.calls == 1
    assert path == cache.path_for(key) == tmp_path / key.label()
    assert cache.get_or_build(key, builder, poll_s=0.01) == path and cache.lookup(key) == path
    assert builder.calls == 1
    # Nothing but the engine is left: no lock, no temp dir.
    assert sorted(p.name for p in tmp_path.iterdir()) == [key.label()]

    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["digest"] == key.digest() and manifest["label"] == key.label()
    assert manifest["key"] == key.as_dict()
    assert manifest["files"] == [{"path": "config.json", "bytes": 2}, {"path": "rank0.engine", "bytes": 1234}]
    assert manifest["total_bytes"] == 1236
    assert manifest["build_seconds"] >= 0 and manifest["host"] == cache.host
    assert datetime.fromisoformat(manifest["created_at"]).utcoffset().total_seconds() == 0
    [listed] = cache.list_engines()
    assert listed["digest"] == key.digest() and listed["path"] == str(path)

    other = make_key(tp=8)
    assert cache.lookup(other) is None
    assert cache.get_or_build(other, builder, poll_s=0.01) == tmp_path / other.label()
    assert builder.calls == 2


def test_lookup_rejects_incomplete_or_foreign_engines(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    key = make_key()
    path = cache.get_or_build(key, Builder(), poll_s=0.01)
    with open(path / "rank0.engine", "r+b") as fh:         # a truncated copy
        fh.truncate(10)
    assert cache.lookup(key) is None
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "rank0.engine").write_bytes(b"x" * 1000)
    assert cache.lookup(key) == path
    (path / "manifest.json").write_text(json.dumps({**manifest, "digest": "0" * 16}))
    assert cache.lookup(key) is None
    (path / "manifest.json").unlink()                     # a final dir without manifest (copied by hand, say)
    assert cache.lookup(key) is None

    builder = Builder()
    assert cache.get_or_build(key, builder, poll_s=0.01) == path and builder.calls == 1
    assert cache.lookup(key) == path
    [aside] = [p for p in tmp_path.iterdir() if ".invalid-" in p.name]   # moved aside, not silently deleted
    assert (aside / "config.json").exists()
    assert [r.reason for r in cache.gc(10**9)] == ["trash"] and not aside.exists()


# ---------------------------------------------------------------------------------------------------- failed builds


def test_failing_build_leaves_nothing_and_next_call_builds(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    key = make_key()
    with pytest.raises(RuntimeError, match="compiler exploded"):
        cache.get_or_build(key, Builder(fail=RuntimeError("compiler exploded")), poll_s=0.01)
    assert cache.lookup(key) is None
    assert list(tmp_path.iterdir()) == []                 # no final dir, no temp dir, no lock
    builder = Builder()
    assert cache.get_or_build(key, builder, poll_s=0.01) == cache.path_for(key)
    assert builder.calls == 1


def test_builder_that_writes_nothing_is_an_error(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    with pytest.raises(EngineCacheError, match=r"wrote no files into .*\.tmp-"):
        cache.get_or_build(make_key(), lambda d: None, poll_s=0.01)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------- concurrency


def test_three_processes_build_one_engine_once(tmp_path: Path) -> None:
    key = make_key()
    procs = [spawn_worker(tmp_path, key, sleep_s=0.5, name=str(i))[0] for i in range(3)]
    (tmp_path / "go").touch()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    builds = (tmp_path / "builds.txt").read_text().splitlines()
    assert len(builds) == 1, builds
    assert [r["built"] for r in results].count(True) == 1
    cache = EngineCache(tmp_path / "cache")
    assert {r["path"] for r in results} == {str(cache.path_for(key))}
    assert cache.lookup(key) == cache.path_for(key)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [key.label()]


def test_killed_builder_is_taken_over(tmp_path: Path) -> None:
    key = make_key()
    cache = EngineCache(tmp_path / "cache")
    (tmp_path / "go").touch()
    proc, started = spawn_worker(tmp_path, key, sleep_s=60, name="doomed")
    try:
        deadline = time.monotonic() + 30
        while not started.exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the builder process never started building"
            time.sleep(0.01)
        tmp_dir = tmp_path / "cache" / f".{key.label()}.tmp-{cache.host}-{proc.pid}"
        lock = tmp_path / "cache" / f".{key.label()}.lock"
        assert tmp_dir.is_dir() and lock.exists()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert cache.lookup(key) is None and not cache.path_for(key).exists()
    assert tmp_dir.is_dir() and lock.exists()             # what a killed build leaves: temp dir and lock, no engine

    builder = Builder()
    assert cache.get_or_build(key, builder, wait_timeout_s=10, poll_s=0.01) == cache.path_for(key)
    assert builder.calls == 1
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [key.label()]


def test_live_lock_is_kept_fresh_by_heartbeat(tmp_path: Path) -> None:
    # A build that lasts longer than stale_after_s: without the heartbeat the waiter would take over and build again.
    cache = EngineCache(tmp_path, stale_after_s=0.8, heartbeat_s=0.05)
    key, slow, second = make_key(), Builder(sleep_s=1.6), Builder()
    results: list[Path] = []
    thread = threading.Thread(target=lambda: results.append(cache.get_or_build(key, slow, poll_s=0.01)))
    thread.start()
    lock = tmp_path / f".{key.label()}.lock"
    while not lock.exists() and thread.is_alive():
        time.sleep(0.005)
    assert cache.get_or_build(key, second, wait_timeout_s=10, poll_s=0.02) == cache.path_for(key)
    thread.join()
    assert (slow.calls, second.calls) == (1, 0)
    assert results == [cache.path_for(key)]


def test_wait_timeout_names_lock_and_holder(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    key, builder = make_key(), Builder()
    lock = write_lock(tmp_path, key, host="gpu-node-17", pid=4242)
    start = time.monotonic()
    with pytest.raises(EngineCacheError) as err:
        cache.get_or_build(key, builder, wait_timeout_s=0.3, poll_s=0.02)
    assert 0.3 <= time.monotonic() - start < 3
    message = str(err.value)
    assert str(lock) in message and "gpu-node-17" in message and "4242" in message
    assert "timed out after 0.3" in message
    assert builder.calls == 0 and lock.exists()


def test_dead_pid_of_another_pid_namespace_is_not_trusted(tmp_path: Path) -> None:
    # Same host name, other container: its pids mean nothing here, so only the lock's age may make it stale.
    cache = EngineCache(tmp_path)
    key, builder = make_key(), Builder()
    lock = write_lock(tmp_path, key, host=cache.host, pid=dead_pid())
    lock.write_text(json.dumps({**json.loads(lock.read_text()), "pid_ns": "pid:[1]"}))
    with pytest.raises(EngineCacheError, match="timed out"):
        cache.get_or_build(key, builder, wait_timeout_s=0.2, poll_s=0.02)
    assert builder.calls == 0 and lock.exists()


def test_stale_lock_by_age_is_taken_over(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path, stale_after_s=30)
    key, builder = make_key(), Builder()
    write_lock(tmp_path, key, host="gpu-node-17", pid=4242, age_s=100)
    dead_tmp = tmp_path / f".{key.label()}.tmp-gpu-node-17-4242"
    dead_tmp.mkdir()
    (dead_tmp / "rank0.engine").write_bytes(b"half")
    assert cache.get_or_build(key, builder, wait_timeout_s=5, poll_s=0.01) == cache.path_for(key)
    assert builder.calls == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [key.label()]


# ---------------------------------------------------------------------------------------------------- gc


def test_gc_removes_least_recently_used_until_within_budget(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    keys = [make_key(max_batch_size=2**i) for i in range(4)]
    paths = [cache.get_or_build(k, Builder(size=998), poll_s=0.01) for k in keys]   # 998 + 2 bytes each
    t0 = time.time() - 1000
    for i, path in enumerate(paths):
        set_last_used(path, t0 + i)                       # 0 oldest ... 3 newest
    assert cache.lookup(keys[0]) == paths[0]              # a hit makes 0 the most recently used
    assert cache.gc(10**6) == []
    removed = cache.gc(2500)
    assert [(r.path, r.bytes, r.reason) for r in removed] == [(paths[1], 1000, "lru"), (paths[2], 1000, "lru")]
    assert [cache.lookup(k) is not None for k in keys] == [True, False, False, True]
    assert sorted(m["digest"] for m in cache.list_engines()) == sorted([keys[0].digest(), keys[3].digest()])


def test_gc_spares_kept_and_locked_engines_and_cleans_dead_builds(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    kept, locked, free = (make_key(tp=tp) for tp in (1, 2, 8))
    paths = [cache.get_or_build(k, Builder(), poll_s=0.01) for k in (kept, locked, free)]
    for i, path in enumerate(paths):
        set_last_used(path, time.time() - 1000 + i)
    lock = write_lock(tmp_path, locked, host="gpu-node-3", pid=99)            # a live holder elsewhere
    pid = dead_pid()
    orphan = tmp_path / f".{make_key(tp=16).label()}.tmp-{cache.host}-{pid}"  # builder gone, lock gone
    orphan.mkdir()
    (orphan / "rank0.engine").write_bytes(b"o" * 300)
    dead_lock = write_lock(tmp_path, make_key(pp=2), host=cache.host, pid=pid)  # builder killed: lock + temp dir
    dead_tmp = tmp_path / f".{make_key(pp=2).label()}.tmp-{cache.host}-{pid}"
    dead_tmp.mkdir()
    (dead_tmp / "part").write_bytes(b"p" * 70)
    live_tmp = tmp_path / f".{locked.label()}.tmp-gpu-node-3-99"           # the live holder's build in progress
    live_tmp.mkdir()

    removed = cache.gc(0, keep={kept.digest()})
    assert sorted((r.path, r.bytes, r.reason) for r in removed) == sorted(
        [(dead_tmp, 70, "dead-build"), (orphan, 300, "dead-build"), (paths[2], 1002, "lru")])
    assert cache.lookup(kept) == paths[0] and cache.lookup(locked) == paths[1] and cache.lookup(free) is None
    assert lock.exists() and live_tmp.is_dir()
    assert not dead_lock.exists() and not orphan.exists() and not dead_tmp.exists()
    assert not any(".trash-" in p.name for p in tmp_path.iterdir())
