"""Catalog: model and hardware facts, parameter counts, the config.json loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from infscale.catalog import (
    CatalogError,
    Efficiency,
    Hardware,
    ModelArch,
    ParamCounts,
    get_hardware,
    get_model,
    load_hardware,
    load_models,
    model_from_hf_config,
    resolve_model,
)

HF = Path(__file__).parent / "data" / "hf"
GiB = 1024**3
MiB = 1024**2


# --- parameter totals against the published figures ------------------------------------------------------

# (model, published total, published active or None). Sources: the models' HF model cards / reference §2.2.
PUBLISHED = [
    ("llama-3.1-8b", 8.03e9, None),
    ("qwen3-8b", 8.2e9, None),  # card: "8.2B"
    ("qwen2.5-32b", 32.76e9, None),
    ("qwen3-32b", 32.8e9, None),  # card: "32.8B"
    ("llama-3.3-70b", 70.55e9, None),
    ("llama-3.1-405b", 405.8e9, None),
    ("qwen3-30b-a3b", 30.5e9, 3.3e9),
    ("deepseek-r1", 671e9, 37e9),  # without the MTP layer
]


@pytest.mark.parametrize("name,total,active", PUBLISHED)
def test_param_totals_match_published(name: str, total: float, active: float | None) -> None:
    counts = get_model(name).param_counts()
    assert counts.total == pytest.approx(total, rel=0.015)
    if active is None:
        assert counts.active_per_token == counts.total
    else:
        # Published active counts have two significant digits (3.3B, 37B): allow 2%.
        assert counts.active_per_token == pytest.approx(active, rel=0.02)


def test_405b_also_within_tolerance_of_other_quoted_total() -> None:
    assert get_model("llama-3.1-405b").param_counts().total == pytest.approx(404.65e9, rel=0.015)


def test_exact_param_counts() -> None:
    # Exact counts from the architecture; Llama-3.1-8B's safetensors hold 8,030,261,248 parameters.
    assert get_model("llama-3.1-8b").param_counts().total == 8_030_261_248
    assert get_model("llama-3.3-70b").param_counts().total == 70_553_706_496
    assert get_model("qwen2.5-32b").param_counts().total == 32_763_876_352


def test_llama_8b_breakdown() -> None:
    c = get_model("llama-3.1-8b").param_counts()
    assert isinstance(c, ParamCounts)
    assert c.embedding == 128256 * 4096
    assert c.lm_head == 128256 * 4096
    # q and o 4096x4096, k and v 4096x1024
    assert c.attention_per_layer == 2 * 4096 * 4096 + 2 * 4096 * 1024
    assert c.dense_ffn_per_layer == 3 * 4096 * 14336
    assert c.norms_per_layer == 2 * 4096
    assert c.final_norm == 4096
    assert (c.expert_params, c.router_per_layer, c.shared_expert_params_per_layer) == (0, 0, 0)
    assert c.total == c.embedding + c.lm_head + c.final_norm + 32 * c.dense_layer


def test_qwen_bias_and_qk_norm_counted() -> None:
    qwen25 = get_model("qwen2.5-32b")
    assert qwen25.qkv_bias and not qwen25.qk_norm
    c = qwen25.param_counts()
    assert c.attention_per_layer == 2 * 5120 * 5120 + 2 * 5120 * 1024 + (5120 + 2 * 1024)
    qwen3 = get_model("qwen3-32b")
    assert qwen3.qk_norm and not qwen3.qkv_bias
    # 64 heads x 128 = 8192 wide q/o projections, plus two 128-wide norms
    assert qwen3.param_counts().attention_per_layer == 2 * 5120 * 8192 + 2 * 5120 * 1024 + 2 * 128


def test_deepseek_r1_breakdown() -> None:
    m = get_model("deepseek-r1")
    c = m.param_counts()
    assert m.is_moe and m.attention == "mla"
    assert (m.num_moe_layers, m.num_dense_layers) == (58, 3)
    assert m.head_dim == 192 and m.num_kv_heads == 128
    # q_a, q_a_norm, q_b, kv_a (latent + rope key), kv_a_norm, kv_b, o
    assert c.attention_per_layer == (7168 * 1536 + 1536 + 1536 * 128 * 192
                                     + 7168 * 576 + 512 + 512 * 128 * 256 + 128 * 128 * 7168)
    assert c.dense_ffn_per_layer == 3 * 7168 * 18432
    assert c.expert_params == 3 * 7168 * 2048
    assert c.shared_expert_params_per_layer == c.expert_params
    assert c.router_per_layer == 7168 * 256 + 256  # gate weight + e_score_correction_bias
    assert c.total == c.embedding + c.lm_head + c.final_norm + 3 * c.dense_layer + 58 * c.moe_layer
    assert c.total - c.active_per_token == 58 * 248 * c.expert_params


def test_qwen3_moe_all_layers_moe() -> None:
    m = get_model("qwen3-30b-a3b")
    assert m.is_moe and m.num_moe_layers == 48 and m.num_dense_layers == 0
    assert (m.num_kv_heads, m.head_dim, m.num_experts, m.experts_per_token) == (4, 128, 128, 8)
    c = m.param_counts()
    assert c.dense_ffn_per_layer == 0  # intermediate_size 6144 is unused
    assert c.router_per_layer == 2048 * 128
    assert c.shared_expert_params_per_layer == 0


# --- catalog facts ---------------------------------------------------------------------------------------


def test_catalog_contents() -> None:
    models = load_models()
    assert {"llama-3.1-8b", "qwen3-8b", "qwen2.5-32b", "qwen3-32b", "llama-3.3-70b", "llama-3.1-405b",
            "qwen3-30b-a3b", "deepseek-r1"} <= set(models)
    for name, m in models.items():
        assert m.name == name == name.lower()
        assert m.source.startswith("https://huggingface.co/") and m.source.endswith("/config.json")
        assert not m.is_moe or m.num_moe_layers > 0


def test_kv_heads_and_context() -> None:
    expect = {  # name: (layers, heads, kv heads, head_dim, context)
        "llama-3.1-8b": (32, 32, 8, 128, 131072),
        "qwen3-8b": (36, 32, 8, 128, 40960),
        "qwen2.5-32b": (64, 40, 8, 128, 131072),
        "qwen3-32b": (64, 64, 8, 128, 40960),
        "llama-3.3-70b": (80, 64, 8, 128, 131072),
        "llama-3.1-405b": (126, 128, 8, 128, 131072),
        "qwen3-30b-a3b": (48, 32, 4, 128, 40960),
        "deepseek-r1": (61, 128, 128, 192, 163840),
    }
    for name, numbers in expect.items():
        m = get_model(name)
        assert (m.num_layers, m.num_attention_heads, m.num_kv_heads, m.head_dim, m.max_context) == numbers, name


def test_llama_rope_scaling() -> None:
    m = get_model("llama-3.1-8b")
    assert m.rope_theta == 500000.0
    assert m.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def test_deepseek_mla_latent() -> None:
    m = get_model("deepseek-r1")
    assert (m.q_lora_rank, m.kv_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim) == (
        1536, 512, 128, 64, 128)
    # Reference §2.2: the latent KV is (512 + 64) * 61 * 2 B = 70,272 B per token in BF16.
    assert (m.kv_lora_rank + m.qk_rope_head_dim) * m.num_layers * 2 == 70_272


def test_aliases_and_hf_ids_resolve() -> None:
    assert get_model("deepseek-r1-distill-qwen-32b") is get_model("qwen2.5-32b")
    assert get_model("deepseek-r1-distill-llama-8b") is get_model("llama-3.1-8b")
    assert get_model("DeepSeek-R1-Distill-Llama-70B") is get_model("llama-3.3-70b")
    assert get_model("meta-llama/Llama-3.1-8B-Instruct") is get_model("llama-3.1-8b")
    assert get_model("Qwen3-32B") is get_model("qwen3-32b")


def test_unknown_model_error() -> None:
    with pytest.raises(CatalogError) as err:
        get_model("llama-3.1-9b")   # (a 7b typo is as close to the llama-3.1-70b alias)
    msg = str(err.value)
    assert "'llama-3.1-9b'" in msg and "did you mean 'llama-3.1-8b'" in msg.lower()
    assert "qwen3-32b" in msg and "deepseek-r1-distill-qwen-32b" in msg  # lists known names and aliases
    assert "\n" not in msg
    assert isinstance(err.value, ValueError)


def test_models_are_frozen_and_strict() -> None:
    m = get_model("llama-3.1-8b")
    with pytest.raises(ValidationError):
        m.num_layers = 1  # type: ignore[misc]
    with pytest.raises(ValidationError):
        ModelArch(**m.model_dump(), bogus=1)
    with pytest.raises(ValidationError):  # MLA fields on a GQA model
        ModelArch(**{**m.model_dump(), "kv_lora_rank": 512})


def test_load_models_returns_a_copy() -> None:
    load_models().clear()
    assert "llama-3.1-8b" in load_models()


# --- Hugging Face config.json loader ---------------------------------------------------------------------


def _same_arch(loaded: ModelArch, catalog: ModelArch) -> bool:
    ignore = {"name", "source", "hf_id"}
    return loaded.model_dump(exclude=ignore) == catalog.model_dump(exclude=ignore)


@pytest.mark.parametrize("fixture,name", [
    ("llama-3.1-8b-instruct.json", "llama-3.1-8b"),
    ("qwen3-30b-a3b.json", "qwen3-30b-a3b"),
    ("deepseek-r1.json", "deepseek-r1"),
])
def test_real_configs_equal_catalog(fixture: str, name: str) -> None:
    loaded = model_from_hf_config(HF / fixture)
    assert _same_arch(loaded, get_model(name))
    assert loaded.param_counts() == get_model(name).param_counts()
    assert loaded.name == Path(fixture).stem
    assert loaded.source == str((HF / fixture).resolve())


def test_tiny_llama_defaults() -> None:
    m = model_from_hf_config(HF / "tiny-llama.json", name="tiny")
    assert m.name == "tiny" and m.hf_id == "example-org/tiny-llama"
    assert m.num_kv_heads == 8  # defaults to num_attention_heads
    assert m.head_dim == 32  # defaults to hidden / heads
    assert m.rope_theta == 10000.0 and m.tie_word_embeddings
    c = m.param_counts()
    assert c.lm_head == 0
    assert c.total == 1000 * 256 + 256 + 4 * (4 * 256 * 256 + 3 * 256 * 688 + 2 * 256)


def test_tiny_deepseek_counts() -> None:
    m = model_from_hf_config(HF / "tiny-deepseek-v3.json")
    assert m.family == "deepseek_v3" and m.attention == "mla"
    assert (m.num_experts, m.num_shared_experts, m.experts_per_token, m.first_dense_layers) == (8, 2, 2, 1)
    assert m.head_dim == 24 and m.num_kv_heads == 4
    c = m.param_counts()
    # q: 64*24 + 24 + 24*4*24; kv: 64*24 + 16 + 16*4*28; o: 4*12*64
    assert c.attention_per_layer == 3864 + 3344 + 3072
    assert c.total == 192_584  # worked by hand: 2*6400 + 64 + 1*34984 + 2*72368
    assert c.active_per_token == 192_584 - 2 * 6 * 3 * 64 * 32


def test_qwen2_gets_bias_qwen3_gets_norm(tmp_path: Path) -> None:
    base = json.loads((HF / "tiny-llama.json").read_text())
    (tmp_path / "q2").mkdir()
    (tmp_path / "q2" / "config.json").write_text(json.dumps({**base, "model_type": "qwen2"}))
    q2 = model_from_hf_config(tmp_path / "q2")  # a directory holding config.json
    assert q2.family == "qwen2" and q2.qkv_bias and not q2.qk_norm and q2.name == "q2"
    del base["model_type"]
    p = tmp_path / "Q3-Model" / "config.json"
    p.parent.mkdir()
    p.write_text(json.dumps({**base, "architectures": ["Qwen3ForCausalLM"]}))  # model_type from architectures
    q3 = model_from_hf_config(p)
    assert q3.family == "qwen3" and q3.qk_norm and not q3.qkv_bias and q3.name == "q3-model"


def test_hf_cache_layout_names(tmp_path: Path) -> None:
    snap = tmp_path / "models--meta-llama--Llama-3.1-8B-Instruct" / "snapshots" / "0e9e39f2"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text((HF / "llama-3.1-8b-instruct.json").read_text())
    m = resolve_model(str(snap))
    assert m.name == "llama-3.1-8b-instruct" and m.hf_id == "meta-llama/Llama-3.1-8B-Instruct"


def test_missing_key_error(tmp_path: Path) -> None:
    cfg = json.loads((HF / "tiny-deepseek-v3.json").read_text())
    del cfg["kv_lora_rank"]
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(CatalogError, match="kv_lora_rank") as err:
        model_from_hf_config(path)
    assert str(path.resolve()) in str(err.value)


def test_unsupported_model_type_error(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}))
    with pytest.raises(CatalogError, match="unsupported model_type 'mistral'") as err:
        model_from_hf_config(path)
    assert str(path.resolve()) in str(err.value)


def test_unreadable_config_errors(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="cannot read"):
        model_from_hf_config(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(CatalogError, match="not valid JSON"):
        model_from_hf_config(bad)


def test_resolve_model() -> None:
    assert resolve_model("qwen3-32b") is get_model("qwen3-32b")
    assert resolve_model("deepseek-r1-distill-qwen-32b").name == "qwen2.5-32b"
    from_file = resolve_model(str(HF / "deepseek-r1.json"))
    assert from_file.name == "deepseek-r1" and from_file.source.endswith("deepseek-r1.json")
    with pytest.raises(CatalogError):
        resolve_model("no-such-model")


# --- hardware ---------------------------------------------------------------------------------------------


def test_hardware_facts() -> None:
    h100, h200 = get_hardware("h100-sxm"), get_hardware("h200-sxm")
    assert isinstance(h200, Hardware) and isinstance(h200.efficiency, Efficiency)
    assert h100.hbm_bytes == 81559 * MiB and h200.hbm_bytes == 143771 * MiB
    assert (h100.hbm_bandwidth, h200.hbm_bandwidth) == (3.35e12, 4.8e12)
    for hw in (h100, h200):
        assert hw.dense_tflops["bf16"] == 989.4 and hw.dense_tflops["fp8"] == 1978.9
        assert hw.flops("bf16") == pytest.approx(989.4e12)
        assert hw.gpus_per_node == 8 and hw.tdp_w == 700
        assert hw.nvlink_bandwidth == 450e9 and hw.internode_bandwidth == 50e9
        assert hw.default_kv_memory_fraction == 0.9
        e = hw.efficiency
        assert (e.hbm_bandwidth, e.matmul) == (0.85, 0.6)
        assert (e.allreduce_latency_s, e.allreduce_bus_bandwidth) == (8e-6, 360e9)
        assert (e.internode_latency_s, e.p2p_latency_s, e.iteration_overhead_s) == (20e-6, 10e-6, 1e-3)
        assert e.activation_reserve_bytes == 6 * GiB
    with pytest.raises(CatalogError, match="dtype 'int4'"):
        h200.flops("int4")


def test_every_hardware_number_has_a_source() -> None:
    for hw in load_hardware().values():
        for field in Hardware.numeric_fields():
            assert hw.sources.get(field, "").strip(), (hw.name, field)
        assert "efficiency.hbm_bandwidth" in hw.sources
    data = get_hardware("h100-sxm").model_dump()
    data["sources"] = {k: v for k, v in data["sources"].items() if k != "tdp_w"}
    with pytest.raises(ValidationError, match="tdp_w"):
        Hardware(**data)


def test_unknown_hardware_error() -> None:
    with pytest.raises(CatalogError) as err:
        get_hardware("h200")
    msg = str(err.value)
    assert "'h200'" in msg and "h100-sxm" in msg and "h200-sxm" in msg and "did you mean" in msg.lower()
