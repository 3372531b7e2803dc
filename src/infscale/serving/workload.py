"""Seeded request generation: lengths from a `LengthDist`, arrival times from the arrival mode."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from infscale.campaign.spec import Arrival, LengthDist


@dataclass
class Requests:
    """The requests of one cell, in submission order."""

    isl: np.ndarray       # prompt tokens per request (int64)
    osl: np.ndarray       # output tokens per request (int64)
    arrival: np.ndarray   # submission time in seconds; 0 for offline; NaN for closed-loop (set when a slot frees)

    def __len__(self) -> int:
        return len(self.isl)


def draw_lengths(dist: LengthDist, count: int, rng: np.random.Generator) -> np.ndarray:
    if dist.dist == "fixed":
        return np.full(count, dist.value, dtype=np.int64)
    if dist.dist == "normal":
        values = rng.normal(dist.mean, dist.std, count)
    else:
        values = rng.lognormal(np.log(dist.median), dist.sigma, count)
    return np.clip(np.rint(values), dist.min, dist.cap).astype(np.int64)


def generate_requests(isl: LengthDist, osl: LengthDist, count: int, arrival: Arrival, seed: int) -> Requests:
    """The same arguments always give the same requests (lengths and times are drawn from separate streams)."""
    length_rng, time_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    isl_values = draw_lengths(isl, count, length_rng)
    osl_values = draw_lengths(osl, count, length_rng)
    if arrival.mode == "poisson":
        times = np.cumsum(time_rng.exponential(1.0 / arrival.rate, count))
        times -= times[0]  # the first request opens the run
    elif arrival.mode == "concurrency":
        times = np.full(count, np.nan)
    else:
        times = np.zeros(count)
    return Requests(isl_values, osl_values, times)
