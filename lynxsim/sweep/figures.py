"""Figures of a sweep, drawn from its results store: what a policy buys as a swept key varies.

Three kinds: a metric against a swept key, one line per policy (and per combination of the other swept keys);
each policy's speed-up over the baseline policy (the first of the experiment) against batch size; and latency
against routing quality with the Pareto front (lower latency, higher quality), each point labelled with its swept
values. Repeats of a point are averaged, with their range as error bars. Each figure's numbers are written beside
it as CSV, so a figure can be checked or redrawn elsewhere. Titles, legends, the front and batch axes follow the
rules of the run figures (lynxsim/plots.py).
"""

from __future__ import annotations

import numbers
import re
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from lynxsim.plots import batch_axis, draw_front, legend_outside, number_text, save_figure, titled  # noqa: E402

DEFAULT_METRICS = ("tpot_p50_ms", "tpot_p99_ms", "ttft_p99_ms", "output_tokens_per_s")
BATCH_KEY = "serving.max_num_seqs"
MAX_LINES = 12
"""Above this many lines in one panel the other swept keys are averaged over instead of drawn apart."""
MAX_VALUE_TEXT = 40
"""A swept value longer than this (a whole policy, say) is cut short in legends and point labels."""
POLICY_KEY = re.compile(r"policies\.(\d+)(\.|$)")
"""A swept key inside one policy's parameters (``policies.1.alpha``): it says nothing about the other policies."""


def sweep_figures(
    results: pd.DataFrame,
    keys: list[str],
    out_dir: Path,
    *,
    metrics: tuple[str, ...] = DEFAULT_METRICS,
    x_keys: list[str] | None = None,
    latency: str = "tpot_p50_ms",
    quality: str = "retained_mass",
    context: str = "",
) -> list[Path]:
    """Every figure of a sweep's ``results`` view (swept ``keys`` as columns); returns the PNG paths. ``context``
    (``lynxsim.plots.run_context`` of the points' run folders) goes into every title."""
    out_dir.mkdir(parents=True, exist_ok=True)
    numeric = [k for k in keys if pd.api.types.is_numeric_dtype(results[k]) and results[k].nunique() > 1]
    paths = []
    for x_key in x_keys if x_keys is not None else numeric:
        paths.append(metric_vs_key(results, keys, x_key, metrics, out_dir / f"{_file_part(x_key)}.png", context))
    paths.append(speedup_vs_batch(results, keys, latency, out_dir / "speedup_vs_batch.png", context))
    paths.append(latency_vs_quality(results, keys, latency, quality, out_dir / "latency_vs_quality.png", context))
    return paths


