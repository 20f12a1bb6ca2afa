"""What one GPU-to-GPU collective costs: a measured table where the profile has one, a latency-bandwidth model
otherwise.

A served decode iteration is a CUDA graph, and NCCL collectives captured in a graph cost much less at small
sizes than the same calls launched one by one (H200 x2, NV18: 12.3 us per small all-reduce in a graph, 24 us
launched eagerly; docs/measurements/). Between a few hundred KB and tens of MB a collective is neither
latency- nor bandwidth-bound, and one ``latency + bytes / bandwidth`` line misses it by up to ~2x. So a profile
may carry ``collectives``: per (operation, GPU count) the measured time at each buffer size. Sizes between two
measured ones interpolate linearly in log(bytes)-log(time); below the smallest the smallest's time (the latency
floor); above the largest the largest's time plus the extra wire bytes over the sustained bandwidth.
(operation, GPU count) pairs without a table use ``latency + wire_bytes / bandwidth``, where a ring all-reduce
puts ``2 (g - 1) / g`` of its buffer on each GPU's link and an all-to-all ``(g - 1) / g``.

``bytes`` is the per-GPU buffer of the collective, as ``benchmarks/collectives.py`` measures it: for an
all-reduce, the activations being reduced; for an all-to-all, the tokens one GPU sends and receives.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike
from pydantic import BaseModel, ConfigDict, Field, model_validator

CollectiveOp = Literal["all_reduce", "all_to_all"]


def wire_fraction(op: str, gpus: int) -> float:
    """Share of the per-GPU buffer that crosses each GPU's link (ring all-reduce, direct all-to-all)."""
    return 2.0 * (gpus - 1) / gpus if op == "all_reduce" else (gpus - 1) / gpus


class CollectiveTable(BaseModel):
    """Measured time of one collective at increasing per-GPU buffer sizes, on ``gpus`` GPUs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    op: CollectiveOp
    gpus: int = Field(ge=2)
    bytes: list[int] = Field(min_length=2, description="per-GPU buffer sizes, strictly increasing")
    time_s: list[float] = Field(min_length=2, description="median seconds of one collective at each size")
    source: str = Field(min_length=1, description="how and where it was measured")

    @model_validator(mode="after")
    def _check(self) -> CollectiveTable:
        if len(self.bytes) != len(self.time_s):
            raise ValueError(f"bytes has {len(self.bytes)} entries, time_s {len(self.time_s)}")
        if any(b <= 0 for b in self.bytes) or any(b2 <= b1 for b1, b2 in pairwise(self.bytes)):
            raise ValueError("bytes must be positive and strictly increasing")
        if any(t <= 0 for t in self.time_s):
            raise ValueError("time_s must be positive")
        return self


class CollectiveCost:
    """Seconds of collectives among ``gpus`` GPUs, vectorised over buffer sizes."""

    def __init__(
        self, tables: list[CollectiveTable], gpus: int, latency_s: float, bandwidth_bytes_per_s: float
    ) -> None:
        self.gpus = gpus
        self.latency_s = latency_s
        self.bandwidth_bytes_per_s = bandwidth_bytes_per_s
        self._tables = {t.op: t for t in tables if t.gpus == gpus}
        self._log = {
            op: (np.log(np.asarray(t.bytes, dtype=float)), np.log(np.asarray(t.time_s, dtype=float)))
            for op, t in self._tables.items()
        }

    def measured(self, op: CollectiveOp) -> bool:
        """Whether ``op`` on this many GPUs comes from a measured table."""
        return op in self._tables

    def time_s(self, op: CollectiveOp, buffer_bytes: ArrayLike) -> np.ndarray:
        """Seconds of one ``op`` on a per-GPU buffer of ``buffer_bytes`` (any shape); 0 for an empty buffer."""
        size = np.asarray(buffer_bytes, dtype=float)
        wire = wire_fraction(op, self.gpus)
        if op not in self._tables:
            out = self.latency_s + wire * size / self.bandwidth_bytes_per_s
        else:
            log_bytes, log_time = self._log[op]
            largest, largest_s = float(np.exp(log_bytes[-1])), float(np.exp(log_time[-1]))
            inside = np.exp(np.interp(np.log(np.maximum(size, 1.0)), log_bytes, log_time))
            beyond = largest_s + wire * (size - largest) / self.bandwidth_bytes_per_s
            out = np.where(size > largest, beyond, inside)
        return np.where(size > 0, out, 0.0)
