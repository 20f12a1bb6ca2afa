"""Request traces: recorded arrival times and prompt/output lengths, read from the files services publish.

Formats:

* ``azure``: the Azure LLM inference traces (Patel et al., "Splitwise", ISCA 2024; github.com/Azure/AzurePublicDataset,
  ``data/AzureLLMInferenceTrace_{code,conv}.csv``): CSV with ``TIMESTAMP`` (``2023-11-16 18:17:03.9799600``, 7
  fractional digits, parsed exactly to the nanosecond), ``ContextTokens``, ``GeneratedTokens``.
* ``mooncake``: JSON Lines as Mooncake publishes them (github.com/kvcache-ai/Mooncake, ``FAST25-release/traces/``):
  ``timestamp`` (milliseconds), ``input_length``, ``output_length``, and ``hash_ids``: the prompt's 512-token
  blocks as prefix-chained hash ids ("Identical hash IDs indicate reusable prefix KV cache blocks. The block size is
  512 tokens", FAST25-release/README.md), which prefix caching reads (``RequestTrace.prefix``).
* ``csv`` / ``jsonl``: any table with a column mapping (``arrival``, ``prompt``, ``output``: the file's column
  names, each optional; ``session``: a conversation id, whose turns each carry the conversation so far as their
  prompt's prefix) and a time unit (``s``, ``ms``, ``us`` or ``datetime``).

Rules every loader applies, so that a trace means the same whatever its format:

* arrival times become seconds from the trace's first request (so the first arrives at 0);
* rows out of time order are sorted by arrival time (stably, each row's lengths kept with it) and the trace's
  ``notes`` say how many were out of order (a ``TraceNote`` warning says it once per process too);
* a length of 0 tokens is raised to 1 and counted in ``notes``: a served request holds at least one prompt token
  and samples at least one output token (its first, at the end of prefill), and dropping the row instead would
  change the recorded arrival process. Negative, fractional, non-numeric or missing lengths are errors;
* every problem with a file is an ``InputError`` naming the file and, where there is one, the line.

Parsed traces are cached per file (path, size, modification time, format and mapping) within the process.
"""

from __future__ import annotations

import csv
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

from lynxsim.datatypes import PrefixIdentity
from lynxsim.errors import InputError

TraceFormat = Literal["azure", "mooncake", "csv", "jsonl"]
TimeUnit = Literal["s", "ms", "us", "datetime"]

_UNITS_PER_SECOND = {"s": 1.0, "ms": 1e3, "us": 1e6}
AZURE_DATETIME_FORMAT = "%Y-%m-%d %H:%M:%S.%f"

MOONCAKE_BLOCK_TOKENS = 512
"""Tokens per Mooncake ``hash_ids`` entry (github.com/kvcache-ai/Mooncake, FAST25-release/README.md)."""

MAX_REQUEST_TOKENS = 1 << 24
"""The longest prompt or output any length source may give (16.8 million tokens, far past every model's context):
a bound so that a typo (1e22) is refused with its line, not wrapped to a negative 64-bit count."""


class TraceNote(UserWarning):
    """Something a loader changed in a trace (rows sorted, zero lengths raised to 1)."""


