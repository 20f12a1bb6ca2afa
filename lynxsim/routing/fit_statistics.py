"""Fit the synthetic router to a model's routing statistics (``lynxsim.routing.statistics``), and report how
close the fitted generator comes to every statistic it was given and to the held-out ones.

A statistics file holds what is public about a real router: batch-level distinct-expert counts, selection
frequencies, mean probabilities, top-2 weights, repetition along sequences. Each generator parameter
(``lynxsim.routing.synthetic``: per MoE layer a popularity, a confidence scale and its spread, a persistence) is
fitted per layer to the statistics that it alone moves, where the file has them; the others keep the
generator's default and are reported as assumed. In order:

1. popularity: ``selection_frequency`` gives the expert bias itself (``fit.fit_bias``, the trace fit's step; on
   layers the data does not cover, a random bias whose spread is interpolated over depth from the covered
   layers). Without frequencies, ``batch_distinct`` under top-k gives the bias spread (``popularity_skew``): in
   a decode batch every token belongs to another request, so the union of their top-k depends on how unequal
   the experts' popularity is and on nothing else the generator has (the top-k ignores the confidence scale,
   and persistence only ties tokens of one request). Bisection per layer; the union shrinks as the skew grows.
2. confidence: ``batch_distinct`` under Lynx gives ``confidence_mean``: Lynx keeps fewer experts the flatter the
   router (more of a token's experts share its best bins) over the range trained routers lie in; Lynx's union
   is not monotone in the scale over all of it, so each layer's scale is read off a scanned curve
   (``_match_on_rising_branch``). ``mean_probability`` gives it too (the least total variation between the
   data's and the generator's mean probability of every expert, over a grid of scales), and ``top2_weight``
   gives the mean and the spread of the scale together (the logit of ``w1 / (w1 + w2)`` is the scale times the
   gap between a token's two best logits: least squares over its quartiles). The spread is otherwise assumed
   (the default).
3. persistence: ``overlap_excess`` (``fit.fit_persistence``); ``repeat_top1`` is reported, not fitted.

Every fit runs on one seeded draw of the generator's own noise (``fit.unit_noise``), with the model's group-
limited routing (``lynxsim.routing.router``) applied where it has one, and is deterministic for a seed. The
report then draws the fitted generator through ``SyntheticRouting`` itself, as a simulation would, and
compares it with the data (``StatisticResidual``).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from lynxsim import __version__
from lynxsim.policies import Lynx, Policy, TopK
from lynxsim.routing.fit import (
    PROFILE_FORMAT,
    PROFILE_FORMAT_VERSION,
    ProfileDumper,
    fit_bias,
    fit_persistence,
    overlap_excess,
    top_k_experts,
    unit_noise,
)
from lynxsim.routing.router import GroupLimit
from lynxsim.routing.statistics import BatchDistinct, LynxPolicy, RoutingStatistics
from lynxsim.routing.synthetic import SyntheticRouting, SyntheticRoutingParams

FIT_TOKENS = 4096
"""Independent generator tokens per layer the fits draw: 256 decode batches of 16, a standard error of about
0.3% on a layer's mean distinct experts."""

SKEW_DRAWS = 2
"""Random expert-bias draws a skew is fitted over: the union of a batch depends a little on which experts
happen to be popular, so the fitted skew is the one whose average over draws matches."""

_BISECTION_STEPS = 16
_MAX_SKEW = 4.0
_LOG_SCALE_RANGE = (np.log(0.02), np.log(50.0))
_DECIMALS = 4
_DEFAULTS = SyntheticRoutingParams()
_REPORT_BATCHES = 256
"""Decode batches the report draws per statistic through ``SyntheticRouting``."""


@dataclass(frozen=True)
class StatisticResidual:
    """One statistic, data against the fitted generator, per listed MoE layer (``distance`` for vector
    statistics: total variation between the two distributions over experts)."""

    name: str
    layers: list[int]
    data: list[float]
    generator: list[float]
    unit: str
    distance: list[float] | None = None

    def relative_error(self) -> np.ndarray:
        d, g = np.asarray(self.data), np.asarray(self.generator)
        return np.divide(g - d, d, out=np.zeros_like(d), where=d != 0)


