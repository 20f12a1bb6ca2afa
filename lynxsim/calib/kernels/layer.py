"""One decoder layer's timed units, composed from the kernels: the pieces a calibration sweep or a
trace-driven executor runs per layer and per iteration.

=============================  ==================================================================================
unit                           what runs (x: ``[T, H]`` bf16 hidden states, residual included)
=============================  ==================================================================================
:func:`attention_block_decode`  RMSNorm, QKV GEMM, append the new K/V to the paged cache, paged decode attention,
                                output GEMM, residual add (one token per sequence: ``T == B``)
:func:`attention_block_prefill` the same for one sequence's prefill chunk with contiguous prior-context K/V
:func:`moe_block`               RMSNorm, router GEMM + softmax top-k, routed experts (fused Triton or grouped GEMM),
                                shared experts, residual add; also returns the top-k ids (for expert counts)
:func:`dense_ffn_block`         RMSNorm, SwiGLU FFN, residual add (the dense layers of DeepSeek-style models)
:func:`lm_head_block`           final RMSNorm + LM head on one position per sequence
=============================  ==================================================================================

No rotary embedding (elementwise, small next to the GEMMs). A routing override (``topk_ids`` /
``topk_weights`` given, e.g. from a recorded trace or a selection policy) replaces the router's choice
after the router GEMM has run, so the router's time is still counted.
"""

from __future__ import annotations

import torch

from lynxsim.calib.kernels import attention as att
from lynxsim.calib.kernels import dense
from lynxsim.calib.kernels.moe import MoeConfig, moe_fused, moe_grouped_gemm
from lynxsim.calib.kernels.weights import LayerShape, LayerWeights


def attention_block_decode(lw: LayerWeights, shape: LayerShape, x: torch.Tensor, cache: att.PagedKVCache,
                           *, impl: str = "triton") -> torch.Tensor:
    h = dense.rms_norm(x, lw.input_norm)
    q, k, v = dense.qkv_proj(h, lw.w_qkv, lw.b_qkv, shape.num_heads, shape.num_kv_heads, shape.head_dim,
                             shape.v_head_dim)
    att.append_kv(cache, k, v)
    o = att.attention_decode(q, cache, impl=impl)
    return x + dense.o_proj(o, lw.w_o)


def attention_block_prefill(lw: LayerWeights, shape: LayerShape, x: torch.Tensor, k_prior: torch.Tensor | None,
                            v_prior: torch.Tensor | None) -> torch.Tensor:
    """``x [T, H]`` one sequence's chunk; ``k_prior/v_prior [C, Hkv, D]`` its cached context (or None)."""
    h = dense.rms_norm(x, lw.input_norm)
    q, k, v = dense.qkv_proj(h, lw.w_qkv, lw.b_qkv, shape.num_heads, shape.num_kv_heads, shape.head_dim,
                             shape.v_head_dim)
    if k_prior is not None:
        k, v = torch.cat([k_prior, k]), torch.cat([v_prior, v])
    o = att.attention_prefill(q, k, v)
    return x + dense.o_proj(o, lw.w_o)


def moe_block(lw: LayerWeights, shape: LayerShape, x: torch.Tensor, *, impl: str = "fused",
              config: MoeConfig | None = None, topk_ids: torch.Tensor | None = None,
              topk_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(x + moe(x), topk_ids)``. ``impl``: ``"fused"`` or ``"grouped_gemm"``."""
    h = dense.rms_norm(x, lw.post_attn_norm)
    w, ids, _ = dense.router_topk(h, lw.router, shape.top_k, shape.renormalize)
    if topk_ids is not None:
        ids = topk_ids.to(torch.int32)
        w = topk_weights if topk_weights is not None else torch.full(ids.shape, 1.0 / ids.shape[1], device=x.device)
    if impl == "fused":
        y = moe_fused(h, lw.w13, lw.w2, w, ids, config=config)
    elif impl == "grouped_gemm":
        y = moe_grouped_gemm(h, lw.w13, lw.w2, w, ids)
    else:
        raise ValueError(f"unknown MoE impl {impl!r}")
    if lw.shared_w13 is not None:
        y = y + dense.swiglu_ffn(h, lw.shared_w13, lw.shared_w2)
    return x + y, ids


def dense_ffn_block(lw: LayerWeights, x: torch.Tensor) -> torch.Tensor:
    return x + dense.swiglu_ffn(dense.rms_norm(x, lw.post_attn_norm), lw.dense_w13, lw.dense_w2)


def lm_head_block(x_last: torch.Tensor, lm_head: torch.Tensor, final_norm: torch.Tensor) -> torch.Tensor:
    """``x_last [S, H]``: the hidden state of each sequence's sampled position -> ``[S, vocab]`` logits."""
    return dense.lm_head(x_last, lm_head, final_norm)
