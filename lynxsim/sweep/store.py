"""The results store of a sweep: one DuckDB database, record files beside it, safe against a kill at any moment.

Layout of a results folder::

    sweep.duckdb                       points, runs, summaries (tables) and results (a view)
    points/<config_hash>/              one finished run: config.resolved.yaml, summary.json,
        policies/<label>/...           requests/iterations/layers parquet and summary.json per policy

Tables: ``points`` (one row per point of the current sweep file: index, repeat, seed, config hash, one column per
swept key), ``runs`` (one row per distinct config: status ``ok`` or ``failed``, error, wall time, records folder),
``summaries`` (one row per run and policy: every summary metric), and the view ``results`` (points joined with
summaries: what most queries want).

Crash safety rests on one order of writes. A point's files are written into a staging folder, which is renamed
to ``points/<hash>`` (an atomic rename) before the database learns of the run in a single transaction that
replaces whatever rows that hash had. A kill before the commit leaves a folder the database does not reference:
the resumed sweep redoes that point and replaces the folder. A kill during the commit is rolled back by DuckDB's
write-ahead log. So a resumed sweep never loses a committed point and never duplicates one.

The database is opened only for each write (and each query), so that ``lynxsim query`` can read a store while
its sweep is still running; a writer that finds the file locked by a reader waits and tries again.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from lynxsim import __version__
from lynxsim.errors import InputError
from lynxsim.sweep.execute import PointOutcome
from lynxsim.sweep.points import Sweep

DATABASE_NAME = "sweep.duckdb"
POINTS_DIR = "points"
LOCK_WAIT_S = 60.0
"""How long a write waits for a reader (``lynxsim query``) to release the database before giving up."""

RUNS_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    config_hash VARCHAR PRIMARY KEY,
    status VARCHAR NOT NULL,
    error VARCHAR,
    wall_s DOUBLE,
    records_dir VARCHAR,
    finished_at TIMESTAMP,
    lynxsim_version VARCHAR,
    config JSON
)"""
SUMMARIES_SCHEMA = """
CREATE TABLE IF NOT EXISTS summaries (
    config_hash VARCHAR NOT NULL,
    policy VARCHAR NOT NULL,
    policy_name VARCHAR NOT NULL,
    policy_position INTEGER NOT NULL,
    policy_dir VARCHAR NOT NULL,
    PRIMARY KEY (config_hash, policy)
)"""
RESULTS_VIEW = """
CREATE OR REPLACE VIEW results AS
SELECT p.*, s.* EXCLUDE (config_hash)
FROM points p JOIN summaries s USING (config_hash) JOIN runs r USING (config_hash)
WHERE r.status = 'ok'"""


