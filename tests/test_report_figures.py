"""The report's figures (lynxsim/report/figures.py) keep the drawing rules of every lynxsim figure
(lynxsim/plots.py): the title names the runs, no legend covers an axes or is cut off, a batch axis is labelled at
its batches, a front is a staircase; a figure of panels has one legend listing every panel's lines. Drawn from
hand-made results and iterations, no sweep is run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.axes import Axes
from matplotlib.colors import to_hex
from matplotlib.figure import Figure

from figure_checks import (
    assert_staircase,
    front_line,
    kept_open,
    labelled_x_ticks,
    legends_cut_off,
    legends_over_axes,
    titles,
)
from lynxsim.report.figures import KINDS, FigureData, draw
from lynxsim.sections.report import ReportSection

CONTEXT = "paper: {mixtral-8x7b, qwen3-30b-a3b} on NVIDIA H200 SXM x{1, 2}"
BATCH = "serving.max_num_seqs"
RATE = "workload.arrival.rate_per_s"
OVERHEAD = "hardware.overrides.efficiency.iteration_overhead_s"
BATCHES = (3, 5)  # less than one power of two apart: a log2 axis has no power of two to label between them
MODELS = ("m-a", "m-b", "m-c", "m-d")  # four panels: two rows of three, the legend beside the first
ROUTINGS = ("uniform", "skewed")
POLICIES = ("topk", "lynx", "prune")
QUALITY = {"topk": 1.0, "lynx": 0.9, "prune": 0.85}  # prune: slower than lynx for less quality, off the front
SPEED = {"topk": 1.0, "lynx": 0.625, "prune": 0.75}  # TPOT relative to top-k's


def results_view(models: tuple[str, ...] = MODELS, routings: tuple[str, ...] = ROUTINGS) -> pd.DataFrame:
    """A sweep's ``results`` view: one row per point (model x routing x batch) and policy, top-k first."""
    rows = []
    points = [(m, r, b) for m in models for r in routings for b in BATCHES]
    for point, (model, routing, batch) in enumerate(points):
        for position, policy in enumerate(POLICIES):
            tpot_ms = (6.0 + batch + len(routing) / 10) * SPEED[policy]
            rows.append({
                "point": point, "repeat": 0, "seed": point, "config_hash": f"hash{point}", "model": model,
                "routing": routing, BATCH: batch, RATE: float(batch), OVERHEAD: batch * 1e-3,
                "policy": policy, "policy_name": policy, "policy_position": position,
                "tpot_p50_ms": tpot_ms, "tpot_mean_ms": 1.1 * tpot_ms, "tpot_p99_ms": 2 * tpot_ms + 2 * batch,
                "scheduling_delay_p99_s": 0.1, "mean_decode_batch": batch - 0.5, "pure_decode_fraction": 0.9,
                "mean_distinct_experts": 8.0 * SPEED[policy] * batch / 5, "retained_mass": QUALITY[policy],
                "top1_kept": 1.0, "assignments_dropped": 0.0 if policy == "topk" else 0.2,
            })
    return pd.DataFrame(rows)


def iterations_view() -> pd.DataFrame:
    """The iterations ``latency_vs_experts`` reads: per model, pure-decode iterations at batches 1 (the first
    model only) and 2 and mixed ones with a full prefill chunk, five of each at 4 and 6 distinct experts."""
    rows = []
    for model in MODELS[:2]:
        for experts in (4.0, 6.0):
            for decode_tokens, prefill_tokens in ((1, 0), (2, 0), (0, 512))[model != MODELS[0]:]:
                for _ in range(5):
                    rows.append({
                        "model": model, "pure_decode": prefill_tokens == 0, "decode_tokens": decode_tokens,
                        "prefill_tokens": prefill_tokens, "mean_distinct_experts": experts,
                        "latency_s": 1e-3 * (experts + decode_tokens + prefill_tokens / 100),
                    })
    return pd.DataFrame(rows)


