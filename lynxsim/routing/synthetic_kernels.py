"""numba kernels of ``SyntheticRouting``: its logits and request means in one pass, bit for bit.

``SyntheticRouting`` computes with numpy in whole-array steps (hash, table read, scale, add, scale), each a
separate pass with its own per-call overhead; a decode iteration of a small batch spends most of its time
in that overhead. These kernels walk the output once and do the same float32 operations in the same order
(no ``fastmath``, so no reassociation and no fused multiply-adds), which makes their output identical to
the numpy path's bit for bit: the numpy path is the reference, and tests compare the two.

Imported only through ``lynxsim.jit.kernels`` (numba is heavy to import and may be switched off).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from lynxsim.routing.hashing import (
    _GOLDEN,
    _MUL1,
    _MUL2,
    EXP_COEFFICIENTS,
    EXP_LIMIT,
    EXP_REDUCTION,
    NORMALS_PER_WORD,
)
from lynxsim.routing.router import MASKED_GAP

_MASKED_GAP = np.float32(MASKED_GAP)
_U_GOLDEN = np.uint64(_GOLDEN)
_U_MUL1 = np.uint64(_MUL1)
_U_MUL2 = np.uint64(_MUL2)
_U_MASK16 = np.uint64(0xFFFF)
_INV_LN2, _LN2_HI, _LN2_LO = EXP_REDUCTION
_EXP_LEADING = EXP_COEFFICIENTS[0]
_EXP_REST = EXP_COEFFICIENTS[1:]


@njit(inline="always")
def _mix64(z: np.uint64) -> np.uint64:
    """splitmix64's finalizer (``hashing._mix64_inplace``) on one word; uint64 arithmetic wraps."""
    z = (z ^ (z >> np.uint64(30))) * _U_MUL1
    z = (z ^ (z >> np.uint64(27))) * _U_MUL2
    return z ^ (z >> np.uint64(31))


@njit(inline="always")
def _chain(key: np.uint64, word: int) -> np.uint64:
    """``hashing.combine`` of one key and one (signed, reinterpreted modulo 2**64) word."""
    return _mix64(key + np.uint64(word) * _U_GOLDEN)


@njit(inline="always")
def _quarter(word: np.uint64, quarter: int) -> np.uint64:
    """Bits ``16 * quarter`` to ``16 * quarter + 15`` of ``word``: the table index of its ``quarter``-th normal."""
    return (word >> np.uint64(16 * quarter)) & _U_MASK16


_EXPONENT_BIAS = np.int64(1023)
_MANTISSA_BITS = np.int64(52)


@njit(inline="always")
def _exp_exact(x: np.ndarray, exponent: np.ndarray, polynomial: np.ndarray, out: np.ndarray) -> None:
    """``out[i] = float32(hashing.exp_exact(x[i]))``, the same float64 operations in the same order, for every
    ``i`` (every token's scales in every layer; ``x`` is overwritten, ``exponent`` and ``polynomial`` are
    scratch of its size).

    ``exp_exact`` reads ``2**k`` from ``POWERS_OF_TWO``; here it is built from its bits, ``(k + 1023) << 52``,
    the same float64 (``|k| <= 1010`` after the clamp, a normal number), since a table read in each lane would
    keep the loop scalar. Horner's rule runs one coefficient at a time over all ``i``, as numpy runs it: each
    step is then a loop over the elements that vectorizes, where a loop over the coefficients inside each
    element's did not (the exponential was half the time of a Mixtral token's logits; measured)."""
    for i in range(x.size):
        v = x[i]
        v = v if v > -EXP_LIMIT else -EXP_LIMIT
        v = v if v < EXP_LIMIT else EXP_LIMIT
        k = np.floor(v * _INV_LN2 + 0.5)
        x[i] = (v - k * _LN2_HI) - k * _LN2_LO
        polynomial[i] = _EXP_LEADING
        exponent[i] = (np.int64(k) + _EXPONENT_BIAS) << _MANTISSA_BITS
    for c in _EXP_REST:
        for i in range(x.size):
            polynomial[i] = polynomial[i] * x[i] + c
    powers = exponent.view(np.float64)
    for i in range(x.size):
        out[i] = np.float32(polynomial[i] * powers[i])


