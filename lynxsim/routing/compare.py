"""Compare a recorded routing trace with the synthetic router fitted to it, on what batch-aware selection feeds on.

The fit (``lynxsim.routing.fit``) matches a few summary statistics; this module checks the generator on what
those do not pin down, side by side with the trace, in the same design (the generator draws exactly the trace's
(sequence, position) tokens):

* ``distinct_experts``: mean distinct experts a batch of B tokens activates per layer under plain top-k, for each
  batch size. This is what the cost model charges for, so its gap decides whether a simulation on the profile
  can stand in for one on the trace. A decode batch holds one token of each of B different requests, so a batch
  takes tokens of B distinct sequences; where B exceeds the number of sequences S, every sequence gives
  ``B // S`` or ``B // S + 1`` tokens at distinct positions (as few tokens of one sequence as possible). Trace
  and generator use the same sampled tokens, so their difference has no batch-sampling noise of its own.
* ``top1_probability``: quantiles of each token's top-1 router probability, per layer (the fit matches only its
  median and interquartile range, jointly with the top-k gaps). For a top-k-only trace these are the recorded
  probabilities (the fill strategies keep them, see ``lynxsim.routing.trace_format``).
* ``variability``: how unequal expert load is inside one batch against over the whole trace. The Lynx paper
  (arXiv 2411.08982) reports that load balancing leaves experts nearly equally used over a dataset but skewed
  within a batch; its exact formula is not reproduced here. Definition used: per-expert load ``c_e`` = number of
  tokens whose top-k holds ``e``; its coefficient of variation ``CV = std_e(c) / mean_e(c)``; per-batch
  variability = root mean square of the CV over batches of ``VARIABILITY_BATCH`` tokens (sampled as above),
  aggregate variability = CV of the loads summed over the whole trace. For reference, routers choosing k
  experts uniformly at random give a per-batch RMS CV of exactly ``sqrt((1 - k/E) * E / (B k))`` (the load of
  one expert is binomial with B trials, and the mean load is fixed at ``B k / E``): most per-batch variability
  is the sampling of few tokens, not the router.
* ``gap``: the largest relative gap ``|generator / trace - 1|`` of the distinct-experts curve, per layer, over
  all layers, and for the curve of the layer mean (what a run's ``mean_distinct_experts`` reports).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from lynxsim.routing.fit import top_k_experts  # noqa: E402
from lynxsim.routing.synthetic import SyntheticRouting, SyntheticRoutingParams  # noqa: E402
from lynxsim.routing.trace import RoutingTrace  # noqa: E402

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
VARIABILITY_BATCH = 16
"""Batch size of the per-batch variability: the decode batch at which the Lynx paper contrasts it."""
QUANTILE_LEVELS = np.round(np.linspace(0.0, 1.0, 101), 2)
"""Top-1 probability quantiles kept: every percentile, enough to draw the distribution function."""
FIGURE_NAMES = ("routing_distinct_experts.png", "routing_top1_cdf.png")


def compare_routing(
    trace: RoutingTrace,
    params: SyntheticRoutingParams,
    top_k: int,
    *,
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
    seed: int = 0,
    batches_per_size: int = 256,
) -> dict[str, pd.DataFrame]:
    """The trace and the generator with ``params`` side by side: ``distinct_experts``, ``top1_probability``,
    ``variability`` and ``gap`` tables (see the module docstring for each definition).

    ``seed`` seeds the generator and the batch sampling; ``batches_per_size`` batches are drawn per batch size.
    Batch sizes must not exceed the trace's token count.
    """
    if not 1 <= top_k <= trace.num_experts:
        raise ValueError(f"top_k must be in [1, {trace.num_experts}], got {top_k}")
    if trace.recorded_top_k is not None and top_k > trace.recorded_top_k:
        raise ValueError(f"top_k {top_k} exceeds the {trace.recorded_top_k} experts per token the trace recorded")
    outside = [b for b in batch_sizes if not 1 <= b <= trace.num_tokens]
    if outside:
        raise ValueError(f"batch sizes {outside} are outside [1, {trace.num_tokens}] (the trace's tokens)")
    if batches_per_size < 1:
        raise ValueError(f"batches_per_size must be >= 1, got {batches_per_size}")
    generator = SyntheticRouting(trace.num_layers, trace.num_experts, params, seed)
    generated = generator.logits(trace.sequence_ids, trace.positions)
    rng = np.random.default_rng(seed)
    sequence_index = np.unique(trace.sequence_ids, return_inverse=True)[1].reshape(-1)
    sides = {"trace": trace.logits, "generator": generated}
    chosen = {side: top_k_experts(logits, top_k)[0] for side, logits in sides.items()}

    rows = []
    for size in batch_sizes:
        batches = sample_batches(sequence_index, size, batches_per_size, rng)
        distinct = {side: _distinct_experts(ids, batches, trace.num_experts) for side, ids in chosen.items()}
        for layer, trace_mean, generator_mean in zip(
            trace.layer_ids, distinct["trace"], distinct["generator"], strict=True
        ):
            rows.append((layer, size, trace_mean, generator_mean))
    distinct_experts = pd.DataFrame(rows, columns=["layer", "batch_size", "trace", "generator"])
    distinct_experts["relative_gap"] = distinct_experts["generator"] / distinct_experts["trace"] - 1.0

    top1 = {side: _top1_probability(logits) for side, logits in sides.items()}
    quantiles = {side: np.quantile(p, QUANTILE_LEVELS, axis=1) for side, p in top1.items()}  # [Q, L]
    top1_probability = pd.DataFrame(
        {
            "layer": np.repeat(trace.layer_ids, QUANTILE_LEVELS.size),
            "quantile": np.tile(QUANTILE_LEVELS, trace.num_layers),
            "trace": quantiles["trace"].T.ravel(),
            "generator": quantiles["generator"].T.ravel(),
        }
    )

    batches = sample_batches(sequence_index, VARIABILITY_BATCH, batches_per_size, rng)
    e, k = trace.num_experts, top_k
    variability = pd.DataFrame(
        {
            "layer": trace.layer_ids,
            "batch_size": VARIABILITY_BATCH,
            "trace_per_batch_cv": _per_batch_cv(chosen["trace"], batches, e),
            "generator_per_batch_cv": _per_batch_cv(chosen["generator"], batches, e),
            "trace_aggregate_cv": _aggregate_cv(chosen["trace"], e),
            "generator_aggregate_cv": _aggregate_cv(chosen["generator"], e),
            "uniform_router_per_batch_cv": np.sqrt((1.0 - k / e) * e / (VARIABILITY_BATCH * k)),
        }
    )
    return {
        "distinct_experts": distinct_experts,
        "top1_probability": top1_probability,
        "variability": variability,
        "gap": _gap_table(distinct_experts),
    }


def sample_batches(sequence_index: np.ndarray, size: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``[count, size]`` token indices: each row a batch of distinct tokens spread over as many sequences as can be.

    Each token gets a random rank among the tokens of its sequence, plus a random fraction per (batch,
    sequence); a batch is the ``size`` tokens of smallest key, so it takes one token of every sequence (in a
    random order of sequences) before a second of any.
    """
    tokens = sequence_index.size
    sequences = int(sequence_index.max()) + 1
    noise = rng.random((count, tokens))
    # Sort by sequence, then by noise: a token's place within its sequence's run is a uniformly random rank.
    order = np.argsort(sequence_index[None, :] + noise, axis=1)
    starts = np.concatenate([[0], np.cumsum(np.bincount(sequence_index, minlength=sequences))[:-1]])
    ranks = np.empty((count, tokens))
    np.put_along_axis(ranks, order, np.arange(tokens) - starts[sequence_index[order]], axis=1)
    keys = ranks + rng.random((count, sequences))[:, sequence_index]
    return np.argpartition(keys, size - 1, axis=1)[:, :size]


