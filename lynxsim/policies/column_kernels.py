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

_BLOCK_COLUMNS = 2048
"""Batches are ranked together, as many as fit this many token columns (a decode run's iterations and every layer
of one): each ranking is then one long loop over all of them rather than one short loop per batch, whose fixed cost
(the loop's set-up and its scalar remainder) dominated a batch of a few dozen tokens (Lynx on 32 layers of 8
tokens: 31 us per call, 13 us ranked together; measured). 2,048 columns keep the kernel's arrays in L2."""


@njit(inline="always")
def _layout(logits: np.ndarray, first: int, count: int, x: np.ndarray) -> None:
    """Batches ``first .. first + count - 1`` (numbered ``layer * groups + g``) side by side in ``x [E, columns]``,
    in the logits' own dtype (float32 fills twice as many vector lanes as float64 and compares the same). Batches
    are not padded to a multiple of the vector width: the rankings run over the whole block, and padding a batch of
    1-4 tokens to 8 columns cost more than it saved (Lynx on 32 layers of one token: 7.3 us padded, 5.2 us not;
    measured)."""
    num_groups, num_tokens, num_experts = logits.shape[1], logits.shape[2], logits.shape[3]
    for b in range(count):
        layer, g = divmod(first + b, num_groups)
        base, end = _columns(b, num_tokens)
        for c in range(base, end):
            for e in range(num_experts):
                x[e, c] = logits[layer, g, c - base, e]


@njit(inline="always")
def _column_max(x: np.ndarray, columns: int, best: np.ndarray) -> None:
    """``best[c]``: the largest of column ``c`` (a token's largest logit), one pass over each expert's row."""
    for c in range(columns):
        best[c] = x[0, c]
    for e in range(1, x.shape[0]):
        for c in range(columns):
            best[c] = x[e, c] if x[e, c] > best[c] else best[c]


@njit(inline="always")
def _columns(b: int, num_tokens: int) -> tuple[np.uint64, np.uint64]:
    """The token columns of batch ``b`` of a block, first and past the last, unsigned: numba then indexes with
    them without checking for negative indices, which kept the loops over them from vectorizing (measured: 7x
    slower over 64 tokens)."""
    base = np.uint64(b * num_tokens)
    return base, base + np.uint64(num_tokens)


@njit(inline="always")
def _rank_descending(x: np.ndarray, rank: np.ndarray, columns: int) -> None:
    """``rank[e, c]``: how many experts of token column ``c`` come before ``e`` by ``x`` descending (logits, or
    Lynx's vote order), ties by lower id (``topk.topk_mask``'s order); distinct for the experts of one token, 0 for
    its first. Each pair of experts is compared once: of ``e < f``, ``f`` is ahead where its value is larger, else
    ``e`` (the values are finite)."""
    num_experts = x.shape[0]
    for e in range(num_experts):
        for c in range(columns):
            rank[e, c] = 0
    for e in range(num_experts):
        for f in range(e + 1, num_experts):
            for c in range(columns):
                later_ahead = x[f, c] > x[e, c]
                rank[e, c] += later_ahead
                rank[f, c] += not later_ahead


@njit(inline="always")
def _kth_largest(key: np.ndarray, k: int, columns: int, out: np.ndarray, second: np.ndarray,
                 rank: np.ndarray) -> None:
    """``out[c]``: the ``k``-th largest of column ``c``'s keys ``key[:, c]``, which are distinct. For k <= 2
    (Mixtral's top-2) a running maximum and second maximum, three operations per key; else the key ranked
    ``k - 1`` by ``_rank_descending`` into ``rank``, whose pairs cost more (``second`` and ``rank``: scratch, the
    latter ``[experts, columns]`` only for k > 2)."""
    num_experts = key.shape[0]
    if k > 2:
        _rank_descending(key, rank, columns)
        for e in range(num_experts):
            for c in range(columns):
                out[c] = key[e, c] if rank[e, c] == k - 1 else out[c]
        return
    for c in range(columns):
        out[c] = key[0, c]
        second[c] = np.iinfo(np.int32).min
    for e in range(1, num_experts):
        for c in range(columns):
            value = key[e, c]
            second[c] = max(second[c], min(out[c], value))
            out[c] = max(out[c], value)
    if k == 2:
        for c in range(columns):
            out[c] = second[c]


