"""GPU hardware profiles: datasheet ceilings, what kernels sustain of them, and measured kernel tables.

A profile is data (``lynxsim/hw_profiles/<key>.yaml``, shipped inside the package; a ``hw_profiles/`` folder in
the working directory adds or overrides profiles), not code, so that a new GPU or a recalibrated one needs no
change to the simulator. Every figure in a profile names where it comes from in its ``sources`` mapping,
because a simulated latency is only as credible as the numbers under it and a reader must be able to check
each one. Datasheet figures are ceilings that no kernel reaches; the ``efficiency`` section says how much of
them the roofline cost model may assume, and the ``measured`` section holds kernel timing tables that the
calibration step (``lynxsim calibrate``) writes from a real GPU.
"""

from __future__ import annotations

import datetime as dt
import math
from functools import lru_cache
from itertools import pairwise
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lynxsim.errors import InputError
from lynxsim.interconnect import CollectiveCost, CollectiveTable
from lynxsim.yaml_input import read_yaml_mapping, validated

# The H200 SXM's measured sustained bandwidth over its datasheet bandwidth: a large device-to-device copy on a
# real H200 moved 4.22e12 B/s counting bytes read plus written, against 4.8e12 B/s on the datasheet. Profiles
# of GPUs with no measured figure of their own assume the same fraction (see ``Efficiency``).
SUSTAINED_BANDWIDTH_FRACTION = 4.22e12 / 4.8e12

# Sustained share of dense bf16 FLOP/s for a large GEMM: an 8192x8192x8192 bf16 torch.matmul on random data ran
# at 775 TFLOP/s on an H200 SXM (torch 2.11, CUDA 13.0, 2026-11-28) and at 769-798 TFLOP/s on other H200s of the
# same cluster (2026-11-04), against a datasheet 989.4 TFLOP/s: 0.78.
DEFAULT_FLOPS_FRACTION = 0.78

# Fixed cost of one weight-streaming kernel (launch, pipeline fill and drain): the intercept of
# t = c + bytes / bandwidth fitted over bf16 cuBLAS GEMVs (4096 x 256 ... 4096 x 57344 weights, batch 1 and 64)
# replayed in a CUDA graph on an H200 SXM (torch 2.11, CUDA 13.0, 2026-11-28): 4.9 us at batch 1, 5.6 us at
# batch 64.
DEFAULT_KERNEL_LAUNCH_S = 5.0e-6

# Per-iteration CPU work that the GPU waits for (scheduling, input preparation, the sampled tokens' return). An
# assumption, not a measurement: engines that overlap it with the GPU (SGLang's zero-overhead scheduler, LMSYS
# blog 2024-12-04; vLLM's async scheduling; TensorRT-LLM's overlap scheduler) hide nearly all of it, while a
# synchronous loop measured 5-6 ms between decode steps at batch 256 (vLLM, vllm-project/vllm issue 10634);
# the README's "Host overhead" has the sources. An engine property, so an experiment may replace it
# (``hardware.overrides.efficiency.iteration_overhead_s``); calibrate it against measured iteration times of the
# engine being modelled.
DEFAULT_ITERATION_OVERHEAD_S = 0.5e-3

# Fixed cost of one GPU-to-GPU collective (all-reduce, all-to-all) within a node, on top of its bytes over the
# interconnect bandwidth. An assumption: NCCL's small-message all-reduce latency over NVLink within one node is
# on the order of 10 us (nccl-tests all_reduce_perf at 8 B-64 KB on 8x H100/H200 NVLink reports about 8-20 us).
DEFAULT_COLLECTIVE_LATENCY_S = 10e-6

# The figures a profile's ``sources`` mapping must name, in the order a reader meets them.
DATASHEET_FIGURES = (
    "memory_bytes",
    "memory_bandwidth_bytes_per_s",
    "dense_bf16_flops_per_s",
    "dense_fp8_flops_per_s",
    "interconnect_bandwidth_bytes_per_s",
)
EFFICIENCY_FIGURES = (
    "efficiency.sustained_bandwidth_bytes_per_s",
    "efficiency.flops_fraction",
    "efficiency.kernel_launch_s",
    "efficiency.iteration_overhead_s",
    "efficiency.collective_latency_s",
    "efficiency.sustained_interconnect_bytes_per_s",
)
FIGURE_NAMES = DATASHEET_FIGURES + EFFICIENCY_FIGURES
# The GPU's link to host memory, which expert offloading fetches weights over (``lynxsim.engine.offloading``):
# optional, since only offloading reads them; a profile that sets one cites it like any other figure.
HOST_LINK_FIGURES = (
    "host_link_bandwidth_bytes_per_s",
    "efficiency.sustained_host_link_bytes_per_s",
    "efficiency.host_transfer_latency_s",
)

