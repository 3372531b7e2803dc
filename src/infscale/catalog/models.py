"""Model architectures: the numbers of each model's config.json, and parameter counts derived from them.

The catalog lives in ``data/models.yaml``; each entry names the config.json it was copied from.
A model that is not in the catalog can be read straight from its config.json (see ``hf_config``).
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from infscale.yamlfile import parse_yaml


class CatalogError(ValueError):
    """An unknown catalog name, or a model/hardware description that cannot be used."""


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of a model, split the way the memory and performance models need them.

    Attention-internal norms (Qwen3's q/k norms, MLA's q_a/kv_a norms) are part of ``attention_per_layer``;
    ``norms_per_layer`` is only the two per-layer RMSNorms (input and post-attention).
    """

    embedding: int  # input embedding (vocab * hidden)
    lm_head: int  # 0 if tied to the embedding
    attention_per_layer: int  # every attention weight of one layer, incl. biases and attention-internal norms
    dense_ffn_per_layer: int  # gate+up+down of one dense layer; 0 when the model has no dense layers
    expert_params: int  # ONE routed expert's gate+up+down
    shared_expert_params_per_layer: int  # all shared experts of one MoE layer
    router_per_layer: int  # router of one MoE layer (DeepSeek-V3 also has a per-expert score bias)
    norms_per_layer: int  # input_layernorm + post_attention_layernorm
    final_norm: int
    total: int  # every parameter (DeepSeek's multi-token-prediction layer excluded)
    active_per_token: int  # total minus the routed experts a token does not use; embeddings and lm_head included
    routed_experts_per_layer: int = 0  # all routed experts of one MoE layer (num_experts * expert_params)

    @property
    def dense_layer(self) -> int:
        """Parameters of one dense decoder layer (0 when the model has no dense layers)."""
        if self.dense_ffn_per_layer == 0:
            return 0
        return self.attention_per_layer + self.dense_ffn_per_layer + self.norms_per_layer

    @property
    def moe_layer(self) -> int:
        """Parameters of one MoE decoder layer (0 for a dense model)."""
        if self.routed_experts_per_layer == 0:
            return 0
        return (self.attention_per_layer + self.routed_experts_per_layer + self.shared_expert_params_per_layer
                + self.router_per_layer + self.norms_per_layer)


class ModelArch(BaseModel):
    """One model architecture, with the numbers of its Hugging Face config.json."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str  # catalog key, lowercase, e.g. "llama-3.1-8b"
    hf_id: str | None = None  # e.g. "meta-llama/Llama-3.1-8B-Instruct"
    family: Literal["llama", "qwen2", "qwen3", "qwen3_moe", "deepseek_v3"]
    attention: Literal["gqa", "mla"] = "gqa"
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int  # for MLA: = num_attention_heads (the KV size comes from the latent instead)
    head_dim: int  # for MLA: qk_nope_head_dim + qk_rope_head_dim
    intermediate_size: int  # dense FFN width (DeepSeek: the dense layers' 18432)
    vocab_size: int
    max_context: int  # max_position_embeddings
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 has q/k/v bias
    qk_norm: bool = False  # Qwen3 has per-head q/k RMSNorm
    rope_theta: float
    rope_scaling: dict | None = None
    # MoE (0 when dense)
    num_experts: int = 0  # routed experts
    num_shared_experts: int = 0
    experts_per_token: int = 0  # top-k
    moe_intermediate_size: int = 0  # per-expert FFN width
    first_dense_layers: int = 0  # leading dense layers before the MoE layers; 0 = all layers MoE for MoE models
    # MLA (None for GQA)
    q_lora_rank: int | None = None  # None for MLA models without a q down-projection (e.g. DeepSeek-V2-Lite)
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None
    source: str  # URL of the config.json, or the path it was read from

    @model_validator(mode="after")
    def _check_consistency(self) -> ModelArch:
        # Catch transcription errors in models.yaml and odd config.json files early, with a one-line reason.
        for field in ("num_layers", "hidden_size", "num_attention_heads", "num_kv_heads", "head_dim",
                      "intermediate_size", "vocab_size", "max_context"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{self.name}: {field} must be positive")
        if self.num_attention_heads % self.num_kv_heads:
            raise ValueError(f"{self.name}: num_attention_heads {self.num_attention_heads} "
                             f"is not a multiple of num_kv_heads {self.num_kv_heads}")
        moe_fields = (self.num_experts, self.experts_per_token, self.moe_intermediate_size)
        if any(moe_fields) and not all(moe_fields):
            raise ValueError(f"{self.name}: num_experts, experts_per_token and moe_intermediate_size "
                             "must all be set for an MoE model")
        if self.experts_per_token > self.num_experts:
            raise ValueError(f"{self.name}: experts_per_token > num_experts")
        if self.first_dense_layers >= self.num_layers and self.num_experts:
            raise ValueError(f"{self.name}: first_dense_layers leaves no MoE layers")
        mla = (self.kv_lora_rank, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim)
        if self.attention == "mla":
            if any(v is None for v in mla):
                raise ValueError(f"{self.name}: MLA needs kv_lora_rank, qk_nope_head_dim, "
                                 "qk_rope_head_dim and v_head_dim")
            if self.head_dim != self.qk_nope_head_dim + self.qk_rope_head_dim:
                raise ValueError(f"{self.name}: MLA head_dim must be qk_nope_head_dim + qk_rope_head_dim")
        elif any(v is not None for v in mla) or self.q_lora_rank is not None:
            raise ValueError(f"{self.name}: MLA fields set on a GQA model")
        return self

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def num_moe_layers(self) -> int:
        """MoE layers; 0 for a dense model."""
        return self.num_layers - self.first_dense_layers if self.is_moe else 0

    @property
    def num_dense_layers(self) -> int:
        """Layers with a dense FFN: all of a dense model's, the leading ones of an MoE model."""
        return self.num_layers - self.num_moe_layers

    def _attention_params(self) -> int:
        h = self.hidden_size
        heads = self.num_attention_heads
        if self.attention == "mla":
            qk_head = self.qk_nope_head_dim + self.qk_rope_head_dim
            if self.q_lora_rank is None:
                q = h * heads * qk_head  # plain q_proj
            else:
                # q_a_proj (down), q_a_layernorm, q_b_proj (up)
                q = h * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * heads * qk_head
            # kv_a_proj_with_mqa emits the latent plus the shared rope key, then kv_a_layernorm;
            # kv_b_proj expands the latent to every head's k_nope and v.
            kv = (h * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
                  + self.kv_lora_rank * heads * (self.qk_nope_head_dim + self.v_head_dim))
            o = heads * self.v_head_dim * h
            return q + kv + o
        q_out = heads * self.head_dim
        kv_out = self.num_kv_heads * self.head_dim
        params = h * q_out + 2 * h * kv_out + q_out * h  # q, k, v, o projections
        if self.qkv_bias:
            params += q_out + 2 * kv_out
        if self.qk_norm:
            params += 2 * self.head_dim  # one RMSNorm weight of head_dim each for q and k, shared by heads
        return params

    def param_counts(self) -> ParamCounts:
        h = self.hidden_size
        embedding = self.vocab_size * h
        lm_head = 0 if self.tie_word_embeddings else self.vocab_size * h
        attention = self._attention_params()
        dense_ffn = 3 * h * self.intermediate_size if self.num_dense_layers else 0  # SwiGLU gate, up, down
        expert = 3 * h * self.moe_intermediate_size
        shared = self.num_shared_experts * expert
        router = h * self.num_experts
        if self.family == "deepseek_v3" and self.is_moe:
            router += self.num_experts  # gate.e_score_correction_bias, one per routed expert
        norms = 2 * h
        final_norm = h
        routed = self.num_experts * expert

        dense_layer = attention + dense_ffn + norms
        moe_layer = attention + routed + shared + router + norms if self.is_moe else 0
        total = (embedding + lm_head + final_norm
                 + self.num_dense_layers * dense_layer + self.num_moe_layers * moe_layer)
        unused_experts = self.num_moe_layers * (self.num_experts - self.experts_per_token) * expert
        return ParamCounts(
            embedding=embedding,
            lm_head=lm_head,
            attention_per_layer=attention,
            dense_ffn_per_layer=dense_ffn,
            expert_params=expert,
            shared_expert_params_per_layer=shared,
            router_per_layer=router,
            norms_per_layer=norms,
            final_norm=final_norm,
            total=total,
            active_per_token=total - unused_experts,
            routed_experts_per_layer=routed,
        )


