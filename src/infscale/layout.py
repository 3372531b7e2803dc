"""The parallel layout of one model instance: DP × TP × PP, with EP for MoE layers (a plain value type)."""

from __future__ import annotations

import re
from dataclasses import dataclass

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
