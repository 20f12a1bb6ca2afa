"""From a sweep file to one validated experiment config per point, each named by a hash of what it resolves to.

Every point is validated before the first one runs, so a bad value in the last corner of the grid never costs
the runs before it; the error names the point and the line of the swept key. The config hash keys the results
store: two points that resolve to the same config (a key that changes nothing) share one run, and a resumed
sweep recognises its finished points by the hash, whatever their position in a since-edited file.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lynxsim.config import (
    ExperimentConfig,
    ModelRoutingConfig,
    ProfileRoutingConfig,
    TraceRoutingConfig,
    apply_override,
    line_of,
    validate_experiment,
)
from lynxsim.errors import InputError
from lynxsim.hardware import load_hardware, profile_dirs
from lynxsim.routing.evidence import model_profile
from lynxsim.routing.profiles import profile_path
from lynxsim.runner import resolve_model
from lynxsim.sections.sweep import SEED_KEY, SweepConfig, SweepPoint, derive_seed, expand
from lynxsim.yaml_input import read_yaml_mapping_with_nodes

HASH_EXCLUDES = {"name", "description", "output", "sweep", "report"}
"""Keys that do not change what a run computes: they stay out of the config hash."""


@dataclass(frozen=True)
class PointConfig:
    """One point of a sweep, resolved: its experiment config (seed included) and the hash of that config."""

    point: SweepPoint
    config: ExperimentConfig
    config_hash: str


@dataclass(frozen=True)
class Sweep:
    """A sweep file, loaded: the base experiment, its ``sweep`` section and every point resolved."""

    source: Path
    base: ExperimentConfig
    spec: SweepConfig
    points: list[PointConfig]

    @property
    def keys(self) -> list[str]:
        return self.spec.keys

    @property
    def distinct_runs(self) -> int:
        return len({p.config_hash for p in self.points})


def config_hash(config: ExperimentConfig) -> str:
    """16 hex digits of a SHA-256 over the canonical JSON of everything that changes the run's numbers: the
    config, and the data it names (``input_digests``), so that a recalibrated profile or an edited routing
    profile makes a results store rerun the points it changes instead of returning their old numbers."""
    payload = config.model_dump(mode="json", exclude=HASH_EXCLUDES)
    payload["inputs"] = input_digests(config)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def input_digests(config: ExperimentConfig) -> dict[str, str]:
    """Digests of what a run reads beside its config: the hardware profile with its measured tables, the
    resolved model shape, and the routing profile or trace file it replays."""
    digests = {"hardware": _hardware_digest(config.hardware.profile),
               "model": _digest(resolve_model(config).model_dump_json().encode())}
    routing = config.routing
    source: Path | None = None
    if isinstance(routing, ModelRoutingConfig) and config.model.name is not None:
        source = model_profile(config.model.name)
    elif isinstance(routing, ProfileRoutingConfig):
        source = routing.path if routing.path is not None else profile_path(str(routing.name))
    elif isinstance(routing, TraceRoutingConfig):
        source = routing.path
    if source is not None:
        digests["routing"] = _path_digest(str(Path(source).resolve()))
    return digests


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _hardware_digest(profile: str) -> str:
    """The loaded profile's digest, computed again only when a profile or table file changed (a sweep of
    hundreds of points loads each profile once)."""
    # a profile file names its table files relative to its own folder: watch the folder, not the file alone
    files = [str(Path(profile).parent)] if Path(profile).is_file() else [str(d) for d in profile_dirs()]
    return _hardware_digest_of(profile, _stat_signature(tuple(files)))


@functools.lru_cache(maxsize=64)
def _hardware_digest_of(profile: str, signature: tuple) -> str:
    return _digest(load_hardware(profile).model_dump_json().encode())


def _stat_signature(paths: tuple[str, ...]) -> tuple:
    """(path, size, mtime) of every file at or below ``paths``: what changes when any of them is edited."""
    signature = []
    for path in paths:
        target = Path(path)
        if target.is_dir():
            signature += [(str(p), *_stat(p)) for p in sorted(target.rglob("*")) if p.is_file()]
        elif target.exists():
            signature.append((str(target), *_stat(target)))
    return tuple(signature)


def _stat(path: Path) -> tuple[int, int]:
    status = path.stat()
    return status.st_size, status.st_mtime_ns


def _path_digest(path: str) -> str:
    return _path_digest_of(path, _stat_signature((path,)))


@functools.lru_cache(maxsize=256)
def _path_digest_of(path: str, signature: tuple) -> str:
    """A file's content digest, or a folder's over its files' names and contents (FLAME-MoE CSV folders)."""
    target = Path(path)
    if not target.exists():
        return "missing"
    files = sorted(p for p in target.rglob("*") if p.is_file()) if target.is_dir() else [target]
    sha = hashlib.sha256()
    for file in files:
        sha.update(file.relative_to(target).as_posix().encode() if target.is_dir() else b"")
        sha.update(file.read_bytes())
    return sha.hexdigest()[:16]


