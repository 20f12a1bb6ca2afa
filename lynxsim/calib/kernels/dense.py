"""The dense operators of a decoder layer, in torch: RMSNorm, projections, router top-k, SwiGLU FFN, LM head.

All take and return bf16 activations of shape ``[T, H]`` (``T`` tokens of the batch flattened), with
weights in the ``[out, in]`` layouts of :mod:`lynxsim.calib.kernels.weights`; reductions, the router softmax
and the SwiGLU activation run in float32. GEMMs go to cuBLAS through ``torch.nn.functional.linear``, as in
vLLM. Every function also runs on the CPU (in float32 or bf16) for the tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``x / rms(x) * weight`` over the last dim, computed in float32, returned in ``x.dtype``."""
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def qkv_proj(
    x: torch.Tensor, w_qkv: torch.Tensor, b_qkv: torch.Tensor | None, num_heads: int, num_kv_heads: int,
    head_dim: int, v_head_dim: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused QKV GEMM; returns views ``q [T, Hq, D]``, ``k [T, Hkv, D]``, ``v [T, Hkv, Dv]``. Columns past
    Q+K+V (the MLA approximation's widened projection) are computed and dropped. No rotary embedding (an
    elementwise op whose time is small next to the GEMM; callers that want it add it)."""
    dv = v_head_dim or head_dim
    qkv = F.linear(x, w_qkv, b_qkv)
    T = x.shape[0]
    qs, ks, vs = num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * dv
    q = qkv[:, :qs].view(T, num_heads, head_dim)
    k = qkv[:, qs:qs + ks].view(T, num_kv_heads, head_dim)
    v = qkv[:, qs + ks:qs + ks + vs].view(T, num_kv_heads, dv)
    return q, k, v


def o_proj(attn_out: torch.Tensor, w_o: torch.Tensor) -> torch.Tensor:
    """``attn_out [T, Hq, Dv]`` (or ``[T, Hq*Dv]``) times ``w_o [H, Hq*Dv]``^T -> ``[T, H]``."""
    return F.linear(attn_out.reshape(attn_out.shape[0], -1), w_o)


def router_topk(
    x: torch.Tensor, w_router: torch.Tensor, top_k: int, renormalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Router GEMM ``[T, H] x [E, H]^T``, float32 softmax over experts, top-k.

    Returns ``(topk_weights float32 [T, k], topk_ids int32 [T, k], logits float32 [T, E])``; weights are
    renormalized to sum to 1 per token when ``renormalize`` (Mixtral, Qwen3), else left as softmax mass.
    """
    logits = F.linear(x, w_router).float()
    probs = torch.softmax(logits, dim=-1)
    w, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    return w, ids.to(torch.int32), logits


def silu_and_mul(h: torch.Tensor) -> torch.Tensor:
    """``silu(h[..., :F]) * h[..., F:]`` in float32, returned in ``h.dtype``."""
    f = h.shape[-1] // 2
    g, u = h[..., :f].float(), h[..., f:].float()
    return (F.silu(g) * u).to(h.dtype)


def swiglu_ffn(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Gated FFN with fused gate+up weight ``w13 [2F, H]`` and down weight ``w2 [H, F]``: used for the dense
    FFN layers and for the shared experts (all shared experts of a layer fused into one of width S*Fs)."""
    return F.linear(silu_and_mul(F.linear(x, w13)), w2)


def lm_head(
    x: torch.Tensor, w_lm: torch.Tensor, final_norm: torch.Tensor | None = None, eps: float = 1e-5
) -> torch.Tensor:
    """Final RMSNorm (if given) and the LM head GEMM: ``[S, H] -> [S, vocab]`` logits (in ``x.dtype``) for
    the ``S`` sampled positions (one per sequence)."""
    if final_norm is not None:
        x = rms_norm(x, final_norm, eps)
    return F.linear(x, w_lm)
