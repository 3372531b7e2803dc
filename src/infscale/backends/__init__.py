"""Backends: `sim` (analytical model, runs anywhere), `torch` and `trtllm` (real engines, later issues)."""

from __future__ import annotations

from infscale.backends.base import Artefact, Backend, BuildSpec, CellResult, InfeasibleCell

AVAILABLE = ("sim",)


def get_backend(name: str) -> Backend:
    if name == "sim":
        from infscale.backends.sim.backend import SimBackend

        return SimBackend()
    if name in ("torch", "trtllm"):
        raise NotImplementedError(f"the '{name}' backend is not part of this infscale version yet; use 'sim'")
    raise ValueError(f"unknown backend '{name}'; allowed: sim, torch, trtllm")


__all__ = ["Artefact", "Backend", "BuildSpec", "CellResult", "InfeasibleCell", "get_backend", "AVAILABLE"]