def load_sweep(
    path: str | Path, overrides: list[str] | None = None, edit: Callable[[dict[str, Any]], None] | None = None
) -> Sweep:
    """Read a sweep file (an experiment with a ``sweep:`` section), apply ``--set`` overrides to the base, and
    resolve every point; every problem becomes an ``InputError`` naming the file, the line and the point.
    ``edit`` changes the raw mapping first (the report's quick mode shortens sweeps that way)."""
    path = Path(path)
    raw, root = read_yaml_mapping_with_nodes(path, "experiment file")
    if edit is not None:
        edit(raw)
    for assignment in overrides or []:
        apply_override(raw, assignment)
    base = validate_experiment(raw, source=path, node=root, base_dir=path.parent)
    if base.sweep is None:
        raise InputError(str(path), "has no 'sweep' section: say which keys to vary (see README, Sweeps)")
    spec = base.sweep
    without_sweep = {key: value for key, value in raw.items() if key not in ("sweep", "report")}
    points = [_resolve_point(path, root, without_sweep, base, point) for point in expand(spec)]
    _check_catalog_names(path, root, spec, points)
    return Sweep(path, base, spec, points)


def _check_catalog_names(path: Path, root: yaml.Node, spec: SweepConfig, points: list[PointConfig]) -> None:
    """Every model and hardware profile the sweep names exists: a typo there is found before the first run,
    not as a failure of every point that uses it. (Checks that need the whole setup run with each point.)"""
    seen: set[str] = set()
    for p in points:
        identity = json.dumps([p.config.model.model_dump(mode="json"), p.config.hardware.model_dump(mode="json")])
        if identity in seen:
            continue
        seen.add(identity)
        try:
            resolve_model(p.config)
            load_hardware(p.config.hardware.profile)
        except InputError as exc:
            swept = next((k for k in p.point.values if k.startswith(("model", "hardware"))), None)
            where = _where(path, root, spec, swept) if swept else str(path)
            raise InputError(f"{where}: sweep point {p.point.index} ({p.point.label()})", str(exc)) from None


def _resolve_point(
    path: Path, root: yaml.Node, raw: dict[str, Any], base: ExperimentConfig, point: SweepPoint
) -> PointConfig:
    assert base.sweep is not None
    point_raw = copy.deepcopy(raw)
    for key, value in point.values.items():
        try:
            apply_override(point_raw, f"{key}={json.dumps(value)}")
        except InputError as exc:
            raise InputError(f"{_where(path, root, base.sweep, key)}: sweep key {key}", exc.problem) from None
    if SEED_KEY not in point.values:
        seed = derive_seed(base.simulation.seed, point, base.sweep.seed)
        apply_override(point_raw, f"{SEED_KEY}={seed}")
    try:
        config = validate_experiment(point_raw, base_dir=path.parent)
        return PointConfig(point, config, config_hash(config))  # the hash resolves the model and its data
    except InputError as exc:
        swept = next((key for key in point.values if exc.where.startswith(key)), None)
        where = _where(path, root, base.sweep, swept) if swept else str(path)
        raise InputError(f"{where}: sweep point {point.index} ({point.label()})", str(exc)) from None


def _where(path: Path, root: yaml.Node, spec: SweepConfig, key: str | None) -> str:
    """``file:line`` of a swept key inside the sweep section (of the section itself when the key is unknown)."""
    loc: tuple[Any, ...] = ("sweep",)
    if key in spec.grid:
        loc = ("sweep", "grid", key)
    else:
        group = next((i for i, g in enumerate(spec.zip) if key in g), None)
        if group is not None:
            loc = ("sweep", "zip", group, key)
    line = line_of(root, loc)
    return f"{path}:{line}" if line else str(path)
