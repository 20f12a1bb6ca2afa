"""Triton kernels of the fused MoE (imported lazily by :mod:`lynxsim.calib.kernels.moe`).

One call is a memset (the float32 output and the per-expert counters share one buffer), then:

1. alignment: ``_moe_count_kernel`` counts the ``P = T * k`` token-expert pairs per expert with atomics
   (each pair gets its slot in its expert's run), ``_moe_place_kernel`` writes each pair's index at its
   position in the expert-sorted order with every expert's run padded to a multiple of ``BLOCK_M``, and for
   each ``BLOCK_M`` block its expert and where that expert's real pairs end (later positions are padding).
   For small ``P`` one program does both (``COUNT_FIRST``), saving a launch. No host synchronisation: the
   GEMM grids are sized for the worst case and surplus programs exit at once, so a call can be captured in
   a CUDA graph. Pair order inside an expert's run follows the atomics (not deterministic); results do not
   depend on it except through float32 summation order.
2. ``_moe_gate_up_kernel``: program (m-block, n-tile) computes ``silu(x W_g^T) * (x W_u^T)`` for the
   ``BLOCK_M`` pairs of one block (all of one expert) and ``BLOCK_N`` columns of the intermediate; it streams
   that expert's gate and up rows once per m-block. Weights of experts with no pair are never touched.
3. ``_moe_down_kernel``: program (m-block, n-tile, k-split) computes a split-K slice of ``inter W_d^T``,
   scales each row by its routing weight and atomically adds it into the float32 output ``[T, H]``: the
   split-K partial sums and the per-token sum over its k experts are the same atomics.
4. a cast of the float32 output to bf16 (torch).

FP8 (W8A8, ``FP8``): the expert weights are float8 e4m3 with one float32 scale per output channel (per row of
``w13`` and of ``w2``), the GEMMs' activations are float8 e4m3 with one float32 scale per row, quantized on the
fly (``_quant_rows_fp8_kernel``: the token rows before gate-up, the bf16 intermediate rows before down, as vLLM's
fused_moe runs ``fp8_w8a8`` with per-channel weight scales and dynamic per-token activation scales). ``tl.dot``
multiplies the e4m3 tiles with float32 accumulation and the epilogue multiplies each accumulator element by its
row's activation scale and its column's weight scale (exact: both scales are constant along K). Where Triton
issues Hopper's wgmma for the e4m3 dot (BLOCK_M 64) it accumulates with reduced precision, Triton's default on
sm_90 (``max_num_imprecise_acc``), as vLLM's fused_moe does: about 1.5% relative error instead of 0.2% at
smaller tiles (tests/test_calib_fp8.py).

Program order puts the m-block index fastest, so the m-blocks of one expert that share a weight tile run
together and re-read it from L2 (this matters only at large batches, where an expert has several blocks).

``DOT_F32`` upcasts operands to float32 before ``tl.dot``: set only under the CPU interpreter
(``TRITON_INTERPRET=1``), whose ``tl.dot`` multiplies bf16 operands as raw integers (seen with triton 3.9).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["P"])
def _moe_count_kernel(ids_ptr, counts_ptr, rank_ptr, P, CH: tl.constexpr):
    """Pairs per expert (``counts``, zeroed by the caller) and each pair's slot among its expert's pairs."""
    offs = tl.program_id(0) * CH + tl.arange(0, CH)
    m = offs < P
    ids = tl.load(ids_ptr + offs, mask=m, other=0)
    slot = tl.atomic_add(counts_ptr + ids, tl.full((CH,), 1, tl.int32), mask=m)
    tl.store(rank_ptr + offs, slot, mask=m)


@triton.jit(do_not_specialize=["P", "max_blocks"])
def _moe_place_kernel(
    ids_ptr, counts_ptr, rank_ptr, sorted_ptr, block_expert_ptr, block_end_ptr, num_post_ptr,
    P, E, max_blocks,
    BLOCK_M: tl.constexpr, E_P: tl.constexpr, CH: tl.constexpr, COUNT_FIRST: tl.constexpr,
):
    """Writes each pair's index at its padded sorted position, and per BLOCK_M block its expert and the end
    of that expert's real pairs (positions at or past it are padding). With ``COUNT_FIRST`` (one program),
    counts first, as ``_moe_count_kernel`` does, saving a launch."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    if COUNT_FIRST:
        for c in range(0, P, CH):
            offs = c + tl.arange(0, CH)
            m = offs < P
            ids = tl.load(ids_ptr + offs, mask=m, other=0)
            slot = tl.atomic_add(counts_ptr + ids, tl.full((CH,), 1, tl.int32), mask=m)
            tl.store(rank_ptr + offs, slot, mask=m)
        tl.debug_barrier()
    e_r = tl.arange(0, E_P)
    counts = tl.load(counts_ptr + e_r, mask=e_r < E, other=0, volatile=True)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    cum = tl.cumsum(padded, axis=0)
    start = cum - padded
    for c in range(pid * CH, P, nprog * CH):
        offs = c + tl.arange(0, CH)
        m = offs < P
        ids = tl.load(ids_ptr + offs, mask=m, other=-1)
        rank = tl.load(rank_ptr + offs, mask=m, other=0, volatile=True)
        onehot = (ids[:, None] == e_r[None, :]).to(tl.int32)
        base = tl.sum(onehot * start[None, :], axis=1)
        tl.store(sorted_ptr + base + rank, offs, mask=m)
    if pid == 0:
        tl.store(num_post_ptr, tl.sum(padded, axis=0))
        real_end = start + counts
        for b0 in range(0, max_blocks, CH):
            b = b0 + tl.arange(0, CH)
            pos = b * BLOCK_M
            # the block's expert: how many experts' padded runs end at or before the block's start
            ex = tl.minimum(tl.sum((cum[None, :] <= pos[:, None]).to(tl.int32), axis=1), E - 1)
            sel = (e_r[None, :] == ex[:, None]).to(tl.int32)
            end = tl.sum(sel * real_end[None, :], axis=1)
            tl.store(block_expert_ptr + b, ex, mask=b < max_blocks)
            tl.store(block_end_ptr + b, end, mask=b < max_blocks)


