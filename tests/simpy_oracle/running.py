"""The running requests of one scheduler as parallel arrays (struct of arrays), in admission order.

Every iteration touches every running request (each computes at least one token, each may need a KV block), so
a per-request Python loop made the engine's cost grow with the batch. Here the counters that change every
iteration live in numpy arrays and are updated with one operation per iteration whatever the batch size; the
``Request`` objects are written to only when a request leaves the running set (it finishes, is preempted, or is
handed off) and at the end of a simulation (``write_back``), so while a request runs its ``Request`` fields
``num_tokens``, ``num_computed_tokens``, ``generated_tokens`` and ``num_blocks`` are stale: read them here.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from simpy_oracle.request import Request


class RunningSet:
    """At most ``capacity`` running requests (the scheduler's sequence limit), position ``i`` in every array
    being the ``i``-th admitted. The arrays are full-capacity buffers: use the first ``len(self)`` entries."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"a running set holds at least one request, got capacity {capacity}")
        self.requests = np.empty(capacity, dtype=object)
        self.ids = np.zeros(capacity, dtype=np.int64)  # request ids
        self.num_tokens = np.zeros(capacity, dtype=np.int64)  # prompt plus generated tokens
        self.computed = np.zeros(capacity, dtype=np.int64)  # tokens in the KV cache
        self.generated = np.zeros(capacity, dtype=np.int64)
        self.output = np.zeros(capacity, dtype=np.int64)  # tokens to generate in all (the request's target)
        self.blocks = np.zeros(capacity, dtype=np.int64)  # KV blocks held
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def __bool__(self) -> bool:
        return self.size > 0

    def __iter__(self) -> Iterator[Request]:
        """The running requests, in admission order (their ``Request`` counters are stale: see the module)."""
        return iter(self.requests[: self.size].tolist())

    def all_decoding(self) -> bool:
        """Whether every running request is a decode step: one missing token that it generated itself."""
        n = self.size
        return bool((self.generated[:n] > 0).all() and (self.num_tokens[:n] - self.computed[:n] == 1).all())

    def append(self, request: Request) -> None:
        """Admit ``request`` last, taking its counters from the ``Request``."""
        i = self.size
        if i == self.requests.size:
            raise RuntimeError(f"more than {i} running requests: the sequence limit was not enforced")
        self.requests[i] = request
        self.ids[i] = request.spec.request_id
        self.num_tokens[i] = request.num_tokens
        self.computed[i] = request.num_computed_tokens
        self.generated[i] = request.generated_tokens
        self.output[i] = request.spec.output_tokens
        self.blocks[i] = request.num_blocks
        self.size = i + 1

    def pop(self) -> Request:
        """Remove the last admitted request, its counters written back."""
        self.size -= 1
        request: Request = self.requests[self.size]
        self._write_back_one(self.size)
        self.requests[self.size] = None
        return request

    def remove(self, leaving: np.ndarray) -> list[Request]:
        """Remove the requests where the boolean mask ``leaving`` (over the first ``len(self)``) is set, keeping
        the order of the others; returns them, counters written back, in admission order."""
        n = self.size
        positions = np.flatnonzero(leaving)
        for i in positions.tolist():
            self._write_back_one(i)
        gone: list[Request] = self.requests[positions].tolist()
        keep = ~leaving
        m = n - positions.size
        columns = (self.requests, self.ids, self.num_tokens, self.computed, self.generated, self.output, self.blocks)
        for array in columns:
            array[:m] = array[:n][keep]
        self.requests[m:n] = None
        self.size = m
        return gone

    def write_back(self) -> None:
        """Write every running request's counters to its ``Request`` (for records taken while it runs)."""
        for i in range(self.size):
            self._write_back_one(i)

    def _write_back_one(self, i: int) -> None:
        request: Request = self.requests[i]
        request.num_tokens = int(self.num_tokens[i])
        request.num_computed_tokens = int(self.computed[i])
        request.generated_tokens = int(self.generated[i])
        request.num_blocks = int(self.blocks[i])
