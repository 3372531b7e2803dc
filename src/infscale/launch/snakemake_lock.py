"""Snakemake's lock on a working directory, and whether whoever holds it is still alive.

Snakemake locks `<workdir>/.snakemake/locks/` while it runs: the lock files list the paths it works on, not its
process id, so the holder is found another way. Snakemake changes into its working directory, so a live holder on
this host is a live process whose command line runs snakemake and whose current directory (`/proc/<pid>/cwd`) is
the working directory. `infscale run` removes a lock only when it holds the campaign's driver lock (no other live
`infscale run` drives the campaign: launch/registry.driver_lock, which records pid and host) and no such process
exists; with one, it refuses. What this cannot see: a `snakemake` started by hand on another host that shares the
folder (its lock would be taken for stale), and another user's processes whose directory cannot be read. Linux
only (`/proc`); elsewhere a lock is never removed.
"""

from __future__ import annotations

import os
from pathlib import Path

from infscale.launch.registry import LockHeld, pid_alive

PROC = Path("/proc")


def lock_files(workdir: Path) -> list[Path]:
    folder = Path(workdir) / ".snakemake" / "locks"
    return sorted(folder.iterdir()) if folder.is_dir() else []


def _runs_snakemake(argv: list[str]) -> bool:
    """`python -m snakemake …`, `…/bin/snakemake …` (also run through its interpreter), `…/snakemake/__main__.py`."""
    return any(Path(arg).name == "snakemake" or arg.endswith("snakemake/__main__.py") for arg in argv[:3])


def snakemake_processes(workdir: Path) -> list[tuple[int, str]]:
    """(pid, command line) of the live Snakemake processes on this host working in `workdir`."""
    target = Path(workdir).resolve()
    found = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = [arg.decode(errors="replace") for arg in (entry / "cmdline").read_bytes().split(b"\0") if arg]
            if not _runs_snakemake(argv) or Path(os.readlink(entry / "cwd")) != target:
                continue
        except OSError:  # gone meanwhile, or another user's process
            continue
        if pid_alive(int(entry.name)):
            found.append((int(entry.name), " ".join(argv)))
    return found


def stale_lock(workdir: Path) -> list[Path]:
    """The lock files of `workdir` when their holder is gone (empty when there is no lock). Raises LockHeld, with
    a one-line message, while a live Snakemake works there (or when this platform cannot tell)."""
    locks = lock_files(workdir)
    if not locks:
        return []
    if not (PROC / "self").is_dir():
        raise LockHeld(f"{workdir}/.snakemake/locks is locked and this platform cannot tell whether its holder is "
                       "alive; if no snakemake runs there, remove the lock with `snakemake --unlock`")
    holders = snakemake_processes(workdir)
    if holders:
        pid, command = holders[0]
        raise LockHeld(f"a live snakemake (pid {pid}: {command[:160]}) holds the lock of {workdir}; wait for it to "
                       "end or stop it (infscale never removes a live lock)")
    return locks
