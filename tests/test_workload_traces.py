"""Trace loaders on the real Azure traces and on small Mooncake-format and generic files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lynxsim.errors import InputError
from lynxsim.workload import TraceFile, TraceNote, load_azure_csv, load_mooncake_jsonl, load_trace, load_trace_table
from lynxsim.workload.traces import clear_trace_cache
from shared_data import REQUEST_TRACES

AZURE_CODE = REQUEST_TRACES / "AzureLLMInferenceTrace_code.csv"
AZURE_CONV = REQUEST_TRACES / "AzureLLMInferenceTrace_conv.csv"


# ----- the real Azure traces ---------------------------------------------------------------------------------------


def test_azure_code_trace() -> None:
    trace = load_azure_csv(AZURE_CODE)
    assert len(trace) == 8819
    assert trace.arrival_s[0] == 0.0 and np.all(np.diff(trace.arrival_s) >= 0)
    assert trace.span_s == pytest.approx(3435.948056, abs=1e-6)  # 57.3 min
    assert trace.prompt_tokens.mean() == pytest.approx(2047.85, rel=0.01)
    assert trace.output_tokens.mean() == pytest.approx(27.88, rel=0.01)
    assert trace.prompt_tokens.min() == 3 and trace.prompt_tokens.max() == 7437
    assert trace.output_tokens.max() == 1899
    assert trace.notes == ()  # already in time order, no zero lengths
    # the code trace is very bursty: inter-arrival CV 13, far from Poisson's 1
    assert trace.describe()["interarrival_cv"] == pytest.approx(13.15, rel=0.01)


def test_azure_conv_trace() -> None:
    trace = load_azure_csv(AZURE_CONV)
    assert len(trace) == 19366
    assert trace.span_s == pytest.approx(3501.721937, abs=1e-6)  # 58.4 min
    assert trace.mean_rate_per_s == pytest.approx(5.530, rel=0.001)
    assert trace.prompt_tokens.mean() == pytest.approx(1154.70, rel=0.01)
    assert trace.output_tokens.mean() == pytest.approx(211.13, rel=0.01)
    assert np.median(trace.prompt_tokens) == 1020 and np.median(trace.output_tokens) == 129
    assert trace.output_tokens.max() == 1000
    assert trace.describe()["interarrival_cv"] == pytest.approx(1.094, rel=0.01)


def test_azure_timestamps_parsed_exactly() -> None:
    """7 fractional digits (100 ns): 18:17:03.9799600, 18:17:04.0319600, 18:17:04.0781490."""
    trace = load_azure_csv(AZURE_CODE)
    assert trace.arrival_s[1] == pytest.approx(0.0520000, abs=1e-12)
    assert trace.arrival_s[2] == pytest.approx(0.0981890, abs=1e-12)
    assert trace.prompt_tokens[:3].tolist() == [4808, 3180, 110]
    assert trace.output_tokens[:3].tolist() == [10, 8, 27]


def test_azure_load_is_cached() -> None:
    source = TraceFile(path=AZURE_CONV, format="azure")
    first = load_trace(source)
    assert load_trace(TraceFile(path=AZURE_CONV, format="azure")) is first
    with pytest.raises(ValueError):
        first.arrival_s[0] = 1.0  # shared between users: read-only


def test_cache_sees_a_changed_file(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(_mooncake_lines([(0, 10, 5)]))
    source = TraceFile(path=path, format="mooncake")
    assert len(load_trace(source)) == 1
    path.write_text(_mooncake_lines([(0, 10, 5), (1000, 20, 6)]))
    assert len(load_trace(source)) == 2


# ----- Mooncake-format JSON Lines -------------------------------------------------------------------------------


def _mooncake_lines(rows: list[tuple[int, int, int]]) -> str:
    """Rows (timestamp ms, input_length, output_length) as Mooncake publishes them, hash_ids included."""
    return "".join(
        json.dumps({"timestamp": t, "input_length": i, "output_length": o, "hash_ids": list(range(k, k + 3))}) + "\n"
        for k, (t, i, o) in enumerate(rows)
    )


def test_mooncake_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "conversation_trace.jsonl"
    path.write_text(_mooncake_lines([(0, 6758, 500), (0, 7322, 490), (3000, 13544, 71), (5999, 1053, 26)]))
    trace = load_mooncake_jsonl(path)
    assert trace.arrival_s.tolist() == [0.0, 0.0, 3.0, 5.999]
    assert trace.prompt_tokens.tolist() == [6758, 7322, 13544, 1053]
    assert trace.output_tokens.tolist() == [500, 490, 71, 26]


def test_mooncake_timestamps_from_first_request(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(_mooncake_lines([(27482, 6955, 52), (30535, 6472, 26)]) + "\n")  # trailing blank line
    assert load_mooncake_jsonl(path).arrival_s.tolist() == pytest.approx([0.0, 3.053])


def test_out_of_order_rows_are_sorted_with_their_lengths(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(_mooncake_lines([(0, 1, 10), (2000, 2, 20), (1000, 3, 30), (3000, 4, 40)]))
    trace = load_mooncake_jsonl(path)
    assert trace.arrival_s.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert trace.prompt_tokens.tolist() == [1, 3, 2, 4] and trace.output_tokens.tolist() == [10, 30, 20, 40]
    assert any("sorted" in note for note in trace.notes)
    clear_trace_cache()
    with pytest.warns(TraceNote, match="sorted"):
        load_trace(TraceFile(path=path, format="mooncake"))


def test_zero_lengths_raised_to_one_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(_mooncake_lines([(0, 100, 0), (10, 100, 3), (20, 100, 0)]))
    trace = load_mooncake_jsonl(path)
    assert trace.output_tokens.tolist() == [1, 3, 1]
    assert trace.notes == ("2 rows have 0 output_length: raised to 1 token",)


@pytest.mark.parametrize(
    ("content", "line", "problem"),
    [
        (
            '{"timestamp": 0, "input_length": 5, "output_length": 1}\n{"timestamp": 1, "input_length": 5\n',
            2,
            "malformed JSON",
        ),
        (
            '{"timestamp": 0, "input_length": 5, "output_length": 1}\n{"timestamp": 1, "output_length": 1}\n',
            2,
            "no field 'input_length'",
        ),
        (
            '{"timestamp": 0, "input_length": 5, "output_length": 1}\n\n'
            '{"timestamp": 1, "input_length": "many", "output_length": 1}\n',
            3,
            "'many' is not a number",
        ),
        ('{"timestamp": 0, "input_length": -5, "output_length": 1}\n', 1, "negative length"),
        ('{"timestamp": 0, "input_length": 5.5, "output_length": 1}\n', 1, "not a whole number"),
        ('{"timestamp": 0, "input_length": null, "output_length": 1}\n', 1, "is empty"),
        ("[0, 5, 1]\n", 1, "JSON object"),
    ],
)
def test_mooncake_errors_name_file_and_line(tmp_path: Path, content: str, line: int, problem: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(InputError) as info:
        load_mooncake_jsonl(path)
    assert info.value.where == f"{path}:{line}"
    assert problem in info.value.problem


# ----- generic tables ---------------------------------------------------------------------------------------------


def test_generic_csv_with_mapping_and_units(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("id,t_ms,in,out,model\n1,500,10,3,a\n2,1500,20,4,b\n3,4000,30,5,c\n")
    columns = {"arrival": "t_ms", "prompt": "in", "output": "out"}
    trace = load_trace_table(path, columns, time_unit="ms")
    assert trace.arrival_s.tolist() == [0.0, 1.0, 3.5]
    assert trace.prompt_tokens.tolist() == [10, 20, 30] and trace.output_tokens.tolist() == [3, 4, 5]
    assert load_trace_table(path, columns, time_unit="us").arrival_s.tolist() == pytest.approx([0.0, 1e-3, 3.5e-3])
    assert load_trace_table(path, columns, time_unit="s").span_s == 3500.0


def test_generic_csv_datetime_column(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("when,p,o\n2024-05-01T10:00:00,5,1\n2024-05-01T10:00:02.5,6,2\n")
    trace = load_trace_table(path, {"arrival": "when", "prompt": "p", "output": "o"}, time_unit="datetime")
    assert trace.arrival_s.tolist() == [0.0, 2.5]
    path.write_text("when,p,o\n2024-05-01T10:00:00+02:00,5,1\n2024-05-01T08:00:01Z,6,2\n")
    trace = load_trace_table(path, {"arrival": "when", "prompt": "p", "output": "o"}, time_unit="datetime")
    assert trace.arrival_s.tolist() == [0.0, 1.0]
    path.write_text("when,p,o\n01/05/2024 10:00:00,5,1\n01/05/2024 10:01:00,6,2\n")
    columns = {"arrival": "when", "prompt": "p", "output": "o"}
    trace = load_trace_table(path, columns, time_unit="datetime", datetime_format="%d/%m/%Y %H:%M:%S")
    assert trace.arrival_s.tolist() == [0.0, 60.0]


def test_generic_jsonl_and_missing_columns(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text('{"ts": 1.0, "prompt": 7, "x": "y"}\n{"ts": 3.0, "prompt": 9}\n')
    trace = load_trace_table(path, {"arrival": "ts", "prompt": "prompt"})
    assert trace.arrival_s.tolist() == [0.0, 2.0] and trace.prompt_tokens.tolist() == [7, 9]
    assert trace.output_tokens is None
    with pytest.raises(InputError, match="no output column"):
        trace.column("output")
    lengths_only = load_trace_table(path, {"prompt": "prompt"})
    assert lengths_only.arrival_s is None and len(lengths_only) == 2


@pytest.mark.parametrize(
    ("content", "where", "problem"),
    [
        ("t,p\n0,5\n", ":1", "no column 'o' in the header"),
        ("t,p,o\n0,5,1\n1,x,1\n", ":3", "'x' is not a number"),
        ("t,p,o\n0,5,1\n\n1,-4,1\n", ":4", "negative length"),
        ("t,p,o\n0,5,1\nsoon,5,1\n", ":3", "'soon' is not a number"),
        ("t,p,o\n0,5,1\n1,5\n", ":3", "column 'o' is empty"),
        ("t,p,o\n0,5,1\n1,5,1,9\n", ":3", "malformed CSV"),
    ],
)
def test_generic_csv_errors(tmp_path: Path, content: str, where: str, problem: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(InputError) as info:
        load_trace_table(path, {"arrival": "t", "prompt": "p", "output": "o"})
    assert info.value.where == f"{path}{where}"
    assert problem in info.value.problem


def test_azure_bad_timestamp_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "azure.csv"
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.9799600,4808,10\n2023-11-16 18:17,3180,8\n"
    )
    with pytest.raises(InputError) as info:
        load_azure_csv(path)
    assert info.value.where == f"{path}:3" and "date-time" in info.value.problem


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        load_azure_csv(tmp_path / "absent.csv")
    with pytest.raises(InputError, match="no such file"):
        load_mooncake_jsonl(tmp_path / "absent.jsonl")
    with pytest.raises(InputError, match="cannot read trace file"):
        load_trace(TraceFile(path=tmp_path / "absent.csv", format="azure"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(InputError, match="no requests"):
        load_mooncake_jsonl(tmp_path / "empty.jsonl")
    (tmp_path / "header.csv").write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n")
    with pytest.raises(InputError, match="no requests"):
        load_azure_csv(tmp_path / "header.csv")
