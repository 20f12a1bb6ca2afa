"""The page of a sweep's results folder: the sweep figures of lynxsim/sweep/figures.py as interactive plotly
figures, from the same numbers. The metric figure has two menus (plotly ``updatemenus``, no JavaScript of ours):
which summary metric is on y, and which swept key is on x. Every (swept key, line) pair is a trace; the x menu
shows one key's traces, the metric menu puts that metric's means (and its range over repeats, as error bars)
into every trace, so either menu can be changed without resetting the other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from lynxsim.html_report.page import FigureWriter, Section, page, paragraph
from lynxsim.sweep.commands import SweepResults, read_sweep_results
from lynxsim.sweep.figures import DEFAULT_METRICS, metric_lines, quality_points, speedup_lines

BOOKKEEPING_COLUMNS = ("point", "repeat", "seed", "policy_position")
"""Numeric columns of the results view that are not a metric to draw."""
LATENCY = "tpot_p50_ms"
QUALITY = "retained_mass"
MENU_Y = 1.04
"""The menus' height above the plot (a fraction of the plot's height)."""


def sweep_page(results_dir: Path) -> str:
    """The HTML page of a sweep's results folder (``read_sweep_results``: ``InputError`` without a finished
    point)."""
    return sweep_results_page(read_sweep_results(results_dir), str(results_dir))


def sweep_results_page(sweep: SweepResults, where: str) -> str:
    results = sweep.results
    x_keys = [k for k in sweep.swept if pd.api.types.is_numeric_dtype(results[k]) and results[k].nunique() > 1]
    figure = FigureWriter()
    parts = []
    if x_keys:
        parts.append(figure(metric_figure(results, sweep.swept, x_keys, metric_columns(results, sweep.swept)),
                            "metrics"))
    else:
        parts.append(paragraph("No swept key takes more than one number: there is no metric figure."))
    for name, columns, draw in (
        ("speedup_vs_batch", [LATENCY, "mean_decode_batch"], speedup_figure),
        ("latency_vs_quality", [LATENCY, QUALITY], quality_figure),
    ):
        if all(column in results for column in columns):
            parts.append(figure(draw(results, sweep.swept), name))
    points = results["point"].nunique()
    return page(
        f"lynxsim sweep: {sweep.context}",
        f"{points} finished points over {', '.join(sweep.swept) or 'no key'}; policies "
        f"{', '.join(map(str, results['policy'].unique()))} ({where})",
        [Section("Figures", "\n".join(parts))],
    )


def metric_columns(results: pd.DataFrame, swept: list[str]) -> list[str]:
    """The numeric summary metrics with a value: ``DEFAULT_METRICS`` first, then the others by name."""
    numeric = [
        c for c in results.columns
        if c not in swept and c not in BOOKKEEPING_COLUMNS and pd.api.types.is_numeric_dtype(results[c])
        and not pd.api.types.is_bool_dtype(results[c]) and results[c].notna().any()
    ]
    return [m for m in DEFAULT_METRICS if m in numeric] + sorted(m for m in numeric if m not in DEFAULT_METRICS)


def metric_figure(results: pd.DataFrame, swept: list[str], x_keys: list[str], metrics: list[str]) -> go.Figure:
    """One trace per swept key on x and line (``metric_lines``); the menus choose the metric and the key."""
    traces = [(x_key, label, line) for x_key in x_keys for label, line in metric_lines(results, swept, x_key,
                                                                                        tuple(metrics))[1]]

    def metric_values(metric: str) -> dict[str, list[Any]]:
        """Each trace's means of ``metric`` and its range over repeats (error bars)."""
        return {
            "y": [line[f"{metric}_mean"].to_numpy() for _, _, line in traces],
            "error_y": [
                {"type": "data", "symmetric": False,
                 "array": (line[f"{metric}_max"] - line[f"{metric}_mean"]).to_numpy(),
                 "arrayminus": (line[f"{metric}_mean"] - line[f"{metric}_min"]).to_numpy()}
                for _, _, line in traces
            ],
        }

    shown = metric_values(metrics[0])
    fig = go.Figure()
    for index, (x_key, label, line) in enumerate(traces):
        fig.add_scatter(x=line[x_key].to_numpy(), y=shown["y"][index], error_y=shown["error_y"][index], name=label,
                        mode="lines+markers", visible=x_key == x_keys[0], hovertemplate="%{x}: %{y:.4g}")
    metric_menu = [{"label": m, "method": "update", "args": [metric_values(m), {"yaxis.title.text": m}]}
                   for m in metrics]
    key_menu = [{"label": k, "method": "update",
                 "args": [{"visible": [key == k for key, _, _ in traces]}, {"xaxis.title.text": k}]} for k in x_keys]
    menu: dict[str, Any] = {"x": 0.07, "y": MENU_Y, "xanchor": "left", "yanchor": "bottom"}
    menu_label: dict[str, Any] = {"y": MENU_Y + 0.04, "xref": "paper", "yref": "paper", "showarrow": False,
                                  "xanchor": "left", "yanchor": "bottom"}
    fig.update_layout(
        title={"text": "metrics against a swept key (mean over repeats, their range as error bars)", "y": 0.97,
               "yanchor": "top"},
        xaxis_title=x_keys[0], yaxis_title=metrics[0], margin_t=150, height=540,
        updatemenus=[{**menu, "buttons": metric_menu}, {**menu, "x": 0.52, "buttons": key_menu}],
        annotations=[{**menu_label, "text": "metric", "x": 0}, {**menu_label, "text": "x", "x": 0.5}],
    )
    return fig


def speedup_figure(results: pd.DataFrame, swept: list[str]) -> go.Figure:
    speedup = speedup_lines(results, swept, LATENCY)
    fig = go.Figure()
    for label, line in speedup.lines:
        fig.add_scatter(x=line[speedup.x_key].to_numpy(), y=line["speedup_mean"].to_numpy(), name=label,
                        mode="lines+markers", hovertemplate="batch %{x:.4g}: %{y:.3f}x")
    fig.add_hline(y=1.0, line={"color": "grey", "dash": "dot"})
    return fig.update_layout(title="speed-up against batch size", xaxis_title=speedup.x_label,
                             yaxis_title=speedup.y_label, xaxis_type="log")


def quality_figure(results: pd.DataFrame, swept: list[str]) -> go.Figure:
    """Every run and policy a point, hover naming its swept values; the Pareto front as a staircase."""
    table = quality_points(results, swept, LATENCY, QUALITY)
    fig = go.Figure()
    for policy, group in table.groupby("policy", sort=False):
        fig.add_scatter(x=group[QUALITY].to_numpy(), y=group[LATENCY].to_numpy(), mode="markers", name=str(policy),
                        text=group["point"].to_numpy(), hovertemplate="%{text}<br>mass %{x:.4f}, %{y:.3f} ms")
    front = table[table["pareto"]].sort_values(QUALITY, kind="stable")
    fig.add_scatter(x=front[QUALITY].to_numpy(), y=front[LATENCY].to_numpy(), mode="lines+markers",
                    line_shape="vh", line={"color": "black", "width": 1},
                    marker={"symbol": "circle-open", "size": 12}, name="Pareto front", hoverinfo="skip")
    return fig.update_layout(title="latency against routing quality", xaxis_title=f"{QUALITY} (higher is better)",
                             yaxis_title=f"{LATENCY} (lower is better)")

