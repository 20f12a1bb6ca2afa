"""Writing measured tables into a hardware profile. No torch.

Calibration writes one table file per model beside the profile, ``<profile-stem>.tables/<model-key>.yaml``
(e.g. ``lynxsim/hw_profiles/h200.tables/mixtral-8x7b.yaml``), holding that run's metadata (GPU, torch and CUDA versions,
date) and the model's tables, and lists it under the profile's ``measured.table_files``. The profile itself is
edited as text: only its top-level ``measured:`` block is replaced, so the datasheet figures, their ``sources``
and every comment stay exactly as they were. The result is read back with ``load_hardware`` before the call
returns, so a profile that would not load is never left behind silently.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from lynxsim.hardware import (
    CalibrationMetadata,
    KernelTable,
    TableFile,
    load_hardware,
)

SIGNIFICANT_DIGITS = 4
"""Latencies are written with 4 significant digits: a repeat-to-repeat spread of a timed kernel is ~0.5%."""


class _FlowListDumper(yaml.SafeDumper):
    """Lists of scalars in flow style (``[1, 2, 4]``), everything else in block style."""


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    flow = all(not isinstance(item, (list, tuple, dict)) for item in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_FlowListDumper.add_representer(list, _represent_list)
_FlowListDumper.add_representer(tuple, _represent_list)


def _round(value: float) -> float:
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}")


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def table_to_yaml_data(table: KernelTable) -> dict[str, Any]:
    """A table as YAML data: axis values as integers where whole, latencies nested one row per value of the
    first axis (flat for a 1-D table), each rounded to ``SIGNIFICANT_DIGITS``."""
    values = [_round(v) for v in table.latency_s]
    shape = table.shape
    if len(shape) == 1:
        nested: Any = values
    else:
        row = len(values) // shape[0]
        nested = [values[i * row:(i + 1) * row] for i in range(shape[0])]
        if len(shape) > 2:
            raise ValueError("tables of more than two axes are not written by calibration")
    data: dict[str, Any] = {}
    if table.description:
        data["description"] = table.description
    data["axes"] = list(table.axes)
    data["axis_values"] = [[_number(v) for v in axis] for axis in table.axis_values]
    data["latency_s"] = nested
    return data


def table_file_text(model_key: str, metadata: CalibrationMetadata, tables: dict[str, KernelTable]) -> str:
    """The text of one model's table file."""
    header = (
        f"# Kernel timing tables of {model_key} measured by `lynxsim calibrate` (lynxsim/calib/): one entry per grid\n"
        "# point, the median of CUDA-graph replays in seconds; see lynxsim/cost.py (MEASURED_UNITS) for what each\n"
        "# unit times and docs/validation.md for how well their sum predicts real iterations.\n"
    )
    body = {
        "metadata": metadata.model_dump(mode="json", exclude_none=True),
        "tables": {name: table_to_yaml_data(tables[name]) for name in tables},
    }
    text = header + yaml.dump(body, Dumper=_FlowListDumper, sort_keys=False, width=250, allow_unicode=True)
    TableFile.model_validate(yaml.safe_load(text))  # what was written reads back
    return text


def tables_folder(profile_path: Path) -> Path:
    """Where a profile's table files go: ``<stem>.tables/`` beside it."""
    return profile_path.with_name(f"{profile_path.stem}.tables")


_TOP_LEVEL_KEY = re.compile(r"^[A-Za-z_][\w.-]*\s*:")


