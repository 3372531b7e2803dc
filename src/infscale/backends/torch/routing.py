"""Expert popularity for MoE models with random weights.

A random router spreads tokens almost uniformly over the experts, while a trained one does not. The cost of an MoE
step depends on how many tokens each expert gets, so the popularity is an input here, and the result is recorded:

- `router`: the model's own top-k of softmax(router logits) (random weights: about uniform, not controlled);
- `uniform`: every expert equally likely;
- `zipf`: the expert of popularity rank r (a seeded permutation per layer) gets a share proportional to r^-s.

For `uniform` and `zipf` the k experts of a token are drawn by systematic sampling, which gives each expert
exactly the requested share of the routed slots in expectation, always k distinct experts. The draw is a hash of
(seed, layer, request, position): every TP rank picks the same experts without communicating, and a request
recomputed after preemption is routed as it was the first time. Routing weights still come from the router's
softmax at the chosen experts, renormalised over the k (Qwen3's norm_topk_prob), so the router's work is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

_MASK32 = 0xFFFFFFFF
_MULT = 0x45D9F3B  # < 2^27, so a 32-bit value times it fits in int64


@dataclass(frozen=True)
class ExpertPopularity:
    mode: Literal["router", "uniform", "zipf"] = "uniform"
    zipf_s: float = 1.0
    seed: int = 0

    def label(self) -> str:
        return f"zipf{self.zipf_s:g}" if self.mode == "zipf" else self.mode


def target_shares(popularity: ExpertPopularity, num_experts: int, top_k: int, layer: int) -> np.ndarray:
    """Requested fraction of routed slots per expert for one layer (sums to 1; each at most 1/top_k)."""
    if popularity.mode == "uniform":
        return np.full(num_experts, 1.0 / num_experts)
    if popularity.mode != "zipf":
        raise ValueError(f"mode {popularity.mode!r} has no target shares")
    ranks = np.arange(1, num_experts + 1, dtype=np.float64)
    by_rank = ranks ** -popularity.zipf_s
    order = np.random.default_rng([popularity.seed, layer]).permutation(num_experts)
    weights = np.empty(num_experts)
    weights[order] = by_rank  # expert order[0] is the most popular
    return _inclusion(weights / weights.sum(), top_k) / top_k


def _inclusion(share: np.ndarray, top_k: int) -> np.ndarray:
    """Inclusion probabilities k·share capped at 1 (an expert cannot be picked twice for one token), the mass
    above the cap passed on to the others in proportion."""
    pi = share * top_k
    capped = np.zeros(len(pi), dtype=bool)
    while (pi > 1 + 1e-12).any():
        capped |= pi >= 1
        rest = top_k - capped.sum()
        free = ~capped
        pi = np.where(capped, 1.0, share * rest / share[free].sum())
    return pi


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = (x * _MULT) & _MASK32
    x = x ^ (x >> 16)
    x = (x * _MULT) & _MASK32
    return x ^ (x >> 16)


def token_uniforms(keys: torch.Tensor, positions: torch.Tensor, seed: int, layer: int) -> torch.Tensor:
    """A uniform in [0, 1) per token from (seed, layer, request key, position); the same on every device."""
    salt = int(np.random.default_rng([seed, layer, 7]).integers(0, 2**32))
    h = _mix32((keys & _MASK32) ^ salt)
    h = _mix32(h ^ (positions & _MASK32))
    return h.double() / 2.0**32


def systematic_topk(uniforms: torch.Tensor, shares: torch.Tensor, top_k: int) -> torch.Tensor:
    """k distinct experts per token [T, k]: expert e covers an interval of length k·share_e on [0, k); the
    points u, u+1, …, u+k-1 each fall in one interval, and no interval is longer than 1."""
    edges = torch.cumsum(shares.double() * top_k, 0)
    # rounding must not leave u + k - 1 past the end; a device-side fill, not a host scalar copied in (which a
    # CUDA graph capture refuses)
    edges = torch.cat([edges[:-1], edges.new_full((1,), float(top_k))])
    points = uniforms[:, None] + torch.arange(top_k, device=uniforms.device, dtype=torch.float64)[None, :]
    picked = torch.searchsorted(edges, points.contiguous(), right=True)
    return picked.clamp_(max=len(shares) - 1)
