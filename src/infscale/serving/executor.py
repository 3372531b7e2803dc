"""What the scheduler asks of an engine: run one iteration, or several pure-decode iterations, and say how long.

The `sim` backend predicts the durations; the `torch` backend runs the model and measures them. Everything
else (admission, preemption, routing, metrics) is the shared serving core's, so both report through one path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass
class IterationBatch:
    """One engine iteration. Context lengths count the tokens held in KV after the iteration."""

    decode_ids: np.ndarray        # request ids generating one token each
    decode_context: np.ndarray    # their context after this step
    prefill_ids: np.ndarray       # request ids prefilling a chunk of their prompt
    prefill_chunk: np.ndarray     # tokens of prompt processed now
    prefill_past: np.ndarray      # prompt tokens already in KV before this chunk

    @property
    def num_tokens(self) -> int:
        return len(self.decode_ids) + int(self.prefill_chunk.sum())


class Executor(Protocol):
    """Optionally also `release(ids)`: called when requests finish or are preempted, so an executor holding real
    KV blocks can free them (the scheduler's block counts guarantee the executor never runs out)."""

    deterministic: bool  # True when equal batches always take equal time (a model, not a measurement)

    def iteration(self, batch: IterationBatch) -> float:
        """Run (or predict) one iteration; return its duration in seconds."""
        ...

    def decode_steps(self, ids: np.ndarray, context: np.ndarray, steps: int, horizon: float | None) -> np.ndarray:
        """Run up to `steps` consecutive decode iterations of the same requests, their contexts `context` at
        the first step and one longer at each next; stop after the step whose end passes `horizon` seconds
        (if given). Return the duration of each step run."""
        ...
