"""Statistical routing tables kept on disk, so that a table is built once per (routing, model, policy, grid).

Building a table routes thousands of batches (DeepSeek-V3 under Lynx: about two minutes), while sampling it
costs microseconds; sweeps, capacity searches and repeated runs ask for the same tables again and again. A table
is a pure function of what ``table_key`` hashes: the routing source's configuration and seed, the model, the
policy, its parameters (after calibration) and its code (``statistical.code_digest``), the placement of experts
on ranks, the size grid, the sample count and the sampling seed; lynxsim's table format version is hashed too, so
a change of format never reads an old file. Each table is one ``.npz`` in ``cache_dir()``, written to a temporary
file and renamed into place, so a crash never leaves a partial table and concurrent runs that build the same table
both end with a whole one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from lynxsim.routing.statistical import ActivityTable

TABLE_FORMAT_VERSION = 1
"""Bump when a table's meaning changes (its arrays, how it is built, the routing generator's numbers)."""

_ARRAYS = ("sizes", "distinct", "assignments", "rank_distinct", "rank_assignments", "proxies")


def cache_dir() -> Path:
    """``$LYNXSIM_CACHE_DIR``, else ``$XDG_CACHE_HOME/lynxsim``, else ``~/.cache/lynxsim``; tables live in its
    ``activity-tables`` folder."""
    root = os.environ.get("LYNXSIM_CACHE_DIR")
    if root:
        return Path(root) / "activity-tables"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "lynxsim" / "activity-tables"


def table_key(parts: dict[str, Any]) -> str:
    """A stable hash of everything a table depends on (``parts`` must be JSON-serializable)."""
    text = json.dumps({"format": TABLE_FORMAT_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def save_table(path: Path, table: ActivityTable) -> None:
    """Write ``table`` atomically (temporary file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {name: getattr(table, name) for name in _ARRAYS if getattr(table, name) is not None}
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            np.savez(stream, policy=np.array(table.policy), build_s=np.array(table.build_s), **arrays)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_table(path: Path) -> ActivityTable:
    with np.load(path, allow_pickle=False) as data:
        arrays: dict[str, Any] = {name: (data[name] if name in data.files else None) for name in _ARRAYS}
        return ActivityTable(policy=str(data["policy"]), build_s=float(data["build_s"]), **arrays)


def cached_table(parts: dict[str, Any], build: Callable[[], ActivityTable], *, use_cache: bool = True
                 ) -> tuple[ActivityTable, float, bool]:
    """The table ``build`` makes for ``parts``: read from the cache when it holds it, else built and stored.
    Returns the table, the seconds this call took (build, or load), and whether it came from the cache. A file
    that cannot be read (truncated by a full disk, an older numpy) is rebuilt and replaced."""
    started = time.perf_counter()
    path = cache_dir() / f"{table_key(parts)}.npz"
    if use_cache and path.is_file():
        try:
            return load_table(path), time.perf_counter() - started, True
        except (OSError, ValueError, KeyError):
            pass
    table = build()
    if use_cache:
        try:
            save_table(path, table)
        except OSError:
            pass  # a read-only or full cache costs the next run a rebuild, never this run its result
    return table, time.perf_counter() - started, False
