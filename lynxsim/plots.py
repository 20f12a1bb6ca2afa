"""Figures of one run, drawn from the records on disk so they can be redrawn without re-simulating."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from lynxsim.metrics import BREAKDOWN_COLUMNS  # noqa: E402
from lynxsim.records import slug  # noqa: E402

FIGURE_NAMES = (
    "tpot_cdf.png",
    "distinct_experts_per_layer.png",
    "latency_breakdown.png",
    "distinct_experts_vs_batch.png",
    "latency_vs_quality.png",
)


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


def tpot_cdf(records: list[PolicyRecords], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for rec in records:
        tpot_ms = np.sort(rec.requests["tpot_s"].dropna().to_numpy() * 1e3)
        if len(tpot_ms):
            ax.plot(tpot_ms, np.arange(1, len(tpot_ms) + 1) / len(tpot_ms), label=rec.label)
    ax.set_xlabel("time per output token (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("TPOT distribution")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def distinct_experts_per_layer(records: list[PolicyRecords], num_experts: int, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for rec in records:
        decode = rec.decode_iterations
        if len(decode):
            per_layer = np.stack(decode["distinct_experts"].to_numpy()).mean(axis=0)
            ax.plot(np.arange(len(per_layer)), per_layer, marker="o", markersize=3, label=rec.label)
    ax.axhline(num_experts, color="grey", linestyle=":", label="all experts")
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("mean distinct experts (pure-decode iterations)")
    ax.set_title("Experts read per layer")
    ax.set_ylim(0, num_experts * 1.05)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def latency_breakdown(records: list[PolicyRecords], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = [rec.label for rec in records]
    bottom = np.zeros(len(records))
    for column in BREAKDOWN_COLUMNS:
        heights = np.array(
            [rec.decode_iterations[column].mean() * 1e3 if len(rec.decode_iterations) else 0.0 for rec in records]
        )
        ax.bar(labels, heights, bottom=bottom, label=column.removesuffix("_s"))
        bottom += heights
    ax.set_ylabel("mean pure-decode iteration latency (ms)")
    ax.set_title("Where decode time goes")
    ax.legend()
    _save(fig, path)


def distinct_experts_vs_batch(records: list[PolicyRecords], num_experts: int, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for rec in records:
        decode = rec.decode_iterations
        if len(decode):
            grouped = decode.groupby("decode_tokens")["mean_distinct_experts"].mean()
            ax.plot(grouped.index, grouped.to_numpy(), marker=".", label=rec.label)
    ax.axhline(num_experts, color="grey", linestyle=":", label="all experts")
    ax.set_xlabel("decode batch size (tokens)")
    ax.set_ylabel("mean distinct experts per layer")
    ax.set_title("Experts read vs batch size")
    ax.set_ylim(0, num_experts * 1.05)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


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


def latency_vs_quality(records: list[PolicyRecords], path: Path) -> None:
    """Median TPOT against the retained top-k probability mass, one point per policy, with the Pareto front; both
    figures are the run summary's (requests and iterations after warm-up)."""
    points = [
        (rec.label, float(rec.summary["tpot_p50_ms"]), float(rec.summary["retained_mass"]))
        for rec in records
        if rec.summary.get("tpot_p50_ms") is not None and rec.summary.get("retained_mass") is not None
    ]
    fig, ax = plt.subplots(figsize=(6, 4))
    if points:
        latency = np.array([p[1] for p in points])
        quality = np.array([p[2] for p in points])
        ax.scatter(quality, latency, zorder=3)
        for label, lat, mass in points:
            ax.annotate(label, (mass, lat), textcoords="offset points", xytext=(4, 4), fontsize=8)
        front = pareto_front(latency, quality)
        ax.plot(quality[front], latency[front], color="grey", linestyle="--", label="Pareto front")
        ax.legend()
    ax.set_xlabel("retained top-k probability mass")
    ax.set_ylabel("median TPOT (ms)")
    ax.set_title("Latency vs routing quality")
    ax.grid(alpha=0.3)
    _save(fig, path)


def write_run_figures(records: list[PolicyRecords], num_experts: int, out_dir: Path) -> list[Path]:
    """All figures of one run into ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / name for name in FIGURE_NAMES]
    tpot_cdf(records, written[0])
    distinct_experts_per_layer(records, num_experts, written[1])
    latency_breakdown(records, written[2])
    distinct_experts_vs_batch(records, num_experts, written[3])
    latency_vs_quality(records, written[4])
    return written


def _save(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
