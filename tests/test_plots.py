"""The run figures: the Pareto front by hand, and the drawing rules every figure keeps (lynxsim/plots.py): its
title names the run, no legend covers data, a front is a staircase, a batch axis is labelled at its batches."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from figure_checks import (  # noqa: E402
    assert_staircase,
    front_line,
    kept_open,
    labelled_x_ticks,
    legends_cut_off,
    legends_over_axes,
    titles,
)
from lynxsim.metrics import BREAKDOWN_COLUMNS  # noqa: E402
from lynxsim.plots import (  # noqa: E402
    FIGURE_NAMES,
    MAX_BATCH_TICKS,
    PolicyRecords,
    batch_axis,
    pareto_front,
    run_context,
    tpot_cdf,
    write_run_figures,
)

CONTEXT = "quickstart: mixtral-8x7b on NVIDIA H200 SXM x1"
LAYERS = 4
EXPERTS = 8


def test_pareto_front_hand_example() -> None:
    # (latency, quality): A (10, 1.0) top-k; B (8, 0.95); C (9, 0.90) is beaten by B; D (6, 0.80); E (6, 0.70)
    latency = np.array([10.0, 8.0, 9.0, 6.0, 6.0])
    quality = np.array([1.0, 0.95, 0.90, 0.80, 0.70])
    assert pareto_front(latency, quality).tolist() == [3, 1, 0]


def test_pareto_front_single_point() -> None:
    assert pareto_front(np.array([5.0]), np.array([0.5])).tolist() == [0]


# ----- the run figures -------------------------------------------------------------------------------------------


def policy_records(label: str, tpot_ms: float, experts: float, quality: float) -> PolicyRecords:
    """A policy's records with every column the figures read: six pure-decode iterations at batches 1-3."""
    requests = pd.DataFrame({"tpot_s": np.linspace(0.8, 1.2, 10) * tpot_ms / 1e3})
    batches = [1, 1, 2, 2, 3, 3]
    iterations = pd.DataFrame(
        {
            "pure_decode": [True] * len(batches),
            "decode_tokens": batches,
            "distinct_experts": [np.full(LAYERS, experts + b / 10) for b in batches],
            "mean_distinct_experts": [experts + b / 10 for b in batches],
            **{column: [tpot_ms / 1e3 / len(BREAKDOWN_COLUMNS)] * len(batches) for column in BREAKDOWN_COLUMNS},
        }
    )
    return PolicyRecords(label, requests, iterations, {"tpot_p50_ms": tpot_ms, "retained_mass": quality})


RECORDS = [policy_records("topk", 8.0, 6.0, 1.0), policy_records("lynx (alpha=0.7)", 5.0, 3.0, 0.9)]


@pytest.fixture(scope="module")
def drawn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[Path, Figure]]:
    """Every run figure by its file, drawn once for the tests that only look at them."""
    folder = tmp_path_factory.mktemp("figures")
    with kept_open() as figures:
        paths = write_run_figures(RECORDS, EXPERTS, folder, context=CONTEXT)
        assert [p.name for p in paths] == list(FIGURE_NAMES) and all(p.is_file() for p in paths)
        yield dict(zip(paths, figures, strict=True))


def test_every_run_figure_title_names_the_run(drawn: dict[Path, Figure]) -> None:
    assert len(drawn) == len(FIGURE_NAMES)
    for path, fig in drawn.items():
        assert any(CONTEXT in title for title in titles(fig)), (path.name, titles(fig))


def test_a_run_figure_drawn_without_a_context_keeps_its_title(tmp_path: Path) -> None:
    with kept_open() as figures:
        tpot_cdf(RECORDS, tmp_path / "tpot_cdf.png")
        assert titles(figures[0])[1] == "TPOT distribution"


def test_no_run_figure_legend_covers_its_axes_or_is_cut_off(drawn: dict[Path, Figure]) -> None:
    for path, fig in drawn.items():
        assert legends_over_axes(fig) == [], path.name
        assert legends_cut_off(fig, path) == [], path.name


def test_a_two_point_front_is_a_staircase(drawn: dict[Path, Figure]) -> None:
    line = front_line(next(fig for path, fig in drawn.items() if path.name == "latency_vs_quality.png"))
    assert_staircase(line, [(0.9, 5.0), (1.0, 8.0)])
    # the corner is the achieved trade-off: quality above 0.9 costs top-k's 8 ms
    assert line.get_path().vertices.tolist() == [[0.9, 5.0], [0.9, 8.0], [1.0, 8.0]]


def test_run_context_names_experiment_model_hardware_and_gpus(tmp_path: Path) -> None:
    def run_dir(name: str, gpus: int) -> Path:
        folder = tmp_path / f"{name}-{gpus}"
        folder.mkdir()
        resolved = {"name": name, "resolved": {"model": {"name": "mixtral-8x7b"}, "hardware": "NVIDIA H200 SXM",
                                               "gpus": gpus}}
        (folder / "config.resolved.yaml").write_text(yaml.safe_dump(resolved))
        return folder

    one, two = run_dir("quickstart", 1), run_dir("quickstart", 2)
    assert run_context(one) == CONTEXT
    assert run_context(one, two) == "quickstart: mixtral-8x7b on NVIDIA H200 SXM x{1, 2}"


# ----- the batch-size axis ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("batches", "expected"),
    [([3, 5], ["3", "5"]), ([3.2, 3.9], ["3.2", "3.9"]), ([7], ["7"]), ([64, 128, 1024], ["64", "128", "1024"])],
)
def test_batch_axis_labels_the_batches_drawn(batches: list[float], expected: list[str]) -> None:
    fig, ax = plt.subplots()
    ax.plot(batches, np.ones(len(batches)), marker="o")
    batch_axis(ax, batches)
    try:
        assert ax.get_xscale() == "log"
        assert labelled_x_ticks(fig) == expected
    finally:
        plt.close(fig)


def test_batch_axis_of_many_batches_labels_a_spread_of_them() -> None:
    batches = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128]
    fig, ax = plt.subplots()
    ax.plot(batches, np.ones(len(batches)))
    batch_axis(ax, batches)
    try:
        labels = labelled_x_ticks(fig)
        assert 2 <= len(labels) <= MAX_BATCH_TICKS
        assert labels[0] == "1" and labels[-1] == "128"
        assert set(labels) <= {str(b) for b in batches}
    finally:
        plt.close(fig)
