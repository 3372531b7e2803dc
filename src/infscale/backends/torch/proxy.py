"""Layer-sliced proxy runs: k of a model's L layers run, and each measured step is scaled to L layers.

A step's time is a fixed part (embedding, PP hand-offs, final norm, LM head, sampling, the host's preparation
and launch) plus a per-layer part. The fixed part is measured directly: the executor runs the same code path
(the same CUDA graphs or eager steps, the same host work) with its layers removed, for each batch size, and
takes the median. A measured step of n sequences then counts as

    t_full = f(n) + max(t - f(n), 0) * L / k

with f interpolated between the measured batch sizes (clamped at the ends). Only the per-layer part grows;
attention's dependence on context is in the per-layer part, so it is scaled with the step it was measured in.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

METHOD = ("fixed part measured per batch size with the layers removed (same path, median of repeats); "
          "t_full = f(n) + max(t - f(n), 0) * full_layers / proxy_layers")


@dataclass
class LayerScaling:
    """The scaling of one replica's step times. `decode_*`: pure-decode steps; `iteration_*`: prefill/mixed
    iterations (f keyed by the number of sequences in the batch)."""

    proxy_layers: int
    full_layers: int
    decode_sizes: list[int] = field(default_factory=list)
    decode_fixed_s: list[float] = field(default_factory=list)
    iteration_sizes: list[int] = field(default_factory=list)
    iteration_fixed_s: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 0 < self.proxy_layers < self.full_layers:
            raise ValueError(f"a proxy runs 1 … {self.full_layers - 1} of the model's {self.full_layers} layers, "
                             f"not {self.proxy_layers}")

    @property
    def factor(self) -> float:
        return self.full_layers / self.proxy_layers

    def fixed(self, rows: int, kind: str = "decode") -> float:
        sizes, seconds = ((self.decode_sizes, self.decode_fixed_s) if kind == "decode"
                          else (self.iteration_sizes, self.iteration_fixed_s))
        if not sizes:
            raise ValueError(f"no fixed-part measurement for {kind} steps: calibrate before scaling")
        return float(np.interp(rows, sizes, seconds))

    def scale(self, seconds: np.ndarray, rows: int, kind: str = "decode") -> np.ndarray:
        """Measured step durations of `rows` sequences (k layers) → the same steps with L layers."""
        fixed = self.fixed(rows, kind)
        measured = np.asarray(seconds, dtype=np.float64)
        return fixed + np.maximum(measured - fixed, 0.0) * self.factor

    def provenance(self) -> dict[str, object]:
        return {"proxy_layers": self.proxy_layers, "full_layers": self.full_layers,
                "per_layer_factor": self.factor, "method": METHOD,
                "decode_fixed_s": dict(zip(map(str, self.decode_sizes), self.decode_fixed_s)),
                "iteration_fixed_s": dict(zip(map(str, self.iteration_sizes), self.iteration_fixed_s))}


@contextmanager
def without_layers(model):
    """The model with no decoder layers: its steps run only the fixed part (the forward loops skip them)."""
    layers = model.layers
    model.layers = []
    try:
        yield model
    finally:
        model.layers = layers