@dataclass(frozen=True, eq=False)
class RequestTrace:
    """One trace, one row per request, sorted by arrival. Arrays are read-only (a parsed trace is shared)."""

    name: str
    source: str
    arrival_s: np.ndarray | None
    """float64 seconds from the first request, non-decreasing; None when the file has no arrival column"""
    prompt_tokens: np.ndarray | None
    """int64, >= 1; None when the file has no prompt column"""
    output_tokens: np.ndarray | None
    """int64, >= 1; None when the file has no output column"""
    notes: tuple[str, ...] = field(default=())
    prefix: PrefixIdentity | None = None
    """which rows share leading tokens (Mooncake ``hash_ids``, a ``session`` column); None: not known"""

    def __post_init__(self) -> None:
        sizes = {len(a) for a in (self.arrival_s, self.prompt_tokens, self.output_tokens) if a is not None}
        if len(sizes) != 1:
            raise ValueError("a trace needs at least one column, all of the same length")
        for array in (self.arrival_s, self.prompt_tokens, self.output_tokens):
            if array is not None:
                array.flags.writeable = False

    def __len__(self) -> int:
        return len(next(a for a in (self.arrival_s, self.prompt_tokens, self.output_tokens) if a is not None))

    @property
    def span_s(self) -> float:
        """Seconds from the first to the last arrival."""
        return float(self.arrival_s[-1] - self.arrival_s[0]) if self.arrival_s is not None and len(self) else 0.0

    @property
    def mean_rate_per_s(self) -> float:
        """Arrivals per second, ``(requests - 1) / span``: the reciprocal of the mean inter-arrival time."""
        return mean_rate_per_s(self.arrival_s) if self.arrival_s is not None else float("nan")

    def column(self, name: Literal["prompt", "output"]) -> np.ndarray:
        values = self.prompt_tokens if name == "prompt" else self.output_tokens
        if values is None:
            raise InputError(self.source, f"the trace has no {name} column (map columns.{name})")
        return values

    def describe(self) -> dict[str, float]:
        """Counts, span, rate, and length statistics, for reports and tests."""
        out: dict[str, float] = {"requests": float(len(self))}
        if self.arrival_s is not None:
            gaps = np.diff(self.arrival_s)
            out |= {
                "span_s": self.span_s,
                "mean_rate_per_s": self.mean_rate_per_s,
                "interarrival_cv": float(gaps.std() / gaps.mean()) if len(gaps) and gaps.mean() > 0 else float("nan"),
            }
        for name, values in (("prompt", self.prompt_tokens), ("output", self.output_tokens)):
            if values is not None:
                p50, p90, p99 = np.percentile(values, [50, 90, 99])
                out |= {
                    f"{name}_mean": float(values.mean()),
                    f"{name}_p50": float(p50),
                    f"{name}_p90": float(p90),
                    f"{name}_p99": float(p99),
                    f"{name}_max": float(values.max()),
                }
        return out


def mean_rate_per_s(arrival_s: np.ndarray) -> float:
    """``(n - 1) / (last - first)``: NaN for fewer than two arrivals or a zero span."""
    if len(arrival_s) < 2 or arrival_s[-1] <= arrival_s[0]:
        return float("nan")
    return float((len(arrival_s) - 1) / (arrival_s[-1] - arrival_s[0]))


# ----- the config-facing description of a trace file -------------------------------------------------------------


class TraceColumns(BaseModel):
    """Which of the file's columns (CSV header names or JSON keys) hold what; each may be left out."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    arrival: str | None = Field(default=None, description="arrival time column (unit: time_unit)")
    prompt: str | None = Field(default=None, description="prompt (input, context) tokens column")
    output: str | None = Field(default=None, description="output (generated) tokens column")
    session: str | None = Field(
        default=None,
        description="conversation id column: a turn's prompt starts with its conversation's earlier turns "
                    "(prompts and outputs), which prefix caching may reuse; needs prompt and output",
    )

    @model_validator(mode="after")
    def _some(self) -> TraceColumns:
        if self.arrival is None and self.prompt is None and self.output is None:
            raise ValueError("map at least one of 'arrival', 'prompt', 'output' to a column of the file")
        if self.session is not None and (self.prompt is None or self.output is None):
            raise ValueError("a session column needs the prompt and output columns too")
        return self


AZURE_COLUMNS = TraceColumns(arrival="TIMESTAMP", prompt="ContextTokens", output="GeneratedTokens")
MOONCAKE_COLUMNS = TraceColumns(arrival="timestamp", prompt="input_length", output="output_length")


class TraceFile(BaseModel):
    """A request trace file: ``path`` and ``format`` (``azure``, ``mooncake``, or ``csv``/``jsonl`` with ``columns``
    and ``time_unit``). The base of every config entry that reads a trace."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    path: Path = Field(description="trace file; relative paths are taken from the experiment file's folder")
    format: TraceFormat = Field(description="azure | mooncake | csv | jsonl")
    columns: TraceColumns | None = Field(default=None, description="column mapping (csv and jsonl only)")
    time_unit: TimeUnit | None = Field(default=None, description="unit of the arrival column (csv/jsonl; default s)")
    datetime_format: str | None = Field(
        default=None, description="strptime format of a datetime arrival column (default: ISO 8601)"
    )

    @model_validator(mode="after")
    def _mapping_fits_format(self) -> TraceFile:
        if self.format in ("csv", "jsonl"):
            if self.columns is None:
                raise ValueError(
                    f"format {self.format} needs 'columns' (arrival, prompt, output: the file's column names)"
                )
            if self.datetime_format is not None and self.time_unit != "datetime":
                raise ValueError("datetime_format applies to time_unit: datetime only")
        else:
            given = [k for k in ("columns", "time_unit", "datetime_format") if getattr(self, k) is not None]
            if given:
                raise ValueError(
                    f"format {self.format} has fixed columns and time unit: remove {', '.join(given)} "
                    "(or use format csv/jsonl with a column mapping)"
                )
        return self

    def load(self) -> RequestTrace:
        return load_trace(self)