def metric_vs_key(
    results: pd.DataFrame, keys: list[str], x_key: str, metrics: tuple[str, ...], path: Path, context: str = ""
) -> Path:
    """One panel per metric; one line per policy and combination of the other swept keys."""
    table, lines = metric_lines(results, keys, x_key, metrics)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for label, line in lines:
            ax.errorbar(
                line[x_key], line[f"{metric}_mean"],
                yerr=[line[f"{metric}_mean"] - line[f"{metric}_min"], line[f"{metric}_max"] - line[f"{metric}_mean"]],
                marker="o", markersize=3, capsize=2, label=label,
            )
        ax.set_xlabel(x_key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    legend_outside(axes[0][-1], of=axes[0][0], fontsize=7)
    fig.suptitle(titled(f"metrics against {x_key}", context))
    return _save(fig, table, path)


def metric_lines(
    results: pd.DataFrame, keys: list[str], x_key: str, metrics: tuple[str, ...]
) -> tuple[pd.DataFrame, list[tuple[str, pd.DataFrame]]]:
    """Each metric's mean, min and max over repeats (``<metric>_mean`` ...) by policy, the other swept keys (if
    drawing them apart keeps a panel readable) and ``x_key``; and that table cut into labelled lines, by x."""
    others = _line_keys(results, keys, x_key)
    table = _mean_and_range(results, ["policy", *others, x_key], list(metrics))
    return table, [(label, line.sort_values(x_key)) for label, line in _lines(table, others)]


@dataclass(frozen=True)
class SpeedupLines:
    """The speed-up figure's numbers: ``table`` (``speedup_mean``/``_min``/``_max`` by policy, line keys and
    ``x_key``), its labelled lines by x, and the axis labels."""

    table: pd.DataFrame
    lines: list[tuple[str, pd.DataFrame]]
    x_key: str
    x_label: str
    y_label: str


def speedup_lines(results: pd.DataFrame, keys: list[str], latency: str) -> SpeedupLines:
    """Baseline latency over each policy's latency in the same run (a paired ratio), against the swept batch
    limit when ``serving.max_num_seqs`` is swept, else against the baseline's measured mean decode batch."""
    others = with_baseline(results, [latency, "mean_decode_batch"])
    others["speedup"] = others[f"baseline_{latency}"] / others[latency]
    x_key = BATCH_KEY if BATCH_KEY in keys else "baseline_mean_decode_batch"
    line_keys = _line_keys(others, keys, x_key)
    table = _mean_and_range(others, ["policy", *line_keys, x_key], ["speedup"])
    baselines = results.loc[results["policy_position"] == 0, "policy"]
    base_label = baselines.iloc[0] if len(baselines) else "baseline"
    return SpeedupLines(
        table, [(label, line.sort_values(x_key)) for label, line in _lines(table, line_keys)], x_key,
        "max decode batch (max_num_seqs)" if x_key == BATCH_KEY else f"mean decode batch of {base_label}",
        f"speed-up over {base_label} ({latency})",
    )


def speedup_vs_batch(results: pd.DataFrame, keys: list[str], latency: str, path: Path, context: str = "") -> Path:
    """``speedup_lines`` drawn, with a line at 1 (no speed-up)."""
    speedup = speedup_lines(results, keys, latency)
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, line in speedup.lines:
        ax.plot(line[speedup.x_key], line["speedup_mean"], marker="o", markersize=3, label=label)
    ax.axhline(1.0, color="grey", linestyle=":")
    ax.set_xlabel(speedup.x_label)
    ax.set_ylabel(speedup.y_label)
    ax.set_title(titled("speed-up against batch size", context))
    batch_axis(ax, speedup.table[speedup.x_key])
    ax.grid(alpha=0.3)
    legend_outside(ax, fontsize=7)
    return _save(fig, speedup.table, path)


def with_baseline(results: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """The rows of every policy but the first (the baseline) of each run, each with ``baseline_<column>``: that
    column's value for the baseline policy of the same run, so that ratios between them are paired."""
    baseline = results[results["policy_position"] == 0].set_index("config_hash")
    others = results[results["policy_position"] > 0].copy()
    for column in columns:
        others[f"baseline_{column}"] = baseline.loc[others["config_hash"], column].to_numpy()
    return others


def latency_vs_quality(
    results: pd.DataFrame, keys: list[str], latency: str, quality: str, path: Path, context: str = ""
) -> Path:
    """Every run and policy as a point labelled with its swept values (which point is which); the Pareto front
    joins those no other point beats on both axes."""
    table = quality_points(results, keys, latency, quality)
    fig, ax = plt.subplots(figsize=(6, 4))
    for policy, group in table.groupby("policy", sort=False):
        ax.scatter(group[quality], group[latency], s=14, label=str(policy))
    # once per distinct point: copies of one result (repeats, a policy that a swept key leaves alone) would
    # print their label over itself
    for label, x, y in dict.fromkeys(zip(table["point"], table[quality], table[latency], strict=True)):
        if label:
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6)
    front = table[table["pareto"]]
    draw_front(ax, front[quality].to_numpy(), front[latency].to_numpy(), color="black")
    ax.set_xlabel(f"{quality} (higher is better)")
    ax.set_ylabel(f"{latency} (lower is better)")
    ax.set_title(titled("latency against routing quality", context))
    ax.grid(alpha=0.3)
    legend_outside(ax, fontsize=7)
    return _save(fig, table, path)


def quality_points(results: pd.DataFrame, keys: list[str], latency: str, quality: str) -> pd.DataFrame:
    """Every run and policy with both figures: its ``latency`` and ``quality``, the swept keys that vary, its
    ``point`` label (``_point_label``) and whether it is on the Pareto front (``pareto``)."""
    varying = [k for k in keys if k in results and results[k].nunique() > 1]
    table = results[["config_hash", "policy", "policy_position", *varying, latency, quality]]
    table = table.dropna(subset=[latency, quality]).copy()
    table["point"] = [
        _point_label(values, int(position))
        for values, position in zip(table[varying].to_dict("records"), table["policy_position"], strict=True)
    ]
    table["pareto"] = pareto_mask(table[quality].to_numpy(), table[latency].to_numpy())
    return table


def pareto_mask(quality: np.ndarray, latency: np.ndarray) -> np.ndarray:
    """True where no other point has quality >= and latency <= with one of them strict."""
    better_or_equal = (quality[None, :] >= quality[:, None]) & (latency[None, :] <= latency[:, None])
    strictly = (quality[None, :] > quality[:, None]) | (latency[None, :] < latency[:, None])
    return ~np.any(better_or_equal & strictly, axis=1)


def _line_keys(results: pd.DataFrame, keys: list[str], x_key: str) -> list[str]:
    """The other swept keys that vary, if drawing them apart keeps the panel readable; else none (averaged)."""
    varying = [k for k in keys if k != x_key and k in results and results[k].nunique() > 1]
    lines = results[["policy", *varying]].drop_duplicates()
    return varying if len(lines) <= MAX_LINES else []


def _mean_and_range(frame: pd.DataFrame, by: list[str], metrics: list[str]) -> pd.DataFrame:
    grouped = frame.groupby(by, sort=False, dropna=False)[metrics]
    parts = [grouped.mean().add_suffix("_mean"), grouped.min().add_suffix("_min"), grouped.max().add_suffix("_max")]
    return pd.concat(parts, axis=1).reset_index()


def _lines(table: pd.DataFrame, line_keys: list[str]) -> list[tuple[str, pd.DataFrame]]:
    by = ["policy", *line_keys]
    out = []
    for values, line in table.groupby(by, sort=False):
        values = values if isinstance(values, tuple) else (values,)
        extra = ", ".join(_assignment(k, v) for k, v in zip(line_keys, values[1:], strict=True))
        out.append((f"{values[0]} ({extra})" if extra else str(values[0]), line))
    return out


def _point_label(values: dict[str, object], policy_position: int) -> str:
    """The swept values of one policy's point, as "alpha=0.7, rate_per_s=4", leaving out another policy's
    parameters: a top-k point does not depend on Lynx's alpha, which would only tell its copies apart."""
    return ", ".join(
        _assignment(key, value)
        for key, value in values.items()
        if (match := POLICY_KEY.match(key)) is None or int(match.group(1)) == policy_position
    )


def _assignment(key: str, value: object) -> str:
    """A swept key and value as "alpha=0.7": the key's last part, the value as short text."""
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
        text = number_text(float(value))
    else:
        text = str(value)
    text = text if len(text) <= MAX_VALUE_TEXT else text[: MAX_VALUE_TEXT - 3] + "..."
    return f"{key.rsplit('.', 1)[-1]}={text}"


def _file_part(key: str) -> str:
    return "metrics_vs_" + key.replace(".", "_")


def _save(fig: Figure, table: pd.DataFrame, path: Path) -> Path:
    save_figure(fig, path)
    table.to_csv(path.with_suffix(".csv"), index=False)
    return path