# Pinned host-to-device copies of one Mixtral-8x7B expert (352 MB, bf16) sustained 53.9 GB/s on an H100 SXM's
# PCIe Gen5 x16 link, 0.842 of its 64 GB/s per direction (measured here 2026-12-06, torch 2.11 cudaMemcpyAsync
# timed with CUDA events, median of 20; four experts queued back to back: 53.8 GB/s): a profile that measured
# none sustains this share of its datasheet link.
SUSTAINED_HOST_LINK_FRACTION = 53.9 / 64.0
# Fixed cost of one host-to-device copy: a 4 KB pinned copy took 12.2 us on the same H100 (median of 50).
DEFAULT_HOST_TRANSFER_LATENCY_S = 12.2e-6


class Efficiency(BaseModel):
    """How much of the datasheet ceilings real kernels sustain; the roofline cost model's only tuning knobs.

    Each field has a default so that a profile for a new GPU needs only its datasheet; a profile that measures
    a figure sets it and names the measurement in ``sources``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    sustained_bandwidth_bytes_per_s: float | None = Field(
        default=None,
        gt=0,
        description="what a large streaming kernel sustains; None: SUSTAINED_BANDWIDTH_FRACTION of the datasheet",
    )
    flops_fraction: float = Field(
        default=DEFAULT_FLOPS_FRACTION, gt=0, le=1, description="sustained share of dense FLOP/s in large GEMMs"
    )
    kernel_launch_s: float = Field(
        default=DEFAULT_KERNEL_LAUNCH_S, ge=0, description="fixed cost of one weight- or KV-streaming kernel"
    )
    iteration_overhead_s: float = Field(
        default=DEFAULT_ITERATION_OVERHEAD_S, ge=0, allow_inf_nan=False,
        description="fixed CPU/scheduler cost of one iteration",
    )
    collective_latency_s: float = Field(
        default=DEFAULT_COLLECTIVE_LATENCY_S, ge=0,
        description="fixed cost of one multi-GPU collective (all-reduce, all-to-all), on top of bytes / bandwidth",
    )
    sustained_interconnect_bytes_per_s: float | None = Field(
        default=None,
        gt=0,
        description="per-GPU, per-direction bandwidth large collectives sustain; None: the datasheet interconnect",
    )
    sustained_host_link_bytes_per_s: float | None = Field(
        default=None,
        gt=0,
        description="host-to-GPU bandwidth an expert-sized pinned copy sustains; None: "
        "SUSTAINED_HOST_LINK_FRACTION of the datasheet host link",
    )
    host_transfer_latency_s: float = Field(
        default=DEFAULT_HOST_TRANSFER_LATENCY_S, ge=0, allow_inf_nan=False,
        description="fixed cost of one host-to-GPU copy, on top of its bytes over the host link",
    )


class CalibrationMetadata(BaseModel):
    """Where a set of measured tables came from, so that a table is never mistaken for another GPU's or
    another software stack's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gpu_name: str = Field(min_length=1, description="as the driver names it, e.g. 'NVIDIA H200'")
    torch_version: str = Field(min_length=1)
    cuda_version: str = Field(min_length=1, description="CUDA (or ROCm/HIP) runtime version")
    date: dt.date
    notes: str | None = None


def _nested_shape(value: Any) -> tuple[int, ...]:
    """Shape of a rectangular nested list of numbers; raises ValueError when the nesting is ragged."""
    if not isinstance(value, (list, tuple)):
        return ()
    if not value:
        return (0,)
    shapes = {_nested_shape(item) for item in value}
    if len(shapes) != 1:
        raise ValueError("latency_s is ragged: rows of one level differ in length or depth")
    return (len(value), *shapes.pop())


