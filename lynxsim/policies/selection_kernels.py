"""numba kernels of ``route_counts`` for the hot policies, top-k and Lynx: selection, counting and proxies fused.

The numpy policies build every intermediate ([layers, tokens, experts] bins, votes, masks, ids, weights) as
whole arrays and then count and score them in further passes; for a decode batch of a few dozen tokens the
per-call overhead of those passes is most of the time. These kernels walk one (layer, batch) at a time and
keep only what the engine needs: tokens per expert and the quality proxies (no weights: nothing downstream
of the counts reads them).

They follow ``topk.py`` and ``lynx.py`` decision for decision, with the same float64 arithmetic in the same
order wherever a value is compared (Lynx's bins ``q``, bin weights, scores and vote scores ``v``), so the
counts are identical to the numpy path's, and so are the proxies but the retained mass, whose exponentials
are summed in another order than numpy's pairwise sums (it may differ in the last bits; tests allow 1e-6).
Where they rank experts, they rank only those that can make the top k (``_cut``, and Lynx's depth classes,
see ``lynx_counts``). Imported only through ``lynxsim.jit.kernels``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

_RANKED = 32
"""``_select`` ranks up to this many experts directly; more are first cut down to those above a lower bound."""


@njit(inline="always")
def _rank_select(
    primary: np.ndarray, secondary: np.ndarray, ids_of: np.ndarray, count: int, k: int, out: np.ndarray
) -> None:
    """The best ``k`` of ``count`` experts (``primary[i]``, ``secondary[i]``, ``ids_of[i]``: contiguous, ids
    increasing) by ``primary`` descending, ties by ``secondary`` descending, then by lower id (``topk.topk_mask``'s
    order), into ``out[:k]``, best first (``out`` has ``k + 1`` slots, the last collecting the others).
    ``secondary`` may be ``primary`` itself: ties then go to the lower id.

    An expert's rank is the number of experts ahead of it: ``count**2`` comparisons with no data-dependent branch,
    which vectorize. Ranking by insertion into a sorted list takes fewer comparisons but mispredicts a branch on
    most insertions, which on fresh logits made it 2-4x slower for 8 to 32 experts (measured)."""
    for i in range(count):
        p = primary[i]
        s = secondary[i]
        ahead = 0
        for j in range(count):
            q = primary[j]
            r = secondary[j]
            ahead += (q > p) | ((q == p) & ((r > s) | ((r == s) & (j < i))))
        out[min(ahead, k)] = ids_of[i]


@njit(inline="always")
def _cut(
    primary: np.ndarray,
    secondary: np.ndarray,
    ids_of: np.ndarray,
    count: int,
    k: int,
    cut_primary: np.ndarray,
    cut_secondary: np.ndarray,
    cut_ids: np.ndarray,
) -> int:
    """Copies the experts that may be among the ``k`` best (``count >= 4k``) into the ``cut_*`` arrays, in order,
    and returns how many: those at or above a lower bound of the k-th best ``primary``, the smallest of the maxima
    of ``k`` disjoint blocks (``k`` distinct experts reach it). About 21 of 256 for top-8 of normal logits. Each
    block's maximum runs in four independent chains (a maximum is exact in any order), and the copy has no
    branch."""
    size = count // k
    bound = np.inf
    for b in range(k):
        m0 = m1 = m2 = m3 = -np.inf
        i = b * size
        end = i + size
        while i + 3 < end:
            m0 = max(m0, primary[i])
            m1 = max(m1, primary[i + 1])
            m2 = max(m2, primary[i + 2])
            m3 = max(m3, primary[i + 3])
            i += 4
        while i < end:
            m0 = max(m0, primary[i])
            i += 1
        bound = min(bound, max(max(m0, m1), max(m2, m3)))
    n = 0
    for i in range(count):
        cut_primary[n] = primary[i]
        cut_secondary[n] = secondary[i]
        cut_ids[n] = ids_of[i]
        n += primary[i] >= bound
    return n


@njit(inline="always")
def _select(
    primary: np.ndarray,
    secondary: np.ndarray,
    ids_of: np.ndarray,
    count: int,
    k: int,
    out: np.ndarray,
    cut_primary: np.ndarray,
    cut_secondary: np.ndarray,
    cut_ids: np.ndarray,
) -> None:
    """``_rank_select`` of ``count >= k`` experts, after ``_cut`` when there are many."""
    if count > _RANKED and count >= 4 * k:
        found = _cut(primary, secondary, ids_of, count, k, cut_primary, cut_secondary, cut_ids)
        _rank_select(cut_primary, cut_secondary, cut_ids, found, k, out)
    else:
        _rank_select(primary, secondary, ids_of, count, k, out)


@njit(inline="always")
def _row_max(row: np.ndarray) -> float:
    """The largest of ``row``, in four independent running maxima (one would chain every comparison to the
    last; the maximum is exact, so the grouping cannot change it)."""
    n = row.size
    m0 = m1 = m2 = m3 = -np.inf
    for i in range(0, n - 3, 4):
        m0 = max(m0, row[i])
        m1 = max(m1, row[i + 1])
        m2 = max(m2, row[i + 2])
        m3 = max(m3, row[i + 3])
    for i in range(n - n % 4, n):
        m0 = max(m0, row[i])
    return max(max(m0, m1), max(m2, m3))


@njit(inline="always")
def _count_within(depth: np.ndarray, reach: int) -> int:
    """How many of ``depth`` are ``<= reach`` (a loop that vectorizes)."""
    n = 0
    for i in range(depth.size):
        n += depth[i] <= reach
    return n


@njit(inline="always")
def _all_finite(x: np.ndarray) -> bool:
    """Whether every value of ``x`` is finite; no early exit, so that the loop vectorizes (about 20x faster)."""
    flat = x.reshape(-1)
    bad = False
    for i in range(flat.size):
        bad |= not math.isfinite(flat[i])
    return not bad


@njit(cache=True)
def topk_counts(logits: np.ndarray, top_k: int, counts: np.ndarray) -> bool:
    """Tokens per expert of plain top-k: ``counts[g, l, e] += 1`` for each of each token's ``top_k`` best experts
    of batch ``logits[l, g]`` (``[layers, groups, tokens, experts]``). ``False`` (nothing counted) if a logit
    is not finite."""
    if not _all_finite(logits):
        return False
    num_layers, num_groups, num_tokens, num_experts = logits.shape
    everyone = np.arange(num_experts)
    ids = np.empty(top_k + 1, dtype=np.int64)
    cut_p = np.empty(num_experts, dtype=logits.dtype)
    cut_s = np.empty(num_experts, dtype=logits.dtype)
    cut_ids = np.empty(num_experts, dtype=np.int64)
    for layer in range(num_layers):
        for g in range(num_groups):
            for t in range(num_tokens):
                row = logits[layer, g, t]
                _select(row, row, everyone, num_experts, top_k, ids, cut_p, cut_s, cut_ids)
                for i in range(top_k):
                    counts[g, layer, ids[i]] += 1
    return True


_COUNTED_DEPTHS = 16
"""``lynx_counts`` counts tokens per depth in one vectorized pass per depth when the batch's depths stay below
this one (else in a scalar histogram), and looks for a token's depth ``D`` among these depths only (else it ranks
all the token's experts). Lynx's floors are small (beta <= 4 for every published model with one), so both are
rare."""


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
    """Lynx (``lynx.Lynx.select``) on each batch ``logits[l, g]`` of ``[layers, groups, tokens, experts]``:
    tokens per expert into ``counts[g, l]`` and the proxies of ``proxies.quality_proxies`` into the ``[g, l]``
    entries of the three proxy arrays (Lynx drops no slot, so ``assignments_dropped`` is 0 and not computed).

    ``alpha``/``floor``: float64 ``[layers]``, the bins' scale and floor ``-beta`` (``-inf`` for none);
    ``bin_weight``: ``lynx.bin_weights(tokens)`` (``bin_weights(2)`` for one token, whose weights are not read).
    ``False`` (nothing computed) if a logit is not finite.

    Every ranking of a token (its votes by ``v``, its own top-k by logit, its top-k inside the kept set) looks
    only at its experts of depth ``<= D``, the smallest depth that holds ``k`` of them: ranking by ``v``
    orders experts by depth first (``v`` lies in ``[-d, -d + 1)`` for depth ``d``, the popularity term being
    below ``(B - 1) / B``, far from 1 in float64), and so does ranking by logit (the depth is a non-increasing
    function of the logit). About 29 of 256 experts for DeepSeek-V3's top-8 at alpha 1, beta 2; with 32 experts
    or fewer, all of them."""
    if not _all_finite(logits):
        return False
    num_layers, num_groups, num_tokens, num_experts = logits.shape
    cap = bin_weight.size - 2  # depths deeper than cap all weigh bin_weight[cap + 1] = 0
    x = np.empty((num_tokens, num_experts))
    depth = np.empty((num_tokens, num_experts), dtype=np.int64)
    row_max = np.empty(num_tokens)
    shallow = np.empty((num_tokens, num_experts), dtype=np.int64)  # each token's experts of depth <= D
    num_shallow = np.empty(num_tokens, dtype=np.int64)
    score = np.zeros(num_experts)
    voted = np.empty(num_experts, dtype=np.bool_)
    kept = np.empty(num_experts, dtype=np.int64)
    ids = np.empty(top_k + 1, dtype=np.int64)
    reference = np.empty(top_k + 1, dtype=np.int64)
    reference_exp = np.empty(top_k)
    match = np.empty(top_k, dtype=np.int64)  # where each chosen expert is in the token's own top-k (-1: not)
    # The experts being ranked, gathered contiguously (values, logits, ids), and their cut (see _select).
    gathered_p = np.empty(num_experts)
    gathered_s = np.empty(num_experts)
    gathered_ids = np.empty(num_experts, dtype=np.int64)
    cut_p = np.empty(num_experts)
    cut_s = np.empty(num_experts)
    cut_ids = np.empty(num_experts, dtype=np.int64)
    for layer in range(num_layers):
        scale = alpha[layer]
        lowest = floor[layer]
        for g in range(num_groups):
            # The logits as float64, each token's max, the depth -q of its bins q = max(ceil(alpha * (L - max)),
            # -beta) (numpy's operation order) capped at cap + 1, and its experts of depth <= D.
            deepest = 0
            for t in range(num_tokens):
                for e in range(num_experts):
                    x[t, e] = np.float64(logits[layer, g, t, e])
                best = _row_max(x[t])
                row_max[t] = best
                for e in range(num_experts):
                    d = int(min(-max(np.ceil((x[t, e] - best) * scale), lowest), cap + 1.0))
                    depth[t, e] = d
                    deepest = max(deepest, d)
                # D, by counting passes that vectorize (a histogram's increments would chain through memory);
                # past the first few depths, or for few experts (ranked at once faster than their depths are
                # counted: measured), every expert.
                reach = 0 if num_experts > _RANKED else _COUNTED_DEPTHS
                while reach < _COUNTED_DEPTHS and _count_within(depth[t], reach) < top_k:
                    reach += 1
                if reach == _COUNTED_DEPTHS:
                    reach = cap + 1
                n = 0
                for e in range(num_experts):
                    shallow[t, n] = e
                    n += depth[t, e] <= reach
                num_shallow[t] = n
            # score[e] = sum over depths, shallowest first, of (tokens at that depth) * B ** -depth: the
            # bin-by-bin order of lynx.vote_scores, in which equal bin counts give equal scores. One token has
            # no popularity term.
            summed = min(deepest, cap)
            if num_tokens > 1:
                tokens_at = np.zeros((summed + 1, num_experts), dtype=np.int64)
                if summed < _COUNTED_DEPTHS:  # one pass per depth, each vectorized
                    for d in range(summed + 1):
                        for t in range(num_tokens):
                            for e in range(num_experts):
                                tokens_at[d, e] += depth[t, e] == d
                else:
                    for t in range(num_tokens):
                        for e in range(num_experts):
                            if depth[t, e] <= summed:
                                tokens_at[depth[t, e], e] += 1
                for e in range(num_experts):
                    total_weight = 0.0
                    for d in range(summed + 1):
                        total_weight += tokens_at[d, e] * bin_weight[d]
                    score[e] = total_weight
            # Votes: each token's top-k of v = q + (score - h) / B (v = q for one token), ties by its own logit,
            # then lower id; kept = the experts with a vote, in increasing id order.
            for e in range(num_experts):
                voted[e] = False
            for t in range(num_tokens):
                for i in range(num_shallow[t]):
                    e = shallow[t, i]
                    q = max(np.ceil((x[t, e] - row_max[t]) * scale), lowest)
                    gathered_p[i] = (score[e] - bin_weight[depth[t, e]]) / num_tokens + q if num_tokens > 1 else q
                    gathered_s[i] = x[t, e]
                _select(gathered_p, gathered_s, shallow[t], num_shallow[t], top_k, ids, cut_p, cut_s, cut_ids)
                for i in range(top_k):
                    voted[ids[i]] = True
            num_kept = 0
            for e in range(num_experts):
                if voted[e]:
                    kept[num_kept] = e
                    num_kept += 1
            # Each token re-picks its top-k inside kept (kept holds >= k experts: none dropped) and is scored
            # against its own top-k.
            mass = 0.0
            top1 = 0
            changed = 0
            for t in range(num_tokens):
                row = x[t]
                for i in range(num_shallow[t]):
                    gathered_p[i] = row[shallow[t, i]]
                _select(gathered_p, gathered_p, shallow[t], num_shallow[t], top_k, reference, cut_p, cut_s, cut_ids)
                survived = True
                for i in range(top_k):
                    survived &= voted[reference[i]]
                if survived:  # its own top-k is all kept: it re-picks exactly that
                    for i in range(top_k):
                        ids[i] = reference[i]
                else:
                    found = 0  # the kept shallow experts: if k of them are, the token's pick is among them
                    for i in range(num_shallow[t]):
                        e = shallow[t, i]
                        gathered_ids[found] = e
                        gathered_p[found] = row[e]
                        found += voted[e]
                    if found < top_k:  # too few: all of kept
                        for i in range(num_kept):
                            gathered_ids[i] = kept[i]
                            gathered_p[i] = row[kept[i]]
                        found = num_kept
                    _select(gathered_p, gathered_p, gathered_ids, found, top_k, ids, cut_p, cut_s, cut_ids)
                lost = 0
                for i in range(top_k):
                    counts[g, layer, ids[i]] += 1
                    top1 += ids[i] == reference[0]  # the token's first argmax (ties: lower id)
                    match[i] = -1
                    for j in range(top_k):
                        if reference[j] == ids[i]:
                            match[i] = j
                    lost += match[i] < 0
                changed += lost
                if lost == 0:
                    mass += 1.0  # the same experts: numpy's ratio of two equal ordered sums, exactly 1
                    continue
                # Both sums in descending order, as numpy sums them; an expert in both shares its value.
                reference_sum = 0.0
                for i in range(top_k):
                    reference_exp[i] = math.exp(row[reference[i]] - row_max[t])
                    reference_sum += reference_exp[i]
                chosen_sum = 0.0
                for i in range(top_k):
                    chosen_sum += reference_exp[match[i]] if match[i] >= 0 else math.exp(row[ids[i]] - row_max[t])
                mass += chosen_sum / reference_sum
            retained_mass[g, layer] = mass / num_tokens
            top1_kept[g, layer] = top1 / num_tokens
            assignments_changed[g, layer] = changed / (num_tokens * top_k)
    return True