@triton.jit(do_not_specialize=["P", "num_m_blocks", "TOP_K"])
def _moe_gate_up_kernel(
    x_ptr, w_ptr, out_ptr, sorted_ptr, block_expert_ptr, block_end_ptr, num_post_ptr, x_scale_ptr, w_scale_ptr,
    P, N, K, num_m_blocks, TOP_K,
    stride_xm, stride_we, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_F32: tl.constexpr, FP8: tl.constexpr,
):
    """``FP8``: ``x`` and ``w`` are e4m3, ``x_scale [T]`` per token row, ``w_scale [E, 2N]`` per weight row."""
    pid = tl.program_id(0)
    pid_m = pid % num_m_blocks
    pid_n = pid // num_m_blocks
    num_post = tl.load(num_post_ptr)
    if pid_m * BLOCK_M >= num_post:
        return
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = offs_m < tl.load(block_end_ptr + pid_m)
    pair = tl.load(sorted_ptr + offs_m, mask=valid, other=0)
    tok = (pair // TOP_K).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_wn = (offs_n % N).to(tl.int64)  # wrap instead of masking the weight loads
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tok[:, None] * stride_xm + offs_k[None, :]
    wg_ptrs = w_ptr + e * stride_we + offs_wn[None, :] * stride_wn + offs_k[:, None]
    wu_ptrs = wg_ptrs + N * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=valid[:, None], other=0.0)
            bg = tl.load(wg_ptrs)
            bu = tl.load(wu_ptrs)
        else:
            k_mask = offs_k < K - kk * BLOCK_K
            a = tl.load(a_ptrs, mask=valid[:, None] & k_mask[None, :], other=0.0)
            bg = tl.load(wg_ptrs, mask=k_mask[:, None], other=0.0)
            bu = tl.load(wu_ptrs, mask=k_mask[:, None], other=0.0)
        if DOT_F32:
            a = a.to(tl.float32)
            bg = bg.to(tl.float32)
            bu = bu.to(tl.float32)
        acc_g = tl.dot(a, bg, acc_g)
        acc_u = tl.dot(a, bu, acc_u)
        a_ptrs += BLOCK_K
        wg_ptrs += BLOCK_K
        wu_ptrs += BLOCK_K
    if FP8:
        x_s = tl.load(x_scale_ptr + tok, mask=valid, other=0.0)
        wg_s = tl.load(w_scale_ptr + e * 2 * N + offs_wn)
        wu_s = tl.load(w_scale_ptr + e * 2 * N + N + offs_wn)
        acc_g = acc_g * x_s[:, None] * wg_s[None, :]
        acc_u = acc_u * x_s[:, None] * wu_s[None, :]
    h = acc_g * tl.sigmoid(acc_g) * acc_u
    o_ptrs = out_ptr + pair[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(o_ptrs, h.to(out_ptr.dtype.element_ty), mask=valid[:, None] & (offs_n[None, :] < N))


@triton.jit(do_not_specialize=["P", "num_m_blocks", "tiles_per_split", "TOP_K"])
def _moe_down_kernel(
    a_ptr, w_ptr, out_ptr, topk_w_ptr, sorted_ptr, block_expert_ptr, block_end_ptr, num_post_ptr, a_scale_ptr,
    w_scale_ptr, P, N, K, num_m_blocks, tiles_per_split, TOP_K,
    stride_am, stride_we, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_F32: tl.constexpr, FP8: tl.constexpr,
):
    """``FP8``: ``a`` and ``w`` are e4m3, ``a_scale [P]`` per pair row, ``w_scale [E, N]`` per weight row."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = pid % num_m_blocks
    pid_n = pid // num_m_blocks
    num_post = tl.load(num_post_ptr)
    if pid_m * BLOCK_M >= num_post:
        return
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = offs_m < tl.load(block_end_ptr + pid_m)
    pair = tl.load(sorted_ptr + offs_m, mask=valid, other=0)
    pair64 = pair.to(tl.int64)
    tok = pair64 // TOP_K
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_wn = (offs_n % N).to(tl.int64)
    # The split's K range, in whole BLOCK_K tiles: its start is a compile-time multiple of BLOCK_K, so the
    # compiler keeps 16-byte vector loads (a K offset of unknown alignment, such as pid_k * k_per_split with
    # a run-time k_per_split, makes it fall back to 2-byte loads and lose the cp.async pipeline; measured on
    # the H200: 1.4-1.7 TB/s instead of ~4).
    t0 = pid_k * tiles_per_split
    t1 = tl.minimum(tl.cdiv(K, BLOCK_K), t0 + tiles_per_split)
    k_start = t0 * BLOCK_K
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + pair64[:, None] * stride_am + k_start + offs_k[None, :]
    w_ptrs = w_ptr + e * stride_we + offs_wn[None, :] * stride_wn + k_start + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(t0, t1):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=valid[:, None], other=0.0)
            b = tl.load(w_ptrs)
        else:
            k_mask = offs_k < K - t * BLOCK_K
            a = tl.load(a_ptrs, mask=valid[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=k_mask[:, None], other=0.0)
        if DOT_F32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    wt = tl.load(topk_w_ptr + pair64, mask=valid, other=0.0)
    if FP8:
        wt = wt * tl.load(a_scale_ptr + pair64, mask=valid, other=0.0)
        acc = acc * tl.load(w_scale_ptr + e * N + offs_wn)[None, :]
    acc = acc * wt[:, None]
    o_ptrs = out_ptr + tok[:, None] * stride_om + offs_n[None, :]
    tl.atomic_add(o_ptrs, acc, mask=valid[:, None] & (offs_n[None, :] < N))


@triton.jit(do_not_specialize=["N"])
def _quant_rows_fp8_kernel(x_ptr, q_ptr, scale_ptr, N, stride_x, stride_q, BLOCK: tl.constexpr,
                           ROUND_F32: tl.constexpr):
    """Dynamic per-row quantization: program ``r`` finds ``amax = max |x[r, :]|``, stores ``scale[r] = amax / 448``
    (448: the largest finite e4m3; a floor keeps an all-zero row finite) and ``q[r, :] = x[r, :] / scale[r]`` in
    e4m3, rounded to nearest even by the cast.

    ``ROUND_F32`` (CPU interpreter only) rounds to the e4m3 grid in float32 arithmetic first (to nearest, ties
    to even), so that the cast is exact: the interpreter's float32 -> e4m3 cast drops the carry of a mantissa that
    rounds up into the next binade (seen with triton 3.9: 127.45 -> 64 instead of 128)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for c in range(0, N, BLOCK):
        m = c + offs < N
        x = tl.load(x_ptr + row * stride_x + c + offs, mask=m, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, axis=0), 1e-12) / 448.0
    tl.store(scale_ptr + row, scale)
    inv = 1.0 / scale
    for c in range(0, N, BLOCK):
        m = c + offs < N
        x = tl.load(x_ptr + row * stride_x + c + offs, mask=m, other=0.0).to(tl.float32)
        q = tl.clamp(x * inv, -448.0, 448.0)
        if ROUND_F32:
            # e4m3 keeps 3 mantissa bits; below 2^-6 the subnormal step 2^-9
            step = tl.exp2(tl.maximum(tl.floor(tl.log2(tl.maximum(tl.abs(q), 1e-30))), -6.0) - 3.0)
            units = tl.abs(q) / step
            low = tl.floor(units)
            odd = low - 2.0 * tl.floor(low * 0.5)
            up = (units - low > 0.5) | ((units - low == 0.5) & (odd == 1.0))
            q = tl.where(q < 0, -1.0, 1.0) * (low + up.to(tl.float32)) * step
        tl.store(q_ptr + row * stride_q + c + offs, q.to(q_ptr.dtype.element_ty), mask=m)
