"""Sweep sections: grid and zip expansion, seed derivation, and the errors a bad sweep file gives."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from lynxsim.cli import main
from lynxsim.errors import InputError
from lynxsim.hardware import SHIPPED_PROFILE_DIR
from lynxsim.sections.sweep import SweepConfig, SweepPoint, derive_seed, expand
from lynxsim.sweep.points import config_hash, load_sweep

BASE = {
    "name": "tiny",
    "model": "mixtral-8x7b",
    "hardware": "h200",
    "workload": {
        "arrival": {"kind": "poisson", "rate_per_s": 2.0},
        "prompt_tokens": {"kind": "fixed", "tokens": 64},
        "output_tokens": {"kind": "fixed", "tokens": 8},
    },
    "policies": [{"name": "topk"}, {"name": "lynx"}],
    "simulation": {"seed": 7, "num_requests": 5},
}


def write(tmp_path: Path, sweep: dict, base: dict | None = None) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**(base or BASE), "sweep": sweep}, sort_keys=False))
    return path


def test_grid_then_zip_first_key_slowest_repeats_innermost() -> None:
    spec = SweepConfig(grid={"a": [1, 2], "b": ["x", "y", "z"]}, zip=[{"c": [10, 20], "d": [True, False]}], repeats=2)
    points = expand(spec)
    assert len(points) == 2 * 3 * 2 * 2
    assert [p.index for p in points] == list(range(24))
    # hand-worked: index 0..1 are the repeats of the first combination, and the zip group varies fastest
    assert points[0].values == {"a": 1, "b": "x", "c": 10, "d": True} and points[0].repeat == 0
    assert points[1].values == points[0].values and points[1].repeat == 1
    assert points[2].values == {"a": 1, "b": "x", "c": 20, "d": False}
    assert points[4].values == {"a": 1, "b": "y", "c": 10, "d": True}
    assert points[12].values == {"a": 2, "b": "x", "c": 10, "d": True}
    assert spec.keys == ["a", "b", "c", "d"]


@given(
    lengths=st.lists(st.integers(1, 4), min_size=0, max_size=3),
    zip_length=st.integers(1, 3),
    repeats=st.integers(1, 3),
)
@settings(max_examples=60, deadline=None)
def test_every_combination_once_per_repeat(lengths: list[int], zip_length: int, repeats: int) -> None:
    grid = {f"k{i}": list(range(n)) for i, n in enumerate(lengths)}
    spec = SweepConfig(grid=grid, zip=[{"z1": list(range(zip_length)), "z2": list(range(zip_length))}], repeats=repeats)
    points = expand(spec)
    assert len(points) == math.prod(lengths) * zip_length * repeats
    combos = {(tuple(sorted(p.values.items())), p.repeat) for p in points}
    assert len(combos) == len(points)
    assert all(p.values["z1"] == p.values["z2"] for p in points)


def test_seeds_are_a_function_of_the_point_not_its_position() -> None:
    point = SweepPoint(3, {"rate": 2.0, "model": "m"}, repeat=0)
    moved = SweepPoint(17, {"model": "m", "rate": 2.0}, repeat=0)
    seed = derive_seed(7, point, "per_point")
    assert seed == derive_seed(7, moved, "per_point")
    assert 0 <= seed < 2**32
    assert seed != derive_seed(8, point, "per_point")
    assert seed != derive_seed(7, SweepPoint(3, {"rate": 4.0, "model": "m"}, 0), "per_point")
    assert seed != derive_seed(7, SweepPoint(3, {"rate": 2.0, "model": "m"}, 1), "per_point")


def test_per_repeat_seeds_are_shared_by_the_points_of_a_repeat() -> None:
    first = SweepPoint(0, {"rate": 2.0}, repeat=1)
    second = SweepPoint(1, {"rate": 4.0}, repeat=1)
    assert derive_seed(7, first, "per_repeat") == derive_seed(7, second, "per_repeat")
    assert derive_seed(7, first, "per_repeat") != derive_seed(7, SweepPoint(0, {"rate": 2.0}, 0), "per_repeat")


def test_points_resolve_to_configs_with_their_values_and_seeds(tmp_path: Path) -> None:
    path = write(tmp_path, {"grid": {"workload.arrival.rate_per_s": [1, 3], "policies.1.alpha": [0.5, 0.9]}})
    sweep = load_sweep(path)
    assert len(sweep.points) == 4 and sweep.distinct_runs == 4
    last = sweep.points[-1]
    assert last.config.workload.arrival.rate_per_s == 3
    assert last.config.policies[1].params["alpha"] == 0.9
    assert last.config.simulation.seed == derive_seed(7, last.point, "per_repeat")  # the default: paired points
    assert last.config.sweep is None
    # adding a value to an axis keeps the other points' configs, hence their hashes
    bigger = load_sweep(
        write(tmp_path, {"grid": {"workload.arrival.rate_per_s": [1, 2, 3], "policies.1.alpha": [0.5, 0.9]}})
    )
    assert {p.config_hash for p in sweep.points} <= {p.config_hash for p in bigger.points}


def test_a_swept_seed_is_used_as_given_and_equal_configs_share_a_hash(tmp_path: Path) -> None:
    path = write(tmp_path, {"grid": {"simulation.seed": [5, 5], "name": ["a", "b"]}})
    sweep = load_sweep(path)
    assert [p.config.simulation.seed for p in sweep.points] == [5, 5, 5, 5]
    assert sweep.distinct_runs == 1  # the name changes nothing the run computes
    assert config_hash(sweep.points[0].config) == sweep.points[0].config_hash


def test_the_hash_follows_the_data_a_run_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A recalibrated profile (a local ``hw_profiles/`` wins over the shipped one) or an edited routing profile
    changes the hash, so a results store reruns those points instead of returning the old numbers."""
    from lynxsim.routing.evidence import model_profile

    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, {"grid": {"workload.arrival.rate_per_s": [1]}})
    shipped = load_sweep(path).points[0].config_hash
    local = tmp_path / "hw_profiles"
    local.mkdir()
    (local / "h200.tables").symlink_to(SHIPPED_PROFILE_DIR / "h200.tables")
    (local / "h200.yaml").write_text((SHIPPED_PROFILE_DIR / "h200.yaml").read_text())
    assert load_sweep(path).points[0].config_hash == shipped  # the same data from another place
    recalibrated = (local / "h200.yaml").read_text().replace("kernel_launch_s: 5.0e-6", "kernel_launch_s: 6.0e-6", 1)
    (local / "h200.yaml").write_text(recalibrated)
    assert load_sweep(path).points[0].config_hash != shipped
    # a profile given by path: an edit of one of its table files (beside it, not named in the sweep) counts too
    import shutil

    copied = tmp_path / "profile_copy"
    shutil.copytree(SHIPPED_PROFILE_DIR / "h200.tables", copied / "h200.tables")
    (copied / "h200.yaml").write_text((SHIPPED_PROFILE_DIR / "h200.yaml").read_text())
    by_path = write(tmp_path, {"grid": {"workload.arrival.rate_per_s": [1]}},
                    {**BASE, "hardware": {"profile": str(copied / "h200.yaml")}})
    before_edit = load_sweep(by_path).points[0].config_hash
    table = copied / "h200.tables" / "olmoe-1b-7b.yaml"
    table.write_text(table.read_text().replace("gpu_name: NVIDIA H200", "gpu_name: NVIDIA H200 (re-measured)", 1))
    assert load_sweep(by_path).points[0].config_hash != before_edit
    # a routing profile given by path: its content is hashed, not its name
    routing = tmp_path / "routing.yaml"
    routing.write_text(model_profile("mixtral-8x7b").read_text())
    with_file = write(tmp_path, {"grid": {"workload.arrival.rate_per_s": [1]}})
    data = yaml.safe_load(with_file.read_text())
    data["routing"] = {"kind": "profile", "path": str(routing)}
    with_file.write_text(yaml.safe_dump(data))
    before = load_sweep(with_file).points[0].config_hash
    routing.write_text(routing.read_text() + "\n# edited\n")
    assert load_sweep(with_file).points[0].config_hash != before


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        ({"grid": {"workload.arrival.rate_per_s": [1, -2]}}, "sweep point 1 (workload.arrival.rate_per_s=-2)"),
        ({"grid": {"serving.no_such_key": [1]}}, "unknown key"),
        ({"zip": [{"a.b": [1, 2], "c.d": [1]}]}, "same, non-zero number of values"),
        ({"grid": {"model": ["mixtral-8x7b", "no-such-model"]}}, "sweep point 1"),
        ({"grid": {"workload": [1]}, "zip": [{"workload": [2]}]}, "keys swept more than once"),
        ({"grid": {"workload.arrival.rate_per_s": []}}, "at least one value"),
    ],
)
def test_bad_sweeps_name_the_point_and_line(tmp_path: Path, sweep: dict, message: str) -> None:
    path = write(tmp_path, sweep)
    with pytest.raises(InputError, match="sweep") as caught:
        load_sweep(path)
    assert message in str(caught.value)
    assert str(path) in str(caught.value)


def test_bad_value_error_points_at_the_swept_key_line(tmp_path: Path) -> None:
    path = write(tmp_path, {"grid": {"serving.max_num_seqs": [4, 0]}})
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "serving.max_num_seqs" in text)
    with pytest.raises(InputError) as caught:
        load_sweep(path)
    assert str(caught.value).startswith(f"{path}:{line}: sweep point 1")


def test_cli_rejects_a_file_without_sweep_with_exit_code_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "plain.yaml"
    path.write_text(yaml.safe_dump(BASE))
    assert main(["sweep", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no 'sweep' section" in err


def test_dry_run_lists_points_without_running(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, {"grid": {"workload.arrival.rate_per_s": [1, 3]}, "repeats": 2})
    assert main(["sweep", str(path), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 points (4 distinct runs)" in out and "rate_per_s=3, repeat=1" in out
    assert not (tmp_path / "out").exists()