def replace_top_level_block(text: str, key: str, block: str) -> str:
    """Replace the top-level ``key:`` block of a YAML text (from its line to the next top-level key or the end,
    trailing comments of the next block left alone) with ``block``; append it when the key is absent."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if re.match(rf"^{re.escape(key)}\s*:", line)), None)
    if not block.endswith("\n"):
        block += "\n"
    if start is None:
        prefix = text if text.endswith("\n") or not text else text + "\n"
        return prefix + block
    end = start + 1
    while end < len(lines) and not _TOP_LEVEL_KEY.match(lines[end]):
        end += 1
    # comment lines directly above the next top-level key belong to it
    while end > start + 1 and lines[end - 1].lstrip().startswith("#") and end < len(lines):
        end -= 1
    return "".join(lines[:start]) + block + "".join(lines[end:])


def measured_block(metadata: CalibrationMetadata, table_files: list[str], inline_tables: dict[str, Any]) -> str:
    """The profile's ``measured:`` section: the latest calibration run's metadata and the table files."""
    body: dict[str, Any] = {"metadata": metadata.model_dump(mode="json", exclude_none=True), "table_files": table_files}
    if inline_tables:
        body["tables"] = inline_tables
    dumped = yaml.dump({"measured": body}, Dumper=_FlowListDumper, sort_keys=False, width=250, allow_unicode=True)
    comment = (
        "  # Kernel timing tables measured on a real GPU by `lynxsim calibrate`, one file per model beside this\n"
        "  # profile; the measured cost model uses them for those models (docs/validation.md: how close it comes).\n"
    )
    first, rest = dumped.split("\n", 1)
    return f"{first}\n{comment}{rest}"


def write_model_tables(
    profile_path: Path, model_key: str, tables: dict[str, KernelTable], metadata: CalibrationMetadata
) -> Path:
    """Write ``tables`` of ``model_key`` into ``<stem>.tables/<model_key>.yaml`` beside the profile, list that
    file in the profile's ``measured.table_files`` and set ``measured.metadata`` to this run's. Returns the
    table file. The profile must load afterwards (else the previous text is restored and the error raised)."""
    bad = [name for name in tables if not name.startswith(f"{model_key}/")]
    if bad:
        raise ValueError(f"tables {bad} do not belong to model {model_key}")
    folder = tables_folder(profile_path)
    folder.mkdir(parents=True, exist_ok=True)
    table_path = folder / f"{model_key}.yaml"
    previous_table = table_path.read_text(encoding="utf-8") if table_path.exists() else None
    table_path.write_text(table_file_text(model_key, metadata, tables), encoding="utf-8")

    text = profile_path.read_text(encoding="utf-8")
    data = yaml.safe_load(text) or {}
    measured = data.get("measured") or {}
    files = list(measured.get("table_files") or [])
    relative = f"{folder.name}/{table_path.name}"
    if relative not in files:
        files.append(relative)
    inline = {
        name: value for name, value in (measured.get("tables") or {}).items() if not name.startswith(f"{model_key}/")
    }
    latest = metadata.model_copy(update={
        "notes": f"the latest calibration run ({model_key}); each table file carries the metadata of its own run"
    })
    new_text = replace_top_level_block(text, "measured", measured_block(latest, sorted(files), inline))
    profile_path.write_text(new_text, encoding="utf-8")
    try:
        load_hardware(profile_path)
    except Exception:
        profile_path.write_text(text, encoding="utf-8")
        if previous_table is None:
            table_path.unlink()
        else:
            table_path.write_text(previous_table, encoding="utf-8")
        raise
    return table_path


def read_table_file(path: Path) -> tuple[str, CalibrationMetadata, dict[str, KernelTable]]:
    """(model key, metadata, tables) of a table file written by ``table_file_text``."""
    parsed = TableFile.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))
    keys = {name.split("/", 1)[0] for name in parsed.tables}
    if len(keys) != 1:
        raise ValueError(f"{path}: a table file holds the tables of exactly one model, found {sorted(keys)}")
    return keys.pop(), parsed.metadata, dict(parsed.tables)


def merge_table_files(profile_path: Path, paths: list[Path]) -> list[Path]:
    """Merge table files (e.g. brought back from a GPU machine) into a profile; returns the written files."""
    written = []
    for path in paths:
        key, metadata, tables = read_table_file(path)
        written.append(write_model_tables(profile_path, key, tables, metadata))
    return written


def shown_path(path: Path) -> str:
    """``path`` relative to the working directory where it lies below it (reports name files by their place in
    the repository, not on the machine that wrote them)."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.as_posix()

