"""Triton split-KV ("flash-decoding") GQA decode attention over a paged KV cache (imported lazily).

``_decode_partial_kernel``: program (sequence b, KV head h, split s) loads the ``G = Hq / Hkv`` query heads
that share KV head h, walks the split's share of the sequence's ``seq_len`` cached tokens ``BLOCK_N`` at a
time (each token's page from the block table), and keeps an online softmax; it writes the split's
normalised partial output and its log-sum-exp. Each cached K/V byte is read once, by one program, for all
G query heads together. ``_decode_reduce_kernel``: program (b, query head) merges the splits.

``DOT_F32`` upcasts ``tl.dot`` operands to float32 under the CPU interpreter (see ``_moe_triton``).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["tokens_per_split"])
def _decode_partial_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, o_ptr, lse_ptr,
    stride_qb, stride_qh, stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
    stride_btb, stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    sm_scale, tokens_per_split,
    G: tl.constexpr, G_P: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr, DV: tl.constexpr,
    DV_P: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr,
):
    b = tl.program_id(0)
    hk = tl.program_id(1)
    s = tl.program_id(2)
    L = tl.load(lens_ptr + b)
    start = s * tokens_per_split
    end = tl.minimum(L, start + tokens_per_split)
    g = tl.arange(0, G_P)
    heads = hk * G + g
    hmask = g < G
    d = tl.arange(0, D_P)
    dmask = d < D
    dv = tl.arange(0, DV_P)
    dvmask = dv < DV
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=hmask[:, None] & dmask[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    m_i = tl.full((G_P,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((G_P,), dtype=tl.float32)
    acc = tl.zeros((G_P, DV_P), dtype=tl.float32)
    k_base = k_ptr + hk * stride_kh
    v_base = v_ptr + hk * stride_vh
    bt_base = bt_ptr + b.to(tl.int64) * stride_btb
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        pmask = pos < end
        page = tl.load(bt_base + pos // PAGE, mask=pmask, other=0).to(tl.int64)
        slot = pos % PAGE
        kt = tl.load(k_base + page[None, :] * stride_kp + slot[None, :] * stride_ks + d[:, None],
                     mask=pmask[None, :] & dmask[:, None], other=0.0)  # [D_P, BLOCK_N]
        if DOT_F32:
            kt = kt.to(tl.float32)
        qk = tl.dot(q, kt) * sm_scale  # [G_P, BLOCK_N]
        qk = tl.where(pmask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + page[:, None] * stride_vp + slot[:, None] * stride_vs + dv[None, :],
                    mask=pmask[:, None] & dvmask[None, :], other=0.0)  # [BLOCK_N, DV_P]
        if DOT_F32:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32))
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    has = l_i > 0.0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(o_ptr + b * stride_ob + heads[:, None] * stride_oh + s * stride_os + dv[None, :], out,
             mask=hmask[:, None] & dvmask[None, :])
    tl.store(lse_ptr + b * stride_lb + heads * stride_lh + s, lse, mask=hmask)


@triton.jit
def _decode_reduce_kernel(
    o_ptr, lse_ptr, out_ptr,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_outb, stride_outh,
    NUM_SPLITS: tl.constexpr, S_P: tl.constexpr, DV: tl.constexpr, DV_P: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, S_P)
    smask = s < NUM_SPLITS
    dv = tl.arange(0, DV_P)
    dvmask = dv < DV
    lse = tl.load(lse_ptr + b * stride_lb + h * stride_lh + s, mask=smask, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.where(smask & (lse > float("-inf")), tl.exp(lse - m), 0.0)
    o = tl.load(o_ptr + b * stride_ob + h * stride_oh + s[:, None] * stride_os + dv[None, :],
                mask=smask[:, None] & dvmask[None, :], other=0.0)
    res = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    tl.store(out_ptr + b * stride_outb + h * stride_outh + dv, res.to(out_ptr.dtype.element_ty), mask=dvmask)
