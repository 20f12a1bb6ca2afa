"""Figures of one run, drawn from the records on disk so they can be redrawn without re-simulating.

The drawing rules shared with the sweep figures (lynxsim/sweep/figures.py) live here: every title names the run
(``run_context``), every legend sits beside its axes (``legend_outside``), a Pareto front is a staircase
(``draw_front``) and a batch-size axis is labelled at the batches drawn (``batch_axis``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow as pa  # noqa: E402
import yaml  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import NullLocator  # noqa: E402

from lynxsim.errors import InputError, file_problem  # noqa: E402
from lynxsim.metrics import BREAKDOWN_COLUMNS  # noqa: E402
from lynxsim.records import slug  # noqa: E402
from lynxsim.yaml_input import read_yaml_mapping  # noqa: E402

FIGURE_NAMES = (
    "tpot_cdf.png",
    "distinct_experts_per_layer.png",
    "latency_breakdown.png",
    "distinct_experts_vs_batch.png",
    "latency_vs_quality.png",
)
MAX_BATCH_TICKS = 8
"""A batch-size axis labels every batch size drawn up to this many; above, this many spread over its range."""


@dataclass(frozen=True)
class PolicyRecords:
    label: str
    requests: pd.DataFrame
    iterations: pd.DataFrame
    summary: dict[str, float]

    @property
    def decode_iterations(self) -> pd.DataFrame:
        return self.iterations[self.iterations["pure_decode"]]


def load_run(run_dir: Path) -> list[PolicyRecords]:
    """The records of every policy of a run directory, in the run's policy order."""
    order = json.loads((run_dir / "summary.json").read_text())["policies"]
    return [
        PolicyRecords(
            label,
            pd.read_parquet(run_dir / "policies" / slug(label) / "requests.parquet"),
            pd.read_parquet(run_dir / "policies" / slug(label) / "iterations.parquet"),
            json.loads((run_dir / "policies" / slug(label) / "summary.json").read_text()),
        )
        for label in order
    ]


def read_run(run_dir: Path) -> tuple[list[PolicyRecords], int]:
    """A finished run directory's records (``load_run``) and its model's expert count, what its figures are drawn
    from; a folder that is not one, or whose records cannot be read, is ``InputError`` (one line)."""
    if not (run_dir / "summary.json").is_file():
        raise InputError(str(run_dir), "not a finished run directory (no summary.json)")
    with unreadable_run_refused(run_dir):
        resolved = yaml.safe_load((run_dir / "config.resolved.yaml").read_text())
        return load_run(run_dir), int(resolved["resolved"]["model"]["num_experts"])


@contextmanager
def unreadable_run_refused(run_dir: Path) -> Iterator[None]:
    """Reading a run directory's files inside the block: a file missing, damaged or not what a run writes ends
    in ``InputError`` naming the folder, in one line, not in a traceback."""
    try:
        yield
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError, pa.ArrowException) as exc:
        detail = file_problem(exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
        detail = " ".join(detail.split())  # one line: a YAML error spans several
        raise InputError(str(run_dir), f"a run directory whose records cannot be read ({detail})") from None


def run_context(*run_dirs: Path) -> str:
    """What a figure is of, from the runs' ``config.resolved.yaml``: "quickstart: mixtral-8x7b on NVIDIA H200 SXM
    x1" (experiment: model on hardware x GPUs). A figure read without it cannot be told from one of another run.
    Several runs (the points of a sweep) that differ in a part list that part's values in braces."""
    resolved = [read_yaml_mapping(run_dir / "config.resolved.yaml", "resolved experiment") for run_dir in run_dirs]
    experiments = _one_or_all(r["name"] for r in resolved)
    models = _one_or_all(r["resolved"]["model"]["name"] for r in resolved)
    hardware = _one_or_all(r["resolved"]["hardware"] for r in resolved)
    gpus = _one_or_all(r["resolved"]["gpus"] for r in resolved)
    return f"{experiments}: {models} on {hardware} x{gpus}"


def titled(what: str, context: str) -> str:
    """A figure's title: what it shows and, on a second line, the run it shows it for."""
    return f"{what}\n{context}" if context else what


def legend_outside(ax: Axes, *, of: Axes | None = None, fontsize: float | str | None = None) -> None:
    """The legend of ``of`` (default ``ax``) beside ``ax``, right of it: a legend inside the axes covers data
    wherever the data happens to be ("best" only avoids what is drawn, and not always that). ``save_figure``
    widens the image to take it in."""
    handles, labels = (of or ax).get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0, fontsize=fontsize)


