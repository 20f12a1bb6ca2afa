"""``lynxsim html``: one self-contained page per run or sweep, with the run's summary table and interactive
versions of its figures drawn from the same numbers as the PNGs; the sweep page's menus choose the metric and the
swept key on x. One test opens both pages in a real headless Chromium (the system's, through playwright)."""

from __future__ import annotations

import html
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from lynxsim.cli import main
from lynxsim.html_report import PAGE_NAME, write_html
from lynxsim.html_report.run_page import CDF_POINTS, thinned, tpot_cdf_figure
from lynxsim.html_report.sweep_page import metric_figure, sweep_results_page
from lynxsim.plots import load_run, tpot_cdf_points
from lynxsim.summary_columns import summary_cells
from lynxsim.sweep.commands import SweepResults

EXPERIMENT = {
    "name": "html-run",
    "description": "two policies <for the page> & its table",
    "model": "mixtral-8x7b",
    "hardware": "h200",
    "routing": {"kind": "synthetic"},
    "workload": {
        "arrival": {"kind": "poisson", "rate_per_s": 8.0},
        "prompt_tokens": {"kind": "fixed", "tokens": 64},
        "output_tokens": {"kind": "uniform", "low_tokens": 8, "high_tokens": 32},
    },
    "serving": {"max_num_seqs": 16},
    "policies": [{"name": "topk"}, {"name": "lynx"}],
    "simulation": {"seed": 1, "num_requests": 30},
    "output": {"figures": False},
}
RUN_FIGURES = 5
PLOTLY_BUNDLE = "plotly.js v"
"""The banner at the head of plotly's JavaScript bundle: once in a page that carries it inline."""
FIGURE_DIV = 'class="plotly-graph-div"'
"""The element plotly draws a figure into: one per figure."""
PLOT_AREA_RGB = (0xE5, 0xEC, 0xF6)
"""The plot area's background in plotly's default template: what a drawn figure shows in a screenshot."""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("html")
    experiment = folder / "exp.yaml"
    experiment.write_text(yaml.safe_dump(EXPERIMENT, sort_keys=False))
    assert main(["run", str(experiment), "--out", str(folder / "run")]) == 0
    return folder / "run"


@pytest.fixture(scope="module")
def run_page_path(run_dir: Path) -> Path:
    assert main(["html", str(run_dir)]) == 0
    return run_dir / PAGE_NAME


def sweep_results() -> SweepResults:
    """A hand-made results view: two swept keys, top-k and Lynx at each point, two repeats of each point whose
    TPOT differs by 2 ms (the error bars' range)."""
    rows = []
    for point, (rate, alpha) in enumerate((r, a) for r in (1.0, 4.0) for a in (0.5, 0.7)):
        for repeat in (0, 1):
            for position, policy in enumerate(("topk", "lynx")):
                tpot_ms = 10.0 + rate - position * alpha + 2 * repeat
                rows.append({
                    "point": point, "repeat": repeat, "seed": point, "config_hash": f"h{point}r{repeat}",
                    "workload.arrival.rate_per_s": rate, "policies.1.alpha": alpha, "policy": policy,
                    "policy_name": policy, "policy_position": position, "tpot_p50_ms": tpot_ms,
                    "tpot_p99_ms": 2 * tpot_ms, "ttft_p99_ms": 30.0, "output_tokens_per_s": 100 * rate,
                    "mean_decode_batch": 4 * rate, "retained_mass": 1.0 - position * (1 - alpha) / 2,
                })
    return SweepResults(pd.DataFrame(rows), ["workload.arrival.rate_per_s", "policies.1.alpha"], "sweep: m on h x1")


def test_a_cdf_keeps_at_most_its_limit_of_points_first_and_last_among_them() -> None:
    values = np.arange(10_000.0)
    fraction = (values + 1) / len(values)
    kept, kept_fraction = thinned(values, fraction, limit=100)
    assert len(kept) == 100 and kept[0] == 0 and kept[-1] == 9_999 and kept_fraction[-1] == 1.0
    assert np.all(np.diff(kept) > 0) and np.array_equal(kept_fraction, (kept + 1) / len(values))
    assert thinned(values[:5], fraction[:5], limit=100)[0].tolist() == [0, 1, 2, 3, 4]