@njit(inline="always")
def _sigmoid_exact(x: np.float32, work: np.ndarray, exponent: np.ndarray, polynomial: np.ndarray,
                   out: np.ndarray) -> np.float32:
    """``router.sigmoid_exact`` of one float32: ``exp_exact(-x)`` rounded to float32, then ``1 / (1 + e)``."""
    work[0] = -np.float64(x)
    _exp_exact(work, exponent, polynomial, out)
    return np.float32(1.0) / (np.float32(1.0) + out[0])


@njit(inline="always")
def _limit_groups(row: np.ndarray, num_groups: int, topk_groups: int, score_code: int,
                  scores: np.ndarray, kept: np.ndarray, work: np.ndarray, exponent: np.ndarray,
                  polynomial: np.ndarray, out: np.ndarray) -> None:
    """``lynxsim.routing.router.GroupLimit.apply`` on one token's logits ``row [E]``, in place, with the same
    float32 operations: group scores (best logit, or the sum of the two best sigmoid scores), the best
    ``topk_groups`` groups (ties to the lower index), every other expert set to the row's best logit minus
    ``MASKED_GAP``."""
    size = row.size // num_groups
    best = row[0]
    for e in range(1, row.size):
        if row[e] > best:
            best = row[e]
    for g in range(num_groups):
        first = row[g * size]
        second = np.float32(-np.inf)
        for e in range(g * size + 1, (g + 1) * size):
            v = row[e]
            if v > first:
                second = first
                first = v
            elif v > second:
                second = v
        if score_code == 0:
            scores[g] = first
        else:
            low = _sigmoid_exact(second, work, exponent, polynomial, out)
            scores[g] = low + _sigmoid_exact(first, work, exponent, polynomial, out)
        kept[g] = False
    for _ in range(topk_groups):
        pick = -1
        for g in range(num_groups):
            if not kept[g] and (pick < 0 or scores[g] > scores[pick]):
                pick = g
        kept[pick] = True
    floor = best - _MASKED_GAP
    for g in range(num_groups):
        if not kept[g]:
            for e in range(g * size, (g + 1) * size):
                row[e] = floor


