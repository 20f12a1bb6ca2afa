"""The ``sweep``, ``query`` and sweep ``plot`` commands of the command line."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from lynxsim.errors import InputError
from lynxsim.plots import run_context
from lynxsim.sweep.backends import default_workers
from lynxsim.sweep.driver import SweepReport, run_sweep
from lynxsim.sweep.figures import DEFAULT_METRICS, sweep_figures
from lynxsim.sweep.points import load_sweep
from lynxsim.sweep.store import DATABASE_NAME, POINTS_DIR, ResultsStore

MAX_PRINTED_ROWS = 200
"""``query`` prints at most this many rows (and says how many it left out)."""


def add_sweep_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sweep = commands.add_parser(
        "sweep", help="run an experiment at every point of its sweep section into a results store (resumable)"
    )
    sweep.add_argument("experiment", type=Path, help="experiment YAML file with a 'sweep' section")
    sweep.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
        help="override a key of the base experiment (repeatable)",
    )
    sweep.add_argument("--out", type=Path, help="results folder (default: output.dir of the experiment)")
    sweep.add_argument("--backend", choices=("local", "ray"), default="local", help="where points run")
    sweep.add_argument("--workers", type=int, help="points run at once (default: every core)")
    sweep.add_argument("--address", help="Ray: address of an existing cluster to join (default: start a local one)")
    sweep.add_argument(
        "--records", choices=("all", "requests", "none"), default="all",
        help="record files kept per point beside the database (summaries are always stored)",
    )
    sweep.add_argument("--retry-failed", action="store_true", help="run the points that failed before again")
    sweep.add_argument("--dry-run", action="store_true", help="list the points and stop")
    sweep.set_defaults(handler=_sweep)

    query = commands.add_parser("query", help="run SQL over a sweep's results store and print the table")
    query.add_argument("results", type=Path, help="results folder of a sweep")
    query.add_argument("sql", help="e.g. \"SELECT policy, avg(tpot_p50_ms) FROM results GROUP BY policy\"")
    query.add_argument("--csv", type=Path, help="also write the whole result here")
    query.set_defaults(handler=_query)


def _sweep(args: argparse.Namespace, console: Console) -> int:
    sweep = load_sweep(args.experiment, args.overrides)
    out_dir: Path = args.out or sweep.base.output.dir
    workers = args.workers if args.workers is not None else default_workers()
    if workers < 1:
        raise InputError("--workers", "must be at least 1")
    console.print(
        f"{sweep.base.name}: {len(sweep.points)} points ({sweep.distinct_runs} distinct runs) over "
        f"{', '.join(sweep.keys) or 'no key'}; backend {args.backend}, {workers} workers; results in {out_dir}"
    )
    if args.dry_run:
        for p in sweep.points:
            console.print(
                f"{p.point.index:>5}  {p.config_hash}  seed {p.config.simulation.seed:>10}  {p.point.label()}"
            )
        return 0
    report = run_sweep(
        sweep, out_dir, backend=args.backend, workers=workers, address=args.address,
        records=args.records, retry_failed=args.retry_failed, console=console,
    )
    _print_report(report, sweep_labels={p.config_hash: p.point.label() for p in sweep.points}, console=console)
    console.print(f"results: {out_dir / DATABASE_NAME}  (lynxsim query {out_dir} \"SELECT * FROM results\")")
    return 1 if report.failures else 0


def _print_report(report: SweepReport, sweep_labels: dict[str, str], console: Console) -> None:
    console.print(
        f"{report.points} points, {report.distinct_runs} distinct runs: {report.ran} run now "
        f"({report.ran - len(report.failures)} ok, {len(report.failures)} failed), {report.skipped} already in "
        f"the store; wall time {report.wall_s:.1f} s"
    )
    if report.failures:
        table = Table(title="failed points (lynxsim sweep --retry-failed runs them again)")
        table.add_column("config hash")
        table.add_column("point")
        table.add_column("error")
        for config_hash, error in report.failures.items():
            table.add_row(config_hash, sweep_labels.get(config_hash, "?"), error)
        console.print(table)


def _query(args: argparse.Namespace, console: Console) -> int:
    frame = ResultsStore(args.results).query(args.sql)
    console.print(frame_table(frame, MAX_PRINTED_ROWS))
    if len(frame) > MAX_PRINTED_ROWS:
        console.print(f"({len(frame) - MAX_PRINTED_ROWS} more rows; --csv writes them all)")
    if args.csv is not None:
        frame.to_csv(args.csv, index=False)
        console.print(f"wrote {args.csv}")
    return 0


def frame_table(frame: pd.DataFrame, max_rows: int) -> Table:
    """A data frame as a rich table; floats with four significant digits."""
    table = Table()
    for column in frame.columns:
        numeric = pd.api.types.is_numeric_dtype(frame[column])
        table.add_column(str(column), justify="right" if numeric else "left")
    for row in frame.head(max_rows).itertuples(index=False):
        table.add_row(*(_cell(value) for value in row))
    return table


def _cell(value: object) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}"
    return str(value)


@dataclass(frozen=True)
class SweepResults:
    """What a sweep's figures are drawn from: the store's ``results`` view (one row per finished point and
    policy, by point), the swept keys (columns of it) and the ``run_context`` of the points' runs."""

    results: pd.DataFrame
    swept: list[str]
    context: str


def read_sweep_results(results_dir: Path) -> SweepResults:
    """The finished points of a sweep's results folder; a store without any is ``InputError``."""
    store = ResultsStore(results_dir)
    results = store.query("SELECT * FROM results ORDER BY point, policy_position")
    keys = store.query("SELECT * FROM points LIMIT 0").columns
    swept = [k for k in keys if k not in ("point", "repeat", "seed", "config_hash")]
    if results.empty:
        raise InputError(str(results_dir), "the store holds no finished run yet")
    context = run_context(*(results_dir / POINTS_DIR / h for h in results["config_hash"].unique()))
    return SweepResults(results, swept, context)


def plot_sweep(results_dir: Path, metrics: list[str] | None, x_keys: list[str] | None, console: Console) -> int:
    """``lynxsim plot`` on a sweep's results folder."""
    sweep = read_sweep_results(results_dir)
    for name, given, known in (("--metric", metrics, sweep.results.columns), ("--x", x_keys, sweep.swept)):
        unknown = [v for v in given or [] if v not in known]
        if unknown:
            raise InputError(name, f"{unknown[0]!r} is not one of {', '.join(map(str, known))}")
    paths = sweep_figures(sweep.results, sweep.swept, results_dir / "figures",
                          metrics=tuple(metrics or DEFAULT_METRICS), x_keys=x_keys, context=sweep.context)
    console.print(f"figures: {', '.join(str(p) for p in paths)}")
    return 0
