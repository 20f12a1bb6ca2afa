"""What a ``sweep:`` section says, and the points it expands to.

A sweep varies config keys of one experiment. Keys of ``grid`` are crossed with each other; each group of ``zip``
varies its keys together (the i-th values of every key of a group belong to one point) and is crossed with the
grid and the other groups as one axis; ``repeats`` replicates every point with its own seed. Keys are the same
key paths as ``--set`` (``workload.arrival.rate_per_s``, ``policies.1.alpha``, ``hardware``), so anything a
config can say can be swept: policy parameters, rates, batch limits, models, hardware, parallelism.

Seeds: a point's ``simulation.seed`` is derived from the experiment's seed and the point (``derive_seed``), so
points are independent draws and reproducible one by one. ``seed: per_repeat`` derives it from the repeat index
only, so that every point of one repeat sees the same arrivals and router logits (common random numbers: the
comparison between points is then paired, as it is between the policies of one point). A sweep that lists
``simulation.seed`` among its keys sets the seeds itself.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SEED_KEY = "simulation.seed"


class SweepConfig(BaseModel):
    """The ``sweep:`` section of an experiment file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    grid: dict[str, list[Any]] = Field(default_factory=dict, description="key path -> values, crossed with each other")
    zip: list[dict[str, list[Any]]] = Field(
        default_factory=list, description="groups of key paths whose value lists have one length and vary together"
    )
    repeats: int = Field(default=1, ge=1, description="runs of every point, each with its own seed")
    seed: Literal["per_point", "per_repeat"] = Field(
        default="per_point",
        description="per_point: each point's seed derives from the base seed and the point; per_repeat: from the "
        "base seed and the repeat index only (every point of a repeat shares arrivals and logits)",
    )

    @field_validator("grid")
    @classmethod
    def _non_empty_axes(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in grid.items():
            if not values:
                raise ValueError(f"{key}: give at least one value")
        return grid

    @field_validator("zip")
    @classmethod
    def _equal_lengths(cls, groups: list[dict[str, list[Any]]]) -> list[dict[str, list[Any]]]:
        for position, group in enumerate(groups):
            if not group:
                raise ValueError(f"group {position} names no key")
            lengths = {key: len(values) for key, values in group.items()}
            if len(set(lengths.values())) != 1 or 0 in lengths.values():
                raise ValueError(f"group {position}: every key needs the same, non-zero number of values {lengths}")
        return groups

    @model_validator(mode="after")
    def _each_key_once(self) -> SweepConfig:
        keys = self.keys
        repeated = sorted({key for key in keys if keys.count(key) > 1})
        if repeated:
            raise ValueError(f"keys swept more than once: {repeated}")
        return self

    @property
    def keys(self) -> list[str]:
        """Every swept key path, grid first, then the zip groups, in the order written."""
        return [*self.grid, *(key for group in self.zip for key in group)]


@dataclass(frozen=True)
class SweepPoint:
    """One run of a sweep: the value of every swept key, and which repeat it is."""

    index: int
    values: dict[str, Any]
    repeat: int

    def label(self) -> str:
        """``key=value`` pairs, as messages and tables show a point."""
        parts = [f"{key}={json.dumps(value)}" for key, value in self.values.items()]
        return ", ".join([*parts, f"repeat={self.repeat}"] if self.repeat else parts) or "base"


def expand(sweep: SweepConfig) -> list[SweepPoint]:
    """Every point of the sweep: the product of the grid axes and the zip groups (first key slowest), then the
    repeats of each point. The order is fixed by the file, so a point's index names it across runs."""
    axes: list[list[dict[str, Any]]] = [[{key: value} for value in values] for key, values in sweep.grid.items()]
    for group in sweep.zip:
        length = len(next(iter(group.values())))
        axes.append([{key: values[i] for key, values in group.items()} for i in range(length)])
    points: list[SweepPoint] = []
    for combination in itertools.product(*axes):
        values = {key: value for part in combination for key, value in part.items()}
        for repeat in range(sweep.repeats):
            points.append(SweepPoint(len(points), values, repeat))
    return points


def derive_seed(base_seed: int, point: SweepPoint, mode: Literal["per_point", "per_repeat"]) -> int:
    """The seed of ``point``: a 32-bit draw from a ``SeedSequence`` of the base seed and a hash of the point's
    values (per_point) or of its repeat index alone (per_repeat). Hashing the canonical JSON of the values makes
    the seed a property of the point itself, not of its position in the file, so adding a value to an axis
    leaves the other points' seeds (and results) unchanged."""
    identity: dict[str, Any] = {"repeat": point.repeat}
    if mode == "per_point":
        identity["values"] = point.values
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).digest()
    words = np.frombuffer(digest[:16], dtype=np.uint32).tolist()
    return int(np.random.SeedSequence([base_seed, *words]).generate_state(1)[0])