@njit(cache=True)
def fill_logits(
    requests: np.ndarray,
    positions: np.ndarray,
    slots: np.ndarray,
    means: np.ndarray,
    token_key: np.uint64,
    confidence_key: np.uint64,
    token_weight: np.ndarray,
    log_scale_spread: np.ndarray,
    log_scale_offset: np.ndarray,
    table: np.ndarray,
    out: np.ndarray,
    num_groups: int = 1,
    topk_groups: int = 1,
    group_score: int = 0,
) -> None:
    """``out[l, t, e] = (z_tok * token_weight[l] + means[slots[t], l, e]) * s[l, t]`` in float32, then, with
    ``num_groups`` > 1, each token's experts outside its best ``topk_groups`` groups masked
    (``lynxsim.routing.router``; ``group_score`` 0 scores a group by its best logit, 1 by the sum of its two best
    sigmoid scores).

    ``requests``/``positions``/``slots``: int64 ``[T]``; ``means``: float32 ``[P, L, E]`` (request means, or
    the bias alone as ``[1, L, E]``); ``token_weight``: float32 ``[L]``; ``log_scale_*``: float64 ``[L]``;
    ``table``: ``hashing.NORMAL_TABLE``; ``out``: float32 ``[L, T, E]``. The token and confidence normals are
    hashed exactly as ``SyntheticRouting``'s numpy path hashes them (see there for the layout of the words).
    """
    group_scores = np.empty(max(num_groups, 1), dtype=np.float32)
    kept = np.empty(max(num_groups, 1), dtype=np.bool_)
    sigmoid_work = np.empty(1)
    sigmoid_exponent = np.empty(1, dtype=np.int64)
    sigmoid_polynomial = np.empty(1)
    sigmoid_out = np.empty(1, dtype=np.float32)
    num_layers, num_tokens, num_experts = out.shape
    words = (num_experts + NORMALS_PER_WORD - 1) // NORMALS_PER_WORD
    token_key = np.uint64(token_key)
    confidence_key = np.uint64(confidence_key)
    # Every token's scale in every layer first, all exponentials in one pass (a pass per token, inside the token
    # loop, took and released references to its arrays on every token: numba's reference counting fell from 9% to
    # 4% of a top-k run without it), then the logits.
    scale = np.empty(num_tokens * num_layers, dtype=np.float32)
    log_scale = np.empty(num_tokens * num_layers)
    exponent = np.empty(num_tokens * num_layers, dtype=np.int64)
    polynomial = np.empty(num_tokens * num_layers)
    keys = np.empty(num_tokens, dtype=np.uint64)
    for t in range(num_tokens):
        key = _chain(_chain(token_key, requests[t]), positions[t])
        keys[t] = key
        confidence_word_key = _mix64(confidence_key + key * _U_GOLDEN)
        for w in range((num_layers + NORMALS_PER_WORD - 1) // NORMALS_PER_WORD):
            confidence_word = _chain(confidence_word_key, w)
            for q in range(NORMALS_PER_WORD):
                layer = NORMALS_PER_WORD * w + q
                if layer < num_layers:
                    n = table[_quarter(confidence_word, q)]
                    log_scale[t * num_layers + layer] = (log_scale_spread[layer] * np.float64(n)
                                                         + log_scale_offset[layer])
    _exp_exact(log_scale, exponent, polynomial, scale)
    for t in range(num_tokens):
        key = keys[t]
        slot = slots[t]
        for layer in range(num_layers):
            weight = token_weight[layer]
            s = scale[t * num_layers + layer]
            for j in range(words):
                word = _chain(key, layer * words + j)
                for q in range(NORMALS_PER_WORD):
                    e = NORMALS_PER_WORD * j + q
                    if e < num_experts:
                        out[layer, t, e] = (table[_quarter(word, q)] * weight + means[slot, layer, e]) * s
            if num_groups > 1:
                _limit_groups(out[layer, t], num_groups, topk_groups, group_score, group_scores, kept,
                              sigmoid_work, sigmoid_exponent, sigmoid_polynomial, sigmoid_out)


@njit(cache=True)
def fill_request_means(
    requests: np.ndarray,
    request_key: np.uint64,
    bias: np.ndarray,
    request_weight: np.ndarray,
    table: np.ndarray,
    out: np.ndarray,
    slots: np.ndarray,
) -> None:
    """``out[slots[i], l, e] = z_req * request_weight[l] + bias[l, e]`` in float32 for request ``requests[i]``.

    ``requests``/``slots``: int64 ``[R]``; ``bias``: float32 ``[L, E]``; ``request_weight``: float32 ``[L]``;
    ``out``: float32 ``[P, L, E]``, written only at the given slots.
    """
    num_layers, num_experts = bias.shape
    words = (num_experts + NORMALS_PER_WORD - 1) // NORMALS_PER_WORD
    request_key = np.uint64(request_key)
    for i in range(requests.size):
        key = _chain(request_key, requests[i])
        dest = out[slots[i]]
        for layer in range(num_layers):
            weight = request_weight[layer]
            for j in range(words):
                word = _chain(key, layer * words + j)
                for q in range(NORMALS_PER_WORD):
                    e = NORMALS_PER_WORD * j + q
                    if e < num_experts:
                        dest[layer, e] = table[_quarter(word, q)] * weight + bias[layer, e]
