"""What a ``sweep:`` section says, and the points it expands to.

A sweep varies config keys of one experiment. Keys of ``grid`` are crossed with each other; each group of ``zip``
varies its keys together (the i-th values of every key of a group belong to one point) and is crossed with the
grid and the other groups as one axis; ``repeats`` replicates every point, each repeat with its own seed. Keys
are the same key paths as ``--set`` (``workload.arrival.rate_per_s``, ``policies.1.alpha``, ``hardware``), so
anything a config can say can be swept: policy parameters, rates, batch limits, models, hardware, parallelism.

Seeds: a point's ``simulation.seed`` is derived from the experiment's seed (``derive_seed``). By default
(``seed: per_repeat``) it depends on the repeat index alone, so that every point of one repeat sees the same
arrivals, request lengths and router logits (common random numbers): points differ only by what is swept, and the
comparison between them is paired, as it is between the policies of one point. Independent draws per point would
make noise look like an effect of the swept key (top-k's TPOT wandering over an alpha-only sweep that cannot
change it). ``seed: per_point`` derives it from the point's values as well: independent draws, each point
reproducible on its own. A sweep that lists ``simulation.seed`` among its keys sets the seeds itself.

The seed a point gets is part of its config, and so of the config hash that keys stored results
(``lynxsim.sweep.points.config_hash``; the ``sweep`` section itself is not hashed): a store filled under the
former default (``per_point``) keeps its runs under their own seeds' hashes, which no paired point matches, so a
paired sweep runs afresh instead of reading them; ``seed: per_point`` finds them again (its seeds are unchanged).
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

SeedMode = Literal["per_point", "per_repeat"]
"""How a sweep derives its points' seeds (``derive_seed``): ``per_repeat`` pairs the points of a repeat."""


class SweepConfig(BaseModel):
    """The ``sweep:`` section of an experiment file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    grid: dict[str, list[Any]] = Field(default_factory=dict, description="key path -> values, crossed with each other")
    zip: list[dict[str, list[Any]]] = Field(
        default_factory=list, description="groups of key paths whose value lists have one length and vary together"
    )
    repeats: int = Field(default=1, ge=1, description="runs of every point, each repeat with its own seed")
    seed: SeedMode = Field(
        default="per_repeat",
        description="per_repeat (default): each point's seed derives from the base seed and the repeat index only, "
        "so every point of a repeat sees the same requests and router logits (paired points: they differ only by "
        "the swept keys); per_point: from the base seed and the point's values (independent draws per point)",
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


def derive_seed(base_seed: int, point: SweepPoint, mode: SeedMode) -> int:
    """The seed of ``point``: a 32-bit draw from a ``SeedSequence`` of the base seed and a hash of its repeat
    index alone (per_repeat: one seed for every point of a repeat, the common random numbers that pair them) or
    of its repeat index and values (per_point). Either way the seed is a property of the point itself, not of its
    position in the file, so adding a value to an axis leaves the other points' seeds (and results) unchanged.
    per_point still gives the seeds it gave when it was the default, so the runs stored then are found again."""
    identity: dict[str, Any] = {"repeat": point.repeat}
    if mode == "per_point":
        identity["values"] = point.values
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).digest()
    words = np.frombuffer(digest[:16], dtype=np.uint32).tolist()
    return int(np.random.SeedSequence([base_seed, *words]).generate_state(1)[0])