# ----- loading ---------------------------------------------------------------------------------------------------

_CACHE: dict[tuple, RequestTrace] = {}


def load_trace(source: TraceFile) -> RequestTrace:
    """The parsed trace of ``source``, cached per file and mapping within the process."""
    path = Path(source.path)
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise InputError(str(path), "cannot read trace file (no such file)") from None
    except OSError as exc:
        raise InputError(str(path), f"cannot read trace file ({exc.strerror})") from None
    key = (
        str(path.resolve()),
        stat.st_size,
        stat.st_mtime_ns,
        source.format,
        source.columns,
        source.time_unit,
        source.datetime_format,
    )
    trace = _CACHE.get(key)
    if trace is None:
        if source.format == "azure":
            trace = load_azure_csv(path)
        elif source.format == "mooncake":
            trace = load_mooncake_jsonl(path)
        else:
            assert source.columns is not None
            trace = load_trace_table(
                path,
                source.columns,
                time_unit=source.time_unit or "s",
                format=source.format,
                datetime_format=source.datetime_format,
            )
        _CACHE[key] = trace
        for note in trace.notes:
            warnings.warn(f"{path}: {note}", TraceNote, stacklevel=2)
    return trace


def clear_trace_cache() -> None:
    _CACHE.clear()


def load_azure_csv(path: str | Path) -> RequestTrace:
    """An Azure LLM inference trace CSV (TIMESTAMP, ContextTokens, GeneratedTokens)."""
    return load_trace_table(
        path, AZURE_COLUMNS, time_unit="datetime", format="csv", datetime_format=AZURE_DATETIME_FORMAT, name="azure"
    )


def load_mooncake_jsonl(path: str | Path) -> RequestTrace:
    """A Mooncake trace (JSON Lines: timestamp in ms, input_length, output_length, hash_ids)."""
    return load_trace_table(path, MOONCAKE_COLUMNS, time_unit="ms", format="jsonl", name="mooncake",
                            hash_ids="hash_ids")