def _distinct_experts(ids: np.ndarray, batches: np.ndarray, num_experts: int) -> np.ndarray:
    """Mean over batches of the distinct experts the batch's top-k ids activate, per layer (``[L]``)."""
    return _batch_loads(ids, batches, num_experts).astype(bool).sum(axis=-1).mean(axis=-1)


def _batch_loads(ids: np.ndarray, batches: np.ndarray, num_experts: int) -> np.ndarray:
    """``[L, batches, E]``: per batch, how many of its tokens hold each expert in their top-k."""
    layers = ids.shape[0]
    count, size = batches.shape
    picked = ids[:, batches].reshape(layers, count, -1).astype(np.int64)  # [L, batches, size * k]
    cells = (np.arange(layers * count, dtype=np.int64).reshape(layers, count, 1) * num_experts + picked).ravel()
    return np.bincount(cells, minlength=layers * count * num_experts).reshape(layers, count, num_experts)


def _per_batch_cv(ids: np.ndarray, batches: np.ndarray, num_experts: int) -> np.ndarray:
    """Root mean square over batches of the CV of per-expert load, per layer."""
    loads = _batch_loads(ids, batches, num_experts).astype(np.float64)
    cv = loads.std(axis=-1) / loads.mean(axis=-1)
    return np.sqrt((cv**2).mean(axis=-1))


