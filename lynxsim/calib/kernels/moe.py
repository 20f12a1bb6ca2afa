"""The routed experts of one MoE layer: a fused Triton kernel, torch's grouped GEMM, and a float32 reference.

Common interface (``T`` tokens, hidden ``H``, ``E`` experts of width ``F``, top-``k``)::

    fn(x, w13, w2, topk_weights, topk_ids, ...) -> out

    x             [T, H]      bf16, contiguous
    w13           [E, 2F, H]  bf16, contiguous; rows 0..F-1 of expert e are its gate projection, F..2F-1 up
    w2            [E, H, F]   bf16, contiguous; down projection
    topk_weights  [T, k]      float32 routing weights (already renormalized or not, as the model does)
    topk_ids      [T, k]      int32/int64 expert ids, distinct within a row
    out           [T, H]      bf16 (float32 for the reference): sum_j w[t,j] * FFN_{id[t,j]}(x[t])
                              with FFN_e(x) = W2_e (silu(W_g,e x) * (W_u,e x))

Only the experts that appear in ``topk_ids`` are read (the "active" experts); achieved weight bandwidth is
``active_experts * 3 * H * F * 2 bytes / time``.

- :func:`moe_fused`: the Triton kernels of :mod:`._moe_triton` (vLLM fused_moe's scheme: pairs sorted and
  padded into blocks per expert; each program one tile of one expert; SiLU-and-multiply fused into the
  gate-up GEMM; routing weights and the per-token sum fused into the down GEMM through split-K atomics).
  Intermediate activations are rounded to bf16 as in vLLM. Runs on the CPU under ``TRITON_INTERPRET=1``.
- :func:`moe_grouped_gemm`: pairs sorted by expert with torch ops, then ``torch._grouped_mm`` (CUTLASS
  grouped GEMM on sm90) for gate-up and down, ``offs`` = cumulative pair counts per expert (int32, one entry
  per expert, empty groups allowed; no padding needed for the 2D x 3D form); weight layout ``[E, N, K]`` is
  passed as ``w.transpose(1, 2)`` (``[E, K, N]`` with the K dim contiguous, which the sm90 kernel takes).
- :func:`moe_fused_fp8`: the same kernels with FP8 (e4m3) W8A8 experts, as vLLM's fused_moe runs ``fp8_w8a8``
  with per-channel weight scales and dynamic per-token activation scales: ``w13``/``w2`` in e4m3 with one float32
  scale per output channel (``quantize_weights_fp8``, offline, as an FP8 checkpoint stores them), the token
  rows and the bf16 intermediate rows quantized per row on the fly (``quantize_rows_fp8``, one Triton kernel
  each, inside the timed unit as in production). Per-channel rather than DeepSeek-style 128x128 block scales:
  both scales are constant along K, so they apply once in the GEMM epilogues and the K loop stays the bf16
  kernel's, with e4m3 tiles; block scales would rescale every K tile's partial sums.
- :func:`moe_reference`: a float32 loop over experts, for correctness checks (FP8 experts: their dequantized
  weights, activations rounded through e4m3 where the kernel quantizes them).

:func:`moe_fused` and :func:`moe_grouped_gemm` never synchronise with the host, so they can be captured in a
CUDA graph (as vLLM captures decode).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from lynxsim.calib.kernels.triton_mode import interpreted, triton_runs


def _check(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> tuple[int, int, int, int, int]:
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise ValueError("expected x [T, H], w13 [E, 2F, H], w2 [E, H, F]")
    T, H = x.shape
    E, F2, H1 = w13.shape
    F_ = F2 // 2
    if H1 != H or F2 != 2 * F_ or tuple(w2.shape) != (E, H, F_):
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}")
    if topk_ids.shape != topk_weights.shape or topk_ids.dim() != 2 or topk_ids.shape[0] != T:
        raise ValueError("topk_ids and topk_weights must both be [T, k]")
    return T, H, E, F_, topk_ids.shape[1]


# ----------------------------------------------------------------------------------------------------------
# float32 reference
# ----------------------------------------------------------------------------------------------------------

def moe_reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, dtype: torch.dtype = torch.float32, *, w13_scale: torch.Tensor | None = None,
                  w2_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Loop over the active experts with plain matmuls in ``dtype`` (float32 or float64); returns ``[T, H]``
    in ``dtype``. Upcasts one expert's weights at a time, so it fits wherever the bf16 weights fit.

    FP8 experts (``w13_scale``/``w2_scale`` given, ``w13``/``w2`` in e4m3): each expert's weights dequantized
    with its per-channel scales, and the token rows and the intermediate rows (rounded to bf16 first, as the
    kernel stores them) rounded through e4m3 per row (``quantize_rows_fp8_reference``), as the kernel quantizes
    them: the function :func:`moe_fused_fp8` computes, in ``dtype``."""
    T, H, E, F_, k = _check(x, w13, w2, topk_weights, topk_ids)
    fp8 = w13_scale is not None
    if fp8 != (w2_scale is not None):
        raise ValueError("FP8 experts need both w13_scale and w2_scale")

    def rows(t: torch.Tensor) -> torch.Tensor:
        if not fp8:
            return t
        q, scale = quantize_rows_fp8_reference(t.to(torch.bfloat16))
        return q.to(dtype) * scale.to(dtype)[:, None]

    def weights(w: torch.Tensor, scale: torch.Tensor | None, e: int) -> torch.Tensor:
        return w[e].to(dtype) if scale is None else w[e].to(dtype) * scale[e].to(dtype)[:, None]

    xf = rows(x.to(dtype))
    out = torch.zeros(T, H, dtype=dtype, device=x.device)
    ids = topk_ids.long()
    for e in torch.unique(ids).tolist():
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        h = xf[tok] @ weights(w13, w13_scale, e).T
        a = rows(F.silu(h[:, :F_]) * h[:, F_:])
        y = a @ weights(w2, w2_scale, e).T
        out.index_add_(0, tok, y * topk_weights[tok, slot].to(dtype)[:, None])
    return out