# ---------------------------------------------------------------------------------------------------------
# Registry


def _data_text(filename: str) -> str:
    return (resources.files("infscale.catalog") / "data" / filename).read_text(encoding="utf-8")


def _unknown(kind: str, name: str, known: list[str]) -> CatalogError:
    close = difflib.get_close_matches(name.lower(), known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return CatalogError(f"unknown {kind} {name!r}.{hint} Known: {', '.join(sorted(known))}")


@functools.cache
def _load_catalog() -> tuple[dict[str, ModelArch], dict[str, str]]:
    data = parse_yaml(_data_text("models.yaml"), "models.yaml")
    models: dict[str, ModelArch] = {}
    for name, fields in data["models"].items():
        if name != name.lower():
            raise CatalogError(f"models.yaml: model name {name!r} must be lowercase")
        try:
            models[name] = ModelArch(name=name, **fields)
        except ValidationError as exc:
            raise CatalogError(f"models.yaml: entry {name!r} is invalid: {exc}") from exc
    aliases: dict[str, str] = {}
    for alias, target in (data.get("aliases") or {}).items():
        if alias in models:
            raise CatalogError(f"models.yaml: alias {alias!r} shadows a model name")
        if target not in models:
            raise CatalogError(f"models.yaml: alias {alias!r} points to unknown model {target!r}")
        aliases[alias.lower()] = target
    return models, aliases


def load_models() -> dict[str, ModelArch]:
    """All catalog models by name (aliases not included). The result is a fresh dict; the models are frozen."""
    return dict(_load_catalog()[0])


def model_aliases() -> dict[str, str]:
    """Alias -> catalog name, e.g. 'deepseek-r1-distill-qwen-32b' -> 'qwen2.5-32b'."""
    return dict(_load_catalog()[1])


def get_model(name: str) -> ModelArch:
    """A catalog model by name, alias or Hugging Face id (case-insensitive)."""
    models, aliases = _load_catalog()
    key = name.strip().lower()
    if key in models:
        return models[key]
    if key in aliases:
        return models[aliases[key]]
    for model in models.values():
        if model.hf_id is not None and model.hf_id.lower() == key:
            return model
    raise _unknown("model", name, list(models) + list(aliases))


def resolve_model(name_or_path: str | Path) -> ModelArch:
    """A model by catalog name, or from a path: a .json file or a directory holding config.json."""
    from infscale.catalog.hf_config import model_from_hf_config  # late import: hf_config imports this module

    path = Path(name_or_path).expanduser()
    try:
        if path.is_file() and path.suffix == ".json":
            return model_from_hf_config(path)
        if path.is_dir() and (path / "config.json").is_file():
            return model_from_hf_config(path / "config.json")
    except OSError as err:  # e.g. a name too long to be a path
        raise CatalogError(f"{str(name_or_path)[:200]!r} is neither a catalog model nor a readable config.json "
                           f"({err.strerror or err})") from None
    return get_model(str(name_or_path))