def load_trace_table(
    path: str | Path,
    columns: TraceColumns | dict[str, str | None],
    *,
    time_unit: TimeUnit = "s",
    format: Literal["csv", "jsonl"] | None = None,
    datetime_format: str | None = None,
    name: str | None = None,
    hash_ids: str | None = None,
) -> RequestTrace:
    """Any CSV or JSON Lines file with a column mapping; ``format`` defaults to the file suffix. ``hash_ids``: a
    JSON Lines field holding each prompt's Mooncake block hash ids (``MOONCAKE_BLOCK_TOKENS`` tokens each)."""
    path = Path(path)
    if not isinstance(columns, TraceColumns):
        columns = TraceColumns(**columns)
    if format is None:
        suffix = path.suffix.lower()
        if suffix not in (".csv", ".jsonl"):
            raise InputError(str(path), "cannot tell csv from jsonl by the suffix: give the format")
        format = "csv" if suffix == ".csv" else "jsonl"
    wanted = {
        role: col
        for role, col in (("arrival", columns.arrival), ("prompt", columns.prompt), ("output", columns.output),
                          ("session", columns.session), ("hash_ids", hash_ids))
        if col is not None
    }
    if format == "csv":
        table, first_line = _read_csv(path, wanted)
    else:
        table, first_line = _read_jsonl(path, wanted, optional=(hash_ids,) if hash_ids is not None else ())
    if len(table) == 0:
        raise InputError(str(path), "the trace has no requests")
    lines = table.index.to_numpy() + first_line  # the 1-based line of each row in the file
    notes: list[str] = []

    arrival = None
    if "arrival" in wanted:
        arrival = _times_s(table[wanted["arrival"]], wanted["arrival"], time_unit, datetime_format, path, lines)
    lengths = {
        role: _lengths(table[wanted[role]], wanted[role], path, lines, notes)
        for role in ("prompt", "output")
        if role in wanted
    }
    prefix = None
    if "hash_ids" in wanted and table[wanted["hash_ids"]].notna().any():
        prefix = _hash_id_prefix(table[wanted["hash_ids"]], lengths["prompt"], path, lines)
    elif "session" in wanted:
        # a turn's KV cache at its end: its prompt (the conversation so far) and every output token but the last
        sessions = pd.factorize(table[wanted["session"]])[0]
        alone = sessions < 0  # a row without a session id is a conversation of its own
        sessions[alone] = sessions.max() + 1 + np.arange(int(alone.sum()))
        prefix = PrefixIdentity.whole(sessions, lengths["prompt"] + lengths["output"] - 1)
    if arrival is not None:
        out_of_order = int(np.count_nonzero(np.diff(arrival) < 0))
        if out_of_order:
            order = np.argsort(arrival, kind="stable")
            arrival = arrival[order]
            lengths = {role: values[order] for role, values in lengths.items()}
            prefix = prefix.take(order) if prefix is not None else None
            notes.append(f"{out_of_order} rows arrive earlier than the row before them: sorted by arrival time")
        arrival = arrival - arrival[0]
    return RequestTrace(
        name=name or path.stem,
        source=str(path),
        arrival_s=arrival,
        prompt_tokens=lengths.get("prompt"),
        output_tokens=lengths.get("output"),
        notes=tuple(notes),
        prefix=prefix,
    )


def _hash_id_prefix(values: pd.Series, prompts: np.ndarray, path: Path, lines: np.ndarray) -> PrefixIdentity:
    """Mooncake ``hash_ids`` as a ``PrefixIdentity`` of ``MOONCAKE_BLOCK_TOKENS``-token units covering each
    prompt; a field that is not a list of integers (or missing where other lines have it) is an error at its line."""
    counts = np.zeros(len(values), dtype=np.int64)
    ids: list[int] = []
    for row, value in enumerate(values):
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise InputError(f"{path}:{int(lines[row])}", f"hash_ids must be a list of integers, got {value!r}"[:200])
        counts[row] = len(value)
        ids.extend(value)
    starts = np.zeros_like(counts)
    if counts.size > 1:
        np.cumsum(counts[:-1], out=starts[1:])
    return PrefixIdentity(MOONCAKE_BLOCK_TOKENS, starts, counts, np.array(ids, dtype=np.int64), prompts.copy())


def _read_csv(path: Path, wanted: dict[str, str]) -> tuple[pd.DataFrame, int]:
    """The wanted columns; the index is the data row's position counting blank lines, so line = index + 2."""
    try:
        header = pd.read_csv(path, nrows=0).columns
    except FileNotFoundError:
        raise InputError(str(path), "cannot read trace file (no such file)") from None
    except OSError as exc:
        raise InputError(str(path), f"cannot read trace file ({exc.strerror})") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(str(path), f"not a CSV file with a header line ({exc})") from None
    missing = [col for col in wanted.values() if col not in header]
    if missing:
        raise InputError(
            f"{path}:1", f"no column {missing[0]!r} in the header (columns: {', '.join(map(str, header))})"
        )
    try:
        # strings for the time column (exact datetime parsing); blank lines kept so that the index counts lines
        dtypes = {wanted["arrival"]: str} if "arrival" in wanted else None
        # every column is read (not usecols), so that a row with too many fields is an error, not silently cut
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)  # pandas cuts a too-long row with a warning
            table = pd.read_csv(path, dtype=dtypes, skip_blank_lines=False, index_col=False)
    except pd.errors.ParserWarning:
        long_row = _first_long_row(path, len(header))
        raise InputError(f"{path}:{long_row}", f"a row with more fields than the header's {len(header)}") from None
    except (pd.errors.ParserError, ValueError, UnicodeDecodeError) as exc:
        text = str(exc).strip()
        line = re.search(r"line (\d+)", text)
        raise InputError(f"{path}:{line.group(1)}" if line else str(path), f"malformed CSV ({text})") from None
    table = table[list(dict.fromkeys(wanted.values()))]
    table = table[table.notna().any(axis=1)]  # blank lines
    return table, 2