# ----------------------------------------------------------------------------------------------------------
# FP8 (e4m3) quantization
# ----------------------------------------------------------------------------------------------------------

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)
"""448: the largest finite e4m3 value, which each row's (or channel's) largest magnitude is scaled to."""


def quantize_weights_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel FP8 of expert weights ``[E, N, K]``: ``(q [E, N, K] e4m3, scale [E, N] float32)`` with
    ``scale = max |w[e, n, :]| / 448`` and ``w ~= q * scale`` (what an FP8 checkpoint with channel-wise weight
    scales holds, e.g. llm-compressor's FP8_DYNAMIC scheme)."""
    if w.dim() != 3:
        raise ValueError(f"expected expert weights [E, N, K], got shape {tuple(w.shape)}")
    scale = w.abs().amax(dim=-1).float().clamp(min=1e-12) / FP8_MAX
    q = (w.float() * (1.0 / scale)[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def quantize_rows_fp8_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-row FP8 of ``x [R, N]`` in torch: ``(q [R, N] e4m3, scale [R] float32)``, ``scale = max |row| /
    448``, as ``quantize_rows_fp8`` computes it (round to nearest even on the cast)."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1).clamp(min=1e-12) / FP8_MAX
    return (xf * (1.0 / scale)[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-row FP8 of ``x [R, N]`` (the token rows before gate-up, the intermediate rows before down) by
    one Triton kernel, one program per row; the torch reference where Triton cannot run."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError("expected rows [R, N] with contiguous columns")
    if not triton_runs(x):
        return quantize_rows_fp8_reference(x)
    from lynxsim.calib.kernels import _moe_triton as kern

    R, N = x.shape
    q = torch.empty(R, N, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(R, dtype=torch.float32, device=x.device)
    if R:
        block = min(2048, max(128, _next_pow2(N)))
        kern._quant_rows_fp8_kernel[(R,)](x, q, scale, N, x.stride(0), q.stride(0), BLOCK=block,
                                          ROUND_F32=interpreted(x), num_warps=4)
    return q, scale


# ----------------------------------------------------------------------------------------------------------
# torch grouped GEMM
# ----------------------------------------------------------------------------------------------------------

def has_grouped_mm() -> bool:
    return hasattr(torch, "_grouped_mm")


def moe_grouped_gemm(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                     topk_ids: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Routed experts through ``torch._grouped_mm`` (see the module docstring). Returns ``out`` ([T, H], x's
    dtype; allocated if not given)."""
    T, H, E, F_, k = _check(x, w13, w2, topk_weights, topk_ids)
    if not has_grouped_mm():
        raise RuntimeError(f"torch {torch.__version__} has no torch._grouped_mm")
    flat = topk_ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    tok = order // k
    counts = torch.zeros(E, dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    xs = x.index_select(0, tok)
    h = torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs)
    a = F.silu(h[:, :F_]) * h[:, F_:]
    y = torch._grouped_mm(a, w2.transpose(1, 2), offs=offs)
    acc = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    acc.index_add_(0, tok, y.float() * topk_weights.reshape(-1)[order].float()[:, None])
    if out is None:
        return acc.to(x.dtype)
    out.copy_(acc)
    return out


# ----------------------------------------------------------------------------------------------------------
# fused Triton kernel
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MoeConfig:
    """Tile sizes of :func:`moe_fused`. ``*1``: the gate-up GEMM (N = F, K = H; each program loads a gate and
    an up tile), ``*2``: the down GEMM (N = H, K = F) with ``split_k`` slices along K."""

    block_m: int = 16
    block_n1: int = 64
    block_k1: int = 128
    warps1: int = 4
    stages1: int = 4
    block_n2: int = 64
    block_k2: int = 128
    warps2: int = 4
    stages2: int = 4
    split_k: int = 1

    def short(self) -> str:
        return (f"m{self.block_m}|n{self.block_n1}k{self.block_k1}w{self.warps1}s{self.stages1}"
                f"|n{self.block_n2}k{self.block_k2}w{self.warps2}s{self.stages2}x{self.split_k}")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def default_moe_config(num_pairs: int, num_experts: int, hidden: int, ffn: int, sm_count: int = 132, *,
                       active_experts: int | None = None, max_tokens_per_expert: int | None = None,
                       fp8: bool = False) -> MoeConfig:
    """A tile configuration from shapes alone (no look at the routing on the device, so no host sync).

    ``active_experts`` / ``max_tokens_per_expert``: optional host-side hints (a calibration sweep or a trace
    replay knows its routing); without them the pairs are assumed spread evenly over ``min(E, pairs)``
    experts, as vLLM's configs (keyed by token count alone) do. A measured table (``TUNED``) for the shape
    ``(hidden, ffn)`` wins where it has an entry for the regime; otherwise a heuristic:

    decode (few pairs per expert) is a weight-streaming GEMV: BLOCK_M 16 (the smallest ``tl.dot`` tile),
    narrow N tiles so that ``active experts x N tiles`` programs cover the 132 SMs several times, deep
    software pipelining (``num_stages``) to keep many 16-byte weight loads in flight, and split-K on the
    down GEMM (whose N = H is the smaller side) until it too has enough programs. Larger batches raise
    BLOCK_M so each weight tile feeds more tokens.

    ``fp8`` (:func:`moe_fused_fp8`): the same tiles with twice the K width (``FP8_K_TILE_FACTOR``), so each
    pipeline stage moves the bytes it moves in bf16 (an e4m3 weight is one byte); ``TUNED`` holds bf16 tiles only.
    """
    active = max(1, min(num_experts, num_pairs, active_experts or num_pairs))
    per_expert = max_tokens_per_expert or _cdiv(num_pairs, active)
    for m_max, a_max, cfg in ([] if fp8 else TUNED.get((hidden, ffn), ())):
        if per_expert <= m_max and active <= a_max:
            return cfg
    if per_expert <= 16:
        cfg = MoeConfig(block_m=16, block_n1=32, block_k1=128, stages1=4, block_n2=32, block_k2=128, stages2=4)
    elif per_expert <= 48:
        cfg = MoeConfig(block_m=32, block_n1=64, block_k1=128, stages1=4, block_n2=64, block_k2=128, stages2=4)
    else:
        cfg = MoeConfig(block_m=64, block_n1=64, block_k1=64, stages1=4, block_n2=64, block_k2=64, stages2=4)
    if fp8:
        cfg = replace(cfg, block_k1=cfg.block_k1 * FP8_K_TILE_FACTOR, block_k2=cfg.block_k2 * FP8_K_TILE_FACTOR)
    return replace(cfg, split_k=heuristic_split_k(cfg, active, per_expert, hidden, ffn, sm_count))


FP8_K_TILE_FACTOR = 2
"""K-tile width of the FP8 kernels over the bf16 heuristic's (same bytes per tile row)."""


def heuristic_split_k(cfg: MoeConfig, active: int, per_expert: int, hidden: int, ffn: int, sm_count: int = 132) -> int:
    """Split-K of the down GEMM: double until ~4 programs per SM, keeping >= 4 K tiles per split."""
    est_blocks = active * max(1, _cdiv(per_expert, cfg.block_m))
    programs2 = est_blocks * _cdiv(hidden, cfg.block_n2)
    split = 1
    while programs2 * split < 4 * sm_count and ffn // (split * 2) >= 4 * cfg.block_k2 and split < 8:
        split *= 2
    return split


# Measured best configurations on an H200 (benchmarks/moe_bandwidth.py --tune), per expert shape (H, F):
# entries (max tokens per expert, max active experts, config), first match wins. Empty for now: the one
# search so far (docs/measurements/moe_bandwidth.md) ran before the down kernel's alignment fix, so its
# down-GEMM winners no longer apply; fill from the fused_best rows of the next --tune run.
TUNED: dict[tuple[int, int], list[tuple[int, int, MoeConfig]]] = {}

# Up to this many pairs one program both counts and places (one launch fewer); above, two kernels.
SINGLE_PROGRAM_MAX_PAIRS = 4096


@dataclass
class FusedPlan:
    """Buffers of one :func:`moe_fused` call after the alignment step (exposed for per-kernel timing)."""

    T: int
    H: int
    E: int
    F: int
    k: int
    P: int
    block_m: int
    max_blocks: int
    interp: bool
    acc: torch.Tensor  # [T, H] float32 output accumulator (zeroed)
    wts: torch.Tensor  # [P] float32 routing weights
    sorted_ids: torch.Tensor
    block_expert: torch.Tensor
    block_end: torch.Tensor
    num_post: torch.Tensor
    inter: torch.Tensor  # [P, F] bf16 intermediate (silu(gate) * up)


def fused_align(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, num_experts: int,
                ffn: int, block_m: int) -> FusedPlan:
    """Memset + alignment kernels of :func:`moe_fused`."""
    from lynxsim.calib.kernels import _moe_triton as kern

    T, H = x.shape
    k = topk_ids.shape[1]
    E, BM, dev = num_experts, block_m, x.device
    P = T * k
    max_padded = _cdiv(P + min(E, P) * (BM - 1), BM) * BM
    max_blocks = max_padded // BM
    E_P = max(16, _next_pow2(E))
    # one memset: float32 output accumulator [T, H], then E int32 counters (viewed from the same bytes)
    ws = torch.zeros(T * H + E, dtype=torch.float32, device=dev)
    acc = ws[: T * H].view(T, H)
    counts = ws[T * H:].view(torch.int32)
    ids = topk_ids.reshape(-1).to(torch.int32).contiguous()
    wts = topk_weights.reshape(-1).to(torch.float32).contiguous()
    rank = torch.empty(P, dtype=torch.int32, device=dev)
    sorted_ids = torch.empty(max_padded, dtype=torch.int32, device=dev)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=dev)
    block_end = torch.empty(max_blocks, dtype=torch.int32, device=dev)
    num_post = torch.empty(1, dtype=torch.int32, device=dev)
    CH = max(16, min(128, 8192 // E_P))
    single = P <= SINGLE_PROGRAM_MAX_PAIRS
    if not single:
        kern._moe_count_kernel[(_cdiv(P, 1024),)](ids, counts, rank, P, CH=1024, num_warps=4)
    n_place = 1 if single else min(_cdiv(P, CH), 132)
    kern._moe_place_kernel[(n_place,)](
        ids, counts, rank, sorted_ids, block_expert, block_end, num_post, P, E, max_blocks,
        BLOCK_M=BM, E_P=E_P, CH=CH, COUNT_FIRST=single, num_warps=4)
    inter = torch.empty(P, ffn, dtype=x.dtype, device=dev)  # bf16 (FP8 runs quantize it before the down GEMM)
    return FusedPlan(T, H, E, ffn, k, P, BM, max_blocks, interpreted(x), acc, wts, sorted_ids, block_expert,
                     block_end, num_post, inter)


def fused_gate_up(plan: FusedPlan, x: torch.Tensor, w13: torch.Tensor, cfg: MoeConfig,
                  scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Gate-up GEMM with the SiLU-and-multiply epilogue into ``plan.inter``. FP8: ``x`` and ``w13`` in e4m3 and
    ``scales = (x_scale [T], w13_scale [E, 2F])``."""
    from lynxsim.calib.kernels import _moe_triton as kern

    assert cfg.block_m == plan.block_m
    x_scale, w_scale = scales if scales is not None else (plan.wts, plan.wts)  # unread without FP8
    grid1 = (plan.max_blocks * _cdiv(plan.F, cfg.block_n1),)
    kern._moe_gate_up_kernel[grid1](
        x, w13, plan.inter, plan.sorted_ids, plan.block_expert, plan.block_end, plan.num_post, x_scale, w_scale,
        plan.P, plan.F, plan.H, plan.max_blocks, plan.k, x.stride(0), w13.stride(0), w13.stride(1),
        plan.inter.stride(0), BLOCK_M=plan.block_m, BLOCK_N=cfg.block_n1, BLOCK_K=cfg.block_k1,
        EVEN_K=plan.H % cfg.block_k1 == 0, DOT_F32=plan.interp, FP8=scales is not None, num_warps=cfg.warps1,
        num_stages=cfg.stages1)


def fused_down(plan: FusedPlan, w2: torch.Tensor, cfg: MoeConfig,
               fp8: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
    """Down GEMM, routing weights and per-token sum (split-K atomics) into ``plan.acc``, from ``plan.inter``;
    FP8: from ``fp8 = (inter [P, F] e4m3, inter_scale [P], w2_scale [E, H])`` with ``w2`` in e4m3."""
    from lynxsim.calib.kernels import _moe_triton as kern

    assert cfg.block_m == plan.block_m
    a, a_scale, w_scale = fp8 if fp8 is not None else (plan.inter, plan.wts, plan.wts)  # scales unread w/o FP8
    k_tiles = _cdiv(plan.F, cfg.block_k2)
    tiles_per_split = _cdiv(k_tiles, cfg.split_k)
    split = _cdiv(k_tiles, tiles_per_split)
    grid2 = (plan.max_blocks * _cdiv(plan.H, cfg.block_n2), split)
    kern._moe_down_kernel[grid2](
        a, w2, plan.acc, plan.wts, plan.sorted_ids, plan.block_expert, plan.block_end, plan.num_post, a_scale,
        w_scale, plan.P, plan.H, plan.F, plan.max_blocks, tiles_per_split, plan.k, a.stride(0), w2.stride(0),
        w2.stride(1), plan.acc.stride(0), BLOCK_M=plan.block_m, BLOCK_N=cfg.block_n2, BLOCK_K=cfg.block_k2,
        EVEN_K=plan.F % cfg.block_k2 == 0, DOT_F32=plan.interp, FP8=fp8 is not None, num_warps=cfg.warps2,
        num_stages=cfg.stages2)


def moe_fused(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, *, config: MoeConfig | None = None, out: torch.Tensor | None = None,
              active_experts: int | None = None, max_tokens_per_expert: int | None = None) -> torch.Tensor:
    """Routed experts through the fused Triton MoE kernels (see the module docstring and :mod:`._moe_triton`).
    ``config`` defaults to :func:`default_moe_config` (with the optional routing hints). Returns ``out``
    ([T, H], x's dtype; allocated if not given)."""
    T, H, E, F_, k = _check(x, w13, w2, topk_weights, topk_ids)
    if not (x.is_contiguous() and w13.is_contiguous() and w2.is_contiguous()):
        raise ValueError("moe_fused needs contiguous x, w13 and w2")
    cfg = config or default_moe_config(T * k, E, H, F_, active_experts=active_experts,
                                       max_tokens_per_expert=max_tokens_per_expert)
    plan = fused_align(x, topk_weights, topk_ids, E, F_, cfg.block_m)
    fused_gate_up(plan, x, w13, cfg)
    fused_down(plan, w2, cfg)
    if out is None:
        return plan.acc.to(x.dtype)
    out.copy_(plan.acc)
    return out


def moe_fused_fp8(x: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor,
                  w2_scale: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
                  config: MoeConfig | None = None, out: torch.Tensor | None = None, active_experts: int | None = None,
                  max_tokens_per_expert: int | None = None) -> torch.Tensor:
    """Routed FP8 (W8A8) experts (module docstring): ``x`` bf16 ``[T, H]``; ``w13 [E, 2F, H]`` and ``w2 [E, H, F]``
    in e4m3 with per-channel scales ``w13_scale [E, 2F]`` and ``w2_scale [E, H]`` (``quantize_weights_fp8``).
    One call: memset and alignment, the token rows quantized, gate-up, the intermediate rows quantized, down,
    the cast; every step on the device (capturable). Returns ``out`` ([T, H] bf16; allocated if not given)."""
    T, H, E, F_, k = _check(x, w13, w2, topk_weights, topk_ids)
    if w13.dtype != FP8_DTYPE or w2.dtype != FP8_DTYPE:
        raise ValueError(f"moe_fused_fp8 needs e4m3 weights, got {w13.dtype} and {w2.dtype}")
    if tuple(w13_scale.shape) != (E, 2 * F_) or tuple(w2_scale.shape) != (E, H):
        raise ValueError(f"per-channel scales must be [E, 2F] and [E, H], got {tuple(w13_scale.shape)} and "
                         f"{tuple(w2_scale.shape)}")
    if not (x.is_contiguous() and w13.is_contiguous() and w2.is_contiguous()):
        raise ValueError("moe_fused_fp8 needs contiguous x, w13 and w2")
    cfg = config or default_moe_config(T * k, E, H, F_, active_experts=active_experts,
                                       max_tokens_per_expert=max_tokens_per_expert, fp8=True)
    plan = fused_align(x, topk_weights, topk_ids, E, F_, cfg.block_m)
    x_q, x_scale = quantize_rows_fp8(x)
    fused_gate_up(plan, x_q, w13, cfg, (x_scale, w13_scale))
    inter_q, inter_scale = quantize_rows_fp8(plan.inter)
    fused_down(plan, w2, cfg, (inter_q, inter_scale, w2_scale))
    if out is None:
        return plan.acc.to(x.dtype)
    out.copy_(plan.acc)
    return out


def moe_active_weight_bytes(topk_ids: torch.Tensor, hidden: int, ffn: int, bytes_per_weight: int = 2) -> int:
    """Weight bytes an implementation must read for this routing: distinct experts x 3 x H x F x bytes (1 for
    FP8 experts, their scales aside). (Synchronises with the device: for reporting, not for timed code.)"""
    return int(torch.unique(topk_ids).numel()) * 3 * hidden * ffn * bytes_per_weight


__all__ = [
    "FP8_DTYPE",
    "FP8_K_TILE_FACTOR",
    "FP8_MAX",
    "FusedPlan",
    "MoeConfig",
    "TUNED",
    "default_moe_config",
    "fused_align",
    "fused_down",
    "fused_gate_up",
    "heuristic_split_k",
    "has_grouped_mm",
    "moe_active_weight_bytes",
    "moe_fused",
    "moe_fused_fp8",
    "moe_grouped_gemm",
    "moe_reference",
    "quantize_rows_fp8",
    "quantize_rows_fp8_reference",
    "quantize_weights_fp8",
]

