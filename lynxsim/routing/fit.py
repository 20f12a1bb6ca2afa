"""Fit the synthetic router to a recorded routing trace, and keep the fit as a routing profile file.

Why: a recorded trace holds a few thousand tokens of a few sequences, while a simulation needs router logits for
any number of requests of any length. The seeded generator (``lynxsim.routing.synthetic``) can draw as many as
needed; fitting its parameters to a trace makes those draws behave like the recorded router where it matters for
batch-aware selection: which experts a layer prefers, how peaked each token's router is, and how much a request
reuses its experts.

What the fit reads. A top-k-only trace (``trace.recorded_top_k`` set) holds, per token and layer, the ids of the
k experts the router chose and their probabilities; its other logits were filled in by an assumption (the
trace's ``fill``), so no statistic here depends on them. Every statistic is a function of each token's top-k ids,
of the differences between its top-k logits (log-ratios of recorded probabilities) and of its top-1 probability
(recorded; every fill keeps it), which full-logit traces have as well.

Each parameter is fitted to statistics that it alone moves (the generator's docstring says why), in this order:

1. ``expert_bias`` ``b[l, :]``, from the per-expert selection frequency ``f[l, e]`` (share of tokens whose top-k
   holds ``e``). Over many requests a generated token's logits are ``s * (b + z)`` with ``z ~ N(0, I)`` whatever
   the persistence, and the top-k ignores the scale ``s > 0``, so ``f`` depends on ``b`` alone. The measured
   ``b`` solves ``f_generator(b) = f_trace`` (half a count added to every expert, so that one never chosen gets
   a finite bias) by a damped fixed-point iteration on one fixed sample of the generator's unit noise.
2. ``persistence[l]``, from the excess overlap: the mean number of top-k experts shared by two tokens of one
   sequence, minus the same for two tokens of different sequences. Popular experts raise both terms alike, so
   the difference is the persistence's. Bisection, all layers at once, on generator draws (measured ``b``,
   candidate persistences). The generator's correlation does not decay along a sequence, so this matches the
   average over all pairs of positions, which is what a batch of tokens drawn at random positions sees.
3. ``popularity_skew[l]``, from the coefficient of variation (CV) of per-expert selection counts. Part of a
   short trace's imbalance is sampling noise, inflated by the correlation of tokens within a sequence, so the
   spread of the measured ``b`` overstates the router's. The skew is the one whose generator draws in the
   trace's own design (its sequences and positions, the fitted persistence) give the trace's CV on average.
   The measured ``b`` is then shrunk towards 0 by ``popularity_skew / std(measured b)``: unshrunk, its sampling
   noise would come on top of the generator's own and make generated load more unequal than the trace's
   (FLAME-MoE: CV 0.33 against 0.28 in its first MoE layer). The shrunk bias, the profile's ``expert_bias``,
   keeps which experts are popular and by how much relative to each other; the generator ignores the skew
   where ``expert_bias`` is given, and the skew is the estimate to use with random biases.
4. ``confidence_mean[l]`` and ``confidence_spread[l]``, from the median and interquartile range (IQR) of two
   per-token quantities: the log top-k gap ``log(mean_{i=2..k}(logit_(1) - logit_(i)))``, which is what Lynx's
   affinity bins read, and the log top-1 probability, which the quality proxies read. For the generator the
   log gap is ``log s + log D`` with ``log s ~ N(log mean - spread**2 / 2, spread**2)`` independent of ``D``, the
   gap of ``b + z``. A Gaussian router cannot match both exactly where a real one is flat in its tail and
   peaked at its top (FLAME-MoE's first MoE layers), so the two are fitted jointly, by least squares over the
   four statistics (all in nats), with ``b + z`` from generator draws with the shrunk bias. Quantiles, so that a
   few odd tokens do not move the fit.

Every step is deterministic for a given ``seed`` (generator draws and one seeded numpy ``Generator``); fitting
the FLAME-MoE-290M sample (8 layers, 2,048 tokens, 64 experts) takes about 3.5 s on one CPU core.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import ValidationError

from lynxsim import __version__
from lynxsim.errors import InputError
from lynxsim.routing.synthetic import SyntheticRouting, SyntheticRoutingParams
from lynxsim.routing.trace import RoutingTrace
from lynxsim.yaml_input import read_yaml_mapping

PROFILE_FORMAT = "lynxsim-routing-profile"
PROFILE_FORMAT_VERSION = 1

STATISTIC_DEFINITIONS = {
    "selection_count_cv": (
        "per layer: standard deviation / mean over experts of the number of tokens whose top-k holds the expert"
    ),
    "selection_frequency_residual": (
        "largest |log(generator / trace selection frequency)| over experts and layers with the measured "
        "expert bias, before shrinking (trace counts plus one half)"
    ),
    "expert_bias_shrink": (
        "per layer: factor applied to the measured expert bias, popularity_skew / its standard deviation (at most "
        "1), which removes the trace's sampling noise from its spread"
    ),
    "overlap_excess": (
        "per layer: mean top-k experts shared by two tokens of one sequence minus by two tokens of different "
        "sequences"
    ),
    "log_gap_median": "per layer: median over tokens of log(mean over i = 2..k of logit_(1) - logit_(i))",
    "log_gap_iqr": "per layer: interquartile range over tokens of the same log gap",
    "log_top1_median": "per layer: median over tokens of the log of the top-1 router probability",
    "log_top1_iqr": "per layer: interquartile range over tokens of the same log probability",
}
"""What each statistic in ``RoutingFit.stats`` (and a profile's ``statistics``) measures."""

FITTED_ON = {
    "expert_bias": "selection frequencies (exactly, up to selection_frequency_residual), then shrunk",
    "persistence": "overlap_excess (exactly, per layer)",
    "popularity_skew": "selection_count_cv (expected value in the trace's design, per layer)",
    "confidence_mean, confidence_spread": (
        "log_gap_median, log_gap_iqr, log_top1_median, log_top1_iqr (least squares, per layer)"
    ),
}
"""Which statistic each parameter was fitted to, as a profile records it."""

_DECIMALS = 4
"""Fitted values are rounded to this many decimals: far below their estimation error, and a profile file then
holds exactly the parameters the fit returned."""

_UNIT_NOISE_TOKENS = 16_384
"""Generator draws for the selection-frequency and gap simulations. At top-6 of 64 an expert is chosen about
1,500 times in them, a relative resolution of 3%, well inside the sampling error of a trace of a few thousand
tokens (about 200 selections per expert in FLAME-MoE's sample)."""

_BIAS_TOLERANCE = 5e-3
_BIAS_MAX_ITERATIONS = 40
"""Fixed-point iteration for ``b``. The slope of ``log f`` in ``b`` is about 2 (more for rare experts), so the
iteration starts at half of ``log f`` and takes steps of ``0.5 / (1 + i / 8)`` of the remaining log-frequency
error: constant steps of 0.8 oscillate, and shrinking ones settle on the simulated counts, which move in jumps.
On FLAME-MoE it reaches the tolerance (0.5% in frequency, a tenth of the trace's own sampling error) in about
8 iterations."""

_PERSISTENCE_SEQUENCES = 512
_PERSISTENCE_POSITIONS = 8
"""Design of the persistence simulation: the excess overlap is an average over pairs, the same in any design,
and many short sequences estimate it with the least noise for the number of tokens (4,096)."""

_MAX_PERSISTENCE = 0.98
_BISECTION_STEPS = 14

_SKEW_GRID = np.array([0.0, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0, 1.4, 2.0, 3.0])
"""Candidate skews; between them the expected squared CV is interpolated linearly in the squared skew (it is
close to linear there: noise variance plus a term proportional to the skew's variance)."""

_SKEW_SIMULATED_VALUES = 1 << 22
"""Logits drawn per candidate skew (layers x replicates x tokens x experts): 4 replicates of each layer of the
FLAME-MoE sample; at least 2 and at most 16 per layer."""

_CONFIDENCE_TOKENS = 2048
"""Generator draws for the confidence fit (the first of the unit-noise draws): each candidate costs a sort of
them, so fewer than for the frequencies; a quantile's Monte Carlo error is then about 3% of the IQR."""

_MAX_CONFIDENCE_SPREAD = 2.0
"""Largest spread searched: a log-standard-deviation of 2 already spans a factor 50 between the 2.5th and the
97.5th percentile of the scale."""

_LOG_SCALE_STEP = 0.1
_LOG_SCALE_GRID = np.arange(np.log(1e-3), np.log(1e2) + _LOG_SCALE_STEP, _LOG_SCALE_STEP)
"""Scales of the top-1 table: from 1e-3 (every expert nearly equal) to 100 (the top-1 takes all the mass)."""


@dataclass(frozen=True)
class RoutingFit:
    """Fitted generator parameters and the statistics they were matched on (trace and generator side by side,
    see ``STATISTIC_DEFINITIONS``): plain lists and numbers, ready for a profile file."""

    params: SyntheticRoutingParams
    stats: dict[str, Any]


def fit_synthetic(trace: RoutingTrace, top_k: int, *, seed: int = 0) -> SyntheticRoutingParams:
    """Generator parameters fitted to ``trace`` for a model that routes each token to ``top_k`` experts.

    Per-layer ``popularity_skew``, ``confidence_mean``, ``confidence_spread`` and ``persistence``, and the
    measured ``expert_bias``; see the module docstring for how each is fitted.
    """
    return fit_routing(trace, top_k, seed=seed).params


def fit_routing(trace: RoutingTrace, top_k: int, *, seed: int = 0) -> RoutingFit:
    """``fit_synthetic`` plus the statistics matched (trace and generator at the fitted parameters)."""
    _check_fittable(trace, top_k)
    ids, values = top_k_experts(trace.logits, top_k)
    sequence_index = np.unique(trace.sequence_ids, return_inverse=True)[1].reshape(-1)
    counts = selection_counts(ids, trace.num_experts)
    layers, experts = trace.num_layers, trace.num_experts
    unit = unit_noise(layers, experts, seed)

    measured_bias, residual = fit_bias(counts, unit, top_k)
    excess_trace = overlap_excess(ids, sequence_index, experts)
    persistence, excess_generator = fit_persistence(excess_trace, measured_bias, top_k, seed)
    skew, cv_trace, cv_generator = _fit_skew(counts, trace, persistence, top_k, seed)
    spread_measured = measured_bias.std(axis=-1)
    shrink = np.divide(skew, spread_measured, out=np.zeros_like(skew), where=spread_measured > 0)
    bias = measured_bias * np.minimum(shrink, 1.0)[:, None]
    confidence_trace = confidence_statistics(log_gaps(values), log_top1_probability(trace.logits, values))
    mean, spread, confidence_generator = _fit_confidence(confidence_trace, bias, unit, top_k, seed)

    params = SyntheticRoutingParams(
        popularity_skew=_rounded(skew),
        confidence_mean=_rounded(mean),
        confidence_spread=_rounded(spread),
        persistence=persistence.tolist(),
        expert_bias=[_rounded(row) for row in bias],
    )
    stats: dict[str, Any] = {
        "top_k": top_k,
        "seed": seed,
        "tokens": trace.num_tokens,
        "sequences": int(sequence_index.max()) + 1,
        "selection_count_cv": {"trace": _rounded(cv_trace), "generator": _rounded(cv_generator)},
        "selection_frequency_residual": round(residual, _DECIMALS),
        "expert_bias_shrink": _rounded(np.minimum(shrink, 1.0)),
        "overlap_excess": {"trace": _rounded(excess_trace), "generator": _rounded(excess_generator)},
    }
    for i, name in enumerate(("log_gap_median", "log_gap_iqr", "log_top1_median", "log_top1_iqr")):
        stats[name] = {"trace": _rounded(confidence_trace[:, i]), "generator": _rounded(confidence_generator[:, i])}
    return RoutingFit(params, stats)


def top_k_experts(logits: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each token's ``top_k`` expert ids and their logits, best first, as ``[layers, tokens, top_k]`` each."""
    top = np.argpartition(-logits, top_k - 1, axis=-1)[..., :top_k]
    values = np.take_along_axis(logits, top, axis=-1)
    order = np.argsort(-values, axis=-1, kind="stable")
    return np.take_along_axis(top, order, axis=-1), np.take_along_axis(values, order, axis=-1)


def selection_counts(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """``[layers, num_experts]``: how many tokens hold each expert in their top-k (``ids``: ``[L, T, k]``)."""
    layers = ids.shape[0]
    flat = ids.astype(np.int64) + num_experts * np.arange(layers, dtype=np.int64)[:, None, None]
    return np.bincount(flat.ravel(), minlength=layers * num_experts).reshape(layers, num_experts)


def overlap_excess(ids: np.ndarray, sequence_index: np.ndarray, num_experts: int) -> np.ndarray:
    """Per layer, mean top-k experts shared by two tokens of one sequence minus by two of different sequences.

    ``sequence_index`` numbers the sequences 0 .. S-1. Over all ordered pairs, from per-sequence expert counts
    ``C[l, s, e]``: pairs within sequences share ``sum_s |C_s|^2 - T k`` experts in total, pairs across
    sequences ``|sum_s C_s|^2 - sum_s |C_s|^2``; no pair is enumerated.
    """
    layers, tokens, k = ids.shape
    sequences = int(sequence_index.max()) + 1
    layer = np.arange(layers, dtype=np.int64)[:, None, None]
    cell = (layer * sequences + sequence_index[None, :, None]) * num_experts + ids
    per_sequence = np.bincount(cell.ravel(), minlength=layers * sequences * num_experts)
    per_sequence = per_sequence.reshape(layers, sequences, num_experts).astype(np.float64)
    lengths = np.bincount(sequence_index, minlength=sequences).astype(np.float64)
    within = (per_sequence**2).sum(axis=(1, 2))
    across = (per_sequence.sum(axis=1) ** 2).sum(axis=1) - within
    same_pairs = float((lengths * (lengths - 1)).sum())
    other_pairs = float(tokens**2 - (lengths**2).sum())
    return (within - tokens * k) / same_pairs - across / other_pairs


def log_gaps(values: np.ndarray) -> np.ndarray:
    """``[layers, tokens]``: log of the mean gap between each token's best logit and its other top-k logits."""
    gap = (values[..., :1] - values[..., 1:]).astype(np.float64).mean(axis=-1)
    return np.log(np.maximum(gap, 1e-12))  # all k tied (only rounding of stored probabilities can do it)


def log_top1_probability(logits: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``[layers, tokens]``: log of each token's top-1 softmax probability (``values``: its top-k logits, best
    first). For a top-k-only trace it is the recorded probability: every fill keeps the recorded probabilities
    (``lynxsim.routing.trace_format``), so the filled logits only contribute the mass the recording says the
    others had."""
    x = logits.astype(np.float64)
    top = values[..., :1].astype(np.float64)
    return -np.log(np.exp(x - top).sum(axis=-1))


def confidence_statistics(log_gap: np.ndarray, log_top1: np.ndarray) -> np.ndarray:
    """``[..., 4]``: median and interquartile range of the log top-k gap, then of the log top-1 probability,
    over the last axis (tokens)."""
    gap = np.quantile(log_gap, [0.25, 0.5, 0.75], axis=-1)
    top1 = np.quantile(log_top1, [0.25, 0.5, 0.75], axis=-1)
    return np.stack([gap[1], gap[2] - gap[0], top1[1], top1[2] - top1[0]], axis=-1)


def save_profile(
    params: SyntheticRoutingParams, path: str | Path, *, source_trace: RoutingTrace, stats: dict[str, Any]
) -> Path:
    """Write a routing profile: ``params`` with where they come from and what they were matched on.

    ``source_trace`` names the recording (its name, origin, licence, model, layers, fill) and ``stats`` is
    ``RoutingFit.stats``. Returns the path written. ``load_profile`` reads it back to the same parameters.
    """
    document = {
        "format": PROFILE_FORMAT,
        "format_version": PROFILE_FORMAT_VERSION,
        "source": {
            "trace": source_trace.name,
            "origin": source_trace.source,
            "license": source_trace.license,
            "model": source_trace.model,
            "notes": source_trace.notes,
            "layer_ids": list(source_trace.layer_ids),
            "num_experts": source_trace.num_experts,
            "recorded_top_k": source_trace.recorded_top_k,
            "fill": source_trace.fill,
            "fill_used_by_fit": False,
        },
        "fitted": {
            "date": datetime.date.today().isoformat(),
            "by": f"lynxsim {__version__}, lynxsim.routing.fit.fit_routing",
            "matched": FITTED_ON,
        },
        "params": params.model_dump(exclude_none=True),
        "statistics": {**stats, "definitions": STATISTIC_DEFINITIONS},
    }
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    header = (
        "# lynxsim routing profile: parameters of lynxsim's synthetic router fitted to a recorded routing trace.\n"
        "# Written by lynxsim.routing.fit.save_profile; see lynxsim/routing/fit.py for how each one was fitted.\n"
    )
    target.write_text(header + yaml.dump(document, Dumper=ProfileDumper, sort_keys=False, width=120))
    return target


class ProfileDumper(yaml.SafeDumper):
    """Mappings in block style, lists of numbers on one line each: a profile reads as a table, one layer's
    expert biases per row."""


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    flat = not any(isinstance(item, (list, dict)) for item in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flat)


ProfileDumper.add_representer(list, _represent_list)


def load_profile(path: str | Path) -> SyntheticRoutingParams:
    """The generator parameters of a routing profile written by ``save_profile``.

    A missing or malformed file raises ``InputError`` naming the file (and the bad key).
    """
    where = str(path)
    document = read_yaml_mapping(path, "routing profile")
    if document.get("format") != PROFILE_FORMAT:
        raise InputError(where, f"not a routing profile (no 'format: {PROFILE_FORMAT}')")
    if document.get("format_version") != PROFILE_FORMAT_VERSION:
        found = document.get("format_version")
        raise InputError(where, f"format_version must be {PROFILE_FORMAT_VERSION}, got {found!r}")
    try:
        return SyntheticRoutingParams.model_validate(document.get("params"))
    except ValidationError as exc:
        error = exc.errors()[0]
        key = ".".join(str(part) for part in ("params", *error["loc"]))
        raise InputError(where, f"{key}: {error['msg']}") from None


def _check_fittable(trace: RoutingTrace, top_k: int) -> None:
    """The fit needs two recorded experts per token (for the gaps) and same- and cross-sequence token pairs."""
    if not 2 <= top_k <= trace.num_experts:
        raise ValueError(
            f"top_k must be in [2, {trace.num_experts}], got {top_k}: the confidence fit reads the gaps between "
            "each token's top-k logits"
        )
    if trace.recorded_top_k is not None and top_k > trace.recorded_top_k:
        raise ValueError(f"top_k {top_k} exceeds the {trace.recorded_top_k} experts per token the trace recorded")
    lengths = np.unique(trace.sequence_ids, return_counts=True)[1]
    if lengths.size < 2 or lengths.max() < 2:
        raise ValueError(
            "fitting persistence needs two or more sequences, one of them with two or more tokens; the trace has "
            f"{lengths.size} sequence(s) of at most {lengths.max(initial=0)} token(s)"
        )


def _rounded(values: np.ndarray) -> list[float]:
    return [round(float(v), _DECIMALS) for v in values]


def unit_noise(layers: int, experts: int, seed: int, tokens: int = _UNIT_NOISE_TOKENS) -> np.ndarray:
    """float32 ``[layers, tokens, experts]``: the generator's ``z`` for independent tokens.

    The generator with zero bias, unit confidence and no persistence returns its noise ``z`` exactly; adding a
    bias ``b`` then gives, bit for bit, its logits with that bias, so one draw serves every candidate ``b``.
    """
    unit = SyntheticRoutingParams(popularity_skew=0.0, confidence_mean=1.0, confidence_spread=0.0, persistence=0.0)
    ids = np.arange(tokens, dtype=np.int64)
    return SyntheticRouting(layers, experts, unit, seed, request_cache_bytes=0).logits(ids, np.zeros_like(ids))


def _smoothed_frequency(counts: np.ndarray, top_k: int) -> np.ndarray:
    """Selection frequencies (summing to ``top_k`` per layer) after adding half a count to every expert."""
    counts = counts + 0.5
    return top_k * counts / counts.sum(axis=-1, keepdims=True)


def fit_bias(counts: np.ndarray, unit: np.ndarray, top_k: int) -> tuple[np.ndarray, float]:
    """``b[l, e]`` (mean 0 per layer) whose generator selection frequencies match ``counts``; and the largest
    remaining ``|log f_generator - log f_trace|``."""
    log_target = np.log(_smoothed_frequency(counts, top_k))
    bias = 0.5 * (log_target - log_target.mean(axis=-1, keepdims=True))
    residual = np.inf
    for i in range(_BIAS_MAX_ITERATIONS):
        logits = unit + bias[:, None, :].astype(np.float32)
        threshold = np.sort(logits, axis=-1)[..., -top_k, None]
        error = log_target - np.log(_smoothed_frequency((logits >= threshold).sum(axis=1), top_k))
        residual = float(np.abs(error).max())
        if residual < _BIAS_TOLERANCE:
            break
        bias = bias + 0.5 / (1.0 + i / 8.0) * error
        bias -= bias.mean(axis=-1, keepdims=True)
    return bias, residual


def fit_persistence(target: np.ndarray, bias: np.ndarray, top_k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-layer persistence whose generator draws give the excess overlaps ``target [L]``; and the generator's
    excess overlap at the (rounded) fitted persistence.

    The layers of one generator draw are independent, so one draw per step bisects every layer at once; the
    excess overlap rises with the persistence, from about 0 (independent tokens) to nearly k.
    """
    layers, experts = bias.shape
    requests = np.repeat(np.arange(_PERSISTENCE_SEQUENCES, dtype=np.int64), _PERSISTENCE_POSITIONS)
    positions = np.tile(np.arange(_PERSISTENCE_POSITIONS, dtype=np.int64), _PERSISTENCE_SEQUENCES)
    bias_rows = bias.tolist()

    def generated(persistence: np.ndarray) -> np.ndarray:
        params = SyntheticRoutingParams(expert_bias=bias_rows, persistence=persistence.tolist())
        logits = SyntheticRouting(layers, experts, params, seed, request_cache_bytes=0).logits(requests, positions)
        return overlap_excess(top_k_experts(logits, top_k)[0], requests, experts)

    low, high = np.zeros(layers), np.full(layers, _MAX_PERSISTENCE)
    for _ in range(_BISECTION_STEPS):
        middle = 0.5 * (low + high)
        below = generated(middle) < target
        low, high = np.where(below, middle, low), np.where(below, high, middle)
    # Outside the generator's range the bisection runs to an end of [0, _MAX_PERSISTENCE], which rounding keeps.
    persistence = np.round(0.5 * (low + high), _DECIMALS)
    return persistence, generated(persistence)


def _fit_skew(
    counts: np.ndarray, trace: RoutingTrace, persistence: np.ndarray, top_k: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-layer skew whose generator draws, in the trace's design, have the trace's expected selection-count
    CV; the trace's CVs and the generator's expected CVs at the (rounded) fitted skews.

    The noise part of the CV depends on the layer's persistence (correlated tokens count less), so each layer
    gets its own replicate layers, drawn with its persistence.
    """
    layers, experts = counts.shape
    trace_cv = counts.std(axis=-1) / counts.mean(axis=-1)
    replicates = int(np.clip(_SKEW_SIMULATED_VALUES // (layers * trace.num_tokens * experts), 2, 16))
    replicate_persistence = np.repeat(persistence, replicates).tolist()
    expected = np.empty((layers, _SKEW_GRID.size))
    for i, skew in enumerate(_SKEW_GRID):
        params = SyntheticRoutingParams(popularity_skew=float(skew), persistence=replicate_persistence)
        source = SyntheticRouting(layers * replicates, experts, params, seed, request_cache_bytes=0)
        logits = source.logits(trace.sequence_ids, trace.positions)
        simulated = selection_counts(top_k_experts(logits, top_k)[0], experts)
        expected[:, i] = (simulated.std(axis=-1) / simulated.mean(axis=-1)).reshape(layers, replicates).mean(axis=1)
    expected_sq = np.maximum.accumulate(expected, axis=1) ** 2
    grid_sq = _SKEW_GRID**2
    skew = np.round(
        [np.sqrt(np.interp(cv**2, row, grid_sq)) for cv, row in zip(trace_cv, expected_sq, strict=True)], _DECIMALS
    )
    fitted_cv = np.sqrt([np.interp(s**2, grid_sq, row) for s, row in zip(skew, expected_sq, strict=True)])
    return skew, trace_cv, fitted_cv


def _fit_confidence(
    trace_stats: np.ndarray, bias: np.ndarray, unit: np.ndarray, top_k: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-layer confidence mean and spread whose generator draws come closest (least squares) to the trace's
    ``confidence_statistics``; and those statistics of the generator at the (rounded) fit, ``[L, 4]``.

    A draw's logits are ``s * (b + z)`` with ``s = mean * exp(spread * n - spread**2 / 2)``, so one draw of
    ``b + z`` serves every candidate: its log gap is ``log s + log D`` and its log top-1 probability is read
    from a per-token table over a grid of scales. The search is a grid over (log mean,
    spread), then a finer grid around the best point.
    """
    layers = bias.shape[0]
    unbiased = unit[:, :_CONFIDENCE_TOKENS] + bias[:, None, :].astype(np.float32)
    log_d = log_gaps(top_k_experts(unbiased, top_k)[1])  # [L, N]
    table = _log_top1_table(unbiased)  # [L, N, G]
    normal = np.random.default_rng(seed).standard_normal(_CONFIDENCE_TOKENS)
    rows, tokens = np.arange(layers)[:, None, None], np.arange(_CONFIDENCE_TOKENS)[None, None, :]

    def statistics(log_mean: np.ndarray, spread: np.ndarray) -> np.ndarray:
        """``[L, M, 4]`` for ``log_mean`` ``[L, M]`` at ``spread`` ``[L, 1]``."""
        log_scale = log_mean[..., None] + (spread * normal - spread**2 / 2)[:, None, :]  # [L, M, N]
        place = np.clip((log_scale - _LOG_SCALE_GRID[0]) / _LOG_SCALE_STEP, 0.0, _LOG_SCALE_GRID.size - 1.0)
        low = np.minimum(place.astype(np.int64), _LOG_SCALE_GRID.size - 2)
        weight = place - low
        log_top1 = table[rows, tokens, low] * (1.0 - weight) + table[rows, tokens, low + 1] * weight
        return confidence_statistics(log_scale + log_d[:, None, :], log_top1)

    def best(log_means: np.ndarray, spreads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The (log mean, spread) per layer of least squared distance to the trace, over ``log_means``
        ``[L, M]`` x ``spreads`` ``[L, S]``."""
        columns = [statistics(log_means, spreads[:, [j]]) for j in range(spreads.shape[1])]  # each [L, M, 4]
        error = (((np.stack(columns, axis=2) - trace_stats[:, None, None, :]) ** 2).sum(axis=-1))  # [L, M, S]
        flat = error.reshape(layers, -1).argmin(axis=1)
        m, j = np.unravel_index(flat, error.shape[1:])
        return log_means[np.arange(layers), m], spreads[np.arange(layers), j]

    coarse_means = np.tile(np.arange(np.log(0.05), np.log(20.0), 0.2), (layers, 1))
    coarse_spreads = np.tile(np.arange(0.0, _MAX_CONFIDENCE_SPREAD + 1e-9, 0.2), (layers, 1))
    log_mean, spread = best(coarse_means, coarse_spreads)
    fine = np.linspace(-0.2, 0.2, 11)  # steps of 0.04, around the coarse optimum
    log_mean, spread = best(log_mean[:, None] + fine, np.maximum(spread[:, None] + fine, 0.0))
    mean, spread = np.round(np.exp(log_mean), _DECIMALS), np.round(spread, _DECIMALS)
    return mean, spread, statistics(np.log(mean)[:, None], spread[:, None])[:, 0]


def _log_top1_table(logits: np.ndarray) -> np.ndarray:
    """``[L, N, G]``: each token's log top-1 softmax probability when its logits are scaled by each of
    ``exp(_LOG_SCALE_GRID)``; smooth and rising in the scale, so linear interpolation in between is close."""
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)  # best logit 0: log p1 = -log(sum exp(s * x))
    table = np.empty(x.shape[:2] + (_LOG_SCALE_GRID.size,))
    for g, scale in enumerate(np.exp(_LOG_SCALE_GRID)):
        table[..., g] = -np.log(np.exp(scale * x).sum(axis=-1))
    return table
