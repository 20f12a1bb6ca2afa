"""The simpy oracle's iteration log: ``lynxsim.metrics.IterationLog`` growing as the oracle's instance runs.

The package's log holds rows recorded elsewhere (the compiled engine's, ``IterationLog.from_columns``); the oracle
records its iterations one by one, or a decode run's together, in preallocated columns (one numpy array per
column, capacity doubled when full) rather than per-row Python objects.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lynxsim.datatypes import LatencyBreakdown
from lynxsim.metrics import BREAKDOWN_COLUMNS, PROXY_COLUMNS, SCALAR_COLUMNS, IterationLog

INITIAL_ROWS = 1024


class GrowingLog(IterationLog):
    """An ``IterationLog`` that rows are appended to: appending a row writes a few numbers, appending a decode run
    writes its rows with one slice assignment per column. ``frame`` copies the rows (the buffers change later)."""

    def __init__(self, num_moe_layers: int, *, instance: int = 0, role: str = "colocated") -> None:
        super().__init__(num_moe_layers, instance=instance, role=role)
        self._scalars = {name: np.zeros(INITIAL_ROWS, dtype=dtype) for name, dtype in SCALAR_COLUMNS.items()}
        self._distinct = np.zeros((INITIAL_ROWS, num_moe_layers), dtype=np.int16)
        self._proxies = np.zeros((len(PROXY_COLUMNS), INITIAL_ROWS, num_moe_layers), dtype=np.float32)

    def append(
        self,
        *,
        start_s: float,
        latency: LatencyBreakdown,
        prefill_tokens: int,
        decode_tokens: int,
        sequences: int,
        sampled_tokens: int,
        policy_applied: bool,
        distinct_experts: np.ndarray,
        proxies: np.ndarray,
        kv_used_fraction: float,
    ) -> None:
        """One iteration; ``distinct_experts`` per MoE layer, ``proxies`` ``[4, layers]`` (the ``QualityProxies``
        fields in order)."""
        i = self._reserve(1)
        total_s = latency.total_s
        values = (start_s, total_s, prefill_tokens, decode_tokens, sequences, sampled_tokens, policy_applied,
                  kv_used_fraction, latency.attention_s, latency.dense_s, latency.moe_s, latency.communication_s,
                  latency.overhead_s, total_s)
        for column, value in zip(self._scalars.values(), values, strict=True):
            column[i] = value
        self._distinct[i] = distinct_experts
        self._proxies[:, i] = proxies

    def append_decode_run(
        self,
        *,
        start_s: np.ndarray,
        latencies: Sequence[LatencyBreakdown],
        sequences: int,
        distinct_experts: np.ndarray,
        proxies: np.ndarray,
        kv_used_fraction: np.ndarray,
    ) -> None:
        """The iterations of a decode run: pure decode, every one of ``sequences`` requests sampling a token, the
        policy applied; one entry of each argument per iteration (``distinct_experts`` ``[iterations, layers]``,
        ``proxies`` ``[4, iterations, layers]``)."""
        count = len(latencies)
        i = self._reserve(count)
        rows = slice(i, i + count)
        columns = self._scalars
        breakdown = np.array(
            [(lat.attention_s, lat.dense_s, lat.moe_s, lat.communication_s, lat.overhead_s, lat.total_s)
             for lat in latencies],
            dtype=np.float64,
        )
        columns["start_s"][rows] = start_s
        columns["latency_s"][rows] = breakdown[:, -1]
        columns["prefill_tokens"][rows] = 0
        for name in ("decode_tokens", "sequences", "sampled_tokens"):
            columns[name][rows] = sequences
        columns["policy_applied"][rows] = True
        columns["kv_used_fraction"][rows] = kv_used_fraction
        for k, name in enumerate((*BREAKDOWN_COLUMNS, "total_s")):
            columns[name][rows] = breakdown[:, k]
        self._distinct[rows] = distinct_experts
        self._proxies[:, rows] = proxies

    def _reserve(self, count: int) -> int:
        """Make room for ``count`` more rows; returns the first one's index."""
        first = self.rows
        needed = first + count
        capacity = self._distinct.shape[0]
        if needed > capacity:
            capacity = max(2 * capacity, needed)
            self._scalars = {name: _grown(column, capacity, 0) for name, column in self._scalars.items()}
            self._distinct = _grown(self._distinct, capacity, 0)
            self._proxies = _grown(self._proxies, capacity, 1)
        self.rows = needed
        return first

    @staticmethod
    def _own(array: np.ndarray) -> np.ndarray:
        return np.copy(array)  # the buffers change as rows are appended


def _grown(array: np.ndarray, capacity: int, axis: int) -> np.ndarray:
    """``array`` with its ``axis`` lengthened to ``capacity``, the new rows zero."""
    shape = list(array.shape)
    shape[axis] = capacity
    grown = np.zeros(shape, dtype=array.dtype)
    grown[(slice(None),) * axis + (slice(0, array.shape[axis]),)] = array
    return grown