class ResultsStore:
    """A results folder: ``open_for_sweep`` to fill it, ``query`` to read it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.database = folder / DATABASE_NAME

    # ----- writing ----------------------------------------------------------------------------------------------

    def prepare(self, sweep: Sweep) -> None:
        """Create the tables if new, and (re)write ``points`` for this sweep file: a resumed sweep whose file
        gained or lost values sees exactly its own points in ``results``, its earlier runs kept."""
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / POINTS_DIR).mkdir(exist_ok=True)
        points = points_frame(sweep)
        with self._connect() as db:
            db.execute("BEGIN TRANSACTION")
            db.execute(RUNS_SCHEMA)
            db.execute(SUMMARIES_SCHEMA)
            db.register("points_frame", points)
            db.execute("CREATE OR REPLACE TABLE points AS SELECT * FROM points_frame")
            db.unregister("points_frame")
            db.execute(RESULTS_VIEW)
            db.execute("COMMIT")

    def finished(self, *, include_failed: bool) -> set[str]:
        """Hashes of the runs already in the store (the failed ones too, unless they are to be retried)."""
        if not self.database.exists():
            return set()
        statuses = ("ok", "failed") if include_failed else ("ok",)
        with self._connect(read_only=True) as db:
            rows = db.execute(
                "SELECT config_hash FROM runs WHERE status IN (SELECT unnest(?))", [list(statuses)]
            ).fetchall()
        return {row[0] for row in rows}

    def record(self, outcome: PointOutcome, config_json: str) -> None:
        """Store one point's outcome: files first (staged, then renamed into place), then one transaction."""
        records_dir = f"{POINTS_DIR}/{outcome.config_hash}"
        if outcome.ok:
            self._write_files(outcome)
        with _interrupts_deferred(), self._connect() as db:
            db.execute("BEGIN TRANSACTION")
            db.execute("DELETE FROM summaries WHERE config_hash = ?", [outcome.config_hash])
            db.execute("DELETE FROM runs WHERE config_hash = ?", [outcome.config_hash])
            db.execute(
                "INSERT INTO runs VALUES (?, ?, ?, ?, ?, now(), ?, ?)",
                [
                    outcome.config_hash,
                    "ok" if outcome.ok else "failed",
                    outcome.error,
                    outcome.wall_s,
                    records_dir if outcome.ok else None,
                    __version__,
                    config_json,
                ],
            )
            if outcome.summaries:
                self._insert_summaries(db, outcome)
            db.execute("COMMIT")

    def _write_files(self, outcome: PointOutcome) -> None:
        final = self.folder / POINTS_DIR / outcome.config_hash
        staging = final.with_name(f"{final.name}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        for relative, content in outcome.files.items():
            target = staging / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
        shutil.rmtree(final, ignore_errors=True)  # left by a run killed before its commit
        staging.rename(final)

    @staticmethod
    def _insert_summaries(db: duckdb.DuckDBPyConnection, outcome: PointOutcome) -> None:
        rows = [
            {
                "config_hash": outcome.config_hash,
                "policy": s.label,
                "policy_name": s.name,
                "policy_position": s.position,
                "policy_dir": s.folder,
                **{key: _finite_or_none(value) for key, value in s.metrics.items()},
            }
            for s in outcome.summaries
        ]
        frame = pd.DataFrame(rows)
        existing = {row[0] for row in db.execute("SELECT column_name FROM (DESCRIBE summaries)").fetchall()}
        for column in frame.columns:
            if column not in existing:
                db.execute(f'ALTER TABLE summaries ADD COLUMN "{column}" DOUBLE')
        frame = frame.astype({c: "float64" for c in frame.columns if c not in _SUMMARY_KEYS})
        db.register("summary_rows", frame)
        columns = ", ".join(f'"{c}"' for c in frame.columns)
        db.execute(f"INSERT INTO summaries ({columns}) SELECT {columns} FROM summary_rows")
        db.unregister("summary_rows")

    # ----- reading ----------------------------------------------------------------------------------------------

    def query(self, sql: str) -> pd.DataFrame:
        """Run ``sql`` against the store: its tables and view, plus ``requests``, ``iterations`` and ``layers``
        views over the record files of the finished runs (with ``config_hash`` and ``policy_dir`` columns)."""
        if not self.database.exists():
            raise InputError(str(self.folder), f"not a sweep results folder (no {DATABASE_NAME})")
        if not sql.strip():  # duckdb returns no result at all for it, not an error
            raise InputError("query", "an SQL statement is needed, e.g. \"SELECT * FROM results\"")
        with self._connect(read_only=True) as db:
            self._record_views(db)
            try:
                return db.execute(sql).df()
            except duckdb.Error as exc:
                first_line = str(exc).strip().splitlines()[0]
                raise InputError("query", first_line) from None

    def _record_views(self, db: duckdb.DuckDBPyConnection) -> None:
        for table in ("requests", "iterations", "layers"):
            pattern = self.folder.resolve() / POINTS_DIR / "*" / "policies" / "*" / f"{table}.parquet"
            if not any(self.folder.glob(f"{POINTS_DIR}/*/policies/*/{table}.parquet")):
                continue
            db.execute(
                f"""CREATE TEMP VIEW {table} AS
                SELECT regexp_extract(filename, '{POINTS_DIR}/([0-9a-f]+)/policies/', 1) AS config_hash,
                       regexp_extract(filename, '/policies/([^/]+)/', 1) AS policy_dir,
                       * EXCLUDE (filename)
                FROM read_parquet('{pattern}', filename = true, union_by_name = true)
                WHERE config_hash IN (SELECT config_hash FROM runs WHERE status = 'ok')"""
            )

    @contextmanager
    def _connect(self, *, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                db = duckdb.connect(str(self.database), read_only=read_only)
                break
            except duckdb.IOException as exc:
                if "lock" not in str(exc).lower() or time.monotonic() > deadline:
                    raise InputError(str(self.database), f"cannot open the results database ({exc})") from None
                time.sleep(0.2)
        try:
            yield db
        except duckdb.InterruptException:  # duckdb's own name for Ctrl-C during a read: the user's interrupt
            raise KeyboardInterrupt from None
        finally:
            db.close()


@contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Ctrl-C held back until the block ends, then raised: a point's files and transaction are stored whole. duckdb
    turns an interrupt that reaches it mid-call into its own errors (``Query interrupted``, or a wrapped
    KeyboardInterrupt from pandas code it called), which would end the sweep in a traceback instead of one line."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


_SUMMARY_KEYS = {"config_hash", "policy", "policy_name", "policy_position", "policy_dir"}


def points_frame(sweep: Sweep) -> pd.DataFrame:
    """One row per point: index, repeat, seed, config hash, and one column per swept key, typed by its values."""
    frame = pd.DataFrame(
        {
            "point": [p.point.index for p in sweep.points],
            "repeat": [p.point.repeat for p in sweep.points],
            "seed": [p.config.simulation.seed for p in sweep.points],
            "config_hash": [p.config_hash for p in sweep.points],
        }
    )
    for key in sweep.keys:
        frame[key] = _typed_column([p.point.values[key] for p in sweep.points])
    return frame


def _typed_column(values: list[Any]) -> pd.Series:
    """Numbers stay numbers (so ``ORDER BY`` and plots treat them as such); anything else becomes text."""
    if all(isinstance(v, bool) for v in values):
        return pd.Series(values, dtype=bool)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return pd.Series(values, dtype="int64" if all(isinstance(v, int) for v in values) else "float64")
    return pd.Series([v if isinstance(v, str) else json.dumps(v) for v in values], dtype=object)


def _finite_or_none(value: float) -> float | None:
    return None if isinstance(value, float) and not math.isfinite(value) else value
