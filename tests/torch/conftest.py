"""Shared pieces of the torch backend's CPU tests: tiny architectures and the `torch` marker.

torch is not a core dependency of infscale. Without it these tests are skipped, unless INFSCALE_REQUIRE_TORCH=1
(set where CI is meant to run them), which turns the skip into a failure.
"""

from __future__ import annotations

import os

import pytest

if os.environ.get("INFSCALE_REQUIRE_TORCH") != "1":
    pytest.importorskip("torch")

from infscale.catalog.models import ModelArch  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "torch: the torch backend (CPU, tiny models)")


def tiny_arch(family: str = "llama", **overrides) -> ModelArch:
    """2 layers, hidden 64, 4 heads, 2 KV heads, head_dim 16, FFN 128, vocab 256 (the issue's test model)."""
    fields = dict(name=f"tiny-{family}", family=family, num_layers=2, hidden_size=64, num_attention_heads=4,
                  num_kv_heads=2, head_dim=16, intermediate_size=128, vocab_size=256, max_context=4096,
                  rope_theta=10000.0, source="tests/torch")
    if family == "qwen2":
        fields.update(qkv_bias=True, rope_theta=1e6)
    if family in ("qwen3", "qwen3_moe"):
        fields.update(qk_norm=True, rope_theta=1e6)
    if family == "qwen3_moe":
        fields.update(num_experts=8, experts_per_token=2, moe_intermediate_size=32)
    fields.update(overrides)
    return ModelArch(**fields)


@pytest.fixture(scope="session")
def arch():
    """The tiny-architecture factory: arch("qwen3", num_kv_heads=1) …"""
    return tiny_arch
