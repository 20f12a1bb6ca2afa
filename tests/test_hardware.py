"""Hardware profiles: every shipped profile loads and cites a source for each figure; bad files fail with the
file and the key path named."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from lynxsim.errors import InputError
from lynxsim.hardware import (
    DATASHEET_FIGURES,
    FIGURE_NAMES,
    HOST_LINK_FIGURES,
    SUSTAINED_BANDWIDTH_FRACTION,
    SUSTAINED_HOST_LINK_FRACTION,
    HardwareProfile,
    KernelTable,
    hardware_names,
    load_hardware,
)

SHIPPED = ("a100-80gb", "b200", "h100-sxm", "h200", "mi300x")


def _minimal_profile(**overrides: object) -> dict:
    data: dict = {
        "name": "Test GPU",
        "memory_bytes": 80_000_000_000,
        "memory_bandwidth_bytes_per_s": 3.0e12,
        "dense_bf16_flops_per_s": 1.0e15,
        "dense_fp8_flops_per_s": 2.0e15,
        "interconnect_bandwidth_bytes_per_s": 4.5e11,
        "sources": {figure: "test" for figure in DATASHEET_FIGURES},
    }
    data.update(overrides)
    return data


def _write(tmp_path: Path, data: object, name: str = "gpu.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_shipped_profiles_are_listed() -> None:
    assert set(SHIPPED) <= set(hardware_names())


@pytest.mark.parametrize("key", SHIPPED)
def test_shipped_profile_loads_and_cites_every_figure(key: str) -> None:
    profile = load_hardware(key)
    # every figure cited; the host link's (optional: only expert offloading reads them) where the profile has one
    assert set(FIGURE_NAMES) <= set(profile.sources) <= set(FIGURE_NAMES) | set(HOST_LINK_FIGURES)
    assert ("host_link_bandwidth_bytes_per_s" in profile.sources) == (key in ("a100-80gb", "h100-sxm", "h200"))
    assert all(text.strip() for text in profile.sources.values())
    assert 0 < profile.sustained_bandwidth_bytes_per_s <= profile.memory_bandwidth_bytes_per_s
    if key == "h200":  # calibrated on a real H200 (lynxsim calibrate): tables for these models, with provenance
        calibrated = {"mixtral-8x7b", "qwen3-30b-a3b", "olmoe-1b-7b", "deepseek-v2-lite"}
        assert calibrated <= set(profile.measured.model_keys())
        assert profile.measured.metadata_for("mixtral-8x7b/moe").gpu_name == "NVIDIA H200"
    else:
        assert profile.measured.tables == {}


def test_h200_figures() -> None:
    h200 = load_hardware("h200")
    assert h200.efficiency.sustained_bandwidth_bytes_per_s == 4.22e12
    assert h200.memory_bandwidth_bytes_per_s == 4.8e12
    assert h200.dense_bf16_flops_per_s == pytest.approx(989.4e12)
    assert "device-to-device copy" in h200.sources["efficiency.sustained_bandwidth_bytes_per_s"]


def test_unmeasured_profiles_derive_sustained_bandwidth_from_the_h200_fraction() -> None:
    h100 = load_hardware("h100-sxm")
    assert h100.efficiency.sustained_bandwidth_bytes_per_s is None
    assert h100.sustained_bandwidth_bytes_per_s == pytest.approx(3.35e12 * 4.22 / 4.8)
    assert SUSTAINED_BANDWIDTH_FRACTION == pytest.approx(0.879, abs=1e-3)


def test_fp8_falls_back_to_bf16_without_fp8_units() -> None:
    a100 = load_hardware("a100-80gb")
    assert a100.dense_fp8_flops_per_s is None
    assert a100.peak_flops_per_s("fp8") == a100.dense_bf16_flops_per_s
    h200 = load_hardware("h200")
    assert h200.peak_flops_per_s("fp8") == h200.dense_fp8_flops_per_s
    assert h200.peak_flops_per_s("mxfp4") == h200.dense_bf16_flops_per_s


def test_load_by_path(tmp_path: Path) -> None:
    path = _write(tmp_path, _minimal_profile())
    assert load_hardware(path).name == "Test GPU"
    assert load_hardware(str(path)).memory_bytes == 80_000_000_000


def test_profiles_in_the_current_directory_are_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "hw_profiles").mkdir()
    _write(tmp_path / "hw_profiles", _minimal_profile(name="Local GPU"), "local-gpu.yaml")
    monkeypatch.chdir(tmp_path)
    assert "local-gpu" in hardware_names()
    assert load_hardware("local-gpu").name == "Local GPU"
    assert load_hardware("h200").name == "NVIDIA H200 SXM"


def test_unknown_name_lists_known_profiles() -> None:
    with pytest.raises(InputError) as info:
        load_hardware("tpu-v9")
    assert "tpu-v9" in info.value.problem
    assert all(key in info.value.problem for key in SHIPPED)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        load_hardware(tmp_path / "absent.yaml")


@pytest.mark.parametrize(
    ("overrides", "key_path"),
    [
        ({"memory_bandwith_bytes_per_s": 3e12}, "memory_bandwith_bytes_per_s"),  # unknown (misspelt) key
        ({"memory_bytes": "lots"}, "memory_bytes"),  # wrong type
        ({"memory_bandwidth_bytes_per_s": -3.0e12}, "memory_bandwidth_bytes_per_s"),  # negative bandwidth
        ({"efficiency": {"flops_fraction": 1.5}}, "efficiency.flops_fraction"),
        ({"efficiency": {"kernel_launch_s": "fast"}}, "efficiency.kernel_launch_s"),
    ],
)
def test_invalid_profile_names_file_and_key(tmp_path: Path, overrides: dict, key_path: str) -> None:
    path = _write(tmp_path, _minimal_profile(**overrides))
    with pytest.raises(InputError) as info:
        load_hardware(path)
    assert str(path) in info.value.where
    assert key_path in info.value.where


def test_malformed_yaml_names_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "name: GPU\nmemory_bytes: 1\nsources: {memory_bytes: [unclosed\nefficiency: {}\n")
    with pytest.raises(InputError) as info:
        load_hardware(path)
    assert info.value.where.startswith(f"{path}:")
    assert int(info.value.where.rsplit(":", 1)[1]) in (3, 4, 5)
    assert "malformed YAML" in info.value.problem


def test_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="mapping"):
        load_hardware(_write(tmp_path, "- just\n- a list\n"))


def test_every_datasheet_figure_needs_a_source(tmp_path: Path) -> None:
    sources = {figure: "test" for figure in DATASHEET_FIGURES if figure != "dense_bf16_flops_per_s"}
    with pytest.raises(InputError, match="dense_bf16_flops_per_s") as info:
        load_hardware(_write(tmp_path, _minimal_profile(sources=sources)))
    assert info.value.where.endswith("(top level)")


def test_an_efficiency_figure_that_is_set_needs_a_source(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="efficiency.kernel_launch_s"):
        load_hardware(_write(tmp_path, _minimal_profile(efficiency={"kernel_launch_s": 3e-6})))


def test_a_host_link_needs_a_source_and_sustains_the_measured_share(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="host_link_bandwidth_bytes_per_s"):
        load_hardware(_write(tmp_path, _minimal_profile(host_link_bandwidth_bytes_per_s=64e9)))
    sources = {figure: "test" for figure in (*DATASHEET_FIGURES, "host_link_bandwidth_bytes_per_s")}
    profile = load_hardware(_write(tmp_path, _minimal_profile(host_link_bandwidth_bytes_per_s=64e9, sources=sources)))
    assert profile.sustained_host_link_bytes_per_s == pytest.approx(64e9 * SUSTAINED_HOST_LINK_FRACTION)
    assert load_hardware(_write(tmp_path, _minimal_profile())).sustained_host_link_bytes_per_s is None
    assert load_hardware("h100-sxm").sustained_host_link_bytes_per_s == 53.9e9  # measured


def test_source_for_an_unknown_figure_is_rejected(tmp_path: Path) -> None:
    sources = {figure: "test" for figure in DATASHEET_FIGURES} | {"memory_bandwith": "typo"}
    with pytest.raises(InputError, match="unknown figures"):
        load_hardware(_write(tmp_path, _minimal_profile(sources=sources)))


def test_sustained_bandwidth_cannot_exceed_the_datasheet(tmp_path: Path) -> None:
    sources = {figure: "test" for figure in FIGURE_NAMES}
    data = _minimal_profile(sources=sources, efficiency={"sustained_bandwidth_bytes_per_s": 3.5e12})
    with pytest.raises(InputError, match="exceeds"):
        load_hardware(_write(tmp_path, data))


# ----- measured tables -----

_METADATA = {"gpu_name": "NVIDIA H200", "torch_version": "2.11.0", "cuda_version": "13.0", "date": "2026-11-20"}


def test_measured_table_nested_and_flat_agree() -> None:
    grid = {"axes": ["tokens", "experts"], "axis_values": [[1, 16, 64], [2, 8]]}
    nested = KernelTable.model_validate({**grid, "latency_s": [[1e-4, 2e-4], [1.1e-4, 2.1e-4], [1.5e-4, 2.5e-4]]})
    flat = KernelTable.model_validate({**grid, "latency_s": [1e-4, 2e-4, 1.1e-4, 2.1e-4, 1.5e-4, 2.5e-4]})
    assert nested == flat
    assert nested.shape == (3, 2)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"axes": ["t"], "axis_values": [[1, 2, 3]], "latency_s": [1e-4, 2e-4]}, "grid"),
        ({"axes": ["t", "e"], "axis_values": [[1, 2], [1, 2, 3]], "latency_s": [[1, 2], [3, 4], [5, 6]]}, "shape"),
        ({"axes": ["t", "e"], "axis_values": [[1, 2], [1, 2]], "latency_s": [[1, 2], [3]]}, "ragged"),
        ({"axes": ["t"], "axis_values": [[2, 1]], "latency_s": [1e-4, 2e-4]}, "increasing"),
        ({"axes": ["t"], "axis_values": [[1, 2]], "latency_s": [1e-4, -2e-4]}, "non-negative"),
        ({"axes": ["t", "t"], "axis_values": [[1], [2]], "latency_s": [1e-4]}, "repeat"),
        ({"axes": ["t", "e"], "axis_values": [[1, 2]], "latency_s": [1e-4, 2e-4]}, "axis_values"),
    ],
)
def test_measured_table_shape_is_validated(tmp_path: Path, table: dict, message: str) -> None:
    measured = {"metadata": _METADATA, "tables": {"moe_decode": table}}
    path = _write(tmp_path, _minimal_profile(measured=measured))
    with pytest.raises(InputError, match=message) as info:
        load_hardware(path)
    assert "measured.tables.moe_decode" in info.value.where


def test_measured_tables_need_metadata() -> None:
    table = {"axes": ["t"], "axis_values": [[1, 2]], "latency_s": [1e-4, 2e-4]}
    with pytest.raises(ValueError, match="metadata"):
        HardwareProfile.model_validate(_minimal_profile(measured={"tables": {"x": table}}))
    profile = HardwareProfile.model_validate(_minimal_profile(measured={"metadata": _METADATA, "tables": {"x": table}}))
    assert profile.measured.tables["x"].latency_s == (1e-4, 2e-4)
    assert str(profile.measured.metadata.date) == "2026-11-20"


def test_a_changed_table_file_is_read_again(tmp_path: Path) -> None:
    """Kernel table files are parsed once per version of the file: a file rewritten with other latencies (a
    recalibration) is read again by the next load, whatever its size."""
    shipped = Path(load_hardware.__code__.co_filename).parent / "hw_profiles"
    profile = yaml.safe_load((shipped / "h200.yaml").read_text())
    profile["measured"]["table_files"] = ["tables/olmoe.yaml"]
    (tmp_path / "tables").mkdir()
    table_path = tmp_path / "tables" / "olmoe.yaml"
    tables = yaml.safe_load((shipped / "h200.tables" / "olmoe-1b-7b.yaml").read_text())
    table_path.write_text(yaml.safe_dump(tables))
    path = _write(tmp_path, profile, "gpu.yaml")
    first = load_hardware(path).measured.tables["olmoe-1b-7b/moe"].latency_s
    assert load_hardware(path).measured.tables["olmoe-1b-7b/moe"].latency_s == first  # read once, same values
    moe = tables["tables"]["olmoe-1b-7b/moe"]
    moe["latency_s"] = [[2.0 * v for v in row] for row in moe["latency_s"]]  # nested: tokens x distinct experts
    table_path.write_text(yaml.safe_dump(tables))
    stat = table_path.stat()
    os.utime(table_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # later, even on a coarse clock
    again = load_hardware(path).measured.tables["olmoe-1b-7b/moe"].latency_s
    assert again == pytest.approx([2.0 * v for v in first])