@dataclass
class StatisticsFit:
    """Fitted parameters, what stands behind each of them, and the residuals of every statistic."""

    params: SyntheticRoutingParams
    evidence: dict[str, str]
    residuals: list[StatisticResidual] = field(default_factory=list)


def _policy(spec: str | LynxPolicy) -> Policy:
    if spec == "topk":
        return TopK()
    assert isinstance(spec, LynxPolicy)
    return Lynx(alpha=spec.alpha, beta=spec.beta)


def batch_distinct(logits: np.ndarray, batch: int, policy: Policy, top_k: int) -> np.ndarray:
    """Mean distinct experts per layer of ``policy``'s choices over consecutive batches of ``batch`` tokens of
    ``logits [L, N, E]`` (each token its own request, as in a decode batch); ``[L]``."""
    layers, tokens, experts = logits.shape
    batches = tokens // batch
    stacked = logits[:, : batches * batch].reshape(layers * batches, batch, experts)
    ids = policy.select(stacked, top_k).expert_ids.reshape(layers * batches, -1)
    flat = ids + np.arange(layers * batches)[:, None] * experts
    used = np.bincount(flat.ravel(), minlength=layers * batches * experts).reshape(layers * batches, experts) > 0
    return used.sum(axis=1).reshape(layers, batches).mean(axis=1)


def _limited(logits: np.ndarray, limit: GroupLimit | None) -> np.ndarray:
    return limit.apply(np.ascontiguousarray(logits)) if limit is not None else logits


