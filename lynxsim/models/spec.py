"""The shape of an MoE decoder model, and the byte and FLOP counts derived from it.

Everything the cost model and the KV-cache sizing need about a model comes from here, so the formulas for
parameter counts live in one place and are checked against each model's published total in the tests.
All expert and dense FFNs are gated (SwiGLU: gate, up and down projections), as in every catalog model.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

WeightDtype = Literal["fp32", "bf16", "fp16", "fp8", "mxfp4"]

# Bytes per stored weight. MXFP4 packs 32 4-bit values with one 8-bit shared scale: 4.25 bits per value
# (source: OCP Microscaling Formats (MX) Specification v1.0, section 5).
BYTES_PER_WEIGHT: dict[str, float] = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "mxfp4": 4.25 / 8.0}

RouterKind = Literal["softmax", "sigmoid", "grouped_topk"]


class AttentionSpec(BaseModel):
    """Attention shape of one layer: grouped-query attention, or multi-head latent attention (MLA) when
    ``kv_lora_rank`` is set (DeepSeek-V2/V3), in which case the KV cache holds the compressed latent."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    q_lora_rank: int | None = Field(default=None, gt=0)
    kv_lora_rank: int | None = Field(default=None, gt=0)
    qk_nope_head_dim: int | None = Field(default=None, gt=0)
    qk_rope_head_dim: int | None = Field(default=None, gt=0)
    v_head_dim: int | None = Field(default=None, gt=0)
    has_bias: bool = False
    qk_norm: bool = Field(
        default=False,
        description=(
            "whether q and k pass an RMSNorm before the rotary embedding (Qwen3-MoE per head, OLMoE over the "
            "whole projection): one more elementwise pass that production engines fuse with the rotary; its "
            "weights (a few thousand per layer) are not counted in params"
        ),
    )

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank is not None

    @model_validator(mode="after")
    def _check(self) -> AttentionSpec:
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        if self.is_mla and None in (self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim):
            raise ValueError("MLA (kv_lora_rank set) needs qk_nope_head_dim, qk_rope_head_dim and v_head_dim")
        return self

    def params(self, hidden_size: int) -> int:
        """Weights of the Q, K, V and output projections of one layer."""
        if not self.is_mla:
            q_out = self.num_heads * self.head_dim
            kv_out = 2 * self.num_kv_heads * self.head_dim
            weights = hidden_size * (q_out + kv_out) + q_out * hidden_size
            bias = (q_out + kv_out) if self.has_bias else 0
            return weights + bias
        assert self.qk_nope_head_dim and self.qk_rope_head_dim and self.v_head_dim and self.kv_lora_rank
        qk_head = self.qk_nope_head_dim + self.qk_rope_head_dim
        if self.q_lora_rank:
            q = hidden_size * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * self.num_heads * qk_head
        else:
            q = hidden_size * self.num_heads * qk_head
        kv_down = hidden_size * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
        kv_up = self.kv_lora_rank * self.num_heads * (self.qk_nope_head_dim + self.v_head_dim)
        out = self.num_heads * self.v_head_dim * hidden_size
        return q + kv_down + kv_up + out

    @property
    def kv_elements_per_token(self) -> int:
        """Cached elements per token per layer: K and V heads, or MLA's latent plus its rotary key."""
        if self.is_mla:
            assert self.kv_lora_rank and self.qk_rope_head_dim
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.num_kv_heads * self.head_dim

    @property
    def qk_head_dim(self) -> int:
        """Per-head dimension of the query-key dot product (sets attention FLOPs)."""
        if self.is_mla:
            assert self.qk_nope_head_dim and self.qk_rope_head_dim
            return self.qk_nope_head_dim + self.qk_rope_head_dim
        return self.head_dim

    @property
    def v_dim(self) -> int:
        """Per-head dimension of the attention output."""
        return self.v_head_dim if self.is_mla and self.v_head_dim else self.head_dim