def draw_front(ax: Axes, quality: np.ndarray, latency: np.ndarray, *, color: str, linestyle: str = "-") -> None:
    """A Pareto front (higher quality, lower latency) as the staircase it is: a straight line between two front
    points would claim trade-offs no run achieved. Quality in (q_i, q_i+1] costs at least the latency of point
    i+1, so each latency holds leftward to the previous point ("steps-pre"); a front of one point is a marker."""
    order = np.argsort(quality, kind="stable")
    ax.plot(
        quality[order], latency[order], drawstyle="steps-pre", color=color, linestyle=linestyle, linewidth=1,
        marker="o", markersize=9, fillstyle="none", label="Pareto front",
    )


def batch_axis(ax: Axes, batches: Iterable[float]) -> None:
    """A log2 x axis labelled at batch sizes drawn: matplotlib labels only powers of two, so batches within one
    octave (3 and 5) got an axis without a label. Up to ``MAX_BATCH_TICKS`` batches each get a tick; above, the
    ticks go to the batches nearest an even spread over the (logarithmic) range."""
    present = np.unique(np.asarray(list(batches), dtype=float))
    present = present[np.isfinite(present) & (present > 0)]
    ax.set_xscale("log", base=2)
    if not len(present):
        return
    if len(present) > MAX_BATCH_TICKS:
        spread = np.geomspace(present[0], present[-1], MAX_BATCH_TICKS)
        present = np.unique(present[np.abs(np.log2(present)[None, :] - np.log2(spread)[:, None]).argmin(axis=1)])
    ax.set_xticks(present, [number_text(b) for b in present])
    ax.xaxis.set_minor_locator(NullLocator())


def number_text(value: float) -> str:
    """A number as a label: whole numbers in full (1024, not 1.02e+03), others to three significant digits."""
    return str(int(value)) if float(value).is_integer() else f"{value:.3g}"


# The numbers each run figure draws, apart from the drawing, so that another rendering of the figures (the
# interactive page of lynxsim/html_report) draws the same numbers.


def tpot_cdf_points(rec: PolicyRecords) -> tuple[np.ndarray, np.ndarray]:
    """The empirical CDF of the policy's TPOT: every request's TPOT (ms) in order, and the fraction of requests at
    or below it."""
    tpot_ms = np.sort(rec.requests["tpot_s"].dropna().to_numpy() * 1e3)
    return tpot_ms, np.arange(1, len(tpot_ms) + 1) / max(len(tpot_ms), 1)


def distinct_experts_by_layer(rec: PolicyRecords) -> np.ndarray:
    """Mean distinct experts of each MoE layer over the pure-decode iterations (empty without any)."""
    decode = rec.decode_iterations
    return np.stack(decode["distinct_experts"].to_numpy()).mean(axis=0) if len(decode) else np.zeros(0)


def decode_breakdown_ms(records: list[PolicyRecords]) -> dict[str, np.ndarray]:
    """Per part of an iteration's latency (``BREAKDOWN_COLUMNS`` without ``_s``), each policy's mean over its
    pure-decode iterations, in ms (0 without any)."""
    return {
        column.removesuffix("_s"): np.array(
            [rec.decode_iterations[column].mean() * 1e3 if len(rec.decode_iterations) else 0.0 for rec in records]
        )
        for column in BREAKDOWN_COLUMNS
    }


def distinct_experts_by_batch(rec: PolicyRecords) -> pd.Series:
    """Mean distinct experts per layer of the pure-decode iterations, by their decode batch size (tokens)."""
    return rec.decode_iterations.groupby("decode_tokens")["mean_distinct_experts"].mean()


def latency_quality_points(records: list[PolicyRecords]) -> list[tuple[str, float, float]]:
    """(label, median TPOT ms, retained mass) of every policy whose summary has both."""
    return [
        (rec.label, float(rec.summary["tpot_p50_ms"]), float(rec.summary["retained_mass"]))
        for rec in records
        if rec.summary.get("tpot_p50_ms") is not None and rec.summary.get("retained_mass") is not None
    ]


