"""Random weights of one decoder layer (and the LM head) in the kernels' layouts, built from a model shape.

The kernels need tensors of the right shapes, dtypes and byte counts, not trained values: every matrix is
drawn from N(0, std^2) with std 0.02 (typical of initialised transformer weights), so activations stay O(1)
through a layer and bf16 rounding errors are representative. Norm weights are 1. FP8 experts
(``LayerShape.expert_dtype`` "fp8") are drawn the same way, then quantized to e4m3 with per-output-channel
scales (``lynxsim.calib.kernels.moe.quantize_weights_fp8``).

Layouts (all row-major, ``[out_features, in_features]`` as ``torch.nn.functional.linear`` wants):

=====================  ==========================================  ==========================================
field                  shape                                       meaning
=====================  ==========================================  ==========================================
``input_norm``         ``[H]``                                     RMSNorm before attention
``post_attn_norm``     ``[H]``                                     RMSNorm before the FFN / MoE
``w_qkv``              ``[qkv_out, H]``                            fused Q, K, V projection (rows: Q, then K, V)
``b_qkv``              ``[qkv_out]`` or None                       its bias (Qwen2-style attention bias)
``w_o``                ``[H, Hq * Dv]``                            attention output projection
``router``             ``[E, H]`` or None                          router GEMM (None on a dense layer)
``w13``                ``[E, 2F, H]``                              routed experts, gate rows 0..F-1, up rows F..2F-1
``w2``                 ``[E, H, F]``                               routed experts, down projection
``w13_scale/w2_scale`` ``[E, 2F]`` / ``[E, H]`` or None            FP8 experts: per-channel float32 scales
``shared_w13``         ``[2 * S * Fs, H]`` or None                 all S shared experts fused into one SwiGLU
``shared_w2``          ``[H, S * Fs]`` or None                     (S experts of width Fs = one of width S * Fs)
``dense_w13/dense_w2`` ``[2 Fd, H]`` / ``[H, Fd]`` or None         the dense FFN of a dense layer
=====================  ==========================================  ==========================================

Weight copies and the L2 cache: the H200 has a 60 MB L2. A kernel timed in a loop on ONE set of weights whose
bytes fit in L2 (a Qwen3-30B-A3B expert is 9.4 MB; 4 of them fit) reads them from L2 after the first call
and looks several times faster than in a real model, where each layer's weights are touched once per
iteration and evicted by the other layers' weights. ``num_copies`` allocates that many independent copies of
the layer; a timing loop that uses copy ``i % num_copies`` on call ``i`` puts ``num_copies`` layers' worth of
bytes between two uses of the same weights, so they are always read from HBM. Pick
``copies_to_defeat_l2(bytes_read_per_call)`` copies (4x the L2 by default) or more.

MLA models (DeepSeek-V2/V3) have two layouts, one per kernel set (``lynxsim.calib.units``). The production
kernels run real MLA (``lynxsim.calib.kernels.mla``: a compressed latent KV cache, absorbed decode, unabsorbed
prefill), with the weights in ``LayerWeights.mla``. The reference kernels keep the first approximation: multi-
query attention (one KV head) with ``Dqk = Dv = (kv_lora_rank + qk_rope_head_dim) / 2`` (rounded up to a
multiple of 8), so K plus V hold the same bytes per token as MLA's latent cache, and a fused QKV projection
widened so that its weight bytes equal MLA's Q, KV-down and KV-up projections together (the extra output
columns are computed and ignored).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch

from lynxsim.calib.kernels.mla import MlaDims, MlaWeights, build_mla_weights
from lynxsim.calib.kernels.moe import quantize_weights_fp8
from lynxsim.calib.plan import KERNEL_EXPERT_DTYPES
from lynxsim.models.spec import BYTES_PER_WEIGHT

KERNEL_SETS = ("production", "reference")
"""The two ways calibration and validation can run a layer (``lynxsim.calib.units``): ``production`` (fused ops
around cuBLAS GEMMs, real MLA: what vLLM runs on Hopper) and ``reference`` (the first, unfused torch path)."""

L2_CACHE_BYTES_H200 = 60 * 1024 * 1024  # 60 MB L2 reported by torch.cuda.get_device_properties on the H200
WEIGHT_STD = 0.02


@dataclass(frozen=True)
class LayerShape:
    """Plain numbers describing one decoder layer and the LM head; built from a ``ModelSpec`` with
    :meth:`from_spec`, or directly (the device benchmark does, so it needs no pydantic)."""

    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int  # query-key head width
    v_head_dim: int
    num_experts: int
    top_k: int
    expert_ffn: int
    renormalize: bool = True
    num_shared_experts: int = 0
    shared_ffn: int = 0
    dense_ffn: int = 0
    vocab: int = 32000
    attn_bias: bool = False
    qkv_out: int = 0  # fused QKV projection width; 0: exactly Q + K + V
    is_mla_approx: bool = False  # the reference kernels' single-KV-head stand-in for MLA (fields above)
    name: str = ""
    qk_norm: bool = False  # q/k RMSNorm before the rotary embedding (Qwen3, OLMoE)
    scoring: str = "softmax"  # router scores: "softmax" or "sigmoid" (DeepSeek-V3, with a correction bias)
    correction_bias: bool = False  # DeepSeek-V3's per-expert selection bias
    num_expert_groups: int = 1  # group-limited top-k (DeepSeek-V2/V3); 1: plain top-k
    topk_groups: int = 1
    mla: MlaDims | None = None  # real MLA dimensions (production kernels), None for GQA models
    expert_dtype: str = "bf16"  # routed experts' weights: "bf16" or "fp8" (KERNEL_EXPERT_DTYPES)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def k_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def v_size(self) -> int:
        return self.num_kv_heads * self.v_head_dim

    @property
    def qkv_size(self) -> int:
        return max(self.qkv_out, self.q_size + self.k_size + self.v_size)

    @property
    def expert_params(self) -> int:
        return 3 * self.hidden * self.expert_ffn

    @property
    def expert_bytes(self) -> int:
        """Bytes of one routed expert's weights (gate, up, down) in ``expert_dtype`` (FP8 scales aside)."""
        _check_expert_dtype(self.expert_dtype)
        return int(BYTES_PER_WEIGHT[self.expert_dtype] * self.expert_params)

    def kv_bytes_per_token(self, kernels: str = "production") -> int:
        """bf16 KV-cache bytes of one token in one layer (MLA's latent row with the production kernels)."""
        if kernels == "production" and self.mla is not None:
            return self.mla.kv_bytes_per_token
        return 2 * self.num_kv_heads * (self.head_dim + self.v_head_dim)

    @classmethod
    def from_spec(cls, spec: Any) -> LayerShape:
        """From a ``lynxsim.models.ModelSpec`` (duck-typed: only its attributes are read)."""
        att = spec.attention
        qkv_out = 0
        mla_dims = MlaDims.from_spec(spec) if att.is_mla else None
        if att.is_mla:
            width = att.kv_lora_rank + att.qk_rope_head_dim
            head_dim = v_head_dim = int(math.ceil(width / 2 / 8) * 8)
            num_kv_heads = 1
            o_params = att.num_heads * att.v_head_dim * spec.hidden_size
            qkv_out = int(math.ceil((att.params(spec.hidden_size) - o_params) / spec.hidden_size))
            mla = True
        else:
            head_dim, v_head_dim, num_kv_heads, mla = att.head_dim, att.head_dim, att.num_kv_heads, False
        return cls(
            hidden=spec.hidden_size,
            num_heads=att.num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            v_head_dim=v_head_dim if not mla else head_dim,
            num_experts=spec.num_experts,
            top_k=spec.top_k,
            expert_ffn=spec.expert_ffn_size,
            renormalize=spec.renormalize,
            num_shared_experts=spec.num_shared_experts,
            shared_ffn=spec.shared_expert_ffn_size or 0,
            dense_ffn=spec.dense_ffn_size or 0,
            vocab=spec.vocab_size,
            attn_bias=att.has_bias,
            qkv_out=qkv_out,
            is_mla_approx=mla,
            name=spec.name,
            qk_norm=bool(getattr(att, "qk_norm", False)),
            scoring="sigmoid" if spec.router in ("sigmoid", "grouped_topk") else "softmax",
            correction_bias=spec.router == "grouped_topk",
            num_expert_groups=spec.num_expert_groups or 1,
            topk_groups=spec.topk_groups or 1,
            mla=mla_dims,
            expert_dtype=spec.expert_weight_dtype or spec.weight_dtype,
        )