@njit(inline="always")
def _blocks(num_tokens: int, batches: int) -> int:
    """How many batches of ``num_tokens`` one block ranks together."""
    return max(1, min(batches, _BLOCK_COLUMNS // max(1, num_tokens)))


@njit(cache=True)
def topk_counts(logits: np.ndarray, top_k: int, counts: np.ndarray) -> bool:
    """``selection_kernels.topk_counts`` (same arguments, same result) by ranks over token columns."""
    if not _all_finite(logits):
        return False
    num_layers, num_groups, num_tokens, num_experts = logits.shape
    batches = num_layers * num_groups
    per_block = _blocks(num_tokens, batches)
    x = np.empty((num_experts, per_block * num_tokens), dtype=logits.dtype)
    rank = np.empty((num_experts, per_block * num_tokens), dtype=np.int32)
    for first in range(0, batches, per_block):
        count = min(per_block, batches - first)
        _layout(logits, first, count, x)
        _rank_descending(x, rank, count * num_tokens)
        for b in range(count):
            layer, g = divmod(first + b, num_groups)
            base, end = _columns(b, num_tokens)
            for e in range(num_experts):
                chosen = 0
                for t in range(base, end):
                    chosen += rank[e, t] < top_k
                counts[g, layer, e] += chosen
    return True


@njit(inline="always")
def _places(values: np.ndarray, count: int, place: np.ndarray) -> None:
    """``place[i]``: how many of ``values[:count]`` are smaller than ``values[i]``: equal values get equal places and
    a smaller value a smaller place, all the vote order needs of them. ``count`` is a batch's (expert, depth) pairs,
    16 for Mixtral's bins: counting every pair, with no branch, costs less than sorting them (an insertion sort was
    4% of a Mixtral run; perf)."""
    for i in range(count):
        smaller = 0
        for j in range(count):
            smaller += values[j] < values[i]
        place[i] = smaller


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
    by its place among the table's values (``_places``): the vote order is then one integer per (expert, token),
    ``place * E + (E - 1 - rank)``. A batch with depths past the bin table (where ``v`` is the token's own; no
    floor and logit gaps of hundreds) goes to ``selection_kernels.lynx_counts``. The re-pick inside the kept set
    is the first k kept experts in the token's own logit order: a token whose own top-k is all kept (a survivor)
    re-picks exactly it, so only the others (5-10% of the tokens in the quickstart's Lynx runs) walk their experts
    for the re-pick and its retained mass.

    The ranking by logit and the votes (each token's keys at or above its k-th largest, ``_kth_largest``) run over
    a block of batches at once; what is a batch's own (its depths, vote scores and table, its kept set, its counts
    and proxies) runs per batch."""
    if not _all_finite(logits):
        return False
    num_layers, num_groups, num_tokens, num_experts = logits.shape
    batches = num_layers * num_groups
    per_block = _blocks(num_tokens, batches)
    columns_max = per_block * num_tokens
    cap = bin_weight.size - 2  # depths deeper than cap all weigh bin_weight[cap + 1] = 0
    # Each column's values are written before they are read.
    x = np.empty((num_experts, columns_max), dtype=logits.dtype)
    best = np.empty(columns_max, dtype=logits.dtype)
    depth = np.empty((num_experts, columns_max), dtype=np.int32)  # -q, capped at cap + 1
    rank = np.empty((num_experts, columns_max), dtype=np.int32)  # by logit
    key = np.empty((num_experts, columns_max), dtype=np.int32)  # the vote order
    vote_rank = np.empty((num_experts, columns_max if top_k > 2 else 0), dtype=np.int32)  # experts ahead by vote
    vote_threshold = np.empty(columns_max, dtype=np.int32)  # each column's k-th largest key
    second = np.empty(columns_max, dtype=np.int32)
    column_scale = np.empty(columns_max)  # alpha of each column's layer
    column_floor = np.empty(columns_max)  # -beta
    column_deepest = np.empty(columns_max, dtype=np.int32)
    deep = np.zeros(per_block, dtype=np.bool_)  # batches past the bin table (the row kernel's)
    voted = np.zeros((per_block, num_experts), dtype=np.bool_)
    survived = np.empty(num_tokens, dtype=np.bool_)
    table = np.empty((cap + 2) * num_experts)  # v of [expert, depth], then its place
    place = np.empty((cap + 2) * num_experts, dtype=np.int64)
    order = np.empty(num_experts, dtype=np.int64)  # one token's experts by logit
    reference_exp = np.empty(top_k)
    for first in range(0, batches, per_block):
        count = min(per_block, batches - first)
        columns = count * num_tokens
        _layout(logits, first, count, x)
        _column_max(x, columns, best)
        _rank_descending(x, rank, columns)
        # Depths -q of the bins q = max(ceil(alpha * (L - max)), -beta) (numpy's operation order), capped; each
        # column's deepest.
        for b in range(count):
            layer = (first + b) // num_groups
            base, end = _columns(b, num_tokens)
            for c in range(base, end):
                column_scale[c] = alpha[layer]
                column_floor[c] = floor[layer]
        for c in range(columns):
            column_deepest[c] = 0
        for e in range(num_experts):
            for c in range(columns):
                q = np.ceil((np.float64(x[e, c]) - np.float64(best[c])) * column_scale[c])
                q = q if q > column_floor[c] else column_floor[c]
                d = np.int32(min(-q, cap + 1.0))
                depth[e, c] = d
                column_deepest[c] = max(column_deepest[c], d)
        for b in range(count):
            layer, g = divmod(first + b, num_groups)
            base, end = _columns(b, num_tokens)
            deepest = 0
            for t in range(base, end):
                deepest = max(deepest, column_deepest[t])
            deep[b] = deepest > cap
            if deep[b]:  # rare: through Python, so that the row kernel is compiled only if it runs
                with objmode():
                    _rows_lynx_counts(logits, layer, g, top_k, alpha, floor, bin_weight, counts, retained_mass,
                                      top1_kept, assignments_changed)
                continue
            # score[e]: tokens per depth times B ** -depth, shallowest first (lynx.vote_scores' order); v of each
            # (expert, depth) (one token: v = q = -d), and its place among them.
            depths = deepest + 1
            for e in range(num_experts):
                total_weight = 0.0
                if depths <= 2:  # tokens at depth 1 are the sum of the depths: one pass, not one per depth
                    deeper = 0
                    for t in range(base, end):
                        deeper += depth[e, t]
                    total_weight += (num_tokens - deeper) * bin_weight[0]
                    if depths == 2:
                        total_weight += deeper * bin_weight[1]
                else:
                    for d in range(depths):
                        at = 0
                        for t in range(base, end):
                            at += depth[e, t] == d
                        total_weight += at * bin_weight[d]
                for d in range(depths):
                    table[e * depths + d] = (total_weight - bin_weight[d]) / num_tokens - d if num_tokens > 1 else -d
            _places(table, depths * num_experts, place)
            for e in range(num_experts):
                if depths <= 2:  # (the usual: beta = 1) a select rather than a table read, so the loop vectorizes
                    shallow = place[e * depths] * num_experts + (num_experts - 1)
                    step = (place[e * depths + depths - 1] - place[e * depths]) * num_experts
                    for t in range(base, end):
                        key[e, t] = shallow + depth[e, t] * step - rank[e, t]
                    continue
                for t in range(base, end):
                    key[e, t] = place[e * depths + depth[e, t]] * num_experts + (num_experts - 1 - rank[e, t])
        # Votes: each token's top-k by that order, the keys at or above its k-th largest (its keys are distinct);
        # kept = the experts with a vote.
        _kth_largest(key, top_k, columns, vote_threshold, second, vote_rank)
        for b in range(count):
            if deep[b]:
                continue
            base, end = _columns(b, num_tokens)
            for e in range(num_experts):
                within = False
                for t in range(base, end):
                    within |= key[e, t] >= vote_threshold[t]
                voted[b, e] = within
        for b in range(count):
            if deep[b]:
                continue
            layer, g = divmod(first + b, num_groups)
            base, end = _columns(b, num_tokens)
            # Survivors: no expert of their own top-k went unvoted.
            for t in range(num_tokens):
                survived[t] = True
            for e in range(num_experts):
                if not voted[b, e]:
                    for c in range(base, end):
                        survived[c - base] &= rank[e, c] >= top_k
            # Counts of the survivors' own top-k and top1 (a token keeps its argmax when that is kept), from the
            # ranks; an unvoted expert is nobody's pick.
            top1 = 0
            for e in range(num_experts):
                if not voted[b, e]:
                    continue
                served = 0
                for c in range(base, end):
                    top1 += rank[e, c] == 0
                    served += survived[c - base] & (rank[e, c] < top_k)
                counts[g, layer, e] += served
            # The other tokens re-pick the first k kept experts in their own logit order, counted and their
            # retained mass summed token by token (1 for a survivor): both sums in descending order, as numpy
            # sums them, an expert in both sharing its value.
            changed = 0
            mass = 0.0
            for t in range(num_tokens):
                if survived[t]:
                    mass += 1.0
                    continue
                c = base + np.uint64(t)
                for e in range(num_experts):
                    order[rank[e, c]] = e
                reference_exp[0] = 1.0  # the argmax: exp(0.0), exactly
                reference_sum = 1.0
                for i in range(1, top_k):
                    reference_exp[i] = math.exp(np.float64(x[order[i], c]) - np.float64(best[c]))
                    reference_sum += reference_exp[i]
                chosen_sum = 0.0
                picked = 0
                for i in range(num_experts):  # kept holds >= k experts: every token voted k distinct ones
                    e = order[i]
                    if picked == top_k or not voted[b, e]:
                        continue
                    picked += 1
                    counts[g, layer, e] += 1
                    if i < top_k:
                        chosen_sum += reference_exp[i]
                    else:
                        chosen_sum += math.exp(np.float64(x[e, c]) - np.float64(best[c]))
                        changed += 1
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
