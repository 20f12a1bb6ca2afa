"""Build a ModelSpec from a Hugging Face ``config.json``, so a user can simulate a checkpoint the catalog lacks.

Supported layouts: Mixtral (``mixtral``), Qwen2-MoE (``qwen2_moe``), Qwen3-MoE (``qwen3_moe``), DeepSeek-V2/V3
(``deepseek_v2``, ``deepseek_v3``) and OLMoE (``olmoe``). Keys that define the architecture are required; a flag
a config may omit falls back to the default of the matching transformers config class, named where it is used.
What a config cannot say (Lynx constants, a serving dtype) comes in through ``overrides``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lynxsim.errors import InputError
from lynxsim.models.catalog import model_spec_from_dict
from lynxsim.models.spec import ModelSpec

_TORCH_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


class _Config:
    """A parsed config.json that raises InputError naming the file and the key when a required key is missing."""

    def __init__(self, data: dict[str, Any], file: Path) -> None:
        self.data = data
        self.file = file

    def req(self, key: str) -> int:
        """A required size or count: every key read this way is a whole number > 0 (the model's shape divides by
        them: ``num_attention_heads: 0`` would end in a ZeroDivisionError, ``hidden_size: "2048"`` in a
        TypeError)."""
        value = self.data.get(key)
        if value is None:
            raise InputError(
                f"{self.file}: {key}", f"missing required key for model_type '{self.data.get('model_type')}'"
            )
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise InputError(f"{self.file}: {key}", f"must be a whole number > 0, got {value!r}")
        return value

    def opt(self, key: str, default: Any) -> Any:
        """An optional key; where its default is a count, a whole number >= 0 is required of it too."""
        value = self.data.get(key)
        if value is None:
            return default
        counts = isinstance(default, int) and not isinstance(default, bool)
        if counts and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise InputError(f"{self.file}: {key}", f"must be a whole number >= 0, got {value!r}")
        return value


def _gqa_attention(
    cfg: _Config, *, head_dim_key_required: bool, has_bias: bool, qk_norm: bool = False
) -> dict[str, Any]:
    num_heads = cfg.req("num_attention_heads")
    if head_dim_key_required:
        head_dim = cfg.req("head_dim")
    else:
        head_dim = cfg.opt("head_dim", cfg.req("hidden_size") // num_heads)  # transformers: hidden / heads
    return {
        "num_heads": num_heads,
        "num_kv_heads": cfg.req("num_key_value_heads"),
        "head_dim": head_dim,
        "has_bias": has_bias,
        "qk_norm": qk_norm,
    }


def _mixtral(cfg: _Config) -> dict[str, Any]:
    return {
        "num_layers": cfg.req("num_hidden_layers"),
        "attention": _gqa_attention(cfg, head_dim_key_required=False, has_bias=False),
        "num_experts": cfg.req("num_local_experts"),
        "top_k": cfg.req("num_experts_per_tok"),
        "expert_ffn_size": cfg.req("intermediate_size"),
        "router": "softmax",
        # Mixtral takes the softmax over the top-k logits only, which equals renormalized top-k weights.
        "renormalize": True,
    }


def _qwen_moe(cfg: _Config) -> dict[str, Any]:
    """Qwen2-MoE and Qwen3-MoE. A layer is MoE unless listed in ``mlp_only_layers`` or off the
    ``decoder_sparse_step`` grid, the rule of transformers' Qwen2MoeDecoderLayer/Qwen3MoeDecoderLayer."""
    qwen3 = cfg.data.get("model_type") == "qwen3_moe"
    num_layers = cfg.req("num_hidden_layers")
    num_experts = cfg.req("num_experts")
    step = cfg.opt("decoder_sparse_step", 1)  # transformers default 1
    mlp_only = set(cfg.opt("mlp_only_layers", []))  # transformers default []
    dense = [i for i in range(num_layers) if i in mlp_only or num_experts == 0 or (i + 1) % step != 0]
    fields: dict[str, Any] = {
        "num_layers": num_layers,
        "dense_layers": dense,
        # Qwen2-MoE puts biases on q/k/v (transformers Qwen2MoeAttention, qkv_bias default true);
        # Qwen3-MoE uses attention_bias, default false.
        "attention": _gqa_attention(
            cfg,
            head_dim_key_required=qwen3,
            has_bias=cfg.opt("attention_bias", False) if qwen3 else cfg.opt("qkv_bias", True),
            qk_norm=qwen3,  # Qwen3MoeAttention's q_norm/k_norm; Qwen2-MoE has none
        ),
        "num_experts": num_experts,
        "top_k": cfg.req("num_experts_per_tok"),
        "expert_ffn_size": cfg.req("moe_intermediate_size"),
        "router": "softmax",
        "renormalize": cfg.opt("norm_topk_prob", False),  # transformers default false for both
    }
    if dense:
        fields["dense_ffn_size"] = cfg.req("intermediate_size")
    # Qwen3-MoE has no shared expert (transformers ignores shared_expert_intermediate_size there).
    shared = 0 if qwen3 else cfg.opt("shared_expert_intermediate_size", 0)
    if shared:
        fields["num_shared_experts"] = 1
        fields["shared_expert_ffn_size"] = shared
    return fields


