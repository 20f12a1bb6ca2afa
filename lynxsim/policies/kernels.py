"""What the engine needs from a policy each iteration, in one call: tokens per expert and the quality proxies.

The engine never looks at the ids and weights a policy picks, only at how many tokens each expert of each
layer serves (the cost model's input) and at the quality proxies. ``route_counts`` returns exactly those, as
``expert_token_counts(policy.select(...).expert_ids)`` and ``quality_proxies(...)`` would (or
``QualityProxies.of_topk`` for top-k, which is its own reference). For the policies that run on most
iterations, top-k (every batch with prefill, and the baseline) and Lynx, it runs fused numba kernels that skip
the intermediate arrays (``column_kernels`` up to ``COLUMN_EXPERTS`` experts, ``selection_kernels`` above); every
other policy, and every policy when numba is unavailable or switched off (``lynxsim.jit``), goes through
``select`` (``numpy_route_counts``).

It also routes several batches at once: logits ``[layers, groups, tokens, experts]`` hold ``groups``
independent batches (e.g. consecutive decode iterations of the same requests, whose logits one routing call
produced), each selected on its own, as ``select`` on ``logits[:, g]`` would.
"""

from __future__ import annotations

import math
from types import ModuleType

import numpy as np

from lynxsim.jit import kernels
from lynxsim.policies.activity import expert_token_counts
from lynxsim.policies.base import Policy
from lynxsim.policies.lynx import Lynx, bin_weights
from lynxsim.policies.params import require_layers
from lynxsim.policies.proxies import QualityProxies, quality_proxies
from lynxsim.policies.topk import TopK, check_top_k

COLUMN_EXPERTS = 16
"""Batches of at most this many experts go to ``column_kernels`` (every token ranked at once: 2.8x faster than
``selection_kernels`` for Lynx on Mixtral's 8 experts, measured); more, to ``selection_kernels``, whose
per-token ranking skips the experts that cannot make a token's top-k (the column kernels' cost grows with the
square of the expert count)."""


def route_counts(
    logits: np.ndarray, policy: Policy, top_k: int, renormalize: bool = True
) -> tuple[np.ndarray, QualityProxies]:
    """Tokens per expert and quality proxies of ``policy`` on ``logits``.

    ``logits [layers, tokens, experts]``: int32 counts ``[layers, experts]`` and proxies of shape ``[layers]``;
    ``logits [layers, groups, tokens, experts]``: counts ``[groups, layers, experts]`` and proxies
    ``[groups, layers]``, group ``g`` as if ``logits[:, g]`` had been routed alone. ``renormalize`` only
    matters to policies whose choice depends on weights. Raises what ``select`` raises for bad input
    (``top_k`` out of range, non-finite logits, per-layer parameters of the wrong length).
    """
    x = _grouped(logits)
    _, _, num_tokens, num_experts = x.shape
    check_top_k(top_k, num_experts)
    few_experts = num_experts <= COLUMN_EXPERTS
    fast = kernels("lynxsim.policies.column_kernels" if few_experts else "lynxsim.policies.selection_kernels")
    kind = type(policy)
    if fast is None or num_tokens == 0 or kind not in (TopK, Lynx):
        counts, proxies = numpy_route_counts(x, policy, top_k, renormalize)
    elif kind is TopK:
        counts, proxies = _topk(fast, x, top_k)
    else:
        assert isinstance(policy, Lynx)
        counts, proxies = _lynx(fast, x, policy, top_k)
    if np.ndim(logits) == 3:
        return counts[0], QualityProxies(*(p[0] for p in proxies))
    return counts, proxies


def numpy_route_counts(
    logits: np.ndarray, policy: Policy, top_k: int, renormalize: bool = True
) -> tuple[np.ndarray, QualityProxies]:
    """``route_counts`` of ``[layers, groups, tokens, experts]`` logits through ``policy.select``: the reference
    the kernels are tested against, and the path of every policy without a kernel."""
    num_layers, num_groups, _, num_experts = logits.shape
    counts = np.empty((num_groups, num_layers, num_experts), dtype=np.int32)
    proxies = QualityProxies(*(np.empty((num_groups, num_layers)) for _ in QualityProxies._fields))
    for g in range(num_groups):
        batch = logits[:, g]
        selection = policy.select(batch, top_k, renormalize=renormalize)
        counts[g] = expert_token_counts(selection.expert_ids, num_experts)
        scored = QualityProxies.of_topk(num_layers) if isinstance(policy, TopK) else quality_proxies(
            batch, selection, top_k
        )
        for out, value in zip(proxies, scored, strict=True):
            out[g] = value
    return counts, proxies


def _grouped(logits: np.ndarray) -> np.ndarray:
    """``logits`` as C-contiguous ``[layers, groups, tokens, experts]`` (one group for 3-D input), float32 or
    float64 as given (the kernels read either; other real dtypes become float64, as ``select`` makes them)."""
    x = np.asarray(logits)
    if x.ndim not in (3, 4):
        raise ValueError(
            f"logits must be [layers, tokens, experts] or [layers, groups, tokens, experts], got shape {x.shape}"
        )
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"logits must be real numbers, got dtype {x.dtype}")
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)
    if x.ndim == 3:
        x = x[:, None]
    return np.ascontiguousarray(x)


def _non_finite() -> ValueError:
    return ValueError("logits must be finite (found NaN or infinity)")


def _topk(fast: ModuleType, x: np.ndarray, top_k: int) -> tuple[np.ndarray, QualityProxies]:
    num_layers, num_groups, _, num_experts = x.shape
    counts = np.zeros((num_groups, num_layers, num_experts), dtype=np.int32)
    if not fast.topk_counts(x, top_k, counts):
        raise _non_finite()
    ones, zeros = np.ones((num_groups, num_layers)), np.zeros((num_groups, num_layers))
    return counts, QualityProxies(ones, ones.copy(), zeros, zeros.copy())


def _lynx(fast: ModuleType, x: np.ndarray, policy: Lynx, top_k: int) -> tuple[np.ndarray, QualityProxies]:
    num_layers, num_groups, num_tokens, num_experts = x.shape
    require_layers(policy.name, policy.num_layers, (num_layers, num_tokens, num_experts), "alpha/beta")
    alphas = policy.alpha if isinstance(policy.alpha, tuple) else (policy.alpha,) * num_layers
    betas = policy.beta if isinstance(policy.beta, tuple) else (policy.beta,) * num_layers
    alpha = np.array(alphas, dtype=np.float64)
    floor = np.array([-math.inf if b is None else -float(b) for b in betas])
    # One token has no popularity term and reads no bin weight: any table will do (read-only like the others,
    # so the kernel is compiled once for both).
    weights = bin_weights(max(num_tokens, 2))
    counts = np.zeros((num_groups, num_layers, num_experts), dtype=np.int32)
    retained, top1, changed = (np.empty((num_groups, num_layers)) for _ in range(3))
    if not fast.lynx_counts(
        x, top_k, alpha, floor, weights, counts, retained, top1, changed
    ):
        raise _non_finite()
    return counts, QualityProxies(retained, top1, changed, np.zeros((num_groups, num_layers)))
