"""``hardware.overrides``: an experiment replaces its profile's host overhead without a profile file of its own,
from the file, from ``--set`` and along a sweep axis; bad values end in one line naming the key path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lynxsim.cli import main
from lynxsim.config import load_experiment
from lynxsim.errors import InputError
from lynxsim.hardware import load_hardware
from lynxsim.runner import prepare, run_experiment
from lynxsim.sweep.driver import run_sweep
from lynxsim.sweep.points import config_hash, load_sweep
from lynxsim.sweep.store import ResultsStore

KEY = "hardware.overrides.efficiency.iteration_overhead_s"
PROFILE_OVERHEAD_S = load_hardware("h200").efficiency.iteration_overhead_s
EXPERIMENT = {
    "name": "overhead",
    "model": "mixtral-8x7b",
    "hardware": "h200",  # the one-string form: --set and sweep keys must still reach its overrides
    "workload": {
        "arrival": {"kind": "poisson", "rate_per_s": 2.0},
        "prompt_tokens": {"kind": "fixed", "tokens": 64},
        "output_tokens": {"kind": "fixed", "tokens": 16},
    },
    "serving": {"max_num_seqs": 8},
    "policies": [{"name": "topk"}],
    "simulation": {"seed": 2, "num_requests": 6},
}


def write(tmp_path: Path, data: dict, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_override_replaces_the_profile_overhead_in_every_iteration(tmp_path: Path) -> None:
    path = write(tmp_path, EXPERIMENT)
    base = run_experiment(load_experiment(path)).runs[0].iterations
    overhead_s = 2e-3
    changed_config = load_experiment(path, [f"{KEY}={overhead_s}"])
    assert prepare(changed_config).hardware.efficiency.iteration_overhead_s == overhead_s
    changed = run_experiment(changed_config).runs[0].iterations
    # overhead_s is the graph launch (measured, the same in both) plus the host overhead: one value per run
    assert base["overhead_s"].nunique() == changed["overhead_s"].nunique() == 1
    shift_s = changed["overhead_s"].iloc[0] - base["overhead_s"].iloc[0]
    assert shift_s == pytest.approx(overhead_s - PROFILE_OVERHEAD_S)
    gpu_s = (changed["latency_s"] - changed["overhead_s"]).sum(), (base["latency_s"] - base["overhead_s"]).sum()
    assert changed["latency_s"].sum() > base["latency_s"].sum() and gpu_s[0] == pytest.approx(gpu_s[1], rel=0.2)


def test_override_written_in_the_file_and_zero_allowed(tmp_path: Path) -> None:
    data = {**EXPERIMENT, "hardware": {"profile": "h200", "overrides": {"efficiency": {"iteration_overhead_s": 0}}}}
    setup = prepare(load_experiment(write(tmp_path, data)))
    assert setup.hardware.efficiency.iteration_overhead_s == 0.0
    assert setup.hardware.efficiency.kernel_launch_s == load_hardware("h200").efficiency.kernel_launch_s


def test_no_override_keeps_the_profile_and_the_config_hash(tmp_path: Path) -> None:
    config = load_experiment(write(tmp_path, EXPERIMENT))
    assert prepare(config).hardware.efficiency.iteration_overhead_s == PROFILE_OVERHEAD_S
    # a config that replaces nothing dumps (and hashes) as before overrides existed: its stored runs stay valid
    assert "overrides" not in config.model_dump(mode="json")["hardware"]
    assert config_hash(config) != config_hash(load_experiment(write(tmp_path, EXPERIMENT), [f"{KEY}=0.0005"]))


@pytest.mark.parametrize(
    ("value", "problem"),
    [("-0.001", "greater than or equal to 0"), (".inf", "finite number"), (".nan", "finite number"),
     ("fast", "valid number")],
)
def test_bad_values_name_the_key_path_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str, problem: str
) -> None:
    path = write(tmp_path, EXPERIMENT)
    assert main(["check", str(path), "--set", f"{KEY}={value}"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and KEY in lines[0] and problem in lines[0]


def test_bad_value_in_the_file_names_its_line(tmp_path: Path) -> None:
    data = {**EXPERIMENT, "hardware": {"profile": "h200", "overrides": {"efficiency": {"iteration_overhead_s": -1}}}}
    path = write(tmp_path, data)
    with pytest.raises(InputError) as info:
        load_experiment(path)
    line = int(str(info.value).split(":")[1])
    assert KEY in str(info.value) and "iteration_overhead_s" in path.read_text().splitlines()[line - 1]


def test_only_engine_figures_can_be_replaced(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"hardware\.overrides\.efficiency\.kernel_launch_s: unknown key"):
        load_experiment(write(tmp_path, EXPERIMENT), ["hardware.overrides.efficiency.kernel_launch_s=1e-6"])


def test_a_sweep_axis_over_the_overhead_runs_one_point_per_value(tmp_path: Path) -> None:
    values_s = [0.0, 2e-3]
    path = write(tmp_path, {**EXPERIMENT, "sweep": {"grid": {KEY: values_s}, "seed": "per_repeat"}})  # same arrivals
    sweep = load_sweep(path)
    assert [p.config.hardware.overrides.efficiency.iteration_overhead_s for p in sweep.points] == values_s
    out = tmp_path / "out"
    report = run_sweep(sweep, out, workers=1, records="none")
    assert report.ran == 2 and not report.failures
    results = ResultsStore(out).query(f'SELECT "{KEY}" AS overhead_s, tpot_p50_ms FROM results ORDER BY overhead_s')
    assert results["overhead_s"].tolist() == values_s
    # each decode iteration is 2 ms longer, and every token of a request waits for one
    assert results["tpot_p50_ms"].iloc[1] - results["tpot_p50_ms"].iloc[0] == pytest.approx(2.0, abs=0.3)


def test_a_bad_sweep_value_names_the_point(tmp_path: Path) -> None:
    path = write(tmp_path, {**EXPERIMENT, "sweep": {"grid": {KEY: [0.0, -1.0]}}})
    with pytest.raises(InputError, match=r"sweep point 1 .*greater than or equal to 0"):
        load_sweep(path)