def _deepseek(cfg: _Config) -> dict[str, Any]:
    """DeepSeek-V2/V3. A layer is MoE from ``first_k_dense_replace`` on, every ``moe_layer_freq`` layers (the rule
    of DeepSeek's modeling_deepseek.py). Routing follows ``topk_method``: greedy and group_limited_greedy score with
    a softmax, noaux_tc (V3) with sigmoids and a group limit."""
    v3 = cfg.data.get("model_type") == "deepseek_v3"
    num_layers = cfg.req("num_hidden_layers")
    first_moe = cfg.opt("first_k_dense_replace", 0)  # transformers default 0
    freq = cfg.opt("moe_layer_freq", 1)  # transformers default 1
    dense = [i for i in range(num_layers) if not (i >= first_moe and i % freq == 0)]
    qk_nope, qk_rope = cfg.req("qk_nope_head_dim"), cfg.req("qk_rope_head_dim")
    moe_ffn = cfg.req("moe_intermediate_size")
    fields: dict[str, Any] = {
        "num_layers": num_layers,
        "dense_layers": dense,
        "attention": {
            "num_heads": cfg.req("num_attention_heads"),
            "num_kv_heads": cfg.req("num_key_value_heads"),
            "head_dim": qk_nope + qk_rope,
            "q_lora_rank": cfg.data.get("q_lora_rank"),  # null: queries projected directly (V2-Lite)
            "kv_lora_rank": cfg.req("kv_lora_rank"),
            "qk_nope_head_dim": qk_nope,
            "qk_rope_head_dim": qk_rope,
            "v_head_dim": cfg.req("v_head_dim"),
            "has_bias": cfg.opt("attention_bias", False),
        },
        "num_experts": cfg.req("n_routed_experts"),
        "top_k": cfg.req("num_experts_per_tok"),
        "expert_ffn_size": moe_ffn,
        # transformers defaults: DeepseekV2Config norm_topk_prob false, DeepseekV3Config true.
        "renormalize": cfg.opt("norm_topk_prob", v3),
    }
    if dense:
        fields["dense_ffn_size"] = cfg.req("intermediate_size")
    shared = cfg.opt("n_shared_experts", 0)
    if shared:
        fields["num_shared_experts"] = shared
        fields["shared_expert_ffn_size"] = moe_ffn  # DeepSeek's shared MLP is n_shared_experts x moe_intermediate_size
    method = cfg.opt("topk_method", "noaux_tc" if v3 else "greedy")  # transformers defaults
    groups, top_groups = cfg.opt("n_group", 1), cfg.opt("topk_group", 1)
    if method == "noaux_tc":
        fields |= {"router": "grouped_topk", "num_expert_groups": groups, "topk_groups": top_groups}
    elif method == "group_limited_greedy":
        fields |= {"router": "softmax", "num_expert_groups": groups, "topk_groups": top_groups}
    elif method == "greedy":
        fields["router"] = "softmax"
    else:
        raise InputError(f"{cfg.file}: topk_method", f"unsupported DeepSeek topk_method '{method}'")
    return fields


def _olmoe(cfg: _Config) -> dict[str, Any]:
    return {
        "num_layers": cfg.req("num_hidden_layers"),
        "attention": _gqa_attention(cfg, head_dim_key_required=False, has_bias=cfg.opt("attention_bias", False),
                                    qk_norm=True),  # OlmoeAttention's q_norm/k_norm
        "num_experts": cfg.req("num_experts"),
        "top_k": cfg.req("num_experts_per_tok"),
        "expert_ffn_size": cfg.req("intermediate_size"),
        "router": "softmax",
        "renormalize": cfg.opt("norm_topk_prob", False),  # transformers OlmoeConfig default false
    }


