"""What the figure tests check of a drawn figure (tests/test_plots.py, test_sweep_figures.py,
test_report_figures.py): its titles, legends that neither cover an axes nor are cut off, a Pareto front drawn as a
staircase, the labels of its batch axis."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest.mock import patch

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from PIL import Image  # noqa: E402


@contextmanager
def kept_open() -> Iterator[list[Figure]]:
    """The figures the code under test saves, in order, kept open to be inspected: its ``plt.close`` only
    collects them (the figures are inspected after the real save, tight layout included)."""
    kept: list[Figure] = []
    try:
        with patch.object(plt, "close", kept.append):
            yield kept
    finally:
        for fig in kept:
            plt.close(fig)


def titles(fig: Figure) -> list[str]:
    """The figure's title and every visible axes' title."""
    suptitle = fig._suptitle.get_text() if fig._suptitle is not None else ""
    return [suptitle, *(ax.get_title() for ax in fig.axes if ax.get_visible())]


def legends_over_axes(fig: Figure) -> list[str]:
    """For every legend of the figure that overlaps any visible axes' area, the axes' title; asserts the figure
    has a legend at all, so that a figure that lost its legend cannot pass."""
    fig.canvas.draw()
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert legends, "the figure has no legend"
    return [
        ax.get_title()
        for legend in legends
        for ax in fig.axes
        if ax.get_visible() and legend.get_window_extent().overlaps(ax.get_window_extent())
    ]


def legends_cut_off(fig: Figure, path: Path) -> list[str]:
    """The first entry of every legend that lies (partly) outside the image saved at ``path``. The image must be
    the figure's tight box, padded (savefig's ``bbox_inches="tight"``), as its size says; the legends must be in
    that box."""
    fig.canvas.draw()
    box = fig.get_tightbbox()  # inches
    pad = matplotlib.rcParams["savefig.pad_inches"]
    with Image.open(path) as image:
        (width, height), (dpi, _) = image.size, image.info["dpi"]
    assert width == pytest.approx((box.width + 2 * pad) * dpi, rel=0.01)
    assert height == pytest.approx((box.height + 2 * pad) * dpi, rel=0.01)
    cut = []
    for legend in (ax.get_legend() for ax in fig.axes if ax.get_legend() is not None):
        extent = legend.get_window_extent().transformed(fig.dpi_scale_trans.inverted())
        if extent.x0 < box.x0 or extent.x1 > box.x1 or extent.y0 < box.y0 or extent.y1 > box.y1:
            cut.append(legend.get_texts()[0].get_text())
    return cut


def front_line(fig: Figure) -> Line2D:
    (line,) = [line for line in fig.axes[0].get_lines() if line.get_label() == "Pareto front"]
    return line


def assert_staircase(line: Line2D, points: list[tuple[float, float]]) -> None:
    """The front line passes through exactly ``points`` (quality, latency) with markers, and each segment is
    horizontal or vertical: the corner between two points is (lower quality, higher latency), the trade-off that
    is achieved, never a straight line between them."""
    assert line.get_drawstyle() == "steps-pre"
    assert line.get_marker() not in ("None", None, "", " ")
    assert sorted(zip(line.get_xdata(), line.get_ydata(), strict=True)) == sorted(points)
    line.recache(always=True)  # drawing the markers leaves the path of the points alone, without its steps
    vertices = line.get_path().vertices
    steps = np.diff(vertices, axis=0)
    assert np.all((steps[:, 0] == 0) | (steps[:, 1] == 0)), vertices


def labelled_x_ticks(fig: Figure) -> list[str]:
    fig.canvas.draw()
    ax = fig.axes[0]
    low, high = ax.get_xlim()
    return [
        tick.label1.get_text()
        for tick in ax.xaxis.get_major_ticks() + ax.xaxis.get_minor_ticks()
        if tick.label1.get_visible() and tick.label1.get_text() and low <= tick.get_loc() <= high
    ]