def _bisect_falling(low: np.ndarray, high: np.ndarray, target: np.ndarray,
                    value: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Per-layer bisection of ``value(x) == target`` on ``[low, high]``, ``value`` falling in x."""
    for _ in range(_BISECTION_STEPS):
        middle = 0.5 * (low + high)
        above = value(middle) >= target
        low, high = np.where(above, middle, low), np.where(above, high, middle)
    return 0.5 * (low + high)


LYNX_SCALE_GRID = np.linspace(np.log(0.05), np.log(20.0), 31)
"""Log confidence scales the Lynx fit scans (steps of 0.2 in log)."""


def _match_on_rising_branch(target: np.ndarray, union: Callable[[np.ndarray], np.ndarray], layers: int) -> np.ndarray:
    """Per layer, the log scale at which ``union`` (Lynx's distinct experts) equals ``target``, on the branch
    that runs from the curve's lowest point up to its peak. Lynx's union is not monotone in the scale. A router
    so flat that every expert shares the token's best bin gives every expert the same popularity, so Lynx keeps
    each token's own top-k (top-k's union); as the scale grows the best bin narrows to a few experts the batch's
    tokens share unevenly and popularity concentrates the votes (the lowest point); the union then rises as each
    token's best experts stand further apart; and a router so confident that only the token's first expert is
    above the floor bin (beta) lets popularity pick the rest from the other tokens' first experts, so the union
    falls again. (DeepSeek-Coder-V2's shape, one layer, alpha 1, beta 2: 71 experts at scale 0.1, 13 at 0.3, 55
    at 1.8, 19 at 20.) The rising branch is the one whose routers are moderately confident, as trained routers
    of many experts are; a target outside it gets the nearer end (the residual then says so)."""
    curve = np.stack([union(np.full(layers, g)) for g in LYNX_SCALE_GRID], axis=1)  # [L, G]
    lowest = curve.argmin(axis=1)
    fitted = np.empty(layers)
    for layer in range(layers):
        first = lowest[layer]
        last = first + int(curve[layer, first:].argmax())  # the rising branch ends at the curve's peak after it
        branch_x = LYNX_SCALE_GRID[first:last + 1]
        branch_y = np.maximum.accumulate(curve[layer, first:last + 1])
        fitted[layer] = np.interp(target[layer], branch_y, branch_x) if branch_y.size > 1 else branch_x[0]
    return fitted


def _scales(log_mean: np.ndarray, spread: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """``s[l, t] = exp(log_mean + spread * n - spread**2 / 2)``, the generator's confidence scale."""
    return np.exp(log_mean[:, None] + spread[:, None] * normal[None, :] - spread[:, None] ** 2 / 2)


def fit_statistics(stats: RoutingStatistics, *, group_limit: GroupLimit | None = None, seed: int = 0,
                   tokens: int = FIT_TOKENS) -> StatisticsFit:
    """Generator parameters fitted to ``stats`` (module docstring), with the evidence behind each."""
    layers, experts, k = stats.num_moe_layers, stats.num_experts, stats.top_k
    s = stats.statistics
    unit = unit_noise(layers, experts, seed, tokens)
    normal = np.random.default_rng(seed).standard_normal(tokens)
    evidence: dict[str, str] = {}

    # 1. popularity: a bias per layer, measured where frequencies are given, else drawn at a fitted spread
    draws = [np.random.default_rng([seed, r]).standard_normal((layers, experts)) for r in range(SKEW_DRAWS)]
    bias: np.ndarray | None = None
    skew = np.full(layers, float(_as_array(_DEFAULTS.popularity_skew, layers)[0]))
    if s.selection_frequency is not None:
        block = s.selection_frequency
        ids = block.layer_ids(layers)
        counts = np.asarray(block.frequency) * float(block.tokens or 1_000_000)
        measured, _ = fit_bias(counts, unit[ids], k)
        spreads = np.interp(np.arange(layers), ids, measured.std(axis=-1))
        bias = draws[0] * spreads[:, None]
        bias[ids] = measured
        skew = bias.std(axis=-1)
        covered = (
            "every layer" if len(ids) == layers
            else f"layers {ids}; the others a random bias of the spread interpolated over depth"
        )
        evidence["expert_bias"] = f"fitted to selection_frequency ({covered})"
    topk_entries = [e for e in s.batch_distinct if e.policy == "topk"]
    if bias is None and topk_entries:
        entry = topk_entries[0]
        target = np.asarray(entry.mean)

        def topk_union(sigma: np.ndarray) -> np.ndarray:
            unions = [batch_distinct(_limited(unit + (sigma[:, None] * d)[:, None, :].astype(np.float32), group_limit),
                                     entry.batch_size, TopK(), k) for d in draws]
            return np.mean(unions, axis=0)

        skew = _bisect_falling(np.zeros(layers), np.full(layers, _MAX_SKEW), target, topk_union)
        evidence["popularity_skew"] = (f"fitted to batch_distinct under top-k at batch {entry.batch_size} "
                                       f"({entry.steps} steps)")
    if bias is None and "popularity_skew" not in evidence:
        evidence["popularity_skew"] = "assumed: the generator's default"
    centred = bias if bias is not None else skew[:, None] * draws[0]

    # 2. confidence: mean (and spread) of the scale
    spread = _as_array(_DEFAULTS.confidence_spread, layers)
    log_mean = np.log(_as_array(_DEFAULTS.confidence_mean, layers))
    lynx_entries = [e for e in s.batch_distinct if e.policy != "topk"]
    base = unit + centred[:, None, :].astype(np.float32)
    if lynx_entries:
        entry = lynx_entries[0]
        policy = _policy(entry.policy)

        def lynx_union(log_m: np.ndarray) -> np.ndarray:
            scaled = (base * _scales(log_m, spread, normal)[:, :, None]).astype(np.float32)
            return batch_distinct(_limited(scaled, group_limit), entry.batch_size, policy, k)

        log_mean = _match_on_rising_branch(np.asarray(entry.mean), lynx_union, layers)
        evidence["confidence_mean"] = (f"fitted to batch_distinct under {entry.policy_label} at batch "
                                       f"{entry.batch_size} ({entry.steps} steps)")
    elif s.mean_probability is not None:
        log_mean = _fit_scale_to_mean_probability(s.mean_probability, base, spread, normal, layers, group_limit)
        evidence["confidence_mean"] = "fitted to mean_probability (total variation over experts, per layer)"
    if s.top2_weight is not None:
        log_mean, spread = _fit_scale_to_top2(s.top2_weight, base, normal, layers, log_mean, spread, group_limit)
        evidence["confidence_mean"] = "fitted to top2_weight quartiles (least squares in log-logit)"
        evidence["confidence_spread"] = "fitted to top2_weight quartiles (least squares in log-logit)"
    evidence.setdefault("confidence_mean", "assumed: the generator's default")
    evidence.setdefault("confidence_spread", "assumed: the generator's default")

    # 3. persistence
    persistence = _as_array(_DEFAULTS.persistence, layers)
    if s.overlap_excess is not None:
        ids = s.overlap_excess.layer_ids(layers)
        fitted, _ = fit_persistence(np.asarray(s.overlap_excess.value), centred[ids], k, seed)
        persistence = np.interp(np.arange(layers), ids, fitted)
        evidence["persistence"] = "fitted to overlap_excess"
    else:
        evidence["persistence"] = "assumed: the generator's default"

    params = SyntheticRoutingParams(
        popularity_skew=_rounded(skew),
        confidence_mean=_rounded(np.exp(log_mean)),
        confidence_spread=_rounded(spread),
        persistence=_rounded(np.clip(persistence, 0.0, 0.98)),
        expert_bias=[_rounded(row) for row in bias] if bias is not None else None,
    )
    return StatisticsFit(params, evidence)


def _fit_scale_to_mean_probability(block: Any, base: np.ndarray, spread: np.ndarray, normal: np.ndarray,
                                   layers: int, limit: GroupLimit | None) -> np.ndarray:
    """Per-layer log scale whose mean softmax probability per expert comes closest to the data's, in total
    variation (half the summed absolute difference: what the report measures, and dominated by the experts that
    carry the probability, not by the rarely chosen ones whose small means a log error would weigh alike)."""
    ids = block.layer_ids(layers)
    target = np.asarray(block.mean) / np.asarray(block.mean).sum(axis=1, keepdims=True)

    def distances(log_means: np.ndarray) -> np.ndarray:
        """``[len(ids), M]``: each layer's distance to the data at each of its candidate log scales ``[l, M]``."""
        out = np.empty(log_means.shape)
        for j in range(log_means.shape[1]):
            scaled = base[ids] * _scales(log_means[:, j], spread[ids], normal)[:, :, None]
            probs = _softmax(_limited(scaled.astype(np.float32), limit)).mean(axis=1)
            out[:, j] = 0.5 * np.abs(probs - target).sum(axis=-1)
        return out

    coarse = np.tile(np.linspace(*_LOG_SCALE_RANGE, 61), (len(ids), 1))
    best = coarse[np.arange(len(ids)), distances(coarse).argmin(axis=1)]
    fine = best[:, None] + np.linspace(-0.1, 0.1, 11)[None, :]
    fitted = fine[np.arange(len(ids)), distances(fine).argmin(axis=1)]
    return np.interp(np.arange(layers), ids, fitted)


def _fit_scale_to_top2(block: Any, base: np.ndarray, normal: np.ndarray, layers: int, log_mean: np.ndarray,
                       spread: np.ndarray, limit: GroupLimit | None) -> tuple[np.ndarray, np.ndarray]:
    """Per-layer (log scale, spread) whose ``log(logit(w1 / (w1 + w2)))`` quartiles come closest to the data's:
    that logit is ``s * (x_(1) - x_(2))``, so its log is ``log s + log gap``, a shift and a widening of the
    gap's distribution."""
    ids = block.layer_ids(layers)
    quantiles = np.column_stack([np.asarray(block.quartiles)[:, 0], block.median, np.asarray(block.quartiles)[:, 1]])
    w = np.clip(quantiles, 0.5 + 1e-6, 1 - 1e-6)
    target = np.log(np.log(w / (1 - w)))  # [layers, 3]
    values = np.sort(_limited(base[ids].copy(), limit), axis=-1)
    log_gap = np.log(np.maximum(values[..., -1] - values[..., -2], 1e-9))  # [l, N]
    means = np.linspace(*_LOG_SCALE_RANGE, 121)
    spreads = np.linspace(0.0, 2.0, 41)
    best_m, best_s = np.empty(len(ids)), np.empty(len(ids))
    for i in range(len(ids)):
        error = np.empty((means.size, spreads.size))
        for j, sd in enumerate(spreads):
            noise = sd * normal - sd**2 / 2
            shifted = log_gap[i][None, :] + noise[None, :] + means[:, None]  # [M, N]
            q = np.quantile(shifted, [0.25, 0.5, 0.75], axis=1).T
            error[:, j] = ((q - target[i]) ** 2).sum(axis=1)
        m, s = np.unravel_index(error.argmin(), error.shape)
        best_m[i], best_s[i] = means[m], spreads[s]
    log_mean = np.interp(np.arange(layers), ids, best_m)
    spread = np.interp(np.arange(layers), ids, best_s)
    return log_mean, spread


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def _as_array(value: float | list[float], layers: int) -> np.ndarray:
    return np.asarray(value, dtype=np.float64) if isinstance(value, list) else np.full(layers, float(value))


def _rounded(values: np.ndarray) -> list[float]:
    return [round(float(v), _DECIMALS) for v in np.asarray(values).ravel()]


# ----- the report: the fitted generator, drawn as a simulation draws it, against the data ------------------------


def generator_residuals(stats: RoutingStatistics, params: SyntheticRoutingParams, *,
                        group_limit: GroupLimit | None = None, seed: int = 1) -> list[StatisticResidual]:
    """Every statistic of ``stats``, data against ``params`` drawn through ``SyntheticRouting`` (another seed
    than the fit's, so the residual includes the fit's own sampling noise)."""
    layers, experts, k = stats.num_moe_layers, stats.num_experts, stats.top_k
    s = stats.statistics
    residuals: list[StatisticResidual] = []
    routing = SyntheticRouting(layers, experts, params, seed, request_cache_bytes=0, group_limit=group_limit)
    for entry in s.batch_distinct:
        residuals.append(_batch_residual(entry, routing, k))
    if s.selection_frequency is not None or s.mean_probability is not None:
        requests = np.arange(_REPORT_BATCHES * 16, dtype=np.int64)
        logits = routing.logits(requests, np.full(requests.size, 7, dtype=np.int64))
        if s.selection_frequency is not None:
            residuals.append(_distribution_residual("selection_frequency", s.selection_frequency.layer_ids(layers),
                                                    np.asarray(s.selection_frequency.frequency) / k,
                                                    _frequencies(logits, k, experts) / k))
        if s.mean_probability is not None:
            residuals.append(_distribution_residual("mean_probability", s.mean_probability.layer_ids(layers),
                                                    np.asarray(s.mean_probability.mean),
                                                    _softmax(logits.astype(np.float64)).mean(axis=1)))
    if s.top2_weight is not None or s.repeat_top1 is not None or s.overlap_excess is not None:
        sequences, positions = 256, 16
        requests = np.repeat(np.arange(sequences, dtype=np.int64), positions)
        where = np.tile(np.arange(positions, dtype=np.int64), sequences)
        logits = routing.logits(requests, where)
        ids, values = top_k_experts(logits, k)
        if s.top2_weight is not None:
            ids_ = s.top2_weight.layer_ids(layers)
            w1 = 1.0 / (1.0 + np.exp(-(values[ids_, :, 0] - values[ids_, :, 1]).astype(np.float64)))
            residuals.append(StatisticResidual("top2_weight_median", ids_, list(s.top2_weight.median),
                                               np.median(w1, axis=1).tolist(), "w1 / (w1 + w2)"))
        if s.repeat_top1 is not None:
            ids_ = s.repeat_top1.layer_ids(layers)
            top1 = ids[ids_, :, 0].reshape(len(ids_), sequences, positions)
            share = (top1[:, :, 1:] == top1[:, :, :-1]).mean(axis=(1, 2))
            residuals.append(StatisticResidual("repeat_top1", ids_, list(s.repeat_top1.share), share.tolist(),
                                               "share of consecutive tokens"))
        if s.overlap_excess is not None:
            ids_ = s.overlap_excess.layer_ids(layers)
            excess = overlap_excess(ids[ids_], requests, experts)
            residuals.append(StatisticResidual("overlap_excess", ids_, list(s.overlap_excess.value),
                                               excess.tolist(), "experts"))
    return residuals


def _batch_residual(entry: BatchDistinct, routing: SyntheticRouting, top_k: int) -> StatisticResidual:
    requests = np.arange(_REPORT_BATCHES * entry.batch_size, dtype=np.int64)
    logits = routing.logits(requests, np.full(requests.size, 100, dtype=np.int64))
    union = batch_distinct(logits, entry.batch_size, _policy(entry.policy), top_k)
    return StatisticResidual(f"batch_distinct {entry.policy_label} at batch {entry.batch_size}",
                             list(range(len(entry.mean))), list(entry.mean), union.tolist(), "experts")


def _frequencies(logits: np.ndarray, top_k: int, experts: int) -> np.ndarray:
    ids = top_k_experts(logits, top_k)[0]
    layers, tokens = ids.shape[:2]
    flat = ids.reshape(layers, -1) + np.arange(layers)[:, None] * experts
    counts = np.bincount(flat.ravel(), minlength=layers * experts).reshape(layers, experts)
    return top_k * counts / tokens


def _distribution_residual(name: str, layers: list[int], data: np.ndarray, generated: np.ndarray
                           ) -> StatisticResidual:
    """Per listed layer: the total-variation distance between two distributions over experts, and each one's
    coefficient of variation (what the popularity fit matches)."""
    gen = generated[layers]
    tv = 0.5 * np.abs(data / data.sum(axis=1, keepdims=True) - gen / gen.sum(axis=1, keepdims=True)).sum(axis=1)
    cv = lambda rows: rows.std(axis=1) / rows.mean(axis=1)  # noqa: E731
    return StatisticResidual(name, layers, cv(data).tolist(), cv(gen).tolist(), "coefficient of variation",
                             distance=tv.tolist())


# ----- the profile file -----------------------------------------------------------------------------------------


def save_statistics_profile(path: str | Path, stats: RoutingStatistics, fit: StatisticsFit, *,
                            statistics_file: str, group_limit: GroupLimit | None,
                            checks: list[StatisticResidual] | None = None) -> Path:
    """Write the fitted generator as a routing profile (``fit.load_profile`` reads its ``params``), with its
    sources, the evidence behind each parameter and the residual of every statistic (fit and check data)."""
    def summary(residuals: list[StatisticResidual]) -> list[dict[str, Any]]:
        out = []
        for r in residuals:
            entry: dict[str, Any] = {"statistic": r.name, "unit": r.unit,
                                     "data_mean": round(float(np.mean(r.data)), 4),
                                     "generator_mean": round(float(np.mean(r.generator)), 4),
                                     "largest_layer_relative_error": round(float(np.abs(r.relative_error()).max()), 4)}
            if r.distance is not None:
                entry["largest_total_variation"] = round(float(max(r.distance)), 4)
            out.append(entry)
        return out

    document = {
        "format": PROFILE_FORMAT,
        "format_version": PROFILE_FORMAT_VERSION,
        "source": {
            "statistics": statistics_file,
            "model": stats.model,
            "sources": [src.model_dump(exclude_none=True) for src in stats.sources],
            "num_experts": stats.num_experts,
            "group_limit": None if group_limit is None else {
                "num_groups": group_limit.num_groups, "topk_groups": group_limit.topk_groups,
                "score": group_limit.score},
        },
        "fitted": {
            "date": datetime.date.today().isoformat(),
            "by": f"lynxsim {__version__}, lynxsim.routing.fit_statistics.fit_statistics",
            "evidence": fit.evidence,
        },
        "params": fit.params.model_dump(exclude_none=True),
        "residuals": {"fit_data": summary(fit.residuals), "check_data": summary(checks or [])},
    }
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    header = ("# lynxsim routing profile: the synthetic router fitted to a model's published routing statistics.\n"
              "# Written by lynxsim.routing.fit_statistics; "
              "`fitted.evidence` says what stands behind each parameter.\n")
    target.write_text(header + yaml.dump(document, Dumper=ProfileDumper, sort_keys=False, width=120))
    return target
