"""Backends: `sim` (analytical model, runs anywhere), `torch` (measured, PyTorch), `trtllm` (a later issue)."""

from __future__ import annotations

from infscale.backends.base import Artefact, Backend, BuildSpec, CellResult, InfeasibleCell

AVAILABLE = ("sim", "torch", "trtllm")


def get_backend(name: str, options: dict | None = None) -> Backend:
    """The backend called `name`; `options` are its site settings (the trtllm backend needs them)."""
    if name == "sim":
        from infscale.backends.sim.backend import SimBackend

        return SimBackend()
    if name == "torch":
        from infscale.extras import require

        require("torch", "the 'torch' backend")
        from infscale.backends.torch.backend import TorchBackend

        return TorchBackend()
    if name == "trtllm":
        from infscale.backends.trtllm.backend import TrtllmBackend
        from infscale.backends.trtllm.commands import TrtllmConfigError, TrtllmSettings

        if options is None:
            raise TrtllmConfigError("the 'trtllm' backend needs a `trtllm:` section in the launcher settings "
                                    "(TensorRT-LLM version, local model directories; see docs/trtllm.md)")
        return TrtllmBackend(TrtllmSettings.model_validate(options))
    raise ValueError(f"unknown backend '{name}'; allowed: sim, torch, trtllm")


__all__ = ["Artefact", "Backend", "BuildSpec", "CellResult", "InfeasibleCell", "get_backend", "AVAILABLE"]
