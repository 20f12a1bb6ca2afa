"""The sweep figures (lynxsim/sweep/figures.py) keep the run figures' drawing rules, and label each point of the
latency-quality figure with its swept values; drawn from a hand-made results view, no sweep is run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
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
from lynxsim.sweep.figures import speedup_vs_batch, sweep_figures

CONTEXT = "tiny-sweep: mixtral-8x7b on NVIDIA H200 SXM x1"
KEYS = ["serving.max_num_seqs", "policies.1.alpha"]
BATCHES = (3, 5)  # less than one power of two apart: a log2 axis has no power of two to label between them
ALPHAS = (0.5, 0.7)
LYNX_QUALITY = {0.5: 0.9, 0.7: 0.95}
LYNX_TPOT_MS = {(3, 0.5): 6.0, (5, 0.5): 6.5, (3, 0.7): 7.0, (5, 0.7): 7.5}
TOPK_TPOT_MS = {3: 8.0, 5: 8.5}
FIGURES = (
    "metrics_vs_serving_max_num_seqs.png",
    "metrics_vs_policies_1_alpha.png",
    "speedup_vs_batch.png",
    "latency_vs_quality.png",
)


def results_view() -> pd.DataFrame:
    """The sweep's ``results`` view: one row per point and policy, top-k first (the baseline)."""
    rows = []
    for point, (batch, alpha) in enumerate((b, a) for b in BATCHES for a in ALPHAS):
        for position, policy, tpot_ms, quality in (
            (0, "topk", TOPK_TPOT_MS[batch], 1.0),
            (1, "lynx", LYNX_TPOT_MS[(batch, alpha)], LYNX_QUALITY[alpha]),
        ):
            rows.append({
                "point": point, "repeat": 0, "seed": point, "config_hash": f"hash{point}",
                "serving.max_num_seqs": batch, "policies.1.alpha": alpha,
                "policy": policy, "policy_name": policy, "policy_position": position,
                "tpot_p50_ms": tpot_ms, "tpot_p99_ms": 2 * tpot_ms, "ttft_p99_ms": 10 * tpot_ms,
                "output_tokens_per_s": 1e3 * batch / tpot_ms, "mean_decode_batch": batch - 0.5,
                "retained_mass": quality,
            })
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def drawn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, Figure]]]:
    """Every figure of the sweep, drawn once for the tests that only look at them, and the folder they are in."""
    folder = tmp_path_factory.mktemp("figures")
    with kept_open() as figures:
        paths = sweep_figures(results_view(), KEYS, folder, context=CONTEXT)
        assert [p.name for p in paths] == list(FIGURES) and all(p.is_file() for p in paths)
        yield folder, dict(zip(FIGURES, figures, strict=True))


def test_every_sweep_figure_title_names_the_sweep(drawn: tuple[Path, dict[str, Figure]]) -> None:
    for name, fig in drawn[1].items():
        assert any(CONTEXT in title for title in titles(fig)), (name, titles(fig))


def test_no_sweep_figure_legend_covers_any_axes_or_is_cut_off(drawn: tuple[Path, dict[str, Figure]]) -> None:
    """The metric figures have four panels: their legend must cover none of them, not only its own."""
    folder, figures = drawn
    for name, fig in figures.items():
        assert legends_over_axes(fig) == [], name
        assert legends_cut_off(fig, folder / name) == [], name


def test_speedup_axis_labels_batches_within_one_octave(drawn: tuple[Path, dict[str, Figure]]) -> None:
    assert labelled_x_ticks(drawn[1]["speedup_vs_batch.png"]) == [str(b) for b in BATCHES]


def test_a_speedup_figure_drawn_without_a_context_keeps_its_title(tmp_path: Path) -> None:
    """The same axis at batches 16 and 24 (no power of two between them), and no context passed."""
    results = results_view()
    results["serving.max_num_seqs"] = results["serving.max_num_seqs"].map({3: 16, 5: 24})
    with kept_open() as figures:
        speedup_vs_batch(results, KEYS, "tpot_p50_ms", tmp_path / "speedup.png")
        assert figures[0].axes[0].get_title() == "speed-up against batch size"
        assert labelled_x_ticks(figures[0]) == ["16", "24"]


def test_latency_quality_points_are_labelled_by_their_swept_values(drawn: tuple[Path, dict[str, Figure]]) -> None:
    """Lynx's points by batch and alpha; top-k's by batch only, since alpha is a parameter of Lynx alone (and
    once: its points at both alphas are the same result)."""
    folder, figures = drawn
    texts = figures["latency_vs_quality.png"].axes[0].texts
    expected = sorted(
        [((LYNX_QUALITY[a], LYNX_TPOT_MS[(b, a)]), f"max_num_seqs={b}, alpha={a}") for b in BATCHES for a in ALPHAS]
        + [((1.0, TOPK_TPOT_MS[b]), f"max_num_seqs={b}") for b in BATCHES]
    )
    assert sorted((text.xy, text.get_text()) for text in texts) == expected
    table = pd.read_csv(folder / "latency_vs_quality.csv")
    assert set(table.loc[table["policy"] == "lynx", "point"]) == {
        f"max_num_seqs={b}, alpha={a}" for b in BATCHES for a in ALPHAS
    }


def test_sweep_front_is_a_staircase(drawn: tuple[Path, dict[str, Figure]]) -> None:
    line = front_line(drawn[1]["latency_vs_quality.png"])
    # top-k at batch 3 is on the front twice (the same result at both of Lynx's alphas)
    assert_staircase(line, [(0.9, 6.0), (0.95, 7.0), (1.0, 8.0), (1.0, 8.0)])
