"""Triton kernels of the fused non-GEMM ops of a decoder layer (imported lazily by :mod:`.fused`).

Each op of :mod:`.fused` is exactly one launch of one kernel here:

- ``_rms_norm_kernel``: one program per row. With ``HAS_RES`` it first adds the residual (float32 add, one
  rounding to the residual dtype, stored as the new residual) and normalises the *rounded* sum, as vLLM's
  fused_add_rms_norm does. A row of up to ``BLOCK`` elements is held in registers (``ONE_PASS``: one read of
  each input byte); longer rows take two passes over ``BLOCK`` chunks, the second re-reading the stored
  residual (or ``x``) after a block barrier, so ``out`` may alias ``x`` and ``residual_out`` ``residual``.
- ``_qk_norm_rope_cache_kernel``: program (token, head block) over the fused QKV GEMM's output row. Q head
  blocks: optional per-head RMSNorm, NeoX rotary, store to ``q_out``. K/V head blocks: the same for K, then
  K and V (unchanged) into their paged-cache slot; a negative slot skips the K/V stores (vLLM's padding).
  Each head is loaded as two halves ``[BH, HALF_P]`` so that rotate-half needs no data movement; a head dim
  that is not a power of two (192) is masked.
- ``_topk_softmax_kernel``: one program per token row, experts padded to ``E_P`` with ``-inf``; softmax or
  sigmoid scores, optional correction bias (selection only), optional group-limited selection, then
  ``TOP_K`` rounds of (max, lowest index attaining it, mask it out). The index is taken as the minimum over
  the lanes equal to the max rather than through ``tl.argmax``, so ties go to the lower expert id by
  construction on every triton version.
- ``_silu_and_mul_kernel``: program (row, column block), ``silu(g) * u`` in float32.

Only long-standing ``triton.language`` features are used (masked load/store, reductions, ``where``,
``static_range``), because the GPU machine runs triton 3.6 and the CPU tests run 3.9's interpreter. No
``tl.dot`` here, so no ``DOT_F32`` workaround is needed. One interpreter difference remains: it casts
float32 to bf16 by truncation where the GPU rounds to nearest even, so CPU outputs can sit one bf16 ulp from
the GPU's (the tests allow for it there and check bit-exactness on CUDA).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _load_with_residual(x_row, r_row, ro_row, offs, m, HAS_RES: tl.constexpr):
    """Loads a chunk of ``x`` as float32; with ``HAS_RES`` adds the residual, stores the sum rounded to the
    residual dtype as the new residual and returns that *rounded* sum (what vLLM's fused_add_rms_norm
    normalises)."""
    z = tl.load(x_row + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_RES:
        z = z + tl.load(r_row + offs, mask=m, other=0.0).to(tl.float32)
        zr = z.to(ro_row.dtype.element_ty)
        tl.store(ro_row + offs, zr, mask=m)
        z = zr.to(tl.float32)
    return z


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    N, stride_x, stride_r, stride_o, stride_ro, eps,
    BLOCK: tl.constexpr, HAS_RES: tl.constexpr, ONE_PASS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    r_row = res_ptr + row * stride_r
    o_row = out_ptr + row * stride_o
    ro_row = res_out_ptr + row * stride_ro
    if ONE_PASS:
        offs = tl.arange(0, BLOCK)
        m = offs < N
        z = _load_with_residual(x_row, r_row, ro_row, offs, m, HAS_RES)
        rstd = tl.rsqrt(tl.sum(z * z, axis=0) / N + eps)
        w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(o_row + offs, (z * rstd * w).to(out_ptr.dtype.element_ty), mask=m)
    else:
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for c in range(0, N, BLOCK):
            offs = c + tl.arange(0, BLOCK)
            m = offs < N
            z = _load_with_residual(x_row, r_row, ro_row, offs, m, HAS_RES)
            acc += z * z
        # the second pass reads what the first one stored (the residual may alias its input)
        tl.debug_barrier()
        rstd = tl.rsqrt(tl.sum(acc, axis=0) / N + eps)
        for c in range(0, N, BLOCK):
            offs = c + tl.arange(0, BLOCK)
            m = offs < N
            if HAS_RES:
                z = tl.load(ro_row + offs, mask=m, other=0.0).to(tl.float32)
            else:
                z = tl.load(x_row + offs, mask=m, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
            tl.store(o_row + offs, (z * rstd * w).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _norm_rope_heads(src, w_ptr, cos, sin, j, m2, eps, D: tl.constexpr, HALF: tl.constexpr, HAS_NORM: tl.constexpr):
    """Loads ``[BH, D]`` heads at ``src`` (pointers to each head's first half), RMS-normalises each head over
    D (if ``HAS_NORM``) and applies NeoX rotary; returns the two float32 halves."""
    x1 = tl.load(src, mask=m2, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=m2, other=0.0).to(tl.float32)
    if HAS_NORM:
        jm = j < HALF
        rstd = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / D + eps)
        w1 = tl.load(w_ptr + j, mask=jm, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + j, mask=jm, other=0.0).to(tl.float32)
        x1 = x1 * rstd[:, None] * w1[None, :]
        x2 = x2 * rstd[:, None] * w2[None, :]
    o1 = x1 * cos[None, :] - x2 * sin[None, :]
    o2 = x2 * cos[None, :] + x1 * sin[None, :]
    return o1, o2


@triton.jit
def _qk_norm_rope_cache_kernel(
    qkv_ptr, qn_ptr, kn_ptr, cs_ptr, pos_ptr, slot_ptr, q_out_ptr, kc_ptr, vc_ptr,
    stride_t, stride_cs, stride_qt, stride_qh, stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
    eps,
    HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr,
    DV: tl.constexpr, DV_P: tl.constexpr, BHQ: tl.constexpr, BHK: tl.constexpr, NQB: tl.constexpr, PAGE: tl.constexpr,
    HAS_QN: tl.constexpr, HAS_KN: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    j = tl.arange(0, HALF_P)
    jm = j < HALF
    row = qkv_ptr + t * stride_t
    pos = tl.load(pos_ptr + t).to(tl.int64)
    cos = tl.load(cs_ptr + pos * stride_cs + j, mask=jm, other=0.0).to(tl.float32)
    sin = tl.load(cs_ptr + pos * stride_cs + HALF + j, mask=jm, other=0.0).to(tl.float32)
    if hb < NQB:
        h = hb * BHQ + tl.arange(0, BHQ)
        m2 = (h < HQ)[:, None] & jm[None, :]
        o1, o2 = _norm_rope_heads(row + h[:, None] * D + j[None, :], qn_ptr, cos, sin, j, m2, eps,
                                  D, HALF, HAS_QN)
        dst = q_out_ptr + t * stride_qt + h[:, None] * stride_qh + j[None, :]
        tl.store(dst, o1.to(q_out_ptr.dtype.element_ty), mask=m2)
        tl.store(dst + HALF, o2.to(q_out_ptr.dtype.element_ty), mask=m2)
    else:
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot >= 0:
            page = slot // PAGE
            off = slot % PAGE
            h = (hb - NQB) * BHK + tl.arange(0, BHK)
            hm = h < HKV
            m2 = hm[:, None] & jm[None, :]
            o1, o2 = _norm_rope_heads(row + HQ * D + h[:, None] * D + j[None, :], kn_ptr, cos, sin, j, m2, eps,
                                      D, HALF, HAS_KN)
            kdst = kc_ptr + page * stride_kp + off * stride_ks + h[:, None] * stride_kh + j[None, :]
            tl.store(kdst, o1.to(kc_ptr.dtype.element_ty), mask=m2)
            tl.store(kdst + HALF, o2.to(kc_ptr.dtype.element_ty), mask=m2)
            dv = tl.arange(0, DV_P)
            mv = hm[:, None] & (dv < DV)[None, :]
            v = tl.load(row + HQ * D + HKV * D + h[:, None] * DV + dv[None, :], mask=mv, other=0.0)
            vdst = vc_ptr + page * stride_vp + off * stride_vs + h[:, None] * stride_vh + dv[None, :]
            tl.store(vdst, v.to(vc_ptr.dtype.element_ty), mask=mv)


@triton.jit
def _topk_softmax_kernel(
    logits_ptr, bias_ptr, w_ptr, ids_ptr,
    stride_l, stride_w, stride_i,
    E: tl.constexpr, E_P: tl.constexpr, TOP_K: tl.constexpr, K_P: tl.constexpr,
    SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, RENORM: tl.constexpr,
    NG: tl.constexpr, NG_P: tl.constexpr, GS: tl.constexpr, TOPK_G: tl.constexpr, GROUP_TOP2: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, E_P)
    em = e < E
    x = tl.load(logits_ptr + row * stride_l + e, mask=em, other=float("-inf")).to(tl.float32)
    if SIGMOID:
        s = tl.where(em, tl.sigmoid(x), 0.0)
    else:
        p = tl.exp(x - tl.max(x, axis=0))  # padded lanes: exp(-inf) = 0
        s = p / tl.sum(p, axis=0)
    sel = s
    if HAS_BIAS:
        sel = sel + tl.load(bias_ptr + e, mask=em, other=0.0).to(tl.float32)
    sel = tl.where(em, sel, float("-inf"))
    if NG > 1:
        # [E_P, NG_P] membership of expert e in group g (contiguous groups of GS experts)
        g = tl.arange(0, NG_P)
        ing = (e // GS)[:, None] == g[None, :]
        sel2 = tl.where(ing, sel[:, None], float("-inf"))
        m1 = tl.max(sel2, axis=0)
        if GROUP_TOP2:
            first = tl.min(tl.where(ing & (sel2 == m1[None, :]), e[:, None], E_P), axis=0)
            m2 = tl.max(tl.where(e[:, None] == first[None, :], float("-inf"), sel2), axis=0)
            gs = m1 + m2
        else:
            gs = m1
        gs = tl.where(g < NG, gs, float("-inf"))
        keep = tl.zeros((NG_P,), dtype=tl.int32)
        for _ in tl.static_range(TOPK_G):
            gm = tl.max(gs, axis=0)
            gi = tl.min(tl.where(gs == gm, g, NG_P), axis=0)
            keep = tl.where(g == gi, 1, keep)
            gs = tl.where(g == gi, float("-inf"), gs)
        kept = tl.max(tl.where(ing & (keep[None, :] > 0), 1, 0), axis=1) > 0
        sel = tl.where(kept, sel, float("-inf"))
    kk = tl.arange(0, K_P)
    out_w = tl.zeros((K_P,), dtype=tl.float32)
    out_i = tl.zeros((K_P,), dtype=tl.int32)
    for i in tl.static_range(TOP_K):
        m = tl.max(sel, axis=0)
        idx = tl.min(tl.where(sel == m, e, E_P), axis=0)
        wv = tl.sum(tl.where(e == idx, s, 0.0), axis=0)
        out_w = tl.where(kk == i, wv, out_w)
        out_i = tl.where(kk == i, idx, out_i)
        sel = tl.where(e == idx, float("-inf"), sel)
    if RENORM:
        out_w = out_w / tl.sum(out_w, axis=0)  # lanes past TOP_K hold 0
    km = kk < TOP_K
    tl.store(w_ptr + row * stride_w + kk, out_w, mask=km)
    tl.store(ids_ptr + row * stride_i + kk, out_i, mask=km)


@triton.jit
def _silu_and_mul_kernel(h_ptr, out_ptr, F, stride_h, stride_o, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = c < F
    src = h_ptr + t * stride_h + c
    g = tl.load(src, mask=m, other=0.0).to(tl.float32)
    u = tl.load(src + F, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_o + c, (g * tl.sigmoid(g) * u).to(out_ptr.dtype.element_ty), mask=m)