def _flatten(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return [leaf for item in value for leaf in _flatten(item)]
    return [value]


class KernelTable(BaseModel):
    """One kernel's measured latency on a grid: ``axes`` name the grid's dimensions (e.g. ``tokens``,
    ``distinct_experts``), ``axis_values`` their sample points, ``latency_s`` the time at each grid point.

    ``latency_s`` may be written nested (one list level per axis) or flat in row-major order (the last axis
    varies fastest); it is stored flat, and its shape is always that of ``axis_values``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str | None = Field(default=None, description="what was timed: kernel, dtype, shapes held fixed")
    axes: tuple[str, ...] = Field(min_length=1)
    axis_values: tuple[tuple[float, ...], ...]
    latency_s: tuple[float, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(len(values) for values in self.axis_values)

    @model_validator(mode="before")
    @classmethod
    def _flatten_nested(cls, data: Any) -> Any:
        """Accept ``latency_s`` nested one level per axis: it must have exactly the grid's shape (not merely as
        many entries), and is then flattened row-major."""
        if not isinstance(data, dict):
            return data
        latency, axis_values = data.get("latency_s"), data.get("axis_values")
        if not (isinstance(latency, (list, tuple)) and any(isinstance(item, (list, tuple)) for item in latency)):
            return data
        nested = _nested_shape(latency)
        if isinstance(axis_values, (list, tuple)):
            expected = tuple(len(v) if isinstance(v, (list, tuple)) else -1 for v in axis_values)
            if nested != expected:
                raise ValueError(f"latency_s has shape {nested}, but axis_values give {expected}")
        return {**data, "latency_s": _flatten(latency)}

    @model_validator(mode="after")
    def _check(self) -> KernelTable:
        if len(set(self.axes)) != len(self.axes):
            raise ValueError(f"axes {list(self.axes)} repeat a name")
        if len(self.axis_values) != len(self.axes):
            raise ValueError(f"{len(self.axes)} axes but {len(self.axis_values)} lists of axis_values")
        for name, values in zip(self.axes, self.axis_values, strict=True):
            if not values:
                raise ValueError(f"axis {name!r} has no values")
            if any(not math.isfinite(v) for v in values) or any(b <= a for a, b in pairwise(values)):
                raise ValueError(f"axis {name!r} values must be finite and strictly increasing")
        expected = math.prod(self.shape)
        if len(self.latency_s) != expected:
            raise ValueError(f"latency_s has {len(self.latency_s)} entries, but the grid {self.shape} has {expected}")
        if any(not math.isfinite(v) or v < 0 for v in self.latency_s):
            raise ValueError("latency_s entries must be finite and non-negative seconds")
        return self


class TableFile(BaseModel):
    """A file of measured tables that a profile lists in ``measured.table_files`` (``lynxsim calibrate`` writes
    one per model, e.g. ``lynxsim/hw_profiles/h200.tables/mixtral-8x7b.yaml``), with the calibration run it
    came from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metadata: CalibrationMetadata
    tables: dict[str, KernelTable] = Field(default_factory=dict)


