"""The run directory on disk: every file a run writes, each written so that a reader never sees a partial one.

The runner decides what a run's records hold; this module only puts them on disk (parquet for tables, YAML and
JSON for the rest; docs/architecture.md: the records writer is separate from the engine and the runner), so
that the sweep workers, the plots and the tests that read a run directory share one description of it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml


def slug(label: str) -> str:
    """A label as a folder name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "policy"


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
