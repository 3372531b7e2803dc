"""The serving core's executor for the `sim` backend: iteration durations from the analytical model."""

from __future__ import annotations

import numpy as np

from infscale.perfmodel import StepModel
from infscale.serving.executor import IterationBatch


class SimExecutor:
    """The serving core's executor for the `sim` backend: predicted durations, no GPU."""

    deterministic = True

    def __init__(self, model: StepModel):
        self.model = model

    def iteration(self, batch: IterationBatch) -> float:
        chunks = batch.prefill_chunk.astype(np.float64)
        past = batch.prefill_past.astype(np.float64)
        kv_read = float(batch.decode_context.sum() + (past + chunks).sum())
        pairs = float(batch.decode_context.sum() + (chunks * (past + (chunks + 1) / 2)).sum())
        sequences = len(batch.decode_ids) + len(batch.prefill_ids)
        return self.model.iteration_time(sequences, batch.num_tokens, kv_read, pairs,
                                         prefill=len(batch.prefill_ids) > 0)

    def decode_steps(self, ids: np.ndarray, context: np.ndarray, steps: int, horizon: float | None) -> np.ndarray:
        first, slope = self.model.decode_line(len(ids), float(context.sum()))
        durations = first + slope * np.arange(steps, dtype=np.float64)
        if horizon is not None:
            ends = np.cumsum(durations)
            durations = durations[: int(np.searchsorted(ends, horizon, side="left")) + 1]
        return durations
