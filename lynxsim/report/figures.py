"""One function per figure kind of a ``report:`` section: results of a sweep in, PNG and CSV out.

Each returns the figure's table (what the CSV beside the PNG holds) so that the report can quote its numbers
in the text and the agreement table. The tables carry one row per line point, with the swept keys' labels.
Titles, legends, fronts and batch axes follow the drawing rules of every lynxsim figure (lynxsim/plots.py): the
title is the section's, with the runs it draws (``context``) on a second line; a figure of panels has one
legend, beside its first row, each line in the same colour in every panel; a front is a staircase.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from lynxsim.plots import batch_axis, draw_front, legend_outside, save_figure, titled  # noqa: E402
from lynxsim.sections.report import ReportSection  # noqa: E402
from lynxsim.sweep.figures import pareto_mask, with_baseline  # noqa: E402

FULL_CHUNK_SHARE = 0.9
"""latency_vs_experts: a mixed iteration counts as carrying a full prefill chunk from this share of the largest."""
MAX_SCHEDULING_DELAY_S = 5.0
"""A rate counts toward SLO throughput only while the p99 wait to first scheduling stays below this
(Vidur's capacity criterion, Agrawal et al., MLSys 2024; the same as ``lynxsim capacity``)."""
PANEL_COLUMNS = 3
"""A figure of panels (one per ``facet`` value) puts this many side by side, in as many rows as needed."""
LEGEND_ENTRY_IN = 0.14
"""Height of one legend entry at font size 6, in inches: speedup_vs_overhead makes its upper panel at least as
tall as that panel's legend, so that it ends above the lower panel's."""
LINE_STYLES = ("-", "--", ":", "-.")
"""experts_vs_batch: one per policy, in the experiment's order (the colour is the line's, the same for each)."""


@dataclass(frozen=True)
class FigureData:
    """What a report section reads: the sweep's ``results`` view and, where a figure needs them, iterations."""

    results: pd.DataFrame
    iterations: pd.DataFrame | None
    section: ReportSection
    labels: dict[str, dict[str, str]]
    quality: pd.DataFrame | None = None

    def label(self, key: str, value: object) -> str:
        """A swept value as the section names it (``labels``), else its short text."""
        text = value if isinstance(value, str) else json.dumps(value)
        return self.labels.get(key, {}).get(text, text if len(text) <= 40 else text[:37] + "...")


class DrawFigure(Protocol):
    def __call__(self, data: FigureData, path: Path, *, context: str = "") -> pd.DataFrame: ...


def draw(data: FigureData, path: Path, *, context: str = "") -> pd.DataFrame:
    """Draw ``data.section.figure`` into ``path`` (PNG) and its table beside it (CSV); return the table.
    ``context`` (``lynxsim.plots.run_context`` of the sweep's point folders) is the title's second line."""
    table = KINDS[data.section.figure](data, path, context=context)
    table.to_csv(path.with_suffix(".csv"), index=False)
    return table


def experts_vs_batch(data: FigureData, path: Path, *, context: str = "") -> pd.DataFrame:
    """Per facet (a panel each): distinct experts per layer against the decode batch, a colour per line and a
    line style per policy."""
    section = data.section
    x, facet = _required(section.x, "x"), _required(section.facet, "facet")
    frame = data.results
    table = frame[[facet, *section.lines, x, "policy", "mean_distinct_experts"]].copy()
    table = _labelled(data, table, section.lines, also=[facet])
    colors = _colors(table["line"])
    styles = {policy: LINE_STYLES[i % len(LINE_STYLES)] for i, policy in enumerate(dict.fromkeys(table["policy"]))}
    panels = list(dict.fromkeys(table[facet]))
    fig, axes = _panels(len(panels))
    for ax, panel in zip(axes, panels, strict=True):
        part = table[table[facet] == panel]
        for (line_label, policy), line in part.groupby(["line", "policy"], sort=False):
            line = line.sort_values(x)
            ax.plot(
                line[x], line["mean_distinct_experts"], styles[policy], color=colors[line_label], marker="o",
                markersize=3, label=f"{policy}, {line_label}" if line_label else str(policy),
            )
        batch_axis(ax, part[x])
        ax.set_title(str(panel))
        ax.set_xlabel("decode batch size")
        ax.set_ylabel("distinct experts per layer")
        ax.grid(alpha=0.3)
    _legend_beside(axes, fontsize=6)
    fig.suptitle(titled(section.title, context))
    save_figure(fig, path)
    return table


def latency_vs_experts(data: FigureData, path: Path, *, context: str = "") -> pd.DataFrame:
    if data.iterations is None or data.iterations.empty:
        raise ValueError("latency_vs_experts needs the sweep's iteration records")
    facet = _required(data.section.facet, "facet")
    its = data.iterations.copy()
    # Mixed iterations are kept only with a (nearly) full prefill chunk: their time follows their tokens, so
    # a fixed token count is what isolates the effect of the experts.
    full_chunk = its.groupby(facet)["prefill_tokens"].transform("max") * FULL_CHUNK_SHARE
    its = its[its["pure_decode"] | (its["prefill_tokens"] >= full_chunk)]
    its["kind"] = np.where(its["pure_decode"], "decode", "with prefill")
    its["batch"] = np.where(its["pure_decode"], _batch_bucket(its["decode_tokens"].to_numpy()), 0)
    its["experts"] = its["mean_distinct_experts"].round()
    table = (
        its.groupby([facet, "kind", "batch", "experts"], sort=True)
        .agg(latency_ms=("latency_s", lambda s: float(s.mean()) * 1e3), iterations=("latency_s", "size"))
        .reset_index()
    )
    table = table[table["iterations"] >= 5]
    # a colour per kind and batch bucket, the same in every panel, in the order of the buckets
    buckets = sorted(set(zip(table["kind"], table["batch"], strict=True)))
    colors = _colors(_bucket_label(str(kind), int(batch)) for kind, batch in buckets)
    panels = list(dict.fromkeys(table[facet]))
    fig, axes = _panels(len(panels))
    for ax, panel in zip(axes, panels, strict=True):
        part = table[table[facet] == panel]
        for (kind, batch), line in part.groupby(["kind", "batch"], sort=False):
            label = _bucket_label(str(kind), int(batch))
            ax.plot(line["experts"], line["latency_ms"], marker="o", markersize=3, color=colors[label], label=label)
        ax.set_title(str(panel))
        ax.set_xlabel("distinct experts per layer (mean over layers)")
        ax.set_ylabel("iteration latency (ms)")
        ax.grid(alpha=0.3)
    _legend_beside(axes, fontsize=6)
    fig.suptitle(titled(data.section.title, context))
    save_figure(fig, path)
    return table


def against_baseline(frame: pd.DataFrame) -> pd.DataFrame:
    """Every non-baseline policy's rows with the baseline's TPOTs and decode batch of the same run beside their
    own (``with_baseline``) and the paired median and mean TPOT speed-ups."""
    others = with_baseline(frame, ["tpot_p50_ms", "tpot_mean_ms", "mean_decode_batch"])
    others = others.rename(columns={"baseline_mean_decode_batch": "baseline_decode_batch"})
    others["median_speedup"] = others["baseline_tpot_p50_ms"] / others["tpot_p50_ms"]
    others["mean_speedup"] = others["baseline_tpot_mean_ms"] / others["tpot_mean_ms"]
    return others


def tpot_table(data: FigureData, path: Path, *, context: str = "") -> pd.DataFrame:
    """Per point: each policy's median and mean TPOT and the first policy's over each other policy's."""
    section = data.section
    paired = against_baseline(data.results).rename(columns={"mean_decode_batch": "decode_batch"})
    columns = [*section.lines, "policy", "baseline_tpot_p50_ms", "tpot_p50_ms", "baseline_tpot_mean_ms",
               "tpot_mean_ms", "baseline_decode_batch", "decode_batch", "pure_decode_fraction",
               "median_speedup", "mean_speedup"]
    rows = _labelled(data, paired[columns], section.lines)
    # horizontal bars: one row per point and policy, its (long) label readable on the left
    fig, ax = plt.subplots(figsize=(8.0, 1.2 + 0.42 * len(rows)))
    positions = np.arange(len(rows))[::-1]
    ax.barh(positions + 0.2, rows["median_speedup"], height=0.4, label="median TPOT")
    ax.barh(positions - 0.2, rows["mean_speedup"], height=0.4, label="mean TPOT")
    ax.axvline(1.0, color="grey", linestyle=":")
    ax.set_yticks(
        positions, [f"{line} ({policy})" for line, policy in zip(rows["line"], rows["policy"], strict=True)], fontsize=7
    )
    ax.set_xlabel(f"speed-up over {_base_policy(data)}")
    low = min(0.95, float(rows[["median_speedup", "mean_speedup"]].min().min()) - 0.05) if len(rows) else 0.9
    ax.set_xlim(low, None)
    ax.set_title(titled(section.title, context))
    legend_outside(ax, fontsize=7)
    ax.grid(alpha=0.3, axis="x")
    save_figure(fig, path)
    return rows


X_LABELS = {
    "serving.max_num_seqs": "maximum decode batch (max_num_seqs)",
    "workload.arrival.clients": "closed-loop clients (requests in flight at most)",
    "workload.arrival.rate_per_s": "arrival rate (requests/s)",
}
"""How a swept key reads on an x axis; any other key is shown as it is written."""


def speedup_vs_batch(data: FigureData, path: Path, *, context: str = "") -> pd.DataFrame:
    """Each policy's median (solid) and mean (dotted, the same colour) TPOT speed-up over the baseline policy of
    the same run, against the swept batch limit ``x`` (or another swept count on a log2 axis: closed-loop
    clients)."""
    section = data.section
    x = _required(section.x, "x")
    others = against_baseline(data.results)
    columns = [*section.lines, x, "policy", "median_speedup", "mean_speedup", "baseline_decode_batch"]
    table = _labelled(data, others[columns], section.lines)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for (line_label, policy), line in table.groupby(["line", "policy"], sort=False):
        line = line.sort_values(x)
        drawn = ax.plot(line[x], line["median_speedup"], marker="o", markersize=3,
                        label=f"{line_label} ({policy}), median")
        ax.plot(line[x], line["mean_speedup"], ":", marker=".", markersize=3, color=drawn[0].get_color(),
                label=f"{line_label} ({policy}), mean")
    ax.axhline(1.0, color="grey", linestyle=":")
    batch_axis(ax, table[x])
    ax.set_xlabel(X_LABELS.get(x, x))
    ax.set_ylabel(f"TPOT speed-up over {_base_policy(data)}")
    ax.set_title(titled(section.title, context))
    ax.grid(alpha=0.3)
    legend_outside(ax, fontsize=6)
    save_figure(fig, path)
    return table


def speedup_vs_overhead(data: FigureData, path: Path, *, context: str = "") -> pd.DataFrame:
    """Speed-up against the host overhead per iteration (``x``: a swept key in seconds, drawn in ms), and
    under it each policy's median TPOT.

    ``diluted_speedup`` is what the speed-up would be if the overhead only added itself to every iteration
    (each request's TPOT then grows by exactly the overhead added): the median TPOTs at the smallest swept
    overhead, both raised by the overhead added since. Where the measured speed-up departs from it, the batches
    changed (``baseline_decode_batch``, ``decode_batch``, and with them the policy's ``distinct_experts`` per
    layer): longer iterations let more requests run at once."""
    section = data.section
    x = _required(section.x, "x")
    others = against_baseline(data.results).rename(
        columns={"mean_decode_batch": "decode_batch", "mean_distinct_experts": "distinct_experts"}
    )
    others["overhead_ms"] = others[x].astype(float) * 1e3
    columns = [*section.lines, "overhead_ms", "policy", "baseline_tpot_p50_ms", "tpot_p50_ms", "median_speedup",
               "mean_speedup", "baseline_decode_batch", "decode_batch", "distinct_experts"]
    table = _labelled(data, others[columns], section.lines)
    table = table.sort_values(["line", "policy", "overhead_ms"], kind="stable")
    at_least = table.groupby(["line", "policy"], sort=False).transform("first")  # each line at its least overhead
    added_ms = table["overhead_ms"] - at_least["overhead_ms"]
    diluted = (at_least["baseline_tpot_p50_ms"] + added_ms) / (at_least["tpot_p50_ms"] + added_ms)
    table.insert(table.columns.get_loc("baseline_decode_batch"), "diluted_speedup", diluted)
    base_policy = data.results.loc[data.results["policy_position"] == 0, "policy"].iloc[0]
    # one above the other, each legend beside its own panel (side by side, the left one's would cover the right
    # panel); the upper panel as tall as its legend of three entries a line
    lines = table.groupby(["line", "policy"], sort=False).ngroups
    fig, (gain, tpot) = plt.subplots(2, 1, figsize=(7, 2 * max(3.75, 3 * lines * LEGEND_ENTRY_IN + 1.0)))
    for (line_label, policy), line in table.groupby(["line", "policy"], sort=False):
        drawn = gain.plot(line["overhead_ms"], line["median_speedup"], marker="o", markersize=3,
                          label=f"{line_label} ({policy}), median")
        color = drawn[0].get_color()
        gain.plot(line["overhead_ms"], line["mean_speedup"], ":", marker=".", markersize=3, color=color,
                  label=f"{line_label} ({policy}), mean")
        gain.plot(line["overhead_ms"], line["diluted_speedup"], "--", color=color, alpha=0.5,
                  label=f"{line_label}: overhead added, batches unchanged")
        tpot.plot(line["overhead_ms"], line["baseline_tpot_p50_ms"], "--", marker="o", markersize=3, color=color,
                  label=f"{line_label}, {base_policy}")
        tpot.plot(line["overhead_ms"], line["tpot_p50_ms"], marker="o", markersize=3, color=color,
                  label=f"{line_label}, {policy}")
    gain.axhline(1.0, color="grey", linestyle=":")
    gain.set_ylabel(f"TPOT speed-up over {base_policy}")
    tpot.set_ylabel("median TPOT (ms)")
    for ax in (gain, tpot):
        ax.set_xlabel("host (CPU) overhead per iteration (ms)")
        ax.grid(alpha=0.3)
        legend_outside(ax, fontsize=6)
    fig.suptitle(titled(section.title, context))
    save_figure(fig, path)
    return table


def slo_throughput(data: FigureData, path: Path, *, context: str = "") -> pd.DataFrame:
    """Per facet, policy and SLO: the highest rate meeting it, interpolated at the crossing of the swept rates."""
    section = data.section
    x, facet = _required(section.x, "x"), _required(section.facet, "facet")
    rows = []
    for (panel, policy), group in data.results.groupby([facet, "policy"], sort=False):
        group = group.sort_values(x)
        for slo_ms in section.slo_tpot_ms:
            rate = capacity_at(
                group[x].to_numpy(float), group["tpot_p99_ms"].to_numpy(float),
                group["scheduling_delay_p99_s"].to_numpy(float), slo_ms,
            )
            rows.append({facet: panel, "policy": policy, "slo_tpot_p99_ms": slo_ms, "capacity_rate_per_s": rate})
    table = pd.DataFrame(rows)
    base_policy = data.results.loc[data.results["policy_position"] == 0, "policy"].iloc[0]
    base = table[table["policy"] == base_policy].set_index([facet, "slo_tpot_p99_ms"])["capacity_rate_per_s"]
    table["ratio_to_baseline"] = [
        r / base.loc[(f, s)] if base.loc[(f, s)] > 0 else np.nan
        for f, s, r in zip(table[facet], table["slo_tpot_p99_ms"], table["capacity_rate_per_s"], strict=True)
    ]
    table = _labelled(data, table, [facet])
    colors = _colors(table["policy"])
    panels = list(dict.fromkeys(table[facet]))
    fig, axes = _panels(len(panels))
    for ax, panel in zip(axes, panels, strict=True):
        part = table[table[facet] == panel]
        policies = list(dict.fromkeys(part["policy"]))
        width = 0.8 / len(policies)
        for i, policy in enumerate(policies):
            rows_of = part[part["policy"] == policy]
            ax.bar(np.arange(len(rows_of)) + i * width, rows_of["capacity_rate_per_s"], width=width,
                   color=colors[policy], label=policy)
        ticks = np.arange(len(section.slo_tpot_ms)) + 0.4 - width / 2
        ax.set_xticks(ticks, [f"<= {s:g} ms" for s in section.slo_tpot_ms])  # short: three fit one panel
        ax.set_xlabel("SLO on P99 TPOT")
        ax.set_ylabel("highest arrival rate meeting it (req/s)")
        ax.set_title(str(panel))
        ax.grid(alpha=0.3, axis="y")
    _legend_beside(axes)
    fig.suptitle(titled(section.title, context))
    save_figure(fig, path)
    return table


def capacity_at(rates: np.ndarray, tpot_p99_ms: np.ndarray, delay_p99_s: np.ndarray, slo_ms: float) -> float:
    """Highest rate meeting the SLO on a sorted rate grid: the last meeting rate before the first failing one,
    moved toward that failing rate by linear interpolation of P99 TPOT; 0 if the lowest rate fails."""
    meets = (tpot_p99_ms <= slo_ms) & (delay_p99_s <= MAX_SCHEDULING_DELAY_S)
    if not meets[0]:
        return 0.0
    failing = np.flatnonzero(~meets)
    if not len(failing):
        return float(rates[-1])
    last, first_fail = failing[0] - 1, failing[0]
    if delay_p99_s[first_fail] > MAX_SCHEDULING_DELAY_S or tpot_p99_ms[first_fail] <= tpot_p99_ms[last]:
        return float(rates[last])
    share = (slo_ms - tpot_p99_ms[last]) / (tpot_p99_ms[first_fail] - tpot_p99_ms[last])
    return float(rates[last] + share * (rates[first_fail] - rates[last]))


def policies(data: FigureData, path: Path, *, context: str = "") -> pd.DataFrame:
    """Per facet (a panel each): every policy's median TPOT against its retained top-k probability mass, with
    the Pareto front (o on it, x off it) drawn as a staircase."""
    section = data.section
    facet = _required(section.facet, "facet")
    frame = data.results
    base = frame[frame["policy_position"] == 0].set_index("config_hash")
    table = frame[[facet, "policy", "policy_name", "tpot_p50_ms", "tpot_mean_ms", "mean_distinct_experts",
                   "retained_mass", "top1_kept", "assignments_dropped"]].copy()
    table["median_speedup"] = base.loc[frame["config_hash"], "tpot_p50_ms"].to_numpy() / frame["tpot_p50_ms"].to_numpy()
    if data.quality is not None and section.quality_models:
        table = table.merge(_measured_loss(data.quality, section, facet), on=[facet, "policy_name"], how="left")
    table = _labelled(data, table, [facet])
    panels = list(dict.fromkeys(table[facet]))
    fig, axes = _panels(len(panels))
    for ax, panel in zip(axes, panels, strict=True):
        part = table[table[facet] == panel]
        quality, latency = part["retained_mass"].to_numpy(float), part["tpot_p50_ms"].to_numpy(float)
        measured = np.isfinite(quality) & np.isfinite(latency)  # a policy without a number is on no front
        front = np.zeros(len(part), dtype=bool)
        front[measured] = pareto_mask(quality[measured], latency[measured])
        for (_, row), on_front in zip(part.iterrows(), front, strict=True):
            ax.scatter(row["retained_mass"], row["tpot_p50_ms"], s=30, marker="o" if on_front else "x")
            ax.annotate(str(row["policy"]), (row["retained_mass"], row["tpot_p50_ms"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
        if front.any():
            draw_front(ax, quality[front], latency[front], color="grey", linestyle="--")
        ax.set_title(str(panel))
        ax.set_xlabel("retained top-k probability mass (higher is better)")
        ax.set_ylabel("median TPOT (ms)")
        ax.grid(alpha=0.3)
    _legend_beside(axes)
    fig.suptitle(titled(section.title, context))
    save_figure(fig, path)
    return table


def _measured_loss(quality: pd.DataFrame, section: ReportSection, facet: str) -> pd.DataFrame:
    """Per simulated model and policy name: the trained model's measured loss change and accuracy change at
    the section's batch, for the policy at its default parameters (docs/quality.csv, rows with ``sweep`` off)."""
    rows = []
    for simulated, trained in section.quality_models.items():
        part = quality[(quality["model"] == trained) & ~quality["sweep"].astype(bool)
                       & (quality["batch_size"] == section.quality_batch)]
        for _, row in part.iterrows():
            rows.append({
                facet: simulated, "policy_name": row["policy"], "trained_model": trained,
                "trained_policy": row["label"], "measured_delta_loss_nats": row["delta_loss_nats"],
                "measured_delta_accuracy_pp": row["delta_accuracy"] * 100,  # stored as a fraction
            })
    return pd.DataFrame(rows, columns=[facet, "policy_name", "trained_model", "trained_policy",
                                       "measured_delta_loss_nats", "measured_delta_accuracy_pp"])


KINDS: dict[str, DrawFigure] = {
    "experts_vs_batch": experts_vs_batch,
    "latency_vs_experts": latency_vs_experts,
    "tpot_table": tpot_table,
    "speedup_vs_batch": speedup_vs_batch,
    "speedup_vs_overhead": speedup_vs_overhead,
    "slo_throughput": slo_throughput,
    "policies": policies,
}


def _labelled(data: FigureData, table: pd.DataFrame, keys: list[str], also: list[str] | None = None) -> pd.DataFrame:
    """Swept values of ``keys`` (and ``also``) replaced by their labels, and a ``line`` column naming each row's
    combination of ``keys``."""
    table = table.copy()
    for key in [*keys, *(also or [])]:
        table[key] = [data.label(key, value) for value in table[key]]
    table["line"] = table[keys].astype(str).agg(", ".join, axis=1) if keys else ""
    return table


def _bucket_label(kind: str, batch: int) -> str:
    """latency_vs_experts: a line's legend entry, from its kind and batch bucket (``_batch_bucket``)."""
    return f"decode, batch {batch}-{2 * batch - 1}" if kind == "decode" else "with a full prefill chunk"


def _batch_bucket(decode_tokens: np.ndarray) -> np.ndarray:
    """Decode batches grouped by powers of two (1, 2-3, 4-7, ...), labelled by the bucket's lower end."""
    return (2 ** np.floor(np.log2(np.maximum(decode_tokens, 1)))).astype(int)


def _required(value: str | None, name: str) -> str:
    if value is None:
        raise ValueError(f"this figure needs report.{name}")
    return value


def _base_policy(data: FigureData) -> str:
    """The baseline policy's label (the experiment's first policy), that speed-ups are over."""
    base = data.results.loc[data.results["policy_position"] == 0, "policy"]
    return str(base.iloc[0]) if len(base) else "baseline"


def _colors(labels: Iterable[str]) -> dict[str, str]:
    """A colour per distinct label, in order of appearance: a line keeps its colour in every panel of a figure,
    which has one legend for all of them (``_legend_beside``)."""
    return {label: f"C{i % 10}" for i, label in enumerate(dict.fromkeys(labels))}


def _legend_beside(axes: list[Axes], *, fontsize: float | str | None = None) -> None:
    """One legend for all panels, right of the first row's last panel (``legend_outside``): a legend beside each
    panel would cover the next one. It lists every panel's entries once, in the order of the panel with the most;
    a line that panel lacks is entered by an empty copy of it (no data) added to that panel."""
    holder = axes[min(len(axes), PANEL_COLUMNS) - 1]
    source = max(axes, key=lambda ax: len(set(ax.get_legend_handles_labels()[1])))
    entered = set(source.get_legend_handles_labels()[1])
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in entered and isinstance(handle, Line2D):
                entry = Line2D([], [])
                entry.update_from(handle)
                entry.set_label(label)
                source.add_line(entry)
                entered.add(label)
    legend_outside(holder, of=source, fontsize=fontsize)


def _panels(count: int) -> tuple[Figure, list[Axes]]:
    columns = min(count, PANEL_COLUMNS)
    rows = -(-count // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.6 * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[count:]:
        ax.set_visible(False)
    return fig, flat[:count]