SECTIONS = {
    "experts_vs_batch": ReportSection(title="experts vs batch", figure="experts_vs_batch", x=BATCH, facet="model",
                                      lines=["routing"]),
    "latency_vs_experts": ReportSection(title="latency vs experts", figure="latency_vs_experts", facet="model"),
    "tpot_table": ReportSection(title="TPOT at batch 16", figure="tpot_table", lines=["model", "routing"]),
    "speedup_vs_batch": ReportSection(title="speed-up vs batch", figure="speedup_vs_batch", x=BATCH,
                                      lines=["model"]),
    "speedup_vs_overhead": ReportSection(title="speed-up vs overhead", figure="speedup_vs_overhead", x=OVERHEAD,
                                         lines=["model", "routing"]),
    "slo_throughput": ReportSection(title="SLO throughput", figure="slo_throughput", x=RATE, facet="model",
                                    slo_tpot_ms=[20.0, 30.0]),
    "policies": ReportSection(title="every policy", figure="policies", facet="model"),
}


def figure_data(kind: str, results: pd.DataFrame | None = None) -> FigureData:
    results = results_view() if results is None else results
    if kind in ("tpot_table", "policies"):  # one batch: a point per line
        results = results[results[BATCH] == BATCHES[0]]
    if kind in ("speedup_vs_batch", "policies"):  # one routing: a point per line and batch
        results = results[results["routing"] == ROUTINGS[0]]
    iterations = iterations_view() if kind == "latency_vs_experts" else None
    return FigureData(results.reset_index(drop=True), iterations, SECTIONS[kind], {})


@pytest.fixture(scope="module")
def drawn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[Path, Figure, pd.DataFrame]]]:
    """Every figure kind, drawn once through ``draw`` with a context: its file, figure and table."""
    folder = tmp_path_factory.mktemp("report_figures")
    out = {}
    with kept_open() as figures:
        for kind in KINDS:
            path = folder / f"{kind}.png"
            table = draw(figure_data(kind), path, context=CONTEXT)
            assert path.is_file() and path.with_suffix(".csv").is_file()
            out[kind] = (path, figures[-1], table)
        yield out


def test_every_kind_is_drawn(drawn: dict[str, tuple[Path, Figure, pd.DataFrame]]) -> None:
    assert set(drawn) == set(SECTIONS) == set(KINDS)
    assert all(len(table) for _, _, table in drawn.values())


def test_every_report_figure_title_names_the_section_and_the_runs(
    drawn: dict[str, tuple[Path, Figure, pd.DataFrame]],
) -> None:
    for kind, (_, fig, _) in drawn.items():
        expected = f"{SECTIONS[kind].title}\n{CONTEXT}"
        assert expected in titles(fig), (kind, titles(fig))


def test_a_report_figure_drawn_without_a_context_keeps_its_title(tmp_path: Path) -> None:
    with kept_open() as figures:
        draw(figure_data("speedup_vs_batch"), tmp_path / "f.png")
        draw(figure_data("experts_vs_batch"), tmp_path / "g.png")
    assert "speed-up vs batch" in titles(figures[0])
    assert "experts vs batch" in titles(figures[1])


def test_no_report_figure_legend_covers_an_axes_or_is_cut_off(
    drawn: dict[str, tuple[Path, Figure, pd.DataFrame]],
) -> None:
    for kind, (path, fig, _) in drawn.items():
        assert legends_over_axes(fig) == [], kind
        assert legends_cut_off(fig, path) == [], kind


def test_no_two_legends_of_a_report_figure_overlap(drawn: dict[str, tuple[Path, Figure, pd.DataFrame]]) -> None:
    for kind, (_, fig, _) in drawn.items():
        fig.canvas.draw()
        extents = [ax.get_legend().get_window_extent() for ax in fig.axes if ax.get_legend() is not None]
        assert not any(a.overlaps(b) for i, a in enumerate(extents) for b in extents[i + 1:]), kind