def test_the_tpot_figure_draws_the_png_figure_numbers(run_dir: Path) -> None:
    records = load_run(run_dir)
    figure = tpot_cdf_figure(records)
    assert [trace.name for trace in figure.data] == [rec.label for rec in records]
    for trace, rec in zip(figure.data, records, strict=True):
        tpot_ms, fraction = tpot_cdf_points(rec)
        assert 0 < len(tpot_ms) <= CDF_POINTS
        assert np.allclose(trace.x, tpot_ms) and np.allclose(trace.y, fraction)


def test_the_run_page_is_self_contained_with_table_figures_and_config(run_dir: Path, run_page_path: Path) -> None:
    text = run_page_path.read_text()
    assert text.count(PLOTLY_BUNDLE) == 1  # the JavaScript inline, once for every figure
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=", text)  # nothing fetched when opened
    assert text.count(FIGURE_DIV) == RUN_FIGURES
    frame = pd.read_parquet(run_dir / "summary.parquet").set_index("policy")
    cells = summary_cells(frame, with_slo=False)
    assert "".join(f"<th>{html.escape(h)}</th>" for h in cells.headers) in text
    for row in cells.rows:
        assert "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" in text
    assert html.escape((run_dir / "config.resolved.yaml").read_text()) in text
    assert html.escape(EXPERIMENT["description"]) in text  # type: ignore[arg-type]


def test_the_same_run_gives_the_same_page(run_dir: Path, run_page_path: Path, tmp_path: Path) -> None:
    again = write_html(run_dir, tmp_path / "again.html")
    assert again.read_bytes() == run_page_path.read_bytes()


def test_the_metric_menu_fills_every_trace_and_the_key_menu_shows_one_key() -> None:
    sweep = sweep_results()
    keys = sweep.swept
    metrics = ["tpot_p50_ms", "output_tokens_per_s"]
    figure = metric_figure(sweep.results, keys, keys, metrics)
    metric_menu, key_menu = figure.layout.updatemenus
    assert [b.label for b in metric_menu.buttons] == metrics and [b.label for b in key_menu.buttons] == keys
    names = [trace.name for trace in figure.data]
    # on rate: a line per policy and alpha; on alpha: per policy and rate; four each
    assert len(names) == 8 and [t.visible for t in figure.data] == [True] * 4 + [False] * 4
    for button, key in zip(key_menu.buttons, keys, strict=True):
        visible = button.args[0]["visible"]
        assert [names[i] for i in range(8) if visible[i]] == [names[i] for i in range(8) if (i < 4) == (key == keys[0])]
        assert button.args[1] == {"xaxis.title.text": key}
    # hand-worked: Lynx at alpha 0.7 against the rate, TPOT 10 + rate - 0.7 + 2 * repeat, mean over the repeats
    lynx = names.index("lynx (alpha=0.7)")
    tpot = metric_menu.buttons[0].args[0]
    assert np.allclose(figure.data[lynx].x, [1.0, 4.0]) and np.allclose(tpot["y"][lynx], [11.3, 14.3])
    assert np.allclose(tpot["error_y"][lynx]["array"], 1.0) and np.allclose(tpot["error_y"][lynx]["arrayminus"], 1.0)
    assert np.allclose(metric_menu.buttons[1].args[0]["y"][lynx], [100.0, 400.0])
    assert np.allclose(figure.data[lynx].y, tpot["y"][lynx])  # the first metric is the one drawn


