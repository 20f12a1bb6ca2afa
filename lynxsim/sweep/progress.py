"""Progress bars for the two kinds of long work: a sweep (points done, failures) and one run (requests arrived).

Both show counts, elapsed time and an ETA, and print nothing without a console (tests, library use); on a
terminal that is not interactive rich draws only the final state.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def sweep_progress(console: Console | None) -> Progress:
    """Runs done out of runs to do, failures so far, elapsed, ETA."""
    return _progress(console, TextColumn("[red]{task.fields[failed]} failed"))


def run_progress(console: Console | None) -> Progress:
    """One bar per policy: requests arrived in the simulation out of the run's requests, elapsed, ETA."""
    return _progress(console, TextColumn("requests arrived"))


def _progress(console: Console | None, after_counts: TextColumn) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        after_counts,
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=console is None,
    )