class ModelSpec(BaseModel):
    """One MoE decoder-only model. Loaded from the catalog (``lynxsim/models/catalog/*.yaml``) or from a
    Hugging Face ``config.json``; ``source`` names the public config the numbers came from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    source: str
    num_layers: int = Field(gt=0)
    dense_layers: tuple[int, ...] = Field(default=(), description="indices of layers with a dense FFN instead of MoE")
    hidden_size: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    tie_word_embeddings: bool = False
    attention: AttentionSpec
    dense_ffn_size: int | None = Field(default=None, gt=0, description="FFN width of the dense layers")
    num_experts: int = Field(gt=0, description="routed experts per MoE layer")
    top_k: int = Field(gt=0, description="routed experts per token")
    expert_ffn_size: int = Field(gt=0)
    num_shared_experts: int = Field(default=0, ge=0)
    shared_expert_ffn_size: int | None = Field(default=None, gt=0, description="FFN width of one shared expert")
    expert_has_bias: bool = False
    router: RouterKind = Field(
        default="softmax",
        description=(
            "softmax: softmax over all experts, then top-k, limited to the best topk_groups of num_expert_groups "
            "expert groups when those are set (DeepSeek-V2 group_limited_greedy); sigmoid: one sigmoid score per "
            "expert, then top-k (Llama-4); grouped_topk: DeepSeek-V3 sigmoid scores with group-limited top-k"
        ),
    )
    num_expert_groups: int | None = Field(default=None, gt=0)
    topk_groups: int | None = Field(default=None, gt=0)
    renormalize: bool = Field(description="whether the top-k routing weights are renormalized to sum to 1")
    weight_dtype: WeightDtype = "bf16"
    expert_weight_dtype: WeightDtype | None = Field(default=None, description="defaults to weight_dtype")
    kv_cache_dtype: WeightDtype = "bf16"
    lynx_alpha: float | None = Field(default=None, gt=0, description="published Lynx bin width constant")
    lynx_beta: float | None = Field(default=None, gt=0, description="published Lynx lowest bin (None: no floor)")
    published_total_params: float | None = Field(default=None, gt=0)
    published_total_params_source: str | None = None

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) exceeds num_experts ({self.num_experts})")
        bad = [i for i in self.dense_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"dense_layers {bad} outside 0..{self.num_layers - 1}")
        if self.dense_layers and self.dense_ffn_size is None:
            raise ValueError("dense_layers given without dense_ffn_size")
        if self.num_shared_experts and self.shared_expert_ffn_size is None:
            raise ValueError("num_shared_experts > 0 needs shared_expert_ffn_size")
        return self

    # ----- layer structure -----
    @property
    def moe_layer_indices(self) -> tuple[int, ...]:
        dense = set(self.dense_layers)
        return tuple(i for i in range(self.num_layers) if i not in dense)

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - len(set(self.dense_layers))

    @property
    def num_dense_layers(self) -> int:
        return len(set(self.dense_layers))

    # ----- bytes per weight -----
    @property
    def weight_bytes_per_param(self) -> float:
        return BYTES_PER_WEIGHT[self.weight_dtype]

    @property
    def expert_bytes_per_param(self) -> float:
        return BYTES_PER_WEIGHT[self.expert_weight_dtype or self.weight_dtype]

    # ----- parameter counts -----
    @property
    def expert_params(self) -> int:
        """One routed expert: gate, up and down projections (plus biases where the model has them)."""
        weights = 3 * self.hidden_size * self.expert_ffn_size
        bias = (2 * self.expert_ffn_size + self.hidden_size) if self.expert_has_bias else 0
        return weights + bias

    @property
    def shared_experts_params(self) -> int:
        """All shared experts of one MoE layer together."""
        return 3 * self.hidden_size * (self.shared_expert_ffn_size or 0) * self.num_shared_experts

    @property
    def router_params(self) -> int:
        return self.hidden_size * self.num_experts

    @property
    def dense_ffn_params(self) -> int:
        return 3 * self.hidden_size * (self.dense_ffn_size or 0)

    @property
    def attention_params(self) -> int:
        return self.attention.params(self.hidden_size)

    @property
    def norm_params_per_layer(self) -> int:
        return 2 * self.hidden_size

    @property
    def embedding_params(self) -> int:
        """Input embedding plus LM head (one matrix when tied)."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    @property
    def total_params(self) -> int:
        per_layer = self.attention_params + self.norm_params_per_layer
        moe = self.router_params + self.num_experts * self.expert_params + self.shared_experts_params
        return (
            self.embedding_params
            + self.hidden_size  # final norm
            + self.num_layers * per_layer
            + self.num_moe_layers * moe
            + self.num_dense_layers * self.dense_ffn_params
        )

    @property
    def active_params(self) -> int:
        """Parameters one token touches: its top-k routed experts instead of all of them."""
        inactive = (self.num_experts - self.top_k) * self.expert_params
        return self.total_params - self.num_moe_layers * inactive

    # ----- bytes -----
    @property
    def expert_bytes(self) -> float:
        """Bytes read from memory to run one routed expert once."""
        return self.expert_params * self.expert_bytes_per_param

    @property
    def moe_layer_expert_bytes(self) -> float:
        """Bytes of all routed experts of one MoE layer."""
        return self.num_experts * self.expert_bytes

    @property
    def weight_bytes(self) -> float:
        """All weights as stored: routed experts in the expert dtype, everything else in ``weight_dtype``."""
        expert = self.num_moe_layers * self.num_experts * self.expert_params
        return expert * self.expert_bytes_per_param + (self.total_params - expert) * self.weight_bytes_per_param

    @property
    def kv_bytes_per_token(self) -> float:
        """KV-cache bytes one token occupies across all layers."""
        return self.num_layers * self.attention.kv_elements_per_token * BYTES_PER_WEIGHT[self.kv_cache_dtype]