def _check_expert_dtype(dtype: str) -> None:
    if dtype not in KERNEL_EXPERT_DTYPES:
        raise ValueError(f"the expert kernels run {' or '.join(KERNEL_EXPERT_DTYPES)} experts, not {dtype}")


@dataclass
class LayerWeights:
    """One decoder layer's weights (see the module docstring for the layouts)."""

    input_norm: torch.Tensor
    post_attn_norm: torch.Tensor
    w_qkv: torch.Tensor | None  # None where ``mla`` holds the attention (production MLA)
    b_qkv: torch.Tensor | None
    w_o: torch.Tensor | None
    router: torch.Tensor | None = None
    router_bias: torch.Tensor | None = None  # float32 [E]: DeepSeek-V3's selection (correction) bias
    q_norm: torch.Tensor | None = None  # [D], models with q/k norm
    k_norm: torch.Tensor | None = None
    mla: MlaWeights | None = None
    w13: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w13_scale: torch.Tensor | None = None  # FP8 experts: float32 [E, 2F], w13 in e4m3
    w2_scale: torch.Tensor | None = None  # FP8 experts: float32 [E, H], w2 in e4m3
    shared_w13: torch.Tensor | None = None
    shared_w2: torch.Tensor | None = None
    dense_w13: torch.Tensor | None = None
    dense_w2: torch.Tensor | None = None

    def nbytes(self) -> int:
        total = 0
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
            elif isinstance(value, MlaWeights):
                total += value.nbytes()
        return total


