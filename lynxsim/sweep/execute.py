"""One sweep point, run where a backend puts it (a local worker process or a Ray worker on any node).

The point's records come back to the driver as file contents rather than being written where the worker runs:
a Ray worker on another node shares no disk with the driver, and only the driver writes the results store, so a
sweep has exactly one writer whichever backend runs it. A point that fails returns its error instead of
raising, so one bad corner of a grid never stops the others.
"""

from __future__ import annotations

import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lynxsim.config import ExperimentConfig
from lynxsim.errors import InputError
from lynxsim.records import slug
from lynxsim.runner import run_experiment

RecordsKept = Literal["all", "requests", "none"]
RECORD_FILES: dict[RecordsKept, tuple[str, ...]] = {
    "all": ("requests.parquet", "iterations.parquet", "layers.parquet"),
    "requests": ("requests.parquet",),
    "none": (),
}
"""Per-policy record files a point keeps, by ``--records``: iteration records dominate a store's size."""


@dataclass(frozen=True)
class PointTask:
    """What a worker needs to run one point."""

    config_hash: str
    config: ExperimentConfig
    records: RecordsKept = "all"


@dataclass(frozen=True)
class PolicySummary:
    """One policy's summary metrics in one point."""

    label: str
    name: str
    position: int
    folder: str
    metrics: dict[str, float]


@dataclass(frozen=True)
class PointOutcome:
    """What a point produced: the summaries and record files (path relative to the point's folder -> bytes),
    or the error that stopped it."""

    config_hash: str
    wall_s: float
    summaries: list[PolicySummary] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def simulate_point(task: PointTask) -> PointOutcome:
    """Run every policy of the point's experiment; never raises for a problem of the point itself."""
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="lynxsim-point-") as tmp:
            out_dir = Path(tmp)
            result = run_experiment(task.config, out_dir)
            summaries = [
                PolicySummary(run.label, run.policy.name, position, slug(run.label), dict(run.summary))
                for position, run in enumerate(result.runs)
            ]
            files = _kept_files(out_dir, summaries, task.records)
    except InputError as exc:
        return PointOutcome(task.config_hash, time.perf_counter() - started, error=str(exc))
    except Exception as exc:  # a failed point is recorded with its error and the sweep goes on
        where = traceback.extract_tb(exc.__traceback__)[-1]
        message = f"{type(exc).__name__}: {exc} ({Path(where.filename).name}:{where.lineno})"
        return PointOutcome(task.config_hash, time.perf_counter() - started, error=message)
    return PointOutcome(task.config_hash, time.perf_counter() - started, summaries, files)


def _kept_files(out_dir: Path, summaries: list[PolicySummary], records: RecordsKept) -> dict[str, bytes]:
    """The point's resolved config and summaries always; the record files ``records`` asks for."""
    kept = ["config.resolved.yaml", "summary.json"]
    for summary in summaries:
        kept.append(f"policies/{summary.folder}/summary.json")
        kept.extend(f"policies/{summary.folder}/{name}" for name in RECORD_FILES[records])
    return {name: (out_dir / name).read_bytes() for name in kept}
