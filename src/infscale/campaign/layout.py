"""The rules that make a parallel layout valid for a model and a target, and enumerating the valid ones."""

from __future__ import annotations

import math

from infscale.catalog import Hardware, ModelArch
from infscale.layout import Layout


def layout_problem(layout: Layout, model: ModelArch, hardware: Hardware, max_nodes: int) -> str | None:
    """Why `layout` cannot run `model` on `max_nodes` nodes of `hardware`, or None when it can.

    These are structural rules (the layout cannot even be expressed); running out of memory is a separate,
    later verdict of the memory model.
    """
    heads = model.num_attention_heads
    if heads % layout.tp:
        allowed = ", ".join(str(t) for t in range(1, heads + 1) if heads % t == 0)
        return f"tp={layout.tp} does not divide {model.name}'s {heads} attention heads (allowed tp: {allowed})"
    kv_heads = model.num_kv_heads
    if model.attention == "gqa" and layout.tp > kv_heads and layout.tp % kv_heads:
        return f"tp={layout.tp} exceeds {model.name}'s {kv_heads} KV heads and is not a multiple of it"
    if layout.pp > model.num_layers:
        return f"pp={layout.pp} exceeds {model.name}'s {model.num_layers} layers"
    if layout.ep > 1:
        if not model.is_moe:
            return f"ep={layout.ep} needs a mixture-of-experts model; {model.name} is dense"
        if layout.tp % layout.ep:
            return f"ep={layout.ep} must divide tp={layout.tp} (experts are split inside the TP group)"
        if model.num_experts % layout.ep:
            return f"ep={layout.ep} does not divide {model.name}'s {model.num_experts} experts"
    available = max_nodes * hardware.gpus_per_node
    if layout.gpus > available:
        return (
            f"{layout} needs {layout.gpus} GPUs but the target has {available} "
            f"({max_nodes} node(s) × {hardware.gpus_per_node} {hardware.name})"
        )
    return None


def enumerate_layouts(
    model: ModelArch,
    hardware: Hardware,
    gpu_counts: list[int],
    max_nodes: int,
    max_pp: int | None = None,
    expert_parallel: bool = False,
    tp_within_node: bool = True,
) -> list[Layout]:
    """Every valid dp × tp × pp (× ep = tp for MoE when `expert_parallel`) using exactly one of `gpu_counts` GPUs."""
    layouts: list[Layout] = []
    for gpus in sorted(set(gpu_counts)):
        for tp in _divisors(gpus):
            if tp_within_node and tp > hardware.gpus_per_node:
                continue
            for pp in _divisors(gpus // tp):
                if max_pp is not None and pp > max_pp:
                    continue
                dp = gpus // (tp * pp)
                candidates = [Layout(dp, tp, pp)]
                if expert_parallel and model.is_moe and tp > 1:
                    candidates.append(Layout(dp, tp, pp, ep=tp))
                layouts += [c for c in candidates if layout_problem(c, model, hardware, max_nodes) is None]
    return layouts


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted({*small, *(n // d for d in small)})
