"""``lynxsim report DIR --out DOCS``: every experiment of DIR through the sweep machinery, then one README.

Each experiment file (sorted by name) is a sweep with a ``report:`` section. Its runs go into a results store
under ``--work`` (so a report interrupted or rebuilt reuses every finished run), its figure and table into the
output folder, and its section into README.md. ``--quick`` shortens every sweep as its ``report.quick`` says:
the same code paths in a few minutes, for CI. The paper's published numbers
(``docs/results/paper_published.yaml``) are set beside lynxsim's where a section names them.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console

from lynxsim.config import apply_override
from lynxsim.errors import InputError
from lynxsim.plots import run_context
from lynxsim.report.agreement import agreement_table, load_published
from lynxsim.report.figures import FigureData, draw
from lynxsim.sections.report import ReportSection
from lynxsim.sections.sweep import SweepConfig
from lynxsim.sweep.backends import LocalPool
from lynxsim.sweep.driver import SweepReport, run_sweep
from lynxsim.sweep.execute import RecordsKept
from lynxsim.sweep.points import Sweep, load_sweep
from lynxsim.sweep.store import POINTS_DIR, ResultsStore

NEEDS_ITERATIONS = {"latency_vs_experts"}
MARKDOWN_ROWS = 40
"""A section's table is printed in the README up to this many rows; the CSV always has all of them."""


@dataclass
class SectionResult:
    """One experiment's contribution to the report."""

    stem: str
    section: ReportSection
    table: pd.DataFrame | None
    sweep_report: SweepReport
    wall_s: float
    error: str | None = None
    figure: Path | None = None
    routing_evidence: list[str] = field(default_factory=list)


@dataclass
class Report:
    sections: list[SectionResult] = field(default_factory=list)
    wall_s: float = 0.0


def experiment_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.glob("*.yaml") if p.is_file())
    if not files:
        raise InputError(str(folder), "holds no experiment files (*.yaml)")
    return files


def build_report(
    folder: Path, out: Path, work: Path, *, quick: bool, workers: int, published_path: Path,
    quality_path: Path | None = None, console: Console | None = None,
) -> Report:
    """Run every experiment of ``folder`` and write the figures, tables and README.md into ``out``."""
    started = time.perf_counter()
    files = experiment_files(folder)
    sweeps = [(path, _load(path, quick)) for path in files]  # every file validated before the first run
    out.mkdir(parents=True, exist_ok=True)
    report = Report()
    quality = pd.read_csv(quality_path) if quality_path is not None and quality_path.is_file() else None
    with LocalPool(workers) as pool:  # one set of workers for every section's sweep
        for path, (sweep, section, labels) in sweeps:
            if console is not None:
                console.print(f"[bold]{path.name}[/]: {section.title} ({len(sweep.points)} points)")
            report.sections.append(
                _section(path, sweep, section, labels, quality, out, work / path.stem, pool, console)
            )
    published = load_published(published_path)
    agreement = agreement_table(published, {s.stem: s.table for s in report.sections if s.table is not None})
    agreement.to_csv(out / "agreement.csv", index=False)
    report.wall_s = time.perf_counter() - started
    (out / "README.md").write_text(_readme(report, agreement, folder, quick, published_path if published else None))
    return report


def _load(path: Path, quick: bool) -> tuple[Sweep, ReportSection, dict[str, dict[str, str]]]:
    full = load_sweep(path)
    section = full.base.report
    if section is None:
        raise InputError(str(path), "has no 'report' section: say which figure this experiment makes")
    labels = _labels(full.spec, section)
    if not quick:
        return full, section, labels

    def shorten(raw: dict[str, Any]) -> None:
        for key, value in section.quick.set.items():
            apply_override(raw, f"{key}={json.dumps(value)}")
        if section.quick.sweep is not None:
            raw["sweep"] = section.quick.sweep

    return load_sweep(path, edit=shorten), section, labels


def _labels(spec: SweepConfig, section: ReportSection) -> dict[str, dict[str, str]]:
    """``report.labels`` as swept value (its text in the results store) -> label, from the full sweep."""
    values: dict[str, list[Any]] = dict(spec.grid)
    for group in spec.zip:
        values.update(group)
    labels = {}
    for key, names in section.labels.items():
        if key not in values or len(values[key]) != len(names):
            raise InputError(f"report.labels.{key}", "needs one label per swept value of that key")
        labels[key] = {
            (v if isinstance(v, str) else json.dumps(v)): name for v, name in zip(values[key], names, strict=True)
        }
    return labels


