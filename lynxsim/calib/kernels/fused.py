"""Fused non-GEMM ops of a decoder layer as vLLM runs them on Hopper: one kernel launch each around the cuBLAS GEMMs.

The unfused torch ops of :mod:`.dense` take several kernels per step (an add, a square, a mean, an rsqrt,
two multiplies, casts...); vLLM serves the same layer with a handful of custom fused kernels. This module
provides those as Triton kernels (:mod:`._fused_triton`, imported lazily) with torch wrappers, so that the
calibration times the layer with vLLM's kernel count and memory traffic:

======================  ======================================================  ==========================  ========
op                      fuses                                                   vLLM op it stands for       launches
======================  ======================================================  ==========================  ========
``add_rms_norm``        residual add (stored as the new residual), RMSNorm,     ``fused_add_rms_norm``      1
                        weight
``rms_norm``            RMSNorm and weight over the last dim                    ``rms_norm``                1
``qk_norm_rope_cache``  split of the QKV GEMM output, per-head q/k RMSNorm      ``rotary_embedding`` +      1
                        (Qwen3, OLMoE), NeoX rotary on q and k, K and V         ``reshape_and_cache_flash``
                        stores into the paged cache                             (+ the q/k RMSNorm vLLM
                                                                                runs for Qwen3)
``topk_softmax``        router softmax or sigmoid, correction bias,             ``topk_softmax`` /          1
                        group-limited selection, top-k, renormalisation         ``grouped_topk``
``silu_and_mul``        SwiGLU activation of a fused gate-up GEMM's output      ``silu_and_mul``            1
======================  ======================================================  ==========================  ========

Where this differs from vLLM's own count: vLLM runs rotary and the KV-cache write as two kernels (the
rotary kernel, then reshape_and_cache_flash inside the attention backend), and for Qwen3-style models two
more RMSNorm launches before them (or one fused_qk_norm_rope where that fusion pass is on); its
grouped_topk without the CUDA fast path is a chain of torch ops. Here each is one launch with the same
bytes moved; a caller that wants vLLM's exact launch count adds the difference.

Conventions: activations ``[T, N]`` bf16 with unit stride along the last dim (row strides are free: slices
of a wider tensor work without a copy), float32 math inside, one rounding to the output dtype. No wrapper
synchronises with the host or allocates by a device value, so each can be captured in a CUDA graph;
outputs may be preallocated (``out=`` and friends). A wrapper never copies an input to make it contiguous
(that would be a second kernel): it raises instead. On the CPU the same kernels run under Triton's
interpreter (``TRITON_INTERPRET=1``); each op has a ``*_reference`` in plain torch with float64 math for
the tests.

Rounding differs slightly from vLLM's CUDA kernels, which round some intermediates to bf16 (the Qwen3 q/k
norm output before rotary, silu(g) before the multiply, the rotary products with a bf16 cos/sin cache);
here everything between the bf16 inputs and the bf16 outputs is float32. The bytes moved and the launch
count, which is what the calibration times, are the same.
"""

from __future__ import annotations

import torch

# One program holds a row of up to this many elements in registers (H = 7168 and 8192 included); longer rows
# take two passes over chunks of this size.
RMS_MAX_BLOCK = 8192

# Streaming multiprocessors of the H100/H200, for the grid-size heuristics (more programs at small T).
SM_COUNT = 132


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_rows(t: torch.Tensor, name: str) -> tuple[int, int]:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [T, N], got shape {tuple(t.shape)}")
    if t.stride(1) != 1 and t.shape[1] > 1:
        raise ValueError(f"{name} needs unit stride along its last dim")
    return t.shape[0], t.shape[1]


def _check_out(out: torch.Tensor, shape: tuple[int, ...], name: str, dtype: torch.dtype | None = None) -> None:
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(out.shape)}")
    if out.stride(-1) != 1 and out.shape[-1] > 1:
        raise ValueError(f"{name} needs unit stride along its last dim")
    if dtype is not None and out.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {out.dtype}")


