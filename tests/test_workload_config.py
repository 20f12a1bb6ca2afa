"""The workload keys of an experiment: every new option, every class of error, relative paths, the example."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from lynxsim.cli import main
from lynxsim.config import load_experiment
from lynxsim.errors import InputError
from lynxsim.runner import prepare
from lynxsim.workload import load_azure_csv
from shared_data import REQUEST_TRACES

REPO = Path(__file__).resolve().parents[1]
AZURE_CONV = REQUEST_TRACES / "AzureLLMInferenceTrace_conv.csv"


def experiment(workload: dict, simulation: dict | None = None) -> dict:
    return {
        "name": "t",
        "model": "qwen3-30b-a3b",
        "hardware": "h200",
        "workload": workload,
        "policies": [{"name": "topk"}],
        "simulation": simulation if simulation is not None else {"seed": 1},
    }


def write(tmp_path: Path, data: dict, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def error_of(tmp_path: Path, data: dict) -> str:
    path = write(tmp_path, data)
    with pytest.raises(InputError) as info:
        prepare(load_experiment(path))
    return str(info.value)


def line_of(message: str, tmp_path: Path) -> str:
    """The YAML line an error message points at."""
    number = int(message.split(":")[1])
    return (tmp_path / "exp.yaml").read_text().splitlines()[number - 1]


AZURE = {"kind": "trace", "path": str(AZURE_CONV), "format": "azure"}


# ----- valid configurations ---------------------------------------------------------------------------------------


def test_trace_arrivals_need_no_lengths_and_no_count(tmp_path: Path) -> None:
    setup = prepare(load_experiment(write(tmp_path, experiment({"arrival": AZURE}))))
    assert len(setup.requests) == 19_366
    trace = load_azure_csv(AZURE_CONV)
    assert [r.output_tokens for r in setup.requests[:50]] == trace.output_tokens[:50].tolist()


def test_trace_arrivals_with_num_requests_and_scaling(tmp_path: Path) -> None:
    data = experiment({"arrival": {**AZURE, "rate_per_s": 20.0}}, {"num_requests": 40})
    setup = prepare(load_experiment(write(tmp_path, data)))
    assert len(setup.requests) == 40
    trace = load_azure_csv(AZURE_CONV)
    factor = trace.mean_rate_per_s / 20.0
    assert setup.requests[-1].arrival_s == pytest.approx(trace.arrival_s[39] * factor)


def test_gamma_with_paired_lengths(tmp_path: Path) -> None:
    data = experiment(
        {
            "arrival": {"kind": "gamma", "rate_per_s": 4.0, "cv": 2.0},
            "paired_lengths": {"path": str(AZURE_CONV), "format": "azure"},
        },
        {"num_requests": 30},
    )
    setup = prepare(load_experiment(write(tmp_path, data)))
    assert len(setup.requests) == 30 and setup.requests[0].arrival_s > 0


def test_empirical_lengths_and_generic_table(tmp_path: Path) -> None:
    (tmp_path / "lengths.csv").write_text("in,out\n100,7\n200,9\n")
    data = experiment(
        {
            "arrival": {"kind": "poisson", "rate_per_s": 2.0},
            "prompt_tokens": {"kind": "empirical", "path": "lengths.csv", "format": "csv", "columns": {"prompt": "in"}},
            "output_tokens": {
                "kind": "empirical",
                "path": "lengths.csv",
                "format": "csv",
                "columns": {"output": "out"},
            },
        },
        {"num_requests": 50},
    )
    setup = prepare(load_experiment(write(tmp_path, data)))  # relative to the experiment file
    assert {r.prompt_tokens for r in setup.requests} == {100, 200}
    assert {r.output_tokens for r in setup.requests} == {7, 9}


def test_relative_trace_paths_follow_the_experiment_file(tmp_path: Path) -> None:
    folder = tmp_path / "experiments"
    folder.mkdir()
    (tmp_path / "trace.jsonl").write_text(
        '{"timestamp": 0, "input_length": 10, "output_length": 2, "hash_ids": [0]}\n'
        '{"timestamp": 1500, "input_length": 20, "output_length": 3, "hash_ids": [0, 1]}\n'
    )
    data = experiment(
        {
            "arrival": {"kind": "trace", "path": "../trace.jsonl", "format": "mooncake"},
            "paired_lengths": {"path": "../trace.jsonl", "format": "mooncake"},
        }
    )
    config = load_experiment(write(folder, data))
    assert config.workload.arrival.path == folder / "../trace.jsonl"
    assert config.workload.paired_lengths.path == folder / "../trace.jsonl"
    setup = prepare(config)
    assert [r.arrival_s for r in setup.requests] == [0.0, 1.5]


def test_example_experiment_resolves() -> None:
    config = load_experiment(REPO / "experiments" / "azure_conv_qwen3.yaml")
    setup = prepare(config)
    trace = load_azure_csv(AZURE_CONV)
    n = config.simulation.num_requests
    assert len(setup.requests) == n
    assert np.array_equal([r.arrival_s for r in setup.requests], trace.arrival_s[:n])
    assert [r.prompt_tokens for r in setup.requests] == trace.prompt_tokens[:n].tolist()
    assert [label for label, _, _ in setup.policies] == ["topk", "lynx"] and config.serving.chunked_prefill


# ----- every class of error -----------------------------------------------------------------------------------------


def test_unknown_format(tmp_path: Path) -> None:
    message = error_of(tmp_path, experiment({"arrival": {**AZURE, "format": "parquet"}}))
    assert "workload.arrival.format" in message and "'azure'" in message
    assert "format" in line_of(message, tmp_path)


def test_unknown_arrival_kind_and_key(tmp_path: Path) -> None:
    assert "workload.arrival" in error_of(tmp_path, experiment({"arrival": {"kind": "replay", "path": "x"}}))
    message = error_of(tmp_path, experiment({"arrival": {**AZURE, "speed_up": 2}}))
    assert "workload.arrival.speed_up" in message and "unknown key" in message


def test_both_speedup_and_rate(tmp_path: Path) -> None:
    message = error_of(tmp_path, experiment({"arrival": {**AZURE, "speedup": 2.0, "rate_per_s": 3.0}}))
    assert "workload.arrival" in message and "at most one of 'speedup' and 'rate_per_s'" in message


@pytest.mark.parametrize(("key", "value"), [("speedup", 0), ("rate_per_s", -1), ("start_s", -5)])
def test_scaling_values(tmp_path: Path, key: str, value: float) -> None:
    message = error_of(tmp_path, experiment({"arrival": {**AZURE, key: value}}))
    assert f"workload.arrival.{key}" in message


def test_gamma_values_and_count(tmp_path: Path) -> None:
    lengths = {"prompt_tokens": {"kind": "fixed", "tokens": 8}, "output_tokens": {"kind": "fixed", "tokens": 2}}
    message = error_of(
        tmp_path, experiment({"arrival": {"kind": "gamma", "rate_per_s": 1.0, "cv": 0}, **lengths}, {"num_requests": 5})
    )
    assert "workload.arrival.cv" in message and "greater than 0" in message
    message = error_of(
        tmp_path, experiment({"arrival": {"kind": "gamma", "rate_per_s": 1.0}, **lengths}, {"num_requests": 5})
    )
    assert "workload.arrival.cv" in message and "required" in message.lower()
    message = error_of(tmp_path, experiment({"arrival": {"kind": "gamma", "rate_per_s": 1.0, "cv": 2}, **lengths}))
    assert "num_requests or duration_s" in message and "gamma" in message


def test_table_format_needs_columns(tmp_path: Path) -> None:
    message = error_of(tmp_path, experiment({"arrival": {"kind": "trace", "path": str(AZURE_CONV), "format": "csv"}}))
    assert "workload.arrival" in message and "needs 'columns'" in message
    message = error_of(tmp_path, experiment({"arrival": {**AZURE, "columns": {"arrival": "TIMESTAMP"}}}))
    assert "fixed columns" in message
    columns = {"prompt": "ContextTokens", "output": "GeneratedTokens"}
    message = error_of(
        tmp_path,
        experiment({"arrival": {"kind": "trace", "path": str(AZURE_CONV), "format": "csv", "columns": columns}}),
    )
    assert "columns.arrival" in message
    message = error_of(
        tmp_path,
        experiment(
            {"arrival": {"kind": "trace", "path": str(AZURE_CONV), "format": "csv", "columns": {"arival": "x"}}}
        ),
    )
    assert "workload.arrival.columns.arival" in message and "unknown key" in message


def test_missing_column_in_the_file(tmp_path: Path) -> None:
    columns = {"arrival": "TIMESTAMP", "prompt": "ContextTokens", "output": "Generated"}
    data = experiment(
        {
            "arrival": {
                "kind": "trace",
                "path": str(AZURE_CONV),
                "format": "csv",
                "columns": columns,
                "time_unit": "datetime",
            }
        }
    )
    message = error_of(tmp_path, data)
    assert f": workload.arrival: {AZURE_CONV}:1: no column 'Generated'" in message  # after the experiment's line
    assert "GeneratedTokens" in message  # the columns the file has


def test_missing_trace_file_cli_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, experiment({"arrival": {**AZURE, "path": "nowhere.csv"}}))
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    # a relative path is taken from the experiment file's folder, and the message shows where it was looked for
    assert len(err.splitlines()) == 1 and f"workload.arrival: {tmp_path / 'nowhere.csv'}" in err
    assert "no such file" in err


def test_bad_value_in_trace_names_the_line(tmp_path: Path) -> None:
    (tmp_path / "t.jsonl").write_text(
        '{"timestamp": 0, "input_length": 10, "output_length": 2}\n'
        '{"timestamp": 5, "input_length": -3, "output_length": 2}\n'
    )
    message = error_of(tmp_path, experiment({"arrival": {"kind": "trace", "path": "t.jsonl", "format": "mooncake"}}))
    assert f": workload.arrival: {tmp_path / 't.jsonl'}:2: " in message and "-3 is a negative length" in message


def test_lengths_given_twice_or_not_at_all(tmp_path: Path) -> None:
    paired = {"path": str(AZURE_CONV), "format": "azure"}
    message = error_of(
        tmp_path,
        experiment({"arrival": AZURE, "paired_lengths": paired, "output_tokens": {"kind": "fixed", "tokens": 3}}),
    )
    assert "workload.output_tokens" in message and "paired_lengths" in message
    assert "output_tokens" in line_of(message, tmp_path)
    poisson = {"kind": "poisson", "rate_per_s": 1.0}
    message = error_of(
        tmp_path, experiment({"arrival": poisson, "prompt_tokens": {"kind": "fixed", "tokens": 3}}, {"num_requests": 3})
    )
    assert "workload.output_tokens" in message and "required" in message
    message = error_of(tmp_path, experiment({"arrival": poisson}, {"num_requests": 3}))
    assert "workload.prompt_tokens" in message and "paired_lengths" in message


def test_paired_lengths_need_both_columns(tmp_path: Path) -> None:
    paired = {"path": str(AZURE_CONV), "format": "csv", "columns": {"prompt": "ContextTokens"}}
    message = error_of(
        tmp_path,
        experiment({"arrival": {"kind": "poisson", "rate_per_s": 1.0}, "paired_lengths": paired}, {"num_requests": 3}),
    )
    assert "workload.paired_lengths" in message and "columns.output" in message


def test_empirical_length_errors(tmp_path: Path) -> None:
    base = {"arrival": {"kind": "poisson", "rate_per_s": 1.0}, "output_tokens": {"kind": "fixed", "tokens": 3}}
    message = error_of(
        tmp_path,
        experiment(
            {
                **base,
                "prompt_tokens": {"kind": "empirical", "path": str(AZURE_CONV), "format": "azure", "column": "input"},
            },
            {"num_requests": 3},
        ),
    )
    assert "workload.prompt_tokens.column" in message
    message = error_of(
        tmp_path, experiment({**base, "prompt_tokens": {"kind": "empirical", "format": "azure"}}, {"num_requests": 3})
    )
    assert "workload.prompt_tokens.path" in message
