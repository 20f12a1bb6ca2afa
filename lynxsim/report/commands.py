"""The ``report`` command of the command line."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from lynxsim.errors import InputError
from lynxsim.report.build import build_report
from lynxsim.sweep.backends import default_workers

DEFAULT_PUBLISHED = Path("docs/results/paper_published.yaml")
DEFAULT_QUALITY = Path("docs/quality.csv")


def add_report_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    report = commands.add_parser(
        "report", help="run the experiments of a folder (sweeps with a report section) and write figures + README"
    )
    report.add_argument("folder", type=Path, help="folder of experiment files, e.g. experiments/paper/")
    report.add_argument("--out", type=Path, required=True, help="folder for README.md, PNG figures and CSV tables")
    report.add_argument("--work", type=Path, help="results stores of the sweeps (default: runs/report[-quick]/)")
    report.add_argument("--quick", action="store_true", help="shortened sweeps (each file's report.quick)")
    report.add_argument("--workers", type=int, help="points run at once (default: every core)")
    report.add_argument(
        "--published", type=Path, default=DEFAULT_PUBLISHED, help="the paper's published figures (YAML)"
    )
    report.add_argument(
        "--quality", type=Path, default=DEFAULT_QUALITY, help="measured loss changes of trained models (CSV)"
    )
    report.set_defaults(handler=_report)


def _report(args: argparse.Namespace, console: Console) -> int:
    workers = args.workers if args.workers is not None else default_workers()
    if workers < 1:
        raise InputError("--workers", "must be at least 1")
    work = args.work or Path("runs/report-quick" if args.quick else "runs/report")
    report = build_report(
        args.folder, args.out, work, quick=args.quick, workers=workers, published_path=args.published,
        quality_path=args.quality, console=console,
    )
    failed = [s.stem for s in report.sections if s.error or s.sweep_report.failures]
    console.print(f"report: {args.out / 'README.md'} ({len(report.sections)} sections, {report.wall_s / 60:.1f} min)")
    if failed:
        console.print(f"[red]sections with failures[/]: {', '.join(failed)}")
    return 1 if failed else 0