def _rms_launch_config(N: int) -> tuple[int, bool, int]:
    """(BLOCK, ONE_PASS, num_warps) for rows of N elements."""
    block = max(16, _next_pow2(N))
    one_pass = block <= RMS_MAX_BLOCK
    if not one_pass:
        block = RMS_MAX_BLOCK
    warps = 4 if block <= 1024 else (8 if block <= 4096 else 16)
    return block, one_pass, warps


# ----------------------------------------------------------------------------------------------------------
# RMSNorm, with and without the residual add
# ----------------------------------------------------------------------------------------------------------

def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float = 1e-6, *,
    out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's fused_add_rms_norm: ``residual_out = x + residual`` (float32 add, one rounding to bf16) and
    ``normed = rms_norm(residual_out) * weight``, normalising the rounded sum as vLLM does; returns
    ``(normed, residual_out)``, both ``[T, H]`` in x's dtype. With ``residual=None`` (a model's first layer)
    ``residual_out`` is ``x`` itself (no copy) and ``normed`` is ``rms_norm(x)``. ``out`` may alias ``x`` and
    ``residual_out`` may alias ``residual`` (vLLM's in-place form). One kernel launch."""
    T, H = _check_rows(x, "x")
    if weight.shape != (H,) or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous [{H}] tensor")
    if residual is None:
        if residual_out is not None and residual_out is not x:
            raise ValueError("residual_out without a residual: the residual is x itself")
        if out is x:
            raise ValueError("with residual=None the residual is x: normalising in place would overwrite it")
        residual_out = x
    else:
        _check_out(residual, (T, H), "residual")
        if residual_out is None:
            residual_out = torch.empty_like(x)
        _check_out(residual_out, (T, H), "residual_out")
    if out is None:
        out = torch.empty_like(x)
    _check_out(out, (T, H), "out")
    if T == 0:
        return out, residual_out
    from lynxsim.calib.kernels import _fused_triton as kern

    block, one_pass, warps = _rms_launch_config(H)
    res = residual if residual is not None else x
    kern._rms_norm_kernel[(T,)](
        x, res, weight, out, residual_out, H, x.stride(0), res.stride(0), out.stride(0), residual_out.stride(0),
        float(eps), BLOCK=block, HAS_RES=residual is not None, ONE_PASS=one_pass, num_warps=warps)
    return out, residual_out


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """vLLM's rms_norm: ``x / rms(x) * weight`` over the last dim of ``x [T, N]`` (any N: the hidden size,
    MLA's q_a / kv_a latents), float32 math, output in x's dtype. One kernel launch."""
    T, N = _check_rows(x, "x")
    if weight.shape != (N,) or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous [{N}] tensor")
    if out is None:
        out = torch.empty_like(x)
    _check_out(out, (T, N), "out")
    if T == 0:
        return out
    from lynxsim.calib.kernels import _fused_triton as kern

    block, one_pass, warps = _rms_launch_config(N)
    kern._rms_norm_kernel[(T,)](
        x, x, weight, out, out, N, x.stride(0), x.stride(0), out.stride(0), out.stride(0), float(eps),
        BLOCK=block, HAS_RES=False, ONE_PASS=one_pass, num_warps=warps)
    return out


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                           eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """``(normed float64, residual_out in x's dtype)``; the residual sum is rounded to x's dtype before the
    norm, as the op does."""
    r = x if residual is None else (x.double() + residual.double()).to(x.dtype)
    return rms_norm_reference(r, weight, eps), r


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Float64 RMSNorm over the last dim."""
    xd = x.double()
    return xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


# ----------------------------------------------------------------------------------------------------------
# rotary embedding + q/k norm + paged KV-cache write
# ----------------------------------------------------------------------------------------------------------

def rope_cos_sin_cache(head_dim_rotary: int, max_positions: int, theta: float = 10000.0,
                       device: torch.device | str = "cpu") -> torch.Tensor:
    """``[max_positions, head_dim_rotary]`` float32: ``cos(p * f_i)`` in columns ``0 .. half-1`` and
    ``sin(p * f_i)`` in ``half .. D-1``, ``f_i = theta ** (-2i / D)`` (vLLM's cos_sin_cache layout, NeoX
    style). Computed in float64, stored in float32."""
    if head_dim_rotary % 2:
        raise ValueError("the rotary dim must be even")
    half = head_dim_rotary // 2
    inv_freq = theta ** (-torch.arange(half, dtype=torch.float64) * 2.0 / head_dim_rotary)
    ang = torch.arange(max_positions, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat([ang.cos(), ang.sin()], dim=1).to(device=device, dtype=torch.float32)


def _qk_heads_per_program(T: int, Hq: int, Hkv: int, half_p: int, dv_p: int) -> tuple[int, int]:
    """Heads per program for the q blocks and the k/v blocks: tiles of about 2K elements (a few 16-byte
    loads per thread at 4 warps), halved while the grid is below two programs per SM (small decode batches:
    more, shorter programs finish sooner)."""
    bq = max(1, min(_next_pow2(Hq), 2048 // (2 * half_p)))
    bk = max(1, min(_next_pow2(Hkv), 2048 // (2 * half_p + dv_p)))
    while (bq > 1 or bk > 1) and T * (_cdiv(Hq, bq) + _cdiv(Hkv, bk)) < 2 * SM_COUNT:
        if bq >= bk:
            bq //= 2
        else:
            bk //= 2
    return bq, bk


def qk_norm_rope_cache(
    qkv: torch.Tensor, *, num_heads: int, num_kv_heads: int, head_dim: int, v_head_dim: int | None = None,
    q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, cos_sin_cache: torch.Tensor,
    positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    q_out: torch.Tensor | None = None, eps: float = 1e-6, heads_per_program: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Everything between the fused QKV GEMM and attention, in one kernel.

    ``qkv [T, Hq*D + Hkv*D + Hkv*Dv]`` (bf16; columns past V are ignored, any row stride). Per token ``t``:
    q heads get an RMSNorm over D with weight ``q_norm [D]`` (skipped if None), then NeoX rotary at
    ``positions[t]`` with ``cos_sin_cache [max_pos, D]`` (:func:`rope_cos_sin_cache`), into
    ``q_out [T, Hq, D]``; k heads the same with ``k_norm``, into ``k_cache [pages, page_size, Hkv, D]`` at
    page ``slot_mapping[t] // page_size``, slot ``slot_mapping[t] % page_size``; v heads unchanged into
    ``v_cache [pages, page_size, Hkv, Dv]`` at the same place. A negative slot writes no K/V for that token
    (vLLM's padding) but still writes its q. Positions and slots are not range-checked (that would need a
    host sync). ``heads_per_program`` overrides the (q, k/v) tiling heuristic (powers of two). Returns
    ``q_out`` (allocated if not given). One kernel launch."""
    dv = v_head_dim or head_dim
    D, Hq, Hkv = head_dim, num_heads, num_kv_heads
    T, W = _check_rows(qkv, "qkv")
    if D % 2:
        raise ValueError("head_dim must be even (rotate-half rotary)")
    if W < Hq * D + Hkv * D + Hkv * dv:
        raise ValueError(f"qkv has {W} columns, fewer than Q+K+V = {Hq * D + Hkv * D + Hkv * dv}")
    if cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != D or cos_sin_cache.stride(1) != 1:
        raise ValueError(f"cos_sin_cache must be [max_pos, {D}] with unit column stride (partial rotary unsupported)")
    for name, idx in (("positions", positions), ("slot_mapping", slot_mapping)):
        if idx.shape != (T,) or (T > 1 and idx.stride(0) != 1) or idx.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be a contiguous [T] int32/int64 tensor")
    if k_cache.dim() != 4 or tuple(k_cache.shape[2:]) != (Hkv, D) or k_cache.stride(3) != 1:
        raise ValueError(f"k_cache must be [pages, page_size, {Hkv}, {D}] with unit last stride")
    if v_cache.dim() != 4 or tuple(v_cache.shape[:3]) != tuple(k_cache.shape[:3]) or v_cache.shape[3] != dv \
            or v_cache.stride(3) != 1:
        raise ValueError(f"v_cache must be [pages, page_size, {Hkv}, {dv}] with unit last stride")
    for name, w in (("q_norm", q_norm), ("k_norm", k_norm)):
        if w is not None and (w.shape != (D,) or not w.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous [{D}] tensor")
    if q_out is None:
        q_out = torch.empty(T, Hq, D, dtype=qkv.dtype, device=qkv.device)
    _check_out(q_out, (T, Hq, D), "q_out")
    if T == 0:
        return q_out
    from lynxsim.calib.kernels import _fused_triton as kern

    half = D // 2
    half_p, dv_p = _next_pow2(half), _next_pow2(dv)
    bq, bk = heads_per_program or _qk_heads_per_program(T, Hq, Hkv, half_p, dv_p)
    nqb, nkb = _cdiv(Hq, bq), _cdiv(Hkv, bk)
    dummy = cos_sin_cache  # never read when the norm is off
    kern._qk_norm_rope_cache_kernel[(T, nqb + nkb)](
        qkv, q_norm if q_norm is not None else dummy, k_norm if k_norm is not None else dummy, cos_sin_cache,
        positions, slot_mapping, q_out, k_cache, v_cache,
        qkv.stride(0), cos_sin_cache.stride(0), q_out.stride(0), q_out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        float(eps),
        HQ=Hq, HKV=Hkv, D=D, HALF=half, HALF_P=half_p, DV=dv, DV_P=dv_p, BHQ=bq, BHK=bk, NQB=nqb,
        PAGE=k_cache.shape[1], HAS_QN=q_norm is not None, HAS_KN=k_norm is not None, num_warps=4)
    return q_out


def qk_norm_rope_reference(
    qkv: torch.Tensor, *, num_heads: int, num_kv_heads: int, head_dim: int, v_head_dim: int | None = None,
    q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, cos_sin_cache: torch.Tensor, positions: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float64 ``(q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, Dv])`` after norm and rotary (v unchanged); the
    cache scatter is left to the caller (:func:`scatter_kv_reference`)."""
    dv = v_head_dim or head_dim
    T, D, Hq, Hkv = qkv.shape[0], head_dim, num_heads, num_kv_heads
    x = qkv.double()
    q = x[:, : Hq * D].reshape(T, Hq, D)
    k = x[:, Hq * D: (Hq + Hkv) * D].reshape(T, Hkv, D)
    v = x[:, (Hq + Hkv) * D: (Hq + Hkv) * D + Hkv * dv].reshape(T, Hkv, dv)
    half = D // 2
    cs = cos_sin_cache.double()[positions.long()]
    cos, sin = cs[:, None, :half], cs[:, None, half:]

    def norm_rope(h: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        if w is not None:
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * w.double()
        h1, h2 = h[..., :half], h[..., half:]
        return torch.cat([h1 * cos - h2 * sin, h2 * cos + h1 * sin], dim=-1)

    return norm_rope(q, q_norm), norm_rope(k, k_norm), v


def scatter_kv_reference(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of the caches with token ``t``'s ``k[t], v[t]`` (rounded to the cache dtype) at slot
    ``slot_mapping[t]``, negative slots skipped."""
    kc, vc = k_cache.clone(), v_cache.clone()
    page = k_cache.shape[1]
    for t, s in enumerate(slot_mapping.tolist()):
        if s >= 0:
            kc[s // page, s % page] = k[t].to(kc.dtype)
            vc[s // page, s % page] = v[t].to(vc.dtype)
    return kc, vc


# ----------------------------------------------------------------------------------------------------------
# router top-k
# ----------------------------------------------------------------------------------------------------------

def _check_topk(E: int, top_k: int, scoring: str, num_groups: int, topk_groups: int) -> None:
    if scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"unknown scoring {scoring!r}")
    if num_groups < 1 or E % num_groups:
        raise ValueError(f"{E} experts do not split into {num_groups} groups")
    if not 1 <= topk_groups <= num_groups:
        raise ValueError("need 1 <= topk_groups <= num_groups")
    if not 1 <= top_k <= topk_groups * (E // num_groups):
        raise ValueError(f"top_k={top_k} is more than the {topk_groups * (E // num_groups)} experts selectable")
    if num_groups > 1 and scoring == "sigmoid" and E // num_groups < 2:
        raise ValueError("sigmoid group scores sum each group's top 2: groups need 2 or more experts")


def topk_softmax(
    logits: torch.Tensor, top_k: int, *, renormalize: bool, scoring: str = "softmax",
    correction_bias: torch.Tensor | None = None, num_groups: int = 1, topk_groups: int = 1,
    out_weights: torch.Tensor | None = None, out_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's topk_softmax / grouped_topk in one kernel: router ``logits [T, E]`` (bf16 or float32) ->
    ``(weights float32 [T, k], ids int32 [T, k])``.

    Scores: ``softmax(logits)`` or ``sigmoid(logits)`` in float32. Selection uses ``score + correction_bias``
    (DeepSeek-V3; bias ``[E]``) but the returned weights are the unbiased scores. With ``num_groups > 1``
    the experts form ``num_groups`` contiguous groups, each scored by its best selection score (softmax:
    DeepSeek-V2's group_limited_greedy) or by the sum of its two best (sigmoid: DeepSeek-V3's noaux_tc);
    only the ``topk_groups`` best groups stay eligible. (vLLM's grouped_topk picks top-2-sum by the presence
    of a bias rather than by scoring; the two rules agree on every catalog model.) ``renormalize`` divides
    the k weights by their sum (no routed scaling factor is applied). Ids come in descending selection
    score; ties, among experts and among groups, go to the lower id. One kernel launch, one program per
    token."""
    T, E = _check_rows(logits, "logits")
    _check_topk(E, top_k, scoring, num_groups, topk_groups)
    if correction_bias is not None and (correction_bias.shape != (E,) or not correction_bias.is_contiguous()):
        raise ValueError(f"correction_bias must be a contiguous [{E}] tensor")
    if out_weights is None:
        out_weights = torch.empty(T, top_k, dtype=torch.float32, device=logits.device)
    if out_ids is None:
        out_ids = torch.empty(T, top_k, dtype=torch.int32, device=logits.device)
    _check_out(out_weights, (T, top_k), "out_weights", torch.float32)
    _check_out(out_ids, (T, top_k), "out_ids", torch.int32)
    if T == 0:
        return out_weights, out_ids
    from lynxsim.calib.kernels import _fused_triton as kern

    E_P = max(16, _next_pow2(E))
    NG_P = max(2, _next_pow2(num_groups))
    kern._topk_softmax_kernel[(T,)](
        logits, correction_bias if correction_bias is not None else logits, out_weights, out_ids,
        logits.stride(0), out_weights.stride(0), out_ids.stride(0),
        E=E, E_P=E_P, TOP_K=top_k, K_P=max(2, _next_pow2(top_k)), SIGMOID=scoring == "sigmoid",
        HAS_BIAS=correction_bias is not None, RENORM=bool(renormalize), NG=num_groups, NG_P=NG_P,
        GS=E // num_groups, TOPK_G=topk_groups, GROUP_TOP2=scoring == "sigmoid",
        # one warp: the row's reductions stay in shuffles; measured on an H100 (triton 3.6) it beat 2-8 warps at
        # T = 1..2048 for 128 experts (softmax) and 256 (sigmoid, 8 groups): 4.0 vs 7.9+ us and 9.8 vs 16+ us
        num_warps=1)
    return out_weights, out_ids


def topk_softmax_reference(
    logits: torch.Tensor, top_k: int, *, renormalize: bool, scoring: str = "softmax",
    correction_bias: torch.Tensor | None = None, num_groups: int = 1, topk_groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 ``(weights [T, k], ids int64 [T, k])`` with the same rules as :func:`topk_softmax`; stable
    sorts give the lower-id tie break."""
    T, E = logits.shape
    _check_topk(E, top_k, scoring, num_groups, topk_groups)
    x = logits.double()
    s = torch.softmax(x, -1) if scoring == "softmax" else torch.sigmoid(x)
    sel = s + correction_bias.double() if correction_bias is not None else s.clone()
    if num_groups > 1:
        grouped = sel.view(T, num_groups, E // num_groups)
        if scoring == "sigmoid":
            gscore = torch.sort(grouped, dim=-1, descending=True, stable=True).values[..., :2].sum(-1)
        else:
            gscore = grouped.max(-1).values
        best = torch.sort(gscore, dim=-1, descending=True, stable=True).indices[:, :topk_groups]
        keep = torch.zeros(T, num_groups, dtype=torch.bool, device=x.device).scatter_(1, best, True)
        sel = sel.masked_fill(~keep.repeat_interleave(E // num_groups, dim=1), float("-inf"))
    ids = torch.sort(sel, dim=-1, descending=True, stable=True).indices[:, :top_k]
    w = s.gather(1, ids)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    return w, ids


# ----------------------------------------------------------------------------------------------------------
# SwiGLU activation
# ----------------------------------------------------------------------------------------------------------

def silu_and_mul(h: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """vLLM's silu_and_mul: ``h [T, 2F]`` -> ``silu(h[:, :F]) * h[:, F:]`` (float32 math, h's dtype out).
    One kernel launch, program (row, column block)."""
    T, F2 = _check_rows(h, "h")
    if F2 % 2:
        raise ValueError("h must have an even number of columns [T, 2F]")
    F = F2 // 2
    if out is None:
        out = torch.empty(T, F, dtype=h.dtype, device=h.device)
    _check_out(out, (T, F), "out")
    if T == 0 or F == 0:
        return out
    from lynxsim.calib.kernels import _fused_triton as kern

    block = min(1024, max(16, _next_pow2(F)))
    while block > 256 and T * _cdiv(F, block) < 2 * SM_COUNT:  # small batches: more, shorter programs
        block //= 2
    kern._silu_and_mul_kernel[(T, _cdiv(F, block))](h, out, F, h.stride(0), out.stride(0), BLOCK=block, num_warps=4)
    return out


def silu_and_mul_reference(h: torch.Tensor) -> torch.Tensor:
    """Float64 ``silu(h[:, :F]) * h[:, F:]``."""
    f = h.shape[-1] // 2
    hd = h.double()
    return torch.nn.functional.silu(hd[..., :f]) * hd[..., f:]


LAUNCHES_PER_OP = {"add_rms_norm": 1, "rms_norm": 1, "qk_norm_rope_cache": 1, "topk_softmax": 1, "silu_and_mul": 1}

__all__ = [
    "LAUNCHES_PER_OP",
    "RMS_MAX_BLOCK",
    "add_rms_norm",
    "add_rms_norm_reference",
    "qk_norm_rope_cache",
    "qk_norm_rope_reference",
    "rms_norm",
    "rms_norm_reference",
    "rope_cos_sin_cache",
    "scatter_kv_reference",
    "silu_and_mul",
    "silu_and_mul_reference",
    "topk_softmax",
    "topk_softmax_reference",
]
