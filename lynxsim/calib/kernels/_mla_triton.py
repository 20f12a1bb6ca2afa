"""Triton kernels of multi-head latent attention (MLA) (imported lazily by :mod:`lynxsim.calib.kernels.mla`).

``_mla_project_kernel``: program = one token. RMSNorm of the token's latent ``c`` (float32 statistics),
rotary embedding of its shared rope key ``k_pe`` and of its ``H`` query rope parts ``q_pe`` (in place), the
write of ``[c_normed | k_pe_roped]`` into the paged latent cache at the token's slot (vLLM's
``concat_and_cache_mla``; slot < 0: no write) and, optionally, the same row into a contiguous latent buffer
(what an unabsorbed prefill reads for the chunk's own tokens). Rotary: NeoX (rotate-half: element ``i`` pairs
with ``i + Dr/2``) or GPT-J (interleaved: ``2i`` pairs with ``2i + 1``), cos/sin from row ``position`` of a
``[max_pos, Dr]`` float32 table (cos in the first ``Dr/2`` columns, sin in the rest).

``_mla_decode_partial_kernel``: the split-KV absorbed MLA decode of vLLM's Triton MLA backend
(``_fwd_grouped_kernel_stage1``). Program = (block of ``BLOCK_H`` heads, KV split, sequence), head block
fastest, so all head blocks of one (split, sequence) run together and the latent rows they share come from
HBM once and from L2 for the other blocks. The program loads ``q_lat [BLOCK_H, R]`` and ``q_pe [BLOCK_H, Dr]``
once, walks its split ``BLOCK_N`` tokens at a time, reads each token's cache row once as a latent tile
``[BLOCK_N, R]`` and a rope tile ``[BLOCK_N, Dr]``, and uses the latent tile both as the key (with the rope
tile) and as the value: ``s = q_lat c^T + q_pe k_pe^T``, online softmax in base 2, ``acc += p c``. It writes
the split's normalised partial output ``[BLOCK_H, R]`` and its log-sum-exp (natural log), which
:func:`lynxsim.calib.kernels._attn_triton._decode_reduce_kernel` merges; with one split (``WRITE_LSE`` off) it
writes the final output, in the output's dtype, directly.

``DOT_F32`` upcasts ``tl.dot`` operands to float32 under the CPU interpreter (see ``_moe_triton``). Only
long-standing ``triton.language`` features are used (the GPU machine runs triton 3.6).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _mla_project_kernel(
    kva_ptr, qpe_ptr, norm_ptr, cs_ptr, pos_ptr, slot_ptr, cache_ptr, lat_ptr,
    stride_kva, stride_qt, stride_qh, stride_cs, stride_cp, stride_cslot, stride_lat,
    num_heads, eps,
    R: tl.constexpr, DR: tl.constexpr, H_P: tl.constexpr, PAGE: tl.constexpr, NEOX: tl.constexpr,
    WRITE_LATENT: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    HALF: tl.constexpr = DR // 2
    r = tl.arange(0, R)
    half = tl.arange(0, HALF)
    if NEOX:
        i1 = half
        i2 = half + HALF
    else:
        i1 = 2 * half
        i2 = 2 * half + 1
    # latent RMSNorm (float32 statistics)
    row = kva_ptr + t * stride_kva
    c = tl.load(row + r).to(tl.float32)
    var = tl.sum(c * c, axis=0) / R
    cn = c * tl.rsqrt(var + eps) * tl.load(norm_ptr + r).to(tl.float32)
    # rotary of the shared rope key
    p = tl.load(pos_ptr + t).to(tl.int64)
    cos = tl.load(cs_ptr + p * stride_cs + half)
    sin = tl.load(cs_ptr + p * stride_cs + HALF + half)
    x1 = tl.load(row + R + i1).to(tl.float32)
    x2 = tl.load(row + R + i2).to(tl.float32)
    k1 = x1 * cos - x2 * sin
    k2 = x2 * cos + x1 * sin
    # rotary of the H query rope parts, in place
    h = tl.arange(0, H_P)
    hm = h < num_heads
    qb = qpe_ptr + t * stride_qt + h[:, None] * stride_qh
    q1 = tl.load(qb + i1[None, :], mask=hm[:, None], other=0.0).to(tl.float32)
    q2 = tl.load(qb + i2[None, :], mask=hm[:, None], other=0.0).to(tl.float32)
    qty = qpe_ptr.dtype.element_ty
    tl.store(qb + i1[None, :], (q1 * cos[None, :] - q2 * sin[None, :]).to(qty), mask=hm[:, None])
    tl.store(qb + i2[None, :], (q2 * cos[None, :] + q1 * sin[None, :]).to(qty), mask=hm[:, None])
    # [c_normed | k_pe_roped] into the paged cache at the token's slot (slot < 0: padding, no write)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    ok_r = (tl.zeros((R,), dtype=tl.int64) + slot) >= 0
    ok_h = (tl.zeros((HALF,), dtype=tl.int64) + slot) >= 0
    slot = tl.maximum(slot, 0)
    dst = cache_ptr + (slot // PAGE) * stride_cp + (slot % PAGE) * stride_cslot
    cty = cache_ptr.dtype.element_ty
    tl.store(dst + r, cn.to(cty), mask=ok_r)
    tl.store(dst + R + i1, k1.to(cty), mask=ok_h)
    tl.store(dst + R + i2, k2.to(cty), mask=ok_h)
    if WRITE_LATENT:
        lty = lat_ptr.dtype.element_ty
        lrow = lat_ptr + t * stride_lat
        tl.store(lrow + r, cn.to(lty))
        tl.store(lrow + R + i1, k1.to(lty))
        tl.store(lrow + R + i2, k2.to(lty))


@triton.jit(do_not_specialize=["tokens_per_split"])
def _mla_decode_partial_kernel(
    ql_ptr, qpe_ptr, kv_ptr, bt_ptr, lens_ptr, o_ptr, lse_ptr,
    stride_qlb, stride_qlh, stride_qpb, stride_qph, stride_kvp, stride_kvs,
    stride_btb, stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    num_heads, sm_scale_log2, tokens_per_split,
    R: tl.constexpr, DR: tl.constexpr, PAGE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    WRITE_LSE: tl.constexpr, DOT_F32: tl.constexpr,
):
    hb = tl.program_id(0)
    s = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    L = tl.load(lens_ptr + b)
    start = s * tokens_per_split
    end = tl.minimum(L, start + tokens_per_split)
    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = heads < num_heads
    r = tl.arange(0, R)
    e = tl.arange(0, DR)
    ql = tl.load(ql_ptr + b * stride_qlb + heads[:, None] * stride_qlh + r[None, :], mask=hmask[:, None], other=0.0)
    qp = tl.load(qpe_ptr + b * stride_qpb + heads[:, None] * stride_qph + e[None, :], mask=hmask[:, None], other=0.0)
    if DOT_F32:
        ql = ql.to(tl.float32)
        qp = qp.to(tl.float32)
    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, R), dtype=tl.float32)
    bt_base = bt_ptr + b * stride_btb
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        pmask = pos < end
        page = tl.load(bt_base + pos // PAGE, mask=pmask, other=0).to(tl.int64)
        rows = kv_ptr + page * stride_kvp + (pos % PAGE).to(tl.int64) * stride_kvs  # [BLOCK_N] row pointers
        c = tl.load(rows[:, None] + r[None, :], mask=pmask[:, None], other=0.0)  # [BLOCK_N, R]: K and V
        kpe = tl.load(rows[:, None] + R + e[None, :], mask=pmask[:, None], other=0.0)  # [BLOCK_N, DR]
        if DOT_F32:
            c = c.to(tl.float32)
            kpe = kpe.to(tl.float32)
        qk = tl.dot(ql, tl.trans(c))
        qk += tl.dot(qp, tl.trans(kpe))
        qk = tl.where(pmask[None, :], qk * sm_scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(c.dtype), c)
        m_i = m_new
    has = l_i > 0.0
    safe_l = tl.where(has, l_i, 1.0)
    out = acc / safe_l[:, None]
    tl.store(o_ptr + b * stride_ob + heads[:, None] * stride_oh + s * stride_os + r[None, :],
             out.to(o_ptr.dtype.element_ty), mask=hmask[:, None])
    if WRITE_LSE:
        lse = tl.where(has, (m_i + tl.log2(safe_l)) * 0.6931471805599453, float("-inf"))
        tl.store(lse_ptr + b * stride_lb + heads * stride_lh + s, lse, mask=hmask)
