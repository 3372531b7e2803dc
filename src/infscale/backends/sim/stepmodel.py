"""The serving core's executor for the `sim` backend: iteration durations from the analytical model."""

from __future__ import annotations

import numpy as np

from infscale.perfmodel import StepModel
from infscale.serving.executor import IterationBatch
from infscale.trtllm_model import TrtllmStepModel


def until_horizon(durations: np.ndarray, horizon: float | None) -> np.ndarray:
    """The steps up to and including the first that ends past `horizon` (all of them without one)."""
    if horizon is None:
        return durations
    ends = np.cumsum(durations)
    return durations[: int(np.searchsorted(ends, horizon, side="left")) + 1]


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
        return until_horizon(first + slope * np.arange(steps, dtype=np.float64), horizon)


class TrtllmExecutor:
    """The serving core's executor for the `trtllm` engine model: iteration times composed from measured
    TensorRT-LLM operator latencies (`infscale.trtllm_model`)."""

    deterministic = True

    def __init__(self, model: TrtllmStepModel):
        self.model = model

    def iteration(self, batch: IterationBatch) -> float:
        return self.model.batch_time(batch.decode_context, batch.prefill_chunk, batch.prefill_past)

    def decode_steps(self, ids: np.ndarray, context: np.ndarray, steps: int, horizon: float | None) -> np.ndarray:
        return until_horizon(self.model.decode_span(context, steps), horizon)