@dataclass
class ModelWeights:
    """``num_copies`` independent copies of one decoder layer, plus the LM head and final norm (one copy:
    the LM head is read once per iteration and is far larger than L2 for every catalog model)."""

    shape: LayerShape
    layers: list[LayerWeights]
    lm_head: torch.Tensor | None
    final_norm: torch.Tensor

    @property
    def num_copies(self) -> int:
        return len(self.layers)

    def layer(self, i: int) -> LayerWeights:
        """Copy ``i % num_copies``: call with a running counter to rotate among copies."""
        return self.layers[i % len(self.layers)]


def copies_to_defeat_l2(bytes_read_per_call: float, l2_bytes: int = L2_CACHE_BYTES_H200, factor: float = 4.0) -> int:
    """Copies needed so that ``factor`` x L2 bytes are read between two uses of the same copy."""
    return max(1, int(math.ceil(factor * l2_bytes / max(bytes_read_per_call, 1.0))))


def _randn(shape: tuple[int, ...], gen: torch.Generator, device: Any, dtype: torch.dtype, std: float) -> torch.Tensor:
    # Drawn in float32 on the target device (fast on a GPU), then rounded to the kernel dtype.
    t = torch.empty(shape, device=device, dtype=torch.float32)
    t.normal_(0.0, std, generator=gen)
    return t.to(dtype)


