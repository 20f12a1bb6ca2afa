"""Every class of bad input ends in one line naming the place, exit code 2, and no traceback."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from lynxsim.cli import main
from lynxsim.config import apply_override, load_experiment
from lynxsim.errors import InputError
from lynxsim.runner import prepare

REPO = Path(__file__).resolve().parents[1]

BASE = {
    "name": "t",
    "model": "mixtral-8x7b",
    "hardware": "h200",
    "workload": {
        "arrival": {"kind": "poisson", "rate_per_s": 1.0},
        "prompt_tokens": {"kind": "fixed", "tokens": 64},
        "output_tokens": {"kind": "fixed", "tokens": 8},
    },
    "policies": [{"name": "topk"}, {"name": "lynx"}],
    "simulation": {"seed": 1, "num_requests": 5},
}


def write(tmp_path: Path, data: object, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def with_change(path: str, value: object) -> dict:
    data = yaml.safe_load(yaml.safe_dump(BASE))
    apply_override(data, f"{path}={yaml.safe_dump(value, default_flow_style=True).strip()}")
    return data


def at_key(message: str, tmp_path: Path, key_path: str) -> bool:
    """Whether ``message`` starts at a line of the experiment file, then names ``key_path``."""
    return re.match(rf"{re.escape(str(tmp_path / 'exp.yaml'))}:\d+: {re.escape(key_path)}: ", message) is not None


def error_of(tmp_path: Path, data: object, *extra: str) -> str:
    config_path = write(tmp_path, data)
    with pytest.raises(InputError) as info:
        prepare(load_experiment(config_path, list(extra)))
    return str(info.value)


def test_valid_base_resolves(tmp_path: Path) -> None:
    setup = prepare(load_experiment(write(tmp_path, BASE)))
    assert setup.model.name.lower().startswith("mixtral")
    assert len(setup.requests) == 5
    assert [label for label, _, _ in setup.policies] == ["topk", "lynx"]


def test_unknown_key_names_path_and_line(tmp_path: Path) -> None:
    data = with_change("serving.max_num_seq", 8)
    message = error_of(tmp_path, data)
    assert "serving.max_num_seq" in message and "unknown key" in message
    line = message.split(":")[1]
    assert line.isdigit()
    assert "max_num_seq" in (tmp_path / "exp.yaml").read_text().splitlines()[int(line) - 1]


def test_wrong_type(tmp_path: Path) -> None:
    message = error_of(tmp_path, with_change("serving.max_num_seqs", "many"))
    assert "serving.max_num_seqs" in message


def test_negative_rate(tmp_path: Path) -> None:
    message = error_of(tmp_path, with_change("workload.arrival.rate_per_s", -2))
    assert "workload.arrival.rate_per_s" in message and "greater than 0" in message


def test_unknown_arrival_kind(tmp_path: Path) -> None:
    message = error_of(tmp_path, with_change("workload.arrival.kind", "bursty"))
    assert "workload.arrival" in message


def test_top_k_above_experts(tmp_path: Path) -> None:
    data = with_change("model", {"name": "mixtral-8x7b", "overrides": {"top_k": 9}})
    message = error_of(tmp_path, data)
    assert at_key(message, tmp_path, "model.overrides") and "top_k" in message


def test_unknown_model(tmp_path: Path) -> None:
    assert "mixtral-8x7b" in error_of(tmp_path, with_change("model", "mixtral-9x9b"))


def test_missing_hf_config_file(tmp_path: Path) -> None:
    message = error_of(tmp_path, with_change("model", {"hf_config": "nowhere/config.json"}))
    assert "config.json" in message


def test_missing_hardware_file(tmp_path: Path) -> None:
    assert "h900" in error_of(tmp_path, with_change("hardware", "h900"))


def test_missing_experiment_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="cannot read"):
        load_experiment(tmp_path / "absent.yaml")


def test_malformed_yaml_names_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nmodel: mixtral-8x7b\nworkload: {arrival: [1, 2\n")
    with pytest.raises(InputError) as info:
        load_experiment(path)
    assert f"{path}:" in str(info.value) and "malformed YAML" in str(info.value)


def test_bad_policy_parameter(tmp_path: Path) -> None:
    message = error_of(tmp_path, with_change("policies", [{"name": "lynx", "alpha": -1}]))
    assert at_key(message, tmp_path, "policies[0]")  # found after validation, still at the file and line


def test_unknown_policy(tmp_path: Path) -> None:
    assert at_key(error_of(tmp_path, with_change("policies", [{"name": "magic"}])), tmp_path, "policies[0]")


def test_lynx_without_published_constants(tmp_path: Path) -> None:
    data = with_change("model", "olmoe-1b-7b")
    assert "policies[1].alpha" in error_of(tmp_path, data)


def test_duplicate_labels(tmp_path: Path) -> None:
    assert "label" in error_of(tmp_path, with_change("policies", [{"name": "topk"}, {"name": "topk"}]))


def test_poisson_needs_a_length(tmp_path: Path) -> None:
    data = yaml.safe_load(yaml.safe_dump(BASE))
    del data["simulation"]["num_requests"]
    assert "num_requests or duration_s" in error_of(tmp_path, data)


def test_set_overrides_nested_and_list_keys(tmp_path: Path) -> None:
    config = load_experiment(
        write(tmp_path, BASE),
        ["workload.arrival.rate_per_s=7.5", "policies.1.alpha=0.5", "serving.chunked_prefill=false"],
    )
    assert config.workload.arrival.rate_per_s == 7.5
    assert config.policies[1].params["alpha"] == 0.5
    assert config.serving.chunked_prefill is False


def test_set_rejects_bad_assignment(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="KEY.PATH=VALUE"):
        load_experiment(write(tmp_path, BASE), ["serving.max_num_seqs"])
    with pytest.raises(InputError, match="out of range"):
        load_experiment(write(tmp_path, BASE), ["policies.5.alpha=1"])


def test_cli_reports_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, with_change("workload.arrival.rate_per_s", -1))
    code = main(["run", str(path), "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "rate_per_s" in lines[0]
    assert "Traceback" not in captured.err


def test_quickstart_is_valid() -> None:
    setup = prepare(load_experiment(REPO / "experiments" / "quickstart.yaml"))
    assert setup.model.num_experts == 8 and setup.model.top_k == 2
    assert [label for label, _, _ in setup.policies] == ["topk", "lynx"]


def test_a_resolved_config_round_trips_through_its_dump() -> None:
    """A validated config, dumped with the keys it was given, validates again to itself (a config rebuilt from a
    dump, as sweeps rebuild them, is the same experiment; keys that do not apply stay errors, so unset defaults
    are left out of the dump)."""
    config = load_experiment(Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml")
    again = type(config).model_validate(config.model_dump(exclude_unset=True))
    assert again == config