class MeasuredKernels(BaseModel):
    """Kernel timing tables measured on a real GPU by calibration; empty until calibration has run.

    Tables are named ``<model-key>/<unit>`` (see ``lynxsim.cost.MEASURED_UNITS``). They are written inline
    under ``tables`` or, to keep the profile readable, in separate files listed in ``table_files`` (paths
    relative to the profile file); ``load_hardware`` reads those files and merges their tables into ``tables``,
    recording each merged table's calibration run in ``table_metadata``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    metadata: CalibrationMetadata | None = None
    tables: dict[str, KernelTable] = Field(default_factory=dict)
    table_files: tuple[str, ...] = Field(default=(), description="table files, relative to the profile file")
    table_metadata: dict[str, CalibrationMetadata] = Field(
        default_factory=dict, description="calibration run of each table read from a table file (filled on load)"
    )

    @model_validator(mode="after")
    def _check(self) -> MeasuredKernels:
        if self.tables and self.metadata is None:
            raise ValueError("measured tables need metadata (gpu_name, torch_version, cuda_version, date)")
        return self

    def metadata_for(self, table: str) -> CalibrationMetadata | None:
        """The calibration run that measured ``table``: its table file's, else the profile's."""
        return self.table_metadata.get(table, self.metadata)

    def model_keys(self) -> list[str]:
        """Model keys that have at least one table (``<model-key>/<unit>``), sorted."""
        return sorted({name.split("/", 1)[0] for name in self.tables if "/" in name})


class HardwareProfile(BaseModel):
    """One GPU model. Datasheet figures are per GPU; bandwidths are bytes per second, FLOP/s are dense
    (no structured sparsity), and the interconnect figure is per direction."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    memory_bytes: int = Field(gt=0, description="device memory as the driver reports it (nvidia-smi memory.total)")
    memory_bandwidth_bytes_per_s: float = Field(gt=0, description="datasheet HBM bandwidth")
    dense_bf16_flops_per_s: float = Field(gt=0, description="datasheet dense bf16 tensor-core rate")
    dense_fp8_flops_per_s: float | None = Field(
        default=None, gt=0, description="datasheet dense fp8 tensor-core rate; None where the GPU has no fp8 units"
    )
    interconnect_bandwidth_bytes_per_s: float = Field(
        gt=0, description="GPU-to-GPU bandwidth (NVLink, Infinity Fabric) per GPU, one direction"
    )
    host_link_bandwidth_bytes_per_s: float | None = Field(
        default=None, gt=0,
        description="GPU-to-host-memory link (PCIe, NVLink-C2C) per direction; None: not known (no offloading)",
    )
    sources: dict[str, str]
    efficiency: Efficiency = Field(default_factory=Efficiency)
    measured: MeasuredKernels = Field(default_factory=MeasuredKernels)
    collectives: list[CollectiveTable] = Field(
        default_factory=list, description="measured collective times (lynxsim.interconnect); one per (op, gpus)"
    )

    @model_validator(mode="after")
    def _check(self) -> HardwareProfile:
        known = FIGURE_NAMES + HOST_LINK_FIGURES
        unknown = sorted(set(self.sources) - set(known))
        if unknown:
            raise ValueError(f"sources names unknown figures {unknown}; known: {', '.join(known)}")
        # a figure departing from its default (which this module cites); a profile dumped and read again sets
        # every field, at its default where it had none
        fields = Efficiency.model_fields
        set_figures = {f"efficiency.{name}" for name in self.efficiency.model_fields_set
                       if getattr(self.efficiency, name) != fields[name].get_default()}
        if self.host_link_bandwidth_bytes_per_s is not None:
            set_figures.add("host_link_bandwidth_bytes_per_s")
        missing = [f for f in known if (f in DATASHEET_FIGURES or f in set_figures) and f not in self.sources]
        if missing:
            raise ValueError(f"sources must say where each figure comes from; missing: {', '.join(missing)}")
        empty = [k for k, v in self.sources.items() if not v.strip()]
        if empty:
            raise ValueError(f"sources entries are empty: {', '.join(empty)}")
        pairs = [(t.op, t.gpus) for t in self.collectives]
        if len(set(pairs)) != len(pairs):
            raise ValueError("collectives has two tables for the same (op, gpus)")
        if self.sustained_bandwidth_bytes_per_s > self.memory_bandwidth_bytes_per_s:
            raise ValueError(
                f"efficiency.sustained_bandwidth_bytes_per_s ({self.sustained_bandwidth_bytes_per_s:.3g}) exceeds "
                f"the datasheet memory_bandwidth_bytes_per_s ({self.memory_bandwidth_bytes_per_s:.3g})"
            )
        return self

    @property
    def sustained_bandwidth_bytes_per_s(self) -> float:
        """The bandwidth the cost model streams weights and KV cache at: measured where the profile has it,
        otherwise the datasheet figure times the H200's measured-over-datasheet fraction."""
        measured = self.efficiency.sustained_bandwidth_bytes_per_s
        return measured if measured is not None else self.memory_bandwidth_bytes_per_s * SUSTAINED_BANDWIDTH_FRACTION

    @property
    def sustained_interconnect_bytes_per_s(self) -> float:
        """GPU-to-GPU bandwidth the cost model moves activations and KV caches at: measured where the profile has
        it, otherwise the datasheet's per-direction figure."""
        measured = self.efficiency.sustained_interconnect_bytes_per_s
        return measured if measured is not None else self.interconnect_bandwidth_bytes_per_s

    @property
    def sustained_host_link_bytes_per_s(self) -> float | None:
        """Host-to-GPU bandwidth an offloaded expert's copy moves at: measured where the profile has it, else the
        datasheet link times ``SUSTAINED_HOST_LINK_FRACTION``; None where the profile gives no host link."""
        measured = self.efficiency.sustained_host_link_bytes_per_s
        if measured is not None:
            return measured
        datasheet = self.host_link_bandwidth_bytes_per_s
        return None if datasheet is None else datasheet * SUSTAINED_HOST_LINK_FRACTION

    def collective_cost(self, gpus: int) -> CollectiveCost:
        """What collectives among ``gpus`` GPUs cost: measured tables where the profile has them for that GPU
        count, the collective latency plus bytes over the sustained interconnect bandwidth otherwise."""
        return CollectiveCost(
            self.collectives, gpus, self.efficiency.collective_latency_s, self.sustained_interconnect_bytes_per_s
        )

    def peak_flops_per_s(self, dtype: str) -> float:
        """Dense tensor-core peak for GEMMs whose weights are stored in ``dtype``.

        fp8 weights run at the fp8 rate where the GPU has fp8 units (W8A8, as vLLM serves fp8 checkpoints on
        Hopper and later) and at the bf16 rate elsewhere (weight-only fp8 kernels dequantize to bf16, e.g. on
        the A100). Every other storage dtype (bf16, fp16, fp32 and the weight-only mxfp4) computes at the
        bf16 rate, fp16's equal on all shipped GPUs.
        """
        if dtype == "fp8" and self.dense_fp8_flops_per_s is not None:
            return self.dense_fp8_flops_per_s
        return self.dense_bf16_flops_per_s

    def sustained_flops_per_s(self, dtype: str) -> float:
        """What a large GEMM in ``dtype`` sustains: ``flops_fraction`` of the dense peak."""
        return self.efficiency.flops_fraction * self.peak_flops_per_s(dtype)


