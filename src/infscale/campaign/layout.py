"""Parallel layouts (DP × TP × PP, with EP for MoE layers) and the rules that make one valid for a model."""

from __future__ import annotations

import re
from dataclasses import dataclass

from infscale.catalog import Hardware, ModelArch

_LAYOUT_RE = re.compile(r"^(?:dp(?P<dp>\d+))?(?:tp(?P<tp>\d+))?(?:pp(?P<pp>\d+))?(?:ep(?P<ep>\d+))?$")


@dataclass(frozen=True, order=True)
class Layout:
    """How one model instance is spread over GPUs: `dp` replicas, each `tp` × `pp` GPUs; MoE experts over `ep`."""

    dp: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1  # expert parallelism inside the TP group (TensorRT-LLM convention: ep divides tp)

    @property
    def gpus(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def gpus_per_replica(self) -> int:
        return self.tp * self.pp

    def nodes(self, gpus_per_node: int) -> int:
        return -(-self.gpus // gpus_per_node)

    def __str__(self) -> str:
        text = f"dp{self.dp}tp{self.tp}pp{self.pp}"
        return text + (f"ep{self.ep}" if self.ep > 1 else "")

    @classmethod
    def parse(cls, text: str) -> "Layout":
        """Parse `dp2tp4`, `tp8pp2`, `tp8ep8` … (parts in the order dp, tp, pp, ep; absent parts are 1)."""
        match = _LAYOUT_RE.match(text.strip().lower()) if text else None
        if not match or not any(match.groupdict().values()):
            raise ValueError(f"'{text}' is not a layout; write e.g. 'dp8', 'dp2tp4', 'tp4pp2', 'tp8ep8'")
        parts = {k: int(v) for k, v in match.groupdict().items() if v is not None}
        if any(v < 1 for v in parts.values()):
            raise ValueError(f"'{text}': every degree must be at least 1")
        return cls(**parts)


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
    return [d for d in range(1, n + 1) if n % d == 0]