def build_layer(
    shape: LayerShape,
    *,
    moe: bool = True,
    device: Any = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    std: float = WEIGHT_STD,
    attention: bool = True,
    kernels: str = "production",
) -> LayerWeights:
    """One layer: MoE (router, routed experts in ``shape.expert_dtype``, shared experts if any) or dense (a SwiGLU
    FFN of ``dense_ffn``). ``attention=False`` leaves the attention projections as 1-element placeholders (for
    MoE-only timing of models whose full layer would not fit). ``kernels`` picks the attention layout of MLA
    models (module docstring)."""
    if kernels not in KERNEL_SETS:
        raise ValueError(f"kernels must be one of {KERNEL_SETS}, got {kernels!r}")
    if moe:
        _check_expert_dtype(shape.expert_dtype)
    dev = torch.device(device)
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed)
    H = shape.hidden

    def r(*s: int) -> torch.Tensor:
        return _randn(tuple(s), gen, dev, dtype, std)

    ones = torch.ones(H, device=dev, dtype=dtype)
    mla = None
    w_qkv: torch.Tensor | None
    w_o: torch.Tensor | None
    b_qkv: torch.Tensor | None
    if not attention:
        w_qkv, w_o, b_qkv = r(1, 1), r(1, 1), None
    elif kernels == "production" and shape.mla is not None:
        w_qkv = w_o = b_qkv = None
        mla = build_mla_weights(shape.mla, device=dev, generator=gen, dtype=dtype, std=std)
    else:
        w_qkv, w_o = r(shape.qkv_size, H), r(H, shape.num_heads * shape.v_head_dim)
        b_qkv = r(shape.qkv_size) if shape.attn_bias else None
    lw = LayerWeights(input_norm=ones, post_attn_norm=ones.clone(), w_qkv=w_qkv, b_qkv=b_qkv, w_o=w_o, mla=mla)
    if shape.qk_norm and attention:
        lw.q_norm = torch.ones(shape.head_dim, device=dev, dtype=dtype)
        lw.k_norm = torch.ones(shape.head_dim, device=dev, dtype=dtype)
    if moe:
        E, F = shape.num_experts, shape.expert_ffn
        lw.router = r(E, H)
        if shape.correction_bias:
            lw.router_bias = torch.empty(E, device=dev, dtype=torch.float32).normal_(0.0, 0.1, generator=gen)
        lw.w13 = r(E, 2 * F, H)
        lw.w2 = r(E, H, F)
        if shape.expert_dtype == "fp8":
            lw.w13, lw.w13_scale = quantize_weights_fp8(lw.w13)
            lw.w2, lw.w2_scale = quantize_weights_fp8(lw.w2)
        if shape.num_shared_experts:
            Fs = shape.num_shared_experts * shape.shared_ffn
            lw.shared_w13, lw.shared_w2 = r(2 * Fs, H), r(H, Fs)
    else:
        if not shape.dense_ffn:
            raise ValueError("a dense layer needs shape.dense_ffn > 0")
        lw.dense_w13, lw.dense_w2 = r(2 * shape.dense_ffn, H), r(H, shape.dense_ffn)
    return lw


def build_model_weights(
    shape: LayerShape,
    *,
    num_copies: int = 1,
    moe: bool = True,
    device: Any = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    lm_head: bool = True,
    attention: bool = True,
    kernels: str = "production",
) -> ModelWeights:
    """``num_copies`` independently drawn copies of one layer (see the module docstring on L2), the LM head
    ``[vocab, H]`` (if ``lm_head``) and the final norm."""
    if num_copies < 1:
        raise ValueError("num_copies must be >= 1")
    layers = [
        build_layer(shape, moe=moe, device=device, dtype=dtype, seed=seed + 1000 * i, attention=attention,
                    kernels=kernels)
        for i in range(num_copies)
    ]
    dev = torch.device(device)
    head = None
    if lm_head:
        gen = torch.Generator(device=dev)
        gen.manual_seed(seed + 7)
        head = _randn((shape.vocab, shape.hidden), gen, dev, dtype, WEIGHT_STD)
    return ModelWeights(shape=shape, layers=layers, lm_head=head,
                        final_norm=torch.ones(shape.hidden, device=dev, dtype=dtype))
