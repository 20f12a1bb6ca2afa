"""numba kernels of ``route_counts`` for few experts (Mixtral's 8): each batch ranked as columns, all tokens at once.

``selection_kernels`` walks a batch token by token, ranking each token's experts on their own. With 8 experts and
top-2 that ranking is a few dozen comparisons, and the per-token bookkeeping around it (a running top-k held in
arrays, whose every update waits for the previous one through memory, or a branch on whether an expert enters,
mispredicted about half the time) costs more than the comparisons: 150 ns per token and layer for Lynx's three
rankings (measured). Here a batch is transposed to ``[experts, tokens]`` and every ranking is a *rank*: for each
expert, how many of the token's experts are ahead of it, counted over all tokens of the batch at once. Each
count is a loop over tokens with no branch and no dependence between tokens, which the compiler vectorizes, and
the rest of Lynx (bins, votes, the kept set, the re-pick, the proxies) follows from integer ranks: an expert is
in a token's top-k when fewer than k are ahead of it.

The decisions and the floating-point operations that produce a compared or reported value are those of
``selection_kernels`` (and so of ``topk.py`` and ``lynx.py``), in the same order: the counts and proxies are
identical to its results bit for bit. The cost grows with the square of the expert count, so ``route_counts``
uses these kernels up to ``kernels.COLUMN_EXPERTS`` experts only. Imported only through ``lynxsim.jit.kernels``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, objmode

from lynxsim.policies import selection_kernels as rows
from lynxsim.policies.selection_kernels import _all_finite

_LANES = 8
"""Token columns are padded to a multiple of this (zeros, never read back): the vectorized loops then have no
scalar remainder."""


@njit(inline="always")
def _transpose(batch: np.ndarray, x: np.ndarray) -> None:
    """``x[e, t] = batch[t, e]``, in the logits' own dtype: float32 logits fill twice as many vector lanes as
    float64, and compare the same."""
    num_tokens, num_experts = batch.shape
    for t in range(num_tokens):
        for e in range(num_experts):
            x[e, t] = batch[t, e]


@njit(inline="always")
def _column_max(x: np.ndarray, num_tokens: int, best: np.ndarray) -> None:
    """``best[t]``: token ``t``'s largest logit."""
    for t in range(num_tokens):
        best[t] = x[0, t]
    for e in range(1, x.shape[0]):
        row = x[e]
        for t in range(num_tokens):
            best[t] = row[t] if row[t] > best[t] else best[t]


@njit(inline="always")
def _rank_by_logit(x: np.ndarray, rank: np.ndarray, width: int) -> None:
    """``rank[e, t]``: how many experts of token ``t`` come before ``e`` by logit descending, ties by lower id
    (``topk.topk_mask``'s order); distinct for the experts of one token, 0 for its first argmax."""
    num_experts = x.shape[0]
    for e in range(num_experts):
        ahead = rank[e]
        own = x[e]
        for t in range(width):
            ahead[t] = 0
        for f in range(e):  # lower ids win ties
            other = x[f]
            for t in range(width):
                ahead[t] += other[t] >= own[t]
        for f in range(e + 1, num_experts):
            other = x[f]
            for t in range(width):
                ahead[t] += other[t] > own[t]