def _aggregate_cv(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """CV of per-expert load over all tokens, per layer."""
    everything = np.arange(ids.shape[1])[None, :]
    loads = _batch_loads(ids, everything, num_experts)[:, 0].astype(np.float64)
    return loads.std(axis=-1) / loads.mean(axis=-1)


def _top1_probability(logits: np.ndarray) -> np.ndarray:
    """``[L, T]``: each token's largest softmax probability (float64, stable for any logit offset)."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return 1.0 / np.exp(x).sum(axis=-1)


def _gap_table(distinct_experts: pd.DataFrame) -> pd.DataFrame:
    """Largest |relative gap| of the distinct-experts curve and the batch size where it occurs, per layer, over
    all layers, and for the layer-mean curve."""

    def largest(frame: pd.DataFrame) -> tuple[float, int]:
        row = frame.loc[frame["relative_gap"].abs().idxmax()]
        return float(row["relative_gap"]), int(row["batch_size"])

    rows = [(f"layer {layer}", *largest(frame)) for layer, frame in distinct_experts.groupby("layer", sort=False)]
    rows.append(("all layers", *largest(distinct_experts)))
    mean = distinct_experts.groupby("batch_size", as_index=False)[["trace", "generator"]].mean()
    mean["relative_gap"] = mean["generator"] / mean["trace"] - 1.0
    rows.append(("layer mean", *largest(mean)))
    return pd.DataFrame(rows, columns=["scope", "relative_gap", "batch_size"])


def compare_figures(result: dict[str, pd.DataFrame], out_dir: str | Path) -> list[Path]:
    """Draw ``compare_routing``'s result into ``out_dir``: distinct experts vs batch size and the top-1
    probability distribution, one panel per layer, trace solid and generator dashed. Returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    distinct_path, top1_path = (out / name for name in FIGURE_NAMES)

    distinct = result["distinct_experts"]
    fig, axes = _layer_panels(distinct["layer"].nunique())
    # strict=False: the panel grid may hold more cells than there are layers (the spare ones are hidden)
    for ax, (layer, part) in zip(axes.ravel(), distinct.groupby("layer", sort=False), strict=False):
        for side, style in (("trace", "-"), ("generator", "--")):
            ax.plot(part["batch_size"], part[side], style, marker="o", markersize=3, label=side)
        ax.set_xscale("log", base=2)
        ax.set_title(f"MoE layer {layer}", fontsize=9)
    title = "distinct experts per batch, plain top-k"
    _finish(fig, axes, "batch size (tokens)", "distinct experts", title, distinct_path)

    top1 = result["top1_probability"]
    fig, axes = _layer_panels(top1["layer"].nunique())
    for ax, (layer, part) in zip(axes.ravel(), top1.groupby("layer", sort=False), strict=False):
        for side, style in (("trace", "-"), ("generator", "--")):
            ax.plot(part[side], part["quantile"], style, label=side)
        ax.set_title(f"MoE layer {layer}", fontsize=9)
    _finish(fig, axes, "top-1 router probability", "fraction of tokens", "top-1 probability distribution", top1_path)
    return [distinct_path, top1_path]


def _layer_panels(layers: int) -> tuple[plt.Figure, np.ndarray]:
    """A grid of up to four panels per row, one per layer, sharing the y axis."""
    columns = min(4, layers)
    rows = -(-layers // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.6 * rows), squeeze=False, sharey=True)
    for ax in axes.ravel()[layers:]:
        ax.set_visible(False)
    return fig, axes


def _finish(fig: plt.Figure, axes: np.ndarray, xlabel: str, ylabel: str, title: str, path: Path) -> None:
    for ax in axes.ravel():
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel(xlabel)
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
