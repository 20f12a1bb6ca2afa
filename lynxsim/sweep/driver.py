"""Run a sweep: skip what the store already has, run the rest on a backend, store each point as it finishes.

The driver is the store's only writer. It commits every outcome the moment it arrives, so a sweep stopped at
any point (Ctrl-C, SIGKILL, a lost node) keeps every finished point, and started again runs only the others.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from lynxsim.config import ExperimentConfig
from lynxsim.sweep.backends import BackendName, LocalPool, run_tasks
from lynxsim.sweep.execute import PointOutcome, PointTask, RecordsKept
from lynxsim.sweep.points import Sweep
from lynxsim.sweep.progress import sweep_progress
from lynxsim.sweep.store import ResultsStore


@dataclass
class SweepReport:
    """What one invocation did: runs done now, runs found already done, failures (hash -> error)."""

    points: int
    distinct_runs: int
    ran: int = 0
    skipped: int = 0
    failures: dict[str, str] = field(default_factory=dict)
    wall_s: float = 0.0


def run_sweep(
    sweep: Sweep,
    out_dir: Path,
    *,
    backend: BackendName = "local",
    workers: int = 1,
    address: str | None = None,
    records: RecordsKept = "all",
    retry_failed: bool = False,
    console: Console | None = None,
    pool: LocalPool | None = None,
) -> SweepReport:
    """Run every point of ``sweep`` not yet in the store at ``out_dir``; with a console, show a progress bar.
    ``pool``: the local backend's workers, kept across sweeps by the caller (``backends.LocalPool``)."""
    started = time.perf_counter()
    store = ResultsStore(out_dir)
    store.prepare(sweep)
    done = store.finished(include_failed=not retry_failed)
    configs = {p.config_hash: p.config for p in sweep.points}
    tasks = [PointTask(h, config, records) for h, config in configs.items() if h not in done]
    report = SweepReport(len(sweep.points), len(configs), skipped=len(configs) - len(tasks))
    progress = sweep_progress(console)
    with progress:
        bar = progress.add_task(f"{sweep.base.name}: {len(tasks)} runs", total=len(tasks), failed=0)
        for outcome in run_tasks(tasks, backend, workers, address, pool):
            store.record(outcome, _config_json(configs[outcome.config_hash]))
            _count(report, outcome)
            progress.update(bar, advance=1, failed=len(report.failures))
    report.wall_s = time.perf_counter() - started
    return report


def _count(report: SweepReport, outcome: PointOutcome) -> None:
    report.ran += 1
    if not outcome.ok:
        assert outcome.error is not None
        report.failures[outcome.config_hash] = outcome.error


def _config_json(config: ExperimentConfig) -> str:
    return json.dumps(config.model_dump(mode="json", exclude={"sweep", "report"}))