@pytest.mark.parametrize("kind", ["experts_vs_batch", "speedup_vs_batch"])
def test_a_batch_axis_within_one_power_of_two_is_labelled_at_its_batches(
    drawn: dict[str, tuple[Path, Figure, pd.DataFrame]], kind: str
) -> None:
    _, fig, _ = drawn[kind]
    assert fig.axes[0].get_xscale() == "log"
    assert labelled_x_ticks(fig) == ["3", "5"]


def test_the_policies_front_is_a_staircase(drawn: dict[str, tuple[Path, Figure, pd.DataFrame]]) -> None:
    _, fig, _ = drawn["policies"]
    topk_ms = 6.0 + BATCHES[0] + len(ROUTINGS[0]) / 10
    line = front_line(fig)
    assert_staircase(line, [(QUALITY["lynx"], topk_ms * SPEED["lynx"]), (QUALITY["topk"], topk_ms)])
    # the corner is the achieved trade-off: quality above lynx's costs top-k's latency
    assert line.get_path().vertices[1].tolist() == pytest.approx([QUALITY["lynx"], topk_ms])


def test_panels_share_one_legend_with_every_line_in_one_colour(tmp_path: Path) -> None:
    """No panel draws every line: the one legend (held by the last panel of the first row) still lists each
    once, and a line drawn in both panels has one colour, a colour per line and a line style per policy."""
    routings = ("uniform", "hot", "skewed")
    results = results_view(MODELS[:2], routings)
    first_only, second_only = routings[0], routings[2]
    results = results[~(((results["model"] == MODELS[0]) & (results["routing"] == second_only))
                        | ((results["model"] == MODELS[1]) & (results["routing"] == first_only)))]
    with kept_open() as figures:
        draw(figure_data("experts_vs_batch", results), tmp_path / "f.png", context=CONTEXT)
    fig = figures[0]
    first, second = fig.axes[:2]
    assert first.get_legend() is None
    legend = second.get_legend()
    entries = [text.get_text() for text in legend.get_texts()]
    assert sorted(entries) == sorted(f"{p}, {r}" for p in POLICIES for r in routings)
    assert len({to_hex(handle.get_color()) for handle in legend.legend_handles}) == len(routings)

    def colors(ax: Axes) -> dict[str, str]:
        return {str(line.get_label()): to_hex(line.get_color()) for line in ax.get_lines() if len(line.get_xdata())}

    shared = set(colors(first)) & set(colors(second))
    assert shared == {f"{p}, {routings[1]}" for p in POLICIES}
    assert all(colors(first)[label] == colors(second)[label] for label in shared)
    assert legends_over_axes(fig) == []


def test_latency_vs_experts_colours_a_bucket_alike_in_every_panel(
    drawn: dict[str, tuple[Path, Figure, pd.DataFrame]],
) -> None:
    _, fig, table = drawn["latency_vs_experts"]
    by_panel = [
        {line.get_label(): to_hex(line.get_color()) for line in ax.get_lines() if len(line.get_xdata())}
        for ax in fig.axes if ax.get_visible()
    ]
    assert len(by_panel) == 2
    # decode 1-1, decode 2-3, with a full prefill chunk; the second panel has no batch of 1
    assert len(set(by_panel[0].values())) == 3 and set(by_panel[1]) == set(by_panel[0]) - {"decode, batch 1-1"}
    assert all(by_panel[0][label] == color for label, color in by_panel[1].items())
    assert np.isfinite(table["latency_ms"]).all()


def test_a_policy_without_a_number_is_on_no_front(tmp_path: Path) -> None:
    """A policy whose TPOT is missing (no request after warm-up) is drawn nowhere and joins no front; the front
    of the others is unchanged."""
    data = figure_data("policies")
    results = data.results.copy()
    results.loc[results["policy"] == "prune", "tpot_p50_ms"] = np.nan
    with kept_open() as figures:
        draw(FigureData(results, None, data.section, {}), tmp_path / "f.png")
    topk_ms = 6.0 + BATCHES[0] + len(ROUTINGS[0]) / 10
    assert_staircase(front_line(figures[0]), [(QUALITY["lynx"], topk_ms * SPEED["lynx"]), (QUALITY["topk"], topk_ms)])