def _first_long_row(path: Path, fields: int) -> int:
    """The line number of the first row of a CSV file with more than ``fields`` fields."""
    with path.open(newline="", encoding="utf-8", errors="replace") as file:
        for number, row in enumerate(csv.reader(file), start=1):
            if len(row) > fields:
                return number
    return 1


def _read_jsonl(path: Path, wanted: dict[str, str], optional: tuple[str, ...] = ()) -> tuple[pd.DataFrame, int]:
    """The wanted fields of every JSON object line (None where an ``optional`` one is missing); the index is the
    0-based line number, so line = index + 1."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise InputError(str(path), "cannot read trace file (no such file)") from None
    except OSError as exc:
        raise InputError(str(path), f"cannot read trace file ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise InputError(str(path), "not a text file") from None
    fields = list(dict.fromkeys(wanted.values()))
    columns: dict[str, list[object]] = {f: [] for f in fields}
    index: list[int] = []
    for number, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{number + 1}", f"malformed JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise InputError(f"{path}:{number + 1}", "each line must be a JSON object")
        for f in fields:
            if f not in row and f not in optional:
                raise InputError(f"{path}:{number + 1}", f"no field {f!r}")
            columns[f].append(row.get(f))
        index.append(number)
    return pd.DataFrame(columns, index=pd.Index(index)), 1


def _times_s(
    values: pd.Series, column: str, unit: TimeUnit, datetime_format: str | None, path: Path, lines: np.ndarray
) -> np.ndarray:
    """Arrival times in seconds (any origin). Datetimes are differenced in integer nanoseconds, exactly."""
    present = values.notna().to_numpy()
    if unit == "datetime":
        # utc=True: offsets ("+02:00") are honoured and times without one are taken as UTC
        parsed = pd.to_datetime(values, format=datetime_format or "ISO8601", errors="coerce", utc=True)
        bad = parsed.isna().to_numpy()
        expected = datetime_format or "ISO 8601"
        _fail_at(bad, values, column, path, lines, f"is not a date-time ({expected})", present)
        stamps = parsed.dt.tz_localize(None).to_numpy().astype("datetime64[ns]").astype(np.int64)
        return (stamps - stamps.min()).astype(np.float64) / 1e9
    numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
    _fail_at(~np.isfinite(numbers), values, column, path, lines, "is not a number", present)
    return numbers / _UNITS_PER_SECOND[unit]  # division: 5999 ms is exactly the double nearest 5.999 s


def _lengths(values: pd.Series, column: str, path: Path, lines: np.ndarray, notes: list[str]) -> np.ndarray:
    present = values.notna().to_numpy()
    numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
    _fail_at(~np.isfinite(numbers), values, column, path, lines, "is not a number", present)
    _fail_at(numbers != np.rint(numbers), values, column, path, lines, "is not a whole number of tokens", present)
    _fail_at(numbers < 0, values, column, path, lines, "is a negative length", present)
    _fail_at(numbers > MAX_REQUEST_TOKENS, values, column, path, lines,
             f"is longer than any request can be ({MAX_REQUEST_TOKENS:,} tokens)", present)
    tokens = numbers.astype(np.int64)
    zeros = int(np.count_nonzero(tokens == 0))
    if zeros:
        notes.append(f"{zeros} rows have 0 {column}: raised to 1 token")
        tokens = np.maximum(tokens, 1)
    return tokens


def _fail_at(
    bad: np.ndarray, values: pd.Series, column: str, path: Path, lines: np.ndarray, problem: str, present: np.ndarray
) -> None:
    if not bad.any():
        return
    first = int(np.argmax(bad))
    where = f"{path}:{int(lines[first])}"
    if not present[first]:
        raise InputError(where, f"column {column!r} is empty")
    value = values.iloc[first]
    value = value.item() if isinstance(value, np.generic) else value  # 3, not np.int64(3)
    raise InputError(where, f"column {column!r}: {value!r} {problem}")
