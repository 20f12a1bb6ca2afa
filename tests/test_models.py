"""Tests of the model catalog, the parameter formulas behind it, and the Hugging Face config import."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lynxsim.errors import InputError
from lynxsim.models import (
    ModelSpec,
    catalog_names,
    catalog_summary,
    load_catalog_model,
    load_model_file,
    model_from_hf_config,
)

EXPECTED_KEYS = {
    "mixtral-8x7b",
    "mixtral-8x22b",
    "dbrx",
    "qwen1.5-moe-a2.7b",
    "qwen2-57b-a14b",
    "qwen3-30b-a3b",
    "qwen3-235b-a22b",
    "deepseek-v2-lite",
    "deepseek-coder-v2",
    "deepseek-v3",
    "olmoe-1b-7b",
    "gpt-oss-120b",
    "llama-4-scout",
}

# Published Lynx (alpha, beta) per model (Lynx paper, arXiv 2411.08982); every other catalog model has none.
LYNX_CONSTANTS = {
    "mixtral-8x7b": (0.7, 1),
    "mixtral-8x22b": (1, 1),
    "qwen2-57b-a14b": (3, 4),
    "qwen3-30b-a3b": (3, 2),
    "qwen3-235b-a22b": (3, 2),
    "deepseek-coder-v2": (1, 2),
    "gpt-oss-120b": (3, 2),
    "llama-4-scout": (1, None),
}

# Fields that describe a checkpoint's provenance or Lynx tuning rather than its architecture.
NON_ARCHITECTURE_FIELDS = {
    "name",
    "source",
    "published_total_params",
    "published_total_params_source",
    "lynx_alpha",
    "lynx_beta",
}


def test_catalog_has_exactly_the_expected_models() -> None:
    assert set(catalog_names()) == EXPECTED_KEYS


@pytest.mark.parametrize("key", sorted(EXPECTED_KEYS))
def test_total_params_within_3_percent_of_published(key: str) -> None:
    model = load_catalog_model(key)
    assert model.published_total_params is not None
    assert model.total_params == pytest.approx(model.published_total_params, rel=0.03)


@pytest.mark.parametrize("key", sorted(EXPECTED_KEYS))
def test_every_entry_names_its_sources(key: str) -> None:
    model = load_catalog_model(key)
    assert model.source.strip()
    assert model.published_total_params_source and model.published_total_params_source.strip()


@pytest.mark.parametrize("key", sorted(EXPECTED_KEYS))
def test_lynx_constants_match_the_paper(key: str) -> None:
    model = load_catalog_model(key)
    assert (model.lynx_alpha, model.lynx_beta) == LYNX_CONSTANTS.get(key, (None, None))


@pytest.mark.parametrize("key", sorted(EXPECTED_KEYS))
def test_derived_bytes_are_consistent(key: str) -> None:
    m = load_catalog_model(key)
    routed_expert_bytes = m.expert_bytes * m.num_experts * m.num_moe_layers
    assert routed_expert_bytes == pytest.approx(m.moe_layer_expert_bytes * m.num_moe_layers)
    assert routed_expert_bytes <= m.weight_bytes
    assert m.top_k * m.expert_params * m.num_moe_layers <= m.active_params <= m.total_params
    assert m.num_moe_layers + m.num_dense_layers == m.num_layers
    assert m.kv_bytes_per_token > 0
    if m.expert_weight_dtype is None:
        assert m.weight_bytes == pytest.approx(m.total_params * m.weight_bytes_per_param)


def test_mixtral_8x7b_hand_checked() -> None:
    m = load_catalog_model("mixtral-8x7b")
    assert m.expert_params == 3 * 4096 * 14336
    assert m.expert_bytes == 3 * 4096 * 14336 * 2
    # 32 layers x (K and V) x 8 KV heads x 128 dims x 2 bytes
    assert m.kv_bytes_per_token == 32 * 2 * 8 * 128 * 2
    assert m.num_moe_layers == 32


def test_deepseek_v3_mla_and_dense_layers() -> None:
    m = load_catalog_model("deepseek-v3")
    assert m.attention.is_mla
    assert m.dense_layers == (0, 1, 2)
    assert m.num_moe_layers == 58
    # MLA caches the 512-wide latent plus the 64-wide rotary key per layer, in bf16.
    assert m.kv_bytes_per_token == 61 * (512 + 64) * 2
    assert m.expert_bytes == 3 * 7168 * 2048 * 1  # fp8


def test_gpt_oss_experts_are_mxfp4_with_biases() -> None:
    m = load_catalog_model("gpt-oss-120b")
    assert m.expert_params == 3 * 2880 * 2880 + 2 * 2880 + 2880
    assert m.expert_bytes == pytest.approx(m.expert_params * 4.25 / 8)
    assert m.weight_bytes < m.total_params * 2


def test_catalog_summary_has_one_row_per_model() -> None:
    summary = catalog_summary()
    assert list(summary["key"]) == catalog_names()
    row = summary.set_index("key").loc["mixtral-8x7b"]
    assert row["expert_mb"] == pytest.approx(3 * 4096 * 14336 * 2 / 1e6)
    assert row["moe_layers"] == 32
    assert abs(summary["total_rel_error"]).max() < 0.03


def test_unknown_catalog_name_lists_known_models() -> None:
    with pytest.raises(InputError) as info:
        load_catalog_model("mixtral-8x9b")
    assert "mixtral-8x9b" in str(info.value)
    assert "mixtral-8x7b" in info.value.problem


def test_invalid_model_file_names_file_and_key_path(tmp_path: Path) -> None:
    good = load_catalog_model("mixtral-8x7b").model_dump(mode="json")
    bad = {**good, "attention": {**good["attention"], "num_kv_heads": 0}}
    file = tmp_path / "bad.yaml"
    file.write_text(json.dumps(bad))  # JSON is valid YAML
    with pytest.raises(InputError) as info:
        load_model_file(file)
    assert str(file) in info.value.where
    assert "attention.num_kv_heads" in info.value.where


def test_model_file_with_unknown_field_is_rejected(tmp_path: Path) -> None:
    data = {**load_catalog_model("olmoe-1b-7b").model_dump(mode="json"), "num_expert": 64}
    file = tmp_path / "typo.yaml"
    file.write_text(json.dumps(data))
    with pytest.raises(InputError, match="num_expert"):
        load_model_file(file)


def test_model_file_round_trips(tmp_path: Path) -> None:
    model = load_catalog_model("deepseek-coder-v2")
    file = tmp_path / "copy.yaml"
    file.write_text(json.dumps(model.model_dump(mode="json")))
    assert load_model_file(file) == model


# ----- Hugging Face config import -----
# Real values of the public configs named in each catalog entry's `source`.
HF_CONFIGS: dict[str, dict[str, Any]] = {
    "mixtral-8x7b": {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_experts_per_tok": 2,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "num_local_experts": 8,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "vocab_size": 32000,
    },
    "qwen1.5-moe-a2.7b": {
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": "qwen2_moe",
        "decoder_sparse_step": 1,
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "moe_intermediate_size": 1408,
        "norm_topk_prob": False,
        "num_attention_heads": 16,
        "num_experts": 60,
        "num_experts_per_tok": 4,
        "num_hidden_layers": 24,
        "num_key_value_heads": 16,
        "shared_expert_intermediate_size": 5632,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "vocab_size": 151936,
    },
    "qwen3-30b-a3b": {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "attention_bias": False,
        "decoder_sparse_step": 1,
        "head_dim": 128,
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "mlp_only_layers": [],
        "moe_intermediate_size": 768,
        "norm_topk_prob": True,
        "num_attention_heads": 32,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "num_hidden_layers": 48,
        "num_key_value_heads": 4,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "vocab_size": 151936,
    },
    "deepseek-v2-lite": {
        "architectures": ["DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v2",
        "first_k_dense_replace": 1,
        "hidden_size": 2048,
        "intermediate_size": 10944,
        "kv_lora_rank": 512,
        "moe_intermediate_size": 1408,
        "moe_layer_freq": 1,
        "n_group": 1,
        "n_routed_experts": 64,
        "n_shared_experts": 2,
        "norm_topk_prob": False,
        "num_attention_heads": 16,
        "num_experts_per_tok": 6,
        "num_hidden_layers": 27,
        "num_key_value_heads": 16,
        "q_lora_rank": None,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "scoring_func": "softmax",
        "topk_group": 1,
        "topk_method": "greedy",
        "torch_dtype": "bfloat16",
        "v_head_dim": 128,
        "vocab_size": 102400,
    },
    "deepseek-coder-v2": {
        "architectures": ["DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v2",
        "first_k_dense_replace": 1,
        "hidden_size": 5120,
        "intermediate_size": 12288,
        "kv_lora_rank": 512,
        "moe_intermediate_size": 1536,
        "moe_layer_freq": 1,
        "n_group": 8,
        "n_routed_experts": 160,
        "n_shared_experts": 2,
        "norm_topk_prob": False,
        "num_attention_heads": 128,
        "num_experts_per_tok": 6,
        "num_hidden_layers": 60,
        "num_key_value_heads": 128,
        "q_lora_rank": 1536,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "scoring_func": "softmax",
        "topk_group": 3,
        "topk_method": "group_limited_greedy",
        "torch_dtype": "bfloat16",
        "v_head_dim": 128,
        "vocab_size": 102400,
    },
    "deepseek-v3": {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "first_k_dense_replace": 3,
        "hidden_size": 7168,
        "intermediate_size": 18432,
        "kv_lora_rank": 512,
        "moe_intermediate_size": 2048,
        "moe_layer_freq": 1,
        "n_group": 8,
        "n_routed_experts": 256,
        "n_shared_experts": 1,
        "norm_topk_prob": True,
        "num_attention_heads": 128,
        "num_experts_per_tok": 8,
        "num_hidden_layers": 61,
        "num_key_value_heads": 128,
        "num_nextn_predict_layers": 1,
        "q_lora_rank": 1536,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8"},
        "scoring_func": "sigmoid",
        "topk_group": 4,
        "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16",
        "v_head_dim": 128,
        "vocab_size": 129280,
    },
    "olmoe-1b-7b": {
        "architectures": ["OlmoeForCausalLM"],
        "model_type": "olmoe",
        "attention_bias": False,
        "clip_qkv": None,
        "hidden_size": 2048,
        "intermediate_size": 1024,
        "norm_topk_prob": False,
        "num_attention_heads": 16,
        "num_experts": 64,
        "num_experts_per_tok": 8,
        "num_hidden_layers": 16,
        "num_key_value_heads": 16,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "vocab_size": 50304,
    },
}


def _write_config(tmp_path: Path, data: dict[str, Any]) -> Path:
    file = tmp_path / "config.json"
    file.write_text(json.dumps(data))
    return file


def _architecture(model: ModelSpec) -> dict[str, Any]:
    return model.model_dump(exclude=NON_ARCHITECTURE_FIELDS)


@pytest.mark.parametrize("key", sorted(HF_CONFIGS))
def test_hf_import_matches_catalog_architecture(key: str, tmp_path: Path) -> None:
    imported = model_from_hf_config(_write_config(tmp_path, HF_CONFIGS[key]))
    assert _architecture(imported) == _architecture(load_catalog_model(key))
    assert imported.total_params == load_catalog_model(key).total_params


def test_hf_import_accepts_folder_name_and_overrides(tmp_path: Path) -> None:
    _write_config(tmp_path, HF_CONFIGS["mixtral-8x7b"])
    model = model_from_hf_config(
        tmp_path, name="my-mixtral", overrides={"lynx_alpha": 0.7, "lynx_beta": 1, "kv_cache_dtype": "fp8"}
    )
    assert model.name == "my-mixtral"
    assert (model.lynx_alpha, model.lynx_beta) == (0.7, 1)
    assert model.kv_bytes_per_token == load_catalog_model("mixtral-8x7b").kv_bytes_per_token / 2


def test_hf_import_attention_override_is_merged(tmp_path: Path) -> None:
    file = _write_config(tmp_path, HF_CONFIGS["qwen3-30b-a3b"])
    model = model_from_hf_config(file, overrides={"attention": {"has_bias": True}})
    assert model.attention.has_bias
    assert model.attention.head_dim == 128


def test_qwen_sparse_step_and_mlp_only_layers_map_to_dense_layers(tmp_path: Path) -> None:
    # Every second layer is MoE ((i + 1) % 2 == 0), and layer 3 is forced dense.
    data = {**HF_CONFIGS["qwen1.5-moe-a2.7b"], "num_hidden_layers": 6, "decoder_sparse_step": 2, "mlp_only_layers": [3]}
    model = model_from_hf_config(_write_config(tmp_path, data))
    assert model.dense_layers == (0, 2, 3, 4)
    assert model.moe_layer_indices == (1, 5)
    assert model.dense_ffn_size == 5632


def test_deepseek_first_k_dense_and_layer_freq_map_to_dense_layers(tmp_path: Path) -> None:
    data = {**HF_CONFIGS["deepseek-v2-lite"], "num_hidden_layers": 7, "first_k_dense_replace": 2, "moe_layer_freq": 2}
    model = model_from_hf_config(_write_config(tmp_path, data))
    assert model.moe_layer_indices == (2, 4, 6)
    assert model.dense_ffn_size == 10944


def test_model_type_falls_back_to_architectures(tmp_path: Path) -> None:
    data = {k: v for k, v in HF_CONFIGS["olmoe-1b-7b"].items() if k != "model_type"}
    model = model_from_hf_config(_write_config(tmp_path, data))
    assert _architecture(model) == _architecture(load_catalog_model("olmoe-1b-7b"))


def test_unsupported_model_type_names_the_file(tmp_path: Path) -> None:
    file = _write_config(tmp_path, {"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    with pytest.raises(InputError) as info:
        model_from_hf_config(file)
    assert str(file) in info.value.where
    assert "llama" in info.value.problem


def test_missing_key_names_the_file_and_key(tmp_path: Path) -> None:
    data = {k: v for k, v in HF_CONFIGS["mixtral-8x7b"].items() if k != "num_local_experts"}
    file = _write_config(tmp_path, data)
    with pytest.raises(InputError) as info:
        model_from_hf_config(file)
    assert str(file) in info.value.where
    assert "num_local_experts" in info.value.where


def test_unmodelled_quantization_needs_a_dtype_override(tmp_path: Path) -> None:
    data = {**HF_CONFIGS["mixtral-8x7b"], "quantization_config": {"quant_method": "awq", "bits": 4}}
    file = _write_config(tmp_path, data)
    with pytest.raises(InputError, match="awq"):
        model_from_hf_config(file)
    assert model_from_hf_config(file, overrides={"weight_dtype": "fp8"}).weight_dtype == "fp8"


def test_invalid_override_names_the_file_and_key(tmp_path: Path) -> None:
    file = _write_config(tmp_path, HF_CONFIGS["mixtral-8x7b"])
    with pytest.raises(InputError) as info:
        model_from_hf_config(file, overrides={"lynx_alpha": -1})
    assert str(file) in info.value.where
    assert "lynx_alpha" in info.value.where


def test_invalid_json_and_missing_file_raise_input_error(tmp_path: Path) -> None:
    file = tmp_path / "config.json"
    file.write_text("{not json")
    with pytest.raises(InputError, match="invalid JSON"):
        model_from_hf_config(file)
    with pytest.raises(InputError, match="cannot read"):
        model_from_hf_config(tmp_path / "absent.json")
