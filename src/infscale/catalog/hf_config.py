"""Read a Hugging Face config.json into a ModelArch, so a model outside the catalog can be used by path."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from infscale.catalog.models import CatalogError, ModelArch

# config.json "architectures" entry -> model_type, for configs that lack model_type.
_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "DeepseekV3ForCausalLM": "deepseek_v3",
}
_SUPPORTED = sorted(set(_ARCHITECTURES.values()))

# Same default as transformers' config classes for these families.
_DEFAULT_ROPE_THETA = 10000.0

_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def model_from_hf_config(path: str | Path, name: str | None = None) -> ModelArch:
    """A ModelArch from a config.json (a file, or a directory holding config.json).

    Raises CatalogError naming the file and the key when the model type is unsupported or a key is missing.
    """
    path = Path(path).expanduser().resolve()
    if path.is_dir():
        path = path / "config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CatalogError(f"{path}: cannot read config: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise CatalogError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(cfg, dict):
        raise CatalogError(f"{path}: expected a JSON object")

    family = _model_type(cfg, path)

    def req(key: str) -> Any:
        if cfg.get(key) is None:
            raise CatalogError(f"{path}: missing required key {key!r} for model_type {family!r}")
        return cfg[key]

    hidden = int(req("hidden_size"))
    heads = int(req("num_attention_heads"))
    fields: dict[str, Any] = dict(
        family=family,
        num_layers=int(req("num_hidden_layers")),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        intermediate_size=int(req("intermediate_size")),
        vocab_size=int(req("vocab_size")),
        max_context=int(req("max_position_embeddings")),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        rope_theta=float(cfg.get("rope_theta", _DEFAULT_ROPE_THETA)),
        rope_scaling=cfg.get("rope_scaling"),
    )
    # Qwen2 always has q/k/v bias; Llama and Qwen3 have it only with attention_bias (o_proj's bias is not modelled).
    fields["qkv_bias"] = family == "qwen2" or bool(cfg.get("attention_bias", False))
    fields["qk_norm"] = family in ("qwen3", "qwen3_moe")

    if family == "qwen3_moe":
        # ModelArch describes "every layer MoE"; other layouts would need per-layer FFN types.
        if cfg.get("decoder_sparse_step", 1) != 1 or cfg.get("mlp_only_layers"):
            raise CatalogError(f"{path}: decoder_sparse_step != 1 or a non-empty mlp_only_layers is not supported")
        fields.update(
            num_experts=int(req("num_experts")),
            experts_per_token=int(req("num_experts_per_tok")),
            moe_intermediate_size=int(req("moe_intermediate_size")),
        )
    elif family == "deepseek_v3":
        if cfg.get("moe_layer_freq", 1) != 1:
            raise CatalogError(f"{path}: moe_layer_freq != 1 is not supported")
        q_lora = cfg.get("q_lora_rank")  # null means a plain q_proj
        nope = int(req("qk_nope_head_dim"))
        rope = int(req("qk_rope_head_dim"))
        fields.update(
            attention="mla",
            num_kv_heads=heads,  # MLA: every head has its own k/v after the up-projection
            head_dim=nope + rope,
            num_experts=int(req("n_routed_experts")),
            num_shared_experts=int(req("n_shared_experts")),
            experts_per_token=int(req("num_experts_per_tok")),
            moe_intermediate_size=int(req("moe_intermediate_size")),
            first_dense_layers=int(req("first_k_dense_replace")),
            q_lora_rank=None if q_lora is None else int(q_lora),
            kv_lora_rank=int(req("kv_lora_rank")),
            qk_nope_head_dim=nope,
            qk_rope_head_dim=rope,
            v_head_dim=int(req("v_head_dim")),
        )

    try:
        return ModelArch(
            name=name or _default_name(path, cfg),
            hf_id=_hf_id(path, cfg),
            source=str(path),
            **fields,
        )
    except ValidationError as exc:
        raise CatalogError(f"{path}: inconsistent config: {exc}") from exc


def _model_type(cfg: dict, path: Path) -> str:
    model_type = cfg.get("model_type")
    if model_type is None:
        archs = cfg.get("architectures") or []
        known = [_ARCHITECTURES[a] for a in archs if a in _ARCHITECTURES]
        if not known:
            raise CatalogError(f"{path}: missing required key 'model_type' (architectures {archs} not recognised)")
        model_type = known[0]
    if model_type not in _SUPPORTED:
        raise CatalogError(f"{path}: unsupported model_type {model_type!r}; supported: {', '.join(_SUPPORTED)}")
    return model_type


def _snapshot_repo(path: Path) -> str | None:
    """'org/name' when path lies in a Hugging Face cache (models--org--name/snapshots/<hash>/config.json)."""
    parent = path.parent
    if parent.parent.name == "snapshots" and parent.parent.parent.name.startswith("models--"):
        return parent.parent.parent.name.removeprefix("models--").replace("--", "/", 1)
    return None


def _default_name(path: Path, cfg: dict) -> str:
    # A file named other than config.json (e.g. tests/data/hf/llama-3.1-8b.json) is named after itself;
    # a config.json after its directory, or after its repo inside a Hugging Face cache.
    if path.name != "config.json":
        return path.stem.lower()
    repo = _snapshot_repo(path)
    if repo:
        return repo.split("/")[-1].lower()
    if path.parent.name:
        return path.parent.name.lower()
    name_or_path = str(cfg.get("_name_or_path") or "").rstrip("/")
    return (name_or_path.split("/")[-1] or "model").lower()


def _hf_id(path: Path, cfg: dict) -> str | None:
    repo = _snapshot_repo(path)
    if repo:
        return repo
    name_or_path = cfg.get("_name_or_path")
    if isinstance(name_or_path, str) and _HF_ID.match(name_or_path):
        return name_or_path
    return None
