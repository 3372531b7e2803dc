"""Backends: `sim` (analytical model, runs anywhere), `torch` (measured, PyTorch), `trtllm` (a later issue)."""

from __future__ import annotations

from infscale.backends.base import Artefact, Backend, BuildSpec, CellResult, InfeasibleCell

AVAILABLE = ("sim", "torch")


def get_backend(name: str) -> Backend:
    if name == "sim":
        from infscale.backends.sim.backend import SimBackend

        return SimBackend()
    if name == "torch":
        try:
            from infscale.backends.torch.backend import TorchBackend
        except ImportError as err:
            raise RuntimeError(f"the 'torch' backend needs PyTorch ({err}); install infscale[torch]") from None
        return TorchBackend()
    if name == "trtllm":
        raise NotImplementedError("the 'trtllm' backend is not part of this infscale version yet; use 'sim'")
    raise ValueError(f"unknown backend '{name}'; allowed: sim, torch, trtllm")


__all__ = ["Artefact", "Backend", "BuildSpec", "CellResult", "InfeasibleCell", "get_backend", "AVAILABLE"]