# ----- loading -----

# The shipped profiles are package data beside this module, so that a wheel install finds them as a checkout
# does; in a checkout this is also the folder ``lynxsim calibrate`` writes measured tables into.
SHIPPED_PROFILE_DIR = Path(__file__).resolve().parent / "hw_profiles"


def profile_dirs() -> tuple[Path, ...]:
    """Where profile keys are looked up: ``./hw_profiles`` in the current directory first (a user's own or
    recalibrated profiles win), then the profiles shipped as package data (``SHIPPED_PROFILE_DIR``), which an
    installed copy carries with it."""
    local = Path.cwd() / "hw_profiles"
    return (local, SHIPPED_PROFILE_DIR) if local.resolve() != SHIPPED_PROFILE_DIR else (SHIPPED_PROFILE_DIR,)


def hardware_names() -> list[str]:
    """Keys of every profile that ``load_hardware`` finds by name, sorted."""
    return sorted({p.stem for d in profile_dirs() if d.is_dir() for p in d.glob("*.yaml")})


def _read_profile(path: Path) -> HardwareProfile:
    data = _merge_table_files(read_yaml_mapping(path, "hardware profile"), path)
    return validated(HardwareProfile, data, str(path))


def _merge_table_files(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """Read the table files that ``measured.table_files`` lists (relative to ``path``) and merge their tables
    into ``measured.tables``; a table named twice is an error, naming both places."""
    measured = data.get("measured")
    if not isinstance(measured, dict) or not measured.get("table_files"):
        return data
    files = measured["table_files"]
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise InputError(f"{path}: measured.table_files", "must be a list of file paths")
    tables = dict(measured.get("tables") or {})
    origin = {name: "measured.tables" for name in tables}
    table_metadata: dict[str, Any] = {}
    for relative in files:
        file_path = path.parent / relative
        try:
            stat = file_path.stat()
        except OSError as exc:
            raise InputError(str(file_path), f"cannot read kernel table file ({exc.strerror or exc})") from None
        file_tables, metadata = _table_file(file_path.resolve(), stat.st_mtime_ns, stat.st_size, str(file_path))
        for name, table in file_tables.items():
            if name in tables:
                raise InputError(str(file_path), f"table {name!r} is also in {origin[name]}")
            tables[name] = table
            origin[name] = str(file_path)
            table_metadata[name] = metadata
    return {**data, "measured": {**measured, "tables": tables, "table_metadata": table_metadata}}


@lru_cache(maxsize=256)
def _table_file(path: Path, mtime_ns: int, size: int, shown: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The tables of one kernel table file (name -> table as a mapping) and its metadata, read once per version
    of the file (its modification time and size are part of the key): loading the H200 profile, its 15 files
    parsed, took 22 ms, paid by every run and every sweep point; 2 ms with the files' tables remembered. Callers
    only read what it returns. ``shown``: the file as the profile names it, for messages."""
    table_file = validated(TableFile, read_yaml_mapping(shown, "kernel table file"), shown)
    tables = {name: table.model_dump() for name, table in table_file.tables.items()}
    return tables, table_file.metadata.model_dump()


def load_hardware(name_or_path: str | Path) -> HardwareProfile:
    """Load a profile by key (a file stem in one of ``profile_dirs()``) or by path to a YAML file.

    Anything that names an existing file, contains a path separator or ends in ``.yaml``/``.yml`` is a path;
    anything else is a key. Bad files raise ``InputError`` naming the file and the offending key path (or
    line, for malformed YAML); an unknown key raises ``InputError`` listing the known ones.
    """
    text = str(name_or_path)
    candidate = Path(text)
    if isinstance(name_or_path, Path) or candidate.is_file() or "/" in text or candidate.suffix in (".yaml", ".yml"):
        if not candidate.is_file():
            raise InputError(text, "hardware profile file not found")
        return _read_profile(candidate)
    for directory in profile_dirs():
        path = directory / f"{text}.yaml"
        if path.is_file():
            return _read_profile(path)
    known = ", ".join(hardware_names()) or "none"
    raise InputError("hardware", f"unknown hardware profile {text!r}; known profiles: {known}")