@njit(cache=True)
def topk_counts(logits: np.ndarray, top_k: int, counts: np.ndarray) -> bool:
    """``selection_kernels.topk_counts`` (same arguments, same result) by ranks over token columns."""
    if not _all_finite(logits):
        return False
    num_layers, num_groups, num_tokens, num_experts = logits.shape
    width = -(-num_tokens // _LANES) * _LANES
    x = np.zeros((num_experts, width), dtype=logits.dtype)
    rank = np.empty((num_experts, width), dtype=np.int32)
    for layer in range(num_layers):
        for g in range(num_groups):
            _transpose(logits[layer, g], x)
            _rank_by_logit(x, rank, width)
            for e in range(num_experts):
                ahead = rank[e]
                chosen = 0
                for t in range(num_tokens):
                    chosen += ahead[t] < top_k
                counts[g, layer, e] += chosen
    return True


@njit(inline="always")
def _order(values: np.ndarray, count: int, index: np.ndarray, order: np.ndarray) -> None:
    """``order[i]``: the place of ``values[i]`` among the distinct values of ``values[:count]``, ascending (equal
    values, equal places). An insertion sort of ``index``: ``count`` is a batch's (expert, depth) pairs, 16 for
    Mixtral's bins, where a library sort's allocation and call would cost more."""
    for i in range(count):
        j = i
        while j > 0 and values[index[j - 1]] > values[i]:
            index[j] = index[j - 1]
            j -= 1
        index[j] = i
    place = 0
    for i in range(count):
        if i and values[index[i]] > values[index[i - 1]]:
            place += 1
        order[index[i]] = place


@njit(cache=True)
def lynx_counts(
    logits: np.ndarray,
    top_k: int,
    alpha: np.ndarray,
    floor: np.ndarray,
    bin_weight: np.ndarray,
    counts: np.ndarray,
    retained_mass: np.ndarray,
    top1_kept: np.ndarray,
    assignments_changed: np.ndarray,
) -> bool:
    """``selection_kernels.lynx_counts`` (same arguments, same results) by ranks over token columns.

    With ``rank[e, t]``, expert ``e``'s place in token ``t``'s own order by logit: a token votes for its experts
    by ``v`` descending, ties by that rank. ``v = (score[e] - B ** -d) / B - d`` depends on the token only through
    its depth ``d`` of the expert, so it is tabulated per batch as ``[expert, depth]`` and each table entry replaced
    by its place among the table's values: the vote order is then one integer per (expert, token),
    ``place * E + (E - 1 - rank)``. A batch with depths past the bin table (where ``v`` is the token's own; no
    floor and logit gaps of hundreds) goes to ``selection_kernels.lynx_counts``. The re-pick inside the kept set
    is the kept experts with the fewest kept experts ahead by logit; a token whose own top-k is all kept (a
    survivor) re-picks exactly it. Only the retained mass of the other tokens needs their experts in order."""
    if not _all_finite(logits):
        return False
    num_layers, num_groups, num_tokens, num_experts = logits.shape
    width = -(-num_tokens // _LANES) * _LANES
    cap = bin_weight.size - 2  # depths deeper than cap all weigh bin_weight[cap + 1] = 0
    x = np.zeros((num_experts, width), dtype=logits.dtype)
    best = np.zeros(width, dtype=logits.dtype)
    depth = np.zeros((num_experts, width), dtype=np.int32)  # -q, capped at cap + 1
    rank = np.zeros((num_experts, width), dtype=np.int32)  # by logit
    key = np.zeros((num_experts, width), dtype=np.int32)  # the vote order
    ahead = np.empty(width, dtype=np.int32)
    kept_rank = np.empty((num_experts, width), dtype=np.int32)  # kept experts ahead by logit
    survived = np.empty(num_tokens, dtype=np.bool_)
    score = np.empty(num_experts)
    table = np.empty(2 * num_experts)  # v of [expert, depth], then its place; grown to the batch's depths
    index = np.empty(2 * num_experts, dtype=np.int64)
    place = np.empty(2 * num_experts, dtype=np.int64)
    voted = np.empty(num_experts, dtype=np.bool_)
    reference = np.empty(top_k + 1, dtype=np.int64)  # one token's own top-k in order (last slot: the others)
    chosen = np.empty(top_k + 1, dtype=np.int64)  # and its re-pick
    reference_exp = np.empty(top_k)
    for layer in range(num_layers):
        scale = alpha[layer]
        lowest = floor[layer]
        for g in range(num_groups):
            # Depths -q of the bins q = max(ceil(alpha * (L - max)), -beta) (numpy's operation order), capped.
            _transpose(logits[layer, g], x)
            _column_max(x, num_tokens, best)
            deepest = 0
            for e in range(num_experts):
                row = x[e]
                bins = depth[e]
                for t in range(num_tokens):
                    q = np.ceil((np.float64(row[t]) - np.float64(best[t])) * scale)
                    q = q if q > lowest else lowest
                    bins[t] = np.int32(min(-q, cap + 1.0))
                for t in range(num_tokens):
                    deepest = max(deepest, bins[t])
            if deepest > cap:  # rare: through Python, so that the row kernel is compiled only if it runs
                with objmode():
                    _rows_lynx_counts(logits, layer, g, top_k, alpha, floor, bin_weight, counts, retained_mass,
                                      top1_kept, assignments_changed)
                continue
            _rank_by_logit(x, rank, width)
            # score[e]: tokens per depth times B ** -depth, shallowest first (lynx.vote_scores' order); v of each
            # (expert, depth) (one token: v = q = -d), and its place among them.
            depths = deepest + 1
            if table.size < depths * num_experts:
                table = np.empty(depths * num_experts)
                index = np.empty(depths * num_experts, dtype=np.int64)
                place = np.empty(depths * num_experts, dtype=np.int64)
            for e in range(num_experts):
                bins = depth[e]
                total_weight = 0.0
                if depths <= 2:  # tokens at depth 1 are the sum of the depths: one pass, not one per depth
                    deeper = 0
                    for t in range(num_tokens):
                        deeper += bins[t]
                    total_weight += (num_tokens - deeper) * bin_weight[0]
                    if depths == 2:
                        total_weight += deeper * bin_weight[1]
                else:
                    for d in range(depths):
                        at = 0
                        for t in range(num_tokens):
                            at += bins[t] == d
                        total_weight += at * bin_weight[d]
                score[e] = total_weight
                for d in range(depths):
                    table[e * depths + d] = (score[e] - bin_weight[d]) / num_tokens - d if num_tokens > 1 else -d
            _order(table, depths * num_experts, index, place)
            for e in range(num_experts):
                bins = depth[e]
                own_rank = rank[e]
                order = key[e]
                if depths <= 2:  # (the usual: beta = 1) a select rather than a table read, so the loop vectorizes
                    shallow = place[e * depths] * num_experts + (num_experts - 1)
                    step = (place[e * depths + depths - 1] - place[e * depths]) * num_experts
                    for t in range(num_tokens):
                        order[t] = shallow + bins[t] * step - own_rank[t]
                    continue
                for t in range(num_tokens):
                    order[t] = place[e * depths + bins[t]] * num_experts + (num_experts - 1 - own_rank[t])
            # Votes: each token's top-k by that order; kept = the experts with a vote.
            for e in range(num_experts):
                own = key[e]
                for t in range(width):
                    ahead[t] = 0
                for f in range(num_experts):  # f == e adds 0
                    other = key[f]
                    for t in range(width):
                        ahead[t] += other[t] > own[t]
                within = False
                for t in range(num_tokens):
                    within |= ahead[t] < top_k
                voted[e] = within
            # Survivors: no expert of their own top-k went unvoted.
            all_survived = True
            for t in range(num_tokens):
                survived[t] = True
            for e in range(num_experts):
                if not voted[e]:
                    own_rank = rank[e]
                    for t in range(num_tokens):
                        survived[t] &= own_rank[t] >= top_k
            for t in range(num_tokens):
                all_survived &= survived[t]
            # The re-pick's ranks among the kept experts; counts, top1 (a token keeps its argmax when that is
            # kept) and changed assignments from the ranks. An unvoted expert is nobody's pick.
            top1 = 0
            changed = 0
            for e in range(num_experts):
                if not voted[e]:
                    continue
                own_rank = rank[e]
                served = 0
                for t in range(num_tokens):
                    top1 += own_rank[t] == 0
                if all_survived:
                    for t in range(num_tokens):
                        served += own_rank[t] < top_k
                    counts[g, layer, e] += served
                    continue
                kept_ahead = kept_rank[e]
                for t in range(width):
                    kept_ahead[t] = 0
                for f in range(num_experts):  # f == e adds 0
                    if voted[f]:
                        other_rank = rank[f]
                        for t in range(width):
                            kept_ahead[t] += other_rank[t] < own_rank[t]
                for t in range(num_tokens):
                    picked = (own_rank[t] < top_k) if survived[t] else (kept_ahead[t] < top_k)
                    served += picked
                    changed += picked & (own_rank[t] >= top_k)
                counts[g, layer, e] += served
            # Retained mass, token by token: 1 for a survivor; else both sums in descending order, as numpy
            # sums them, an expert in both sharing its value.
            mass = 0.0
            for t in range(num_tokens):
                if survived[t]:
                    mass += 1.0
                    continue
                for e in range(num_experts):
                    reference[min(rank[e, t], top_k)] = e
                    chosen[min(kept_rank[e, t], top_k) if voted[e] else top_k] = e
                reference_sum = 0.0
                for i in range(top_k):
                    reference_exp[i] = math.exp(np.float64(x[reference[i], t]) - np.float64(best[t]))
                    reference_sum += reference_exp[i]
                chosen_sum = 0.0
                for i in range(top_k):
                    e = chosen[i]
                    own = rank[e, t]
                    chosen_sum += (
                        reference_exp[own] if own < top_k else math.exp(np.float64(x[e, t]) - np.float64(best[t]))
                    )
                mass += chosen_sum / reference_sum
            retained_mass[g, layer] = mass / num_tokens
            top1_kept[g, layer] = top1 / num_tokens
            assignments_changed[g, layer] = changed / (num_tokens * top_k)
    return True


def _rows_lynx_counts(
    logits: np.ndarray, layer: int, g: int, top_k: int, alpha: np.ndarray, floor: np.ndarray,
    bin_weight: np.ndarray, counts: np.ndarray, retained_mass: np.ndarray, top1_kept: np.ndarray,
    assignments_changed: np.ndarray,
) -> None:
    """``selection_kernels.lynx_counts`` of one layer and group, into their slices of the outputs: the column
    kernel's way out for a batch deeper than the bin table. Called from object mode (``objmode``): the row kernel,
    as large as the column one, is compiled the first time a run needs it rather than with every loop (5 s of a
    cold start)."""
    rows.lynx_counts(
        np.ascontiguousarray(logits[layer : layer + 1, g : g + 1]), top_k,
        alpha[layer : layer + 1], floor[layer : layer + 1], bin_weight,
        counts[g : g + 1, layer : layer + 1], retained_mass[g : g + 1, layer : layer + 1],
        top1_kept[g : g + 1, layer : layer + 1], assignments_changed[g : g + 1, layer : layer + 1],
    )