def tpot_cdf(records: list[PolicyRecords], path: Path, context: str = "") -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for rec in records:
        tpot_ms, fraction = tpot_cdf_points(rec)
        if len(tpot_ms):
            ax.plot(tpot_ms, fraction, label=rec.label)
    ax.set_xlabel("time per output token (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(titled("TPOT distribution", context))
    ax.grid(alpha=0.3)
    legend_outside(ax)
    save_figure(fig, path)


def distinct_experts_per_layer(records: list[PolicyRecords], num_experts: int, path: Path, context: str = "") -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for rec in records:
        per_layer = distinct_experts_by_layer(rec)
        if len(per_layer):
            ax.plot(np.arange(len(per_layer)), per_layer, marker="o", markersize=3, label=rec.label)
    ax.axhline(num_experts, color="grey", linestyle=":", label="all experts")
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("mean distinct experts (pure-decode iterations)")
    ax.set_title(titled("Experts read per layer", context))
    ax.set_ylim(0, num_experts * 1.05)
    ax.grid(alpha=0.3)
    legend_outside(ax)
    save_figure(fig, path)


def latency_breakdown(records: list[PolicyRecords], path: Path, context: str = "") -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = [rec.label for rec in records]
    bottom = np.zeros(len(records))
    for part, heights in decode_breakdown_ms(records).items():
        ax.bar(labels, heights, bottom=bottom, label=part)
        bottom += heights
    ax.set_ylabel("mean pure-decode iteration latency (ms)")
    ax.set_title(titled("Where decode time goes", context))
    legend_outside(ax)
    save_figure(fig, path)


def distinct_experts_vs_batch(records: list[PolicyRecords], num_experts: int, path: Path, context: str = "") -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for rec in records:
        grouped = distinct_experts_by_batch(rec)
        if len(grouped):
            ax.plot(grouped.index, grouped.to_numpy(), marker=".", label=rec.label)
    ax.axhline(num_experts, color="grey", linestyle=":", label="all experts")
    ax.set_xlabel("decode batch size (tokens)")
    ax.set_ylabel("mean distinct experts per layer")
    ax.set_title(titled("Experts read vs batch size", context))
    ax.set_ylim(0, num_experts * 1.05)
    ax.grid(alpha=0.3)
    legend_outside(ax)
    save_figure(fig, path)


def pareto_front(latency: np.ndarray, quality: np.ndarray) -> np.ndarray:
    """Indices of the points no other point beats on both lower latency and higher quality, by latency."""
    order = np.lexsort((-quality, latency))
    front: list[int] = []
    best_quality = -np.inf
    for index in order:
        if quality[index] > best_quality:
            front.append(int(index))
            best_quality = quality[index]
    return np.asarray(front, dtype=np.int64)


def latency_vs_quality(records: list[PolicyRecords], path: Path, context: str = "") -> None:
    """Median TPOT against the retained top-k probability mass, one point per policy, with the Pareto front; both
    figures are the run summary's (requests and iterations after warm-up)."""
    points = latency_quality_points(records)
    fig, ax = plt.subplots(figsize=(6, 4))
    if points:
        latency = np.array([p[1] for p in points])
        quality = np.array([p[2] for p in points])
        ax.scatter(quality, latency, zorder=3)
        for label, lat, mass in points:
            ax.annotate(label, (mass, lat), textcoords="offset points", xytext=(4, 4), fontsize=8)
        front = pareto_front(latency, quality)
        draw_front(ax, quality[front], latency[front], color="grey", linestyle="--")
        legend_outside(ax)
    ax.set_xlabel("retained top-k probability mass")
    ax.set_ylabel("median TPOT (ms)")
    ax.set_title(titled("Latency vs routing quality", context))
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def write_run_figures(
    records: list[PolicyRecords], num_experts: int, out_dir: Path, *, context: str = ""
) -> list[Path]:
    """All figures of one run into ``out_dir``; returns their paths. ``context`` (``run_context`` of the run
    directory) goes into every title."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / name for name in FIGURE_NAMES]
    tpot_cdf(records, written[0], context)
    distinct_experts_per_layer(records, num_experts, written[1], context)
    latency_breakdown(records, written[2], context)
    distinct_experts_vs_batch(records, num_experts, written[3], context)
    latency_vs_quality(records, written[4], context)
    return written


def save_figure(fig: Figure, path: Path) -> None:
    """Into ``path`` and closed. The axes are laid out without the legends beside them (``legend_outside``),
    which would otherwise squeeze them into what the figure's size leaves; the image's tight bounding box is
    then widened to take the legends in."""
    legends = [legend for ax in fig.axes if (legend := ax.get_legend()) is not None]
    for legend in legends:
        legend.set_in_layout(False)
    fig.tight_layout()
    for legend in legends:
        legend.set_in_layout(True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _one_or_all(values: Iterable[object]) -> str:
    """The one value of a title part, or its distinct values in braces where the runs differ."""
    distinct = list(dict.fromkeys(str(v) for v in values))
    return distinct[0] if len(distinct) == 1 else "{" + ", ".join(distinct) + "}"
