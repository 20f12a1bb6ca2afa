"""The run directory on disk: every file a run writes, each written so that a reader never sees a partial one.

The runner decides what a run's records hold; this module only puts them on disk (parquet for tables, YAML and
JSON for the rest; docs/architecture.md: the records writer is separate from the engine and the runner), so
that the sweep workers, the plots and the tests that read a run directory share one description of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from lynxsim.errors import InputError

_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
"""A folder name that means the same on every file system and in every shell: no separators, no leading dot (so
never ``.`` or ``..``) or dash (an option to most commands), nothing a shell or Windows treats specially."""


def slug(label: str) -> str:
    """A policy label as its folder name, distinct for distinct labels. A label that is already a safe name
    (``_SAFE_NAME``) is its own folder; any other is its safe characters and a hash of the whole label after a
    ``~``, a character no safe name holds: ``α`` and ``β`` both clean to nothing and ``lynx a`` cleans to
    ``lynx_a``, yet each gets its own folder, and a label can never name a folder outside the run directory."""
    if _SAFE_NAME.fullmatch(label) and len(label) <= 100:
        return label
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("._-")[:80] or "policy"
    return f"{cleaned}~{hashlib.sha256(label.encode()).hexdigest()[:12]}"


PARTIAL_SUFFIX = ".partial"


def partial_dir(out_dir: Path) -> Path:
    """Where a run directory is written until the run ends: ``<out_dir>.partial`` beside it."""
    return out_dir.with_name(out_dir.name + PARTIAL_SUFFIX)


RUN_MARKER = "config.resolved.yaml"
"""The file every run directory holds from its start: a folder with it (or an empty one) may be replaced by a
rerun; any other folder is not lynxsim's to delete."""


@contextmanager
def staged_run_dir(out_dir: Path) -> Iterator[Path]:
    """A run directory written whole or not at all. The run writes into ``partial_dir(out_dir)`` (each policy's
    records as soon as it ends: an interrupted run keeps them there, beside the old results, with no summary so
    that nothing reads it as a finished run); when the block ends without an error the folder replaces
    ``out_dir`` entirely, so a rerun leaves no stale policy folders or figures of the run before. ``out_dir`` must
    be absent, empty or a run directory (``RUN_MARKER``): anything else is refused (``InputError``) before the
    run, never deleted."""
    if out_dir.exists() or out_dir.is_symlink():
        if not out_dir.is_dir():
            raise InputError(str(out_dir), "exists and is not a folder: give another run directory (--out)")
        if any(out_dir.iterdir()) and not (out_dir / RUN_MARKER).is_file():
            raise InputError(str(out_dir), "is a folder that is not a lynxsim run directory, which a run would "
                             "replace: give another run directory (--out)")
    stage = partial_dir(out_dir)
    try:
        if stage.exists():
            shutil.rmtree(stage)
        stage.mkdir(parents=True)
    except OSError as exc:
        raise InputError(str(out_dir), f"cannot write the run directory ({exc.strerror or exc})") from None
    yield stage
    if out_dir.exists():
        old = out_dir.with_name(f"{out_dir.name}.old-{os.getpid()}")
        out_dir.rename(old)
        stage.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        stage.rename(out_dir)


def write_resolved_config(out_dir: Path, resolved: dict[str, Any]) -> None:
    """``config.resolved.yaml``: the validated experiment and what it resolved to."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(out_dir / "config.resolved.yaml", yaml.safe_dump(resolved, sort_keys=False))


def write_policy_records(
    out_dir: Path, label: str, requests: pd.DataFrame, iterations: pd.DataFrame, layers: pd.DataFrame,
    summary: dict[str, Any],
) -> None:
    """One policy's folder, ``policies/<slug>/``: its request, iteration and layer records and its summary."""
    folder = out_dir / "policies" / slug(label)
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_parquet(requests, folder / "requests.parquet")
    _atomic_parquet(iterations, folder / "iterations.parquet")
    _atomic_parquet(layers, folder / "layers.parquet")
    _atomic_write_text(folder / "summary.json", json.dumps(_jsonable(summary), indent=2))


def write_run_summary(out_dir: Path, frame: pd.DataFrame, header: dict[str, Any]) -> None:
    """``summary.parquet`` (one row per policy) and ``summary.json`` (``header``, then each policy's row)."""
    _atomic_parquet(frame.reset_index(), out_dir / "summary.parquet")
    payload = {**header, "summary": {label: _jsonable(row) for label, row in frame.to_dict(orient="index").items()}}
    _atomic_write_text(out_dir / "summary.json", json.dumps(payload, indent=2))


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    return {key: (None if isinstance(v, float) and not np.isfinite(v) else v) for key, v in values.items()}


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _atomic_parquet(frame: pd.DataFrame, path: Path) -> None:
    """Write ``frame`` (without its index) where a reader never sees a partial file. zstd without dictionaries
    writes an iteration table in two thirds of the time of pandas' defaults (snappy, a dictionary tried on every
    column, most of them floats that do not repeat) and a fifth smaller; statistics are kept for the scalar
    columns only, those a query filters on."""
    table = _records_table(frame)
    tmp = path.with_name(path.name + ".tmp")
    scalar_columns = [field.name for field in table.schema if not pa.types.is_list(field.type)]
    pq.write_table(table, tmp, compression="zstd", use_dictionary=False, write_statistics=scalar_columns)
    tmp.replace(path)


def _records_table(frame: pd.DataFrame) -> pa.Table:
    """``frame`` as an Arrow table whose pandas metadata describes each Arrow list column
    (``lynxsim.metrics.PER_LAYER_COLUMNS``) as an object column: ``pandas.read_parquet`` then returns one numpy
    array per row, as it always has, where the Arrow dtype's own name (``list<item: int16>[pyarrow]``) is one it
    cannot read back."""
    table = pa.Table.from_pandas(frame, preserve_index=False)
    list_columns = {
        name for name, dtype in frame.dtypes.items()
        if isinstance(dtype, pd.ArrowDtype) and pa.types.is_list(dtype.pyarrow_dtype)
    }
    if not list_columns:
        return table
    metadata = dict(table.schema.metadata)
    pandas_metadata = json.loads(metadata[b"pandas"])
    for column in pandas_metadata["columns"]:
        if column["name"] in list_columns:
            column["numpy_type"] = "object"
    metadata[b"pandas"] = json.dumps(pandas_metadata).encode()
    return table.replace_schema_metadata(metadata)