def _section(
    path: Path, sweep: Sweep, section: ReportSection, labels: dict[str, dict[str, str]],
    quality: pd.DataFrame | None, out: Path, store_dir: Path, pool: LocalPool, console: Console | None,
) -> SectionResult:
    started = time.perf_counter()
    records: RecordsKept = "all" if section.figure in NEEDS_ITERATIONS else "none"
    sweep_report = run_sweep(sweep, store_dir, workers=pool.workers, records=records, console=console, pool=pool)
    store = ResultsStore(store_dir)
    results = store.query("SELECT * FROM results ORDER BY point, policy_position")
    result = SectionResult(path.stem, section, None, sweep_report, 0.0, routing_evidence=_routing_evidence(sweep))
    if results.empty:
        result.error = "every point failed: " + "; ".join(sorted(set(sweep_report.failures.values())))
    else:
        iterations = None
        if section.figure in NEEDS_ITERATIONS:
            facet = section.facet or "point"
            iterations = store.query(
                f'SELECT p."{facet}", i.* FROM iterations i JOIN points p USING (config_hash) '
                "ORDER BY i.config_hash, i.policy_dir, i.instance, i.start_s"  # a fixed order: sums repeat to the bit
            )
        figure = out / f"{path.stem}.png"
        try:
            context = run_context(*(store_dir / POINTS_DIR / h for h in results["config_hash"].unique()))
            result.table = draw(FigureData(results, iterations, section, labels, quality), figure, context=context)
            result.figure = figure
        except (ValueError, KeyError) as exc:
            result.error = f"{type(exc).__name__}: {exc}"
    result.wall_s = time.perf_counter() - started
    return result


def _routing_evidence(sweep: Sweep) -> list[str]:
    """What stands behind the routing of the section's runs, one line per distinct (model, routing) pair."""
    from lynxsim.routing.evidence import routing_evidence
    from lynxsim.runner import resolve_model

    seen: dict[str, None] = {}
    for point in sweep.points:
        config = point.config
        evidence = routing_evidence(config.routing, config.model.name, resolve_model(config).name)
        seen[f"{config.model.name or 'model'}: {evidence}"] = None
    return list(seen)


def _readme(report: Report, agreement: pd.DataFrame, folder: Path, quick: bool, published: Path | None) -> str:
    mode = "quick mode (`--quick`: shortened sweeps, for CI; not the numbers to quote)" if quick else "full mode"
    runs = sum(s.sweep_report.distinct_runs for s in report.sections)
    reused = sum(s.sweep_report.skipped for s in report.sections)
    lines = [
        "# lynxsim results: the Lynx paper's figures, and past them",
        "",
        f"Generated by `lynxsim report {folder} --out <this folder>{' --quick' if quick else ''}` on {date.today()}"
        f" ({_commit(folder)}), {mode}, in {report.wall_s / 60:.1f} min of wall time on this machine, {reused} of its"
        f" {runs} runs read from the work stores of an earlier build. Every figure is one"
        f" experiment file of `{folder}` (a sweep plus a `report:` section); its numbers are in the CSV beside the"
        " PNG. Costs come from the committed H200 kernel tables (`lynxsim/hw_profiles/h200.tables/`, measured and"
        " validated on an H200); other GPUs and deployments without tables use the roofline, as each section says.",
        "",
    ]
    for s in report.sections:
        lines += [f"## {s.section.title}", "", f"`{s.stem}.yaml`: {len(s.sweep_report.failures)} failed of"
                  f" {s.sweep_report.distinct_runs} runs, {s.wall_s:.0f} s.", ""]
        if s.figure is not None:
            lines += [f"![{s.section.title}]({s.figure.name})", "", f"Numbers: [{s.stem}.csv]({s.stem}.csv)", ""]
        if s.section.text:
            lines += [s.section.text.strip(), ""]
        if s.routing_evidence:
            lines += ["Routing evidence ([docs/routing_evidence.md](../routing_evidence.md)):", ""]
            lines += [f"- {line}" for line in s.routing_evidence] + [""]
        if s.table is not None:
            lines += [_markdown(s.table.head(MARKDOWN_ROWS)), ""]
        if s.error:
            lines += [f"**Not drawn**: {s.error}", ""]
        if s.sweep_report.failures:
            lines += ["Failed runs:", ""] + [f"- `{h}`: {e}" for h, e in s.sweep_report.failures.items()] + [""]
    lines += ["## Agreement with the paper", ""]
    if published is not None and not agreement.empty:
        lines += [
            f"The paper's published figures (`{published}`: each with its version and where in the paper"
            " it is) next to lynxsim's for the same settings. A verdict is given per model, and only where the"
            " paper publishes a number for that model in the setting simulated; a range or bound over the paper's"
            " models, or a figure of another setting, is shown beside lynxsim's as \"not comparable\", with the"
            " reason. Per-model numbers of the paper's Table 2 and Figures 10-17 were not available to this"
            " project (the stored copies of arXiv 2411.08982 hold the abstract only).",
            "",
            _markdown(agreement),
            "",
        ]
    else:
        lines += ["No published figure could be compared in this build (no published-figures file, or none of the"
                  " sections the comparisons read ran).", ""]
    return "\n".join(lines)


def _markdown(table: pd.DataFrame) -> str:
    def cell(value: object) -> str:
        if isinstance(value, float):
            return "-" if value != value else f"{value:.4g}"
        return str(value).replace("|", "/")

    header = "| " + " | ".join(map(str, table.columns)) + " |"
    rule = "|" + "---|" * len(table.columns)
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def _commit(folder: Path) -> str:
    """The commit the report was built from, and whether the code or the experiments differed from it."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--", "lynxsim", str(folder)], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "lynxsim outside a git checkout"
    return f"lynxsim at {sha.stdout.strip()}" + (" with uncommitted changes" if changed.stdout.strip() else "")
