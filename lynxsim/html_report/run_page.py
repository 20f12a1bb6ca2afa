"""The page of one run directory: its summary table, the run's figures as interactive plotly figures (the same
numbers as lynxsim/plots.py's PNGs, taken from the same functions there), and its resolved config.

A big run keeps a small page: the TPOT CDF, the one figure with a point per request, is drawn at most
``CDF_POINTS`` points per policy (evenly spaced ranks, the first and last included); every other figure has a
point per policy, per MoE layer or per decode batch size.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import yaml

from lynxsim.config import SLOConfig
from lynxsim.html_report.page import FigureWriter, Section, collapsible_text, page, paragraph, summary_table_html
from lynxsim.plots import (
    PolicyRecords,
    decode_breakdown_ms,
    distinct_experts_by_batch,
    distinct_experts_by_layer,
    latency_quality_points,
    pareto_front,
    read_run,
    run_context,
    tpot_cdf_points,
    unreadable_run_refused,
)
from lynxsim.records import RUN_MARKER
from lynxsim.summary_columns import summary_cells

CDF_POINTS = 1000
"""At most this many points of a policy's TPOT CDF on the page (19,366 requests of the S1 scenario: 1,000)."""
ALL_EXPERTS_LINE = {"color": "grey", "dash": "dot"}


def run_page(run_dir: Path) -> str:
    """The HTML page of a finished run directory (``plots.read_run``: ``InputError`` for anything else)."""
    records, num_experts = read_run(run_dir)
    with unreadable_run_refused(run_dir):
        resolved_text = (run_dir / RUN_MARKER).read_text()
        resolved = yaml.safe_load(resolved_text)
        header = json.loads((run_dir / "summary.json").read_text())
        frame = pd.read_parquet(run_dir / "summary.parquet").set_index("policy")
        cells = summary_cells(frame, with_slo=SLOConfig.model_validate(resolved.get("slo") or {}).has_target)
    figure = FigureWriter()
    figures = [
        figure(tpot_cdf_figure(records), "tpot_cdf"),
        figure(distinct_experts_per_layer_figure(records, num_experts), "distinct_experts_per_layer"),
        figure(latency_breakdown_figure(records), "latency_breakdown"),
        figure(distinct_experts_vs_batch_figure(records, num_experts), "distinct_experts_vs_batch"),
        figure(latency_vs_quality_figure(records), "latency_vs_quality"),
    ]
    details = (f"cost model: {header.get('cost_model')}; routing mode: {header.get('routing_mode')}; "
               f"routing: {header.get('routing_evidence')}")
    return page(
        f"lynxsim run: {run_context(run_dir)}",
        f"{resolved.get('description') or ''} ({run_dir})",
        [
            Section("Summary", summary_table_html(cells) + paragraph(details)),
            Section("Figures", "\n".join(figures)),
            Section("Resolved config", collapsible_text(f"{RUN_MARKER} (click to open)", resolved_text)),
        ],
    )


def thinned(values: np.ndarray, fraction: np.ndarray, limit: int = CDF_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """At most ``limit`` points of a CDF: those at evenly spaced ranks, the first and last always among them."""
    if len(values) <= limit:
        return values, fraction
    keep = np.unique(np.linspace(0, len(values) - 1, limit).round().astype(np.int64))
    return values[keep], fraction[keep]


def tpot_cdf_figure(records: list[PolicyRecords]) -> go.Figure:
    fig = go.Figure()
    for rec in records:
        tpot_ms, fraction = thinned(*tpot_cdf_points(rec))
        if len(tpot_ms):
            fig.add_scatter(x=tpot_ms, y=fraction, mode="lines", name=rec.label,
                            hovertemplate="%{y:.3f} of requests at or below %{x:.2f} ms")
    return fig.update_layout(title="TPOT distribution", xaxis_title="time per output token (ms)",
                             yaxis_title="fraction of requests")


def distinct_experts_per_layer_figure(records: list[PolicyRecords], num_experts: int) -> go.Figure:
    fig = go.Figure()
    for rec in records:
        per_layer = distinct_experts_by_layer(rec)
        if len(per_layer):
            fig.add_scatter(x=np.arange(len(per_layer)), y=per_layer, mode="lines+markers", name=rec.label,
                            hovertemplate="layer %{x}: %{y:.2f} experts")
    fig.add_hline(y=num_experts, line=ALL_EXPERTS_LINE, annotation_text="all experts")
    return fig.update_layout(title="Experts read per layer", xaxis_title="MoE layer",
                             yaxis_title="mean distinct experts (pure-decode iterations)",
                             yaxis_range=[0, num_experts * 1.05])


def latency_breakdown_figure(records: list[PolicyRecords]) -> go.Figure:
    fig = go.Figure()
    labels = [rec.label for rec in records]
    for part, heights in decode_breakdown_ms(records).items():
        fig.add_bar(x=labels, y=heights, name=part, hovertemplate=f"{part}: %{{y:.3f}} ms")
    return fig.update_layout(title="Where decode time goes", barmode="stack",
                             yaxis_title="mean pure-decode iteration latency (ms)")


def distinct_experts_vs_batch_figure(records: list[PolicyRecords], num_experts: int) -> go.Figure:
    fig = go.Figure()
    for rec in records:
        grouped = distinct_experts_by_batch(rec)
        if len(grouped):
            fig.add_scatter(x=grouped.index.to_numpy(), y=grouped.to_numpy(), mode="lines+markers", name=rec.label,
                            hovertemplate="batch %{x}: %{y:.2f} experts")
    fig.add_hline(y=num_experts, line=ALL_EXPERTS_LINE, annotation_text="all experts")
    return fig.update_layout(title="Experts read vs batch size", xaxis_title="decode batch size (tokens)",
                             yaxis_title="mean distinct experts per layer", yaxis_range=[0, num_experts * 1.05])


def latency_vs_quality_figure(records: list[PolicyRecords]) -> go.Figure:
    """Median TPOT against retained mass, a point per policy, and the Pareto front as the staircase the PNG draws
    (``plots.draw_front``'s "steps-pre" is plotly's "vh")."""
    fig = go.Figure()
    points = latency_quality_points(records)
    if points:
        labels = [p[0] for p in points]
        latency = np.array([p[1] for p in points])
        quality = np.array([p[2] for p in points])
        fig.add_scatter(x=quality, y=latency, mode="markers+text", text=labels, textposition="top right",
                        name="policies", hovertemplate="%{text}: mass %{x:.4f}, TPOT p50 %{y:.2f} ms")
        front = pareto_front(latency, quality)
        order = front[np.argsort(quality[front], kind="stable")]
        fig.add_scatter(x=quality[order], y=latency[order], mode="lines+markers", line_shape="vh",
                        line={"color": "grey", "dash": "dash", "width": 1},
                        marker={"symbol": "circle-open", "size": 12}, name="Pareto front", hoverinfo="skip")
    return fig.update_layout(title="Latency vs routing quality", xaxis_title="retained top-k probability mass",
                             yaxis_title="median TPOT (ms)")
