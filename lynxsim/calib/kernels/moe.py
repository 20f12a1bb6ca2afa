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
- :func:`moe_reference`: a float32 loop over experts, for correctness checks.

:func:`moe_fused` and :func:`moe_grouped_gemm` never synchronise with the host, so they can be captured in a
CUDA graph (as vLLM captures decode).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from lynxsim.calib.kernels.triton_mode import interpreted


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
                  topk_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Loop over the active experts with plain matmuls in ``dtype`` (float32 or float64); returns ``[T, H]``
    in ``dtype``. Upcasts one expert's weights at a time, so it fits wherever the bf16 weights fit."""
    T, H, E, F_, k = _check(x, w13, w2, topk_weights, topk_ids)
    xf = x.to(dtype)
    out = torch.zeros(T, H, dtype=dtype, device=x.device)
    ids = topk_ids.long()
    for e in torch.unique(ids).tolist():
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        h = xf[tok] @ w13[e].to(dtype).T
        a = F.silu(h[:, :F_]) * h[:, F_:]
        y = a @ w2[e].to(dtype).T
        out.index_add_(0, tok, y * topk_weights[tok, slot].to(dtype)[:, None])
    return out


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
                       active_experts: int | None = None, max_tokens_per_expert: int | None = None) -> MoeConfig:
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
    """
    active = max(1, min(num_experts, num_pairs, active_experts or num_pairs))
    per_expert = max_tokens_per_expert or _cdiv(num_pairs, active)
    for m_max, a_max, cfg in TUNED.get((hidden, ffn), ()):
        if per_expert <= m_max and active <= a_max:
            return cfg
    if per_expert <= 16:
        cfg = MoeConfig(block_m=16, block_n1=32, block_k1=128, stages1=4, block_n2=32, block_k2=128, stages2=4)
    elif per_expert <= 48:
        cfg = MoeConfig(block_m=32, block_n1=64, block_k1=128, stages1=4, block_n2=64, block_k2=128, stages2=4)
    else:
        cfg = MoeConfig(block_m=64, block_n1=64, block_k1=64, stages1=4, block_n2=64, block_k2=64, stages2=4)
    return replace(cfg, split_k=heuristic_split_k(cfg, active, per_expert, hidden, ffn, sm_count))


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
    inter = torch.empty(P, ffn, dtype=x.dtype, device=dev)
    return FusedPlan(T, H, E, ffn, k, P, BM, max_blocks, interpreted(x), acc, wts, sorted_ids, block_expert,
                     block_end, num_post, inter)


def fused_gate_up(plan: FusedPlan, x: torch.Tensor, w13: torch.Tensor, cfg: MoeConfig) -> None:
    """Gate-up GEMM with the SiLU-and-multiply epilogue into ``plan.inter``."""
    from lynxsim.calib.kernels import _moe_triton as kern

    assert cfg.block_m == plan.block_m
    grid1 = (plan.max_blocks * _cdiv(plan.F, cfg.block_n1),)
    kern._moe_gate_up_kernel[grid1](
        x, w13, plan.inter, plan.sorted_ids, plan.block_expert, plan.block_end, plan.num_post,
        plan.P, plan.F, plan.H, plan.max_blocks, plan.k, x.stride(0), w13.stride(0), w13.stride(1),
        plan.inter.stride(0), BLOCK_M=plan.block_m, BLOCK_N=cfg.block_n1, BLOCK_K=cfg.block_k1,
        EVEN_K=plan.H % cfg.block_k1 == 0, DOT_F32=plan.interp, num_warps=cfg.warps1, num_stages=cfg.stages1)


def fused_down(plan: FusedPlan, w2: torch.Tensor, cfg: MoeConfig) -> None:
    """Down GEMM, routing weights and per-token sum (split-K atomics) into ``plan.acc``."""
    from lynxsim.calib.kernels import _moe_triton as kern

    assert cfg.block_m == plan.block_m
    k_tiles = _cdiv(plan.F, cfg.block_k2)
    tiles_per_split = _cdiv(k_tiles, cfg.split_k)
    split = _cdiv(k_tiles, tiles_per_split)
    grid2 = (plan.max_blocks * _cdiv(plan.H, cfg.block_n2), split)
    kern._moe_down_kernel[grid2](
        plan.inter, w2, plan.acc, plan.wts, plan.sorted_ids, plan.block_expert, plan.block_end, plan.num_post,
        plan.P, plan.H, plan.F, plan.max_blocks, tiles_per_split, plan.k, plan.inter.stride(0), w2.stride(0),
        w2.stride(1), plan.acc.stride(0), BLOCK_M=plan.block_m, BLOCK_N=cfg.block_n2, BLOCK_K=cfg.block_k2,
        EVEN_K=plan.F % cfg.block_k2 == 0, DOT_F32=plan.interp, num_warps=cfg.warps2, num_stages=cfg.stages2)


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


def moe_active_weight_bytes(topk_ids: torch.Tensor, hidden: int, ffn: int, bytes_per_weight: int = 2) -> int:
    """Weight bytes an implementation must read for this routing: distinct experts x 3 x H x F x bytes.
    (Synchronises with the device: for reporting, not for timed code.)"""
    return int(torch.unique(topk_ids).numel()) * 3 * hidden * ffn * bytes_per_weight


__all__ = [
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
    "moe_grouped_gemm",
    "moe_reference",
]