def test_html_of_a_real_sweep_folder(tmp_path: Path) -> None:
    sweep = {**EXPERIMENT, "simulation": {"seed": 1, "num_requests": 6},
             "sweep": {"grid": {"workload.arrival.rate_per_s": [2.0, 6.0]}}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    assert main(["sweep", str(path), "--out", str(tmp_path / "out"), "--workers", "1"]) == 0
    assert main(["html", str(tmp_path / "out"), "--out", str(tmp_path / "sweep.html")]) == 0
    text = (tmp_path / "sweep.html").read_text()
    assert text.count(PLOTLY_BUNDLE) == 1 and text.count(FIGURE_DIV) == 3
    assert "2 finished points over workload.arrival.rate_per_s" in text


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: tmp / "missing", "no such folder"),
        (lambda tmp: (tmp / "file.html").write_text("x") and tmp / "file.html", "not a folder"),
        (lambda tmp: (tmp / "sweep.duckdb").write_bytes(b"not a database") and tmp, "sweep.duckdb"),
        (lambda tmp: tmp, "neither a run directory"),
        (lambda tmp: (tmp / "run.partial").mkdir() or tmp / "run", "a run that did not finish"),
        (lambda tmp: (tmp / "run.partial").mkdir() or tmp / "run.partial", "a run that did not finish"),
    ],
)
def test_bad_folders_end_with_one_line_and_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make: object, message: str
) -> None:
    folder = make(tmp_path)  # type: ignore[operator]
    assert main(["html", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lynxsim: error: ") and err.count("\n") == 1 and message in err
    assert not (Path(folder) / PAGE_NAME).exists()


@pytest.mark.parametrize(
    "damage", ["policies/lynx/iterations.parquet", "summary.parquet", "config.resolved.yaml"]
)
def test_a_run_with_a_missing_or_damaged_file_ends_with_one_line(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    for how in ("missing", "damaged"):
        broken = tmp_path / how
        shutil.copytree(run_dir, broken)
        if how == "missing":
            (broken / damage).unlink()
        else:
            (broken / damage).write_bytes(b"\x00not [what: a run writes")
        assert main(["html", str(broken)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"lynxsim: error: {broken}") and err.count("\n") == 1, err


def chromium_executable() -> str:
    """The system's Chromium (Debian: ``apt-get install chromium``), or the test is skipped with the reason."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if (found := shutil.which(name)) is not None:
            return found
    pytest.skip("no Chromium executable on PATH (Debian: apt-get install chromium)")


def click_centre(page: Any, element: Any) -> None:
    """A mouse click at the centre of ``element``: plotly's menus are SVG groups that answer the mouse, not a
    click dispatched to the group."""
    box = element.bounding_box()
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)


def opened_without_problems(browser: Any, path: Path, figures: int, shot: Path) -> Any:
    """``path`` opened in a new page of ``browser``: it must show no console error or warning, no script error and
    no failed request, draw each of its ``figures`` (plotly's SVG, a trace in each, the plot areas' colour over a
    tenth of a screenshot, written to ``shot``). Returns the page and the list its problems go on."""
    image = pytest.importorskip("PIL.Image")
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    page.on("requestfailed", lambda request: problems.append(f"failed: {request.url}"))
    page.goto(path.as_uri())
    page.wait_for_function(f"document.querySelectorAll('.js-plotly-plot .main-svg').length >= {figures}")
    traces = page.evaluate("[...document.querySelectorAll('.js-plotly-plot')]"
                           ".map(figure => figure.querySelectorAll('g.trace').length)")
    assert len(traces) == figures and min(traces) >= 1, traces  # every figure drew its data
    page.screenshot(path=str(shot), full_page=True)
    pixels = np.asarray(image.open(shot).convert("RGB")).reshape(-1, 3)
    plot_area = np.all(pixels == PLOT_AREA_RGB, axis=1).mean()
    assert plot_area > 0.1, f"{path.name}: {plot_area:.1%} of the screenshot is plot area"
    return page, problems


def test_both_pages_in_a_headless_browser(run_page_path: Path, tmp_path: Path) -> None:
    """Both pages open cleanly and draw every figure; the sweep page's metric menu changes the y axis."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (the test extra) is not installed")
    executable = chromium_executable()
    sweep_page = tmp_path / "sweep.html"
    sweep_page.write_text(sweep_results_page(sweep_results(), "hand-made"))
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            page, problems = opened_without_problems(browser, run_page_path, RUN_FIGURES, tmp_path / "run.png")
            assert problems == []
            page, problems = opened_without_problems(browser, sweep_page, 3, tmp_path / "sweep.png")
            click_centre(page, page.locator(".updatemenu-header-group").first)  # the metric menu, with the mouse
            click_centre(page, page.locator(".updatemenu-item-text", has_text="output_tokens_per_s"))
            page.wait_for_function("document.querySelector('.ytitle').textContent == 'output_tokens_per_s'")
            assert problems == []
        finally:
            browser.close()