_LAYOUTS: dict[str, Callable[[_Config], dict[str, Any]]] = {
    "mixtral": _mixtral,
    "qwen2_moe": _qwen_moe,
    "qwen3_moe": _qwen_moe,
    "deepseek_v2": _deepseek,
    "deepseek_v3": _deepseek,
    "olmoe": _olmoe,
}
_ARCHITECTURES = {
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "DeepseekV2ForCausalLM": "deepseek_v2",
    "DeepseekV3ForCausalLM": "deepseek_v3",
    "OlmoeForCausalLM": "olmoe",
}


def _layout(cfg: _Config) -> str:
    """The layout key, from ``model_type`` or, when that is absent, from ``architectures``."""
    model_type = cfg.data.get("model_type")
    if model_type is None:
        known = [_ARCHITECTURES[a] for a in cfg.data.get("architectures") or [] if a in _ARCHITECTURES]
        if known:
            return known[0]
        raise InputError(
            f"{cfg.file}: model_type",
            f"missing, and architectures {cfg.data.get('architectures')} name no supported model; "
            f"supported: {', '.join(_ARCHITECTURES)}",
        )
    if model_type not in _LAYOUTS:
        raise InputError(
            f"{cfg.file}: model_type",
            f"unsupported model_type '{model_type}'; supported: {', '.join(_LAYOUTS)}",
        )
    return str(model_type)


def _dtypes(cfg: _Config, overrides: dict[str, Any]) -> dict[str, Any]:
    """Stored weight dtype: FP8 checkpoints say so in ``quantization_config``; otherwise ``torch_dtype`` (or
    ``dtype``, its newer name). Other quantization methods need ``weight_dtype`` in ``overrides``."""
    if "weight_dtype" in overrides:
        return {}
    quant = cfg.data.get("quantization_config")
    if quant is not None:
        method = quant.get("quant_method") if isinstance(quant, dict) else None
        if method == "fp8":
            return {"weight_dtype": "fp8"}
        raise InputError(
            f"{cfg.file}: quantization_config.quant_method",
            f"quantization '{method}' is not modelled; pass overrides={{'weight_dtype': ...}}",
        )
    torch_dtype = cfg.data.get("torch_dtype") or cfg.data.get("dtype") or "bfloat16"
    if torch_dtype not in _TORCH_DTYPES:
        raise InputError(f"{cfg.file}: torch_dtype", f"unsupported dtype '{torch_dtype}'")
    return {"weight_dtype": _TORCH_DTYPES[torch_dtype]}


def model_from_hf_config(
    path: str | Path, *, name: str | None = None, overrides: dict[str, Any] | None = None
) -> ModelSpec:
    """ModelSpec for the Hugging Face ``config.json`` at ``path`` (the file, or the folder holding it).

    ``name`` defaults to the config's ``_name_or_path`` or the folder name. ``overrides`` sets ModelSpec fields
    the config lacks or gets wrong for serving (``lynx_alpha``, ``weight_dtype``, ``kv_cache_dtype``...); an
    ``attention`` override is merged into the attention fields rather than replacing them.
    """
    file = Path(path)
    if file.is_dir():
        file = file / "config.json"
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except OSError as err:
        raise InputError(str(file), f"cannot read config: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise InputError(f"{file}:{err.lineno}", f"invalid JSON: {err.msg}") from None
    if not isinstance(data, dict):
        raise InputError(str(file), "config.json must be a JSON object")
    cfg = _Config(data, file)
    overrides = dict(overrides or {})

    fields = _LAYOUTS[_layout(cfg)](cfg)
    fields |= {
        "name": name or data.get("_name_or_path") or file.parent.name,
        "source": f"Hugging Face config.json at {file}",
        "hidden_size": cfg.req("hidden_size"),
        "vocab_size": cfg.req("vocab_size"),
        "tie_word_embeddings": cfg.opt("tie_word_embeddings", False),  # default of every supported config class
    }
    fields |= _dtypes(cfg, overrides)
    attention_overrides = overrides.pop("attention", None)
    if isinstance(attention_overrides, dict):
        fields["attention"] = {**fields["attention"], **attention_overrides}
    elif attention_overrides is not None:
        fields["attention"] = attention_overrides  # not a mapping: let validation report it
    fields |= overrides
    return model_spec_from_dict(fields, str(file))
