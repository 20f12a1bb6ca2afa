"""The list of requests a run serves, drawn once so that every policy sees the same arrivals."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Literal, TypeVar

import numpy as np

from lynxsim.datatypes import PrefixIdentity, RequestTable
from lynxsim.errors import InputError
from lynxsim.workload.arrivals import (
    BatchArrivals,
    ClosedLoopArrivals,
    GammaArrivals,
    ListArrivals,
    PoissonArrivals,
    TraceArrivals,
)
from lynxsim.workload.lengths import (
    EmpiricalLength,
    FixedLength,
    LognormalLength,
    PairedLengths,
    TaskLength,
    UniformLength,
)
from lynxsim.workload.traces import RequestTrace, TraceFile

_T = TypeVar("_T")

Arrival = PoissonArrivals | GammaArrivals | ListArrivals | TraceArrivals | ClosedLoopArrivals | BatchArrivals
Length = FixedLength | UniformLength | LognormalLength | EmpiricalLength | TaskLength


def generate_requests(
    arrival: Arrival,
    prompt_tokens: Length | None = None,
    output_tokens: Length | None = None,
    *,
    paired_lengths: PairedLengths | None = None,
    seed: int,
    num_requests: int | None = None,
    duration_s: float | None = None,
    until_s: float | None = None,
) -> RequestTable:
    """Draw the requests of one run.

    Arrival times, prompt lengths, output lengths and paired (prompt, output) rows each use their own child stream
    of ``seed``, so changing one leaves the others unchanged. Lengths come from ``paired_lengths`` (whole trace
    rows), or from ``prompt_tokens`` and ``output_tokens``; with ``trace`` arrivals, a length not given is the
    trace's own, row by row. ``num_requests`` and ``duration_s`` bound the arrivals (trace and list arrivals:
    the first ``num_requests`` and those before ``duration_s``, scaled time; either may be left out). Requests
    that would arrive at or after ``until_s`` (the cut-off: never served) are not drawn at all, so that a run cut
    off early costs what it serves, not what it was asked to generate; those drawn are the same either way.
    Errors in a trace file are ``InputError``s that name the workload key, the file and the line.

    Which requests share a prompt prefix (``RequestTable.prefix``, for prefix caching) comes with the lengths: a
    task's prompts all start with its few-shot prefix; a trace replayed with its own lengths brings what it
    records (Mooncake ``hash_ids``, a ``session`` column). Lengths from anywhere else share nothing.
    """
    if paired_lengths is not None and (prompt_tokens is not None or output_tokens is not None):
        raise ValueError("paired_lengths excludes prompt_tokens and output_tokens")
    is_trace = isinstance(arrival, TraceArrivals)
    if paired_lengths is None and not is_trace and (prompt_tokens is None or output_tokens is None):
        raise ValueError("give prompt_tokens and output_tokens, or paired_lengths")
    streams = np.random.SeedSequence(seed).spawn(4)  # children 0..2 are those of earlier versions' spawn(3)
    arrival_rng, prompt_rng, output_rng, paired_rng = (np.random.default_rng(s) for s in streams)

    rows: np.ndarray | None = None
    trace: RequestTrace | None = None
    if isinstance(arrival, TraceArrivals):
        trace = _load(arrival, "workload.arrival")
        times_s, rows = _located(lambda: arrival.select(trace, num_requests, duration_s), "workload.arrival")
    elif isinstance(arrival, (ClosedLoopArrivals, BatchArrivals)):
        if num_requests is None:
            raise ValueError(f"{arrival.kind} arrivals need num_requests")
        # closed loop: sent as clients free up (the engine fills the times in); a batch job: all at time 0
        closed = isinstance(arrival, ClosedLoopArrivals)
        times_s = np.full(num_requests, np.nan if closed else 0.0)
    elif isinstance(arrival, ListArrivals):
        times_s = arrival.times_s_array()
        if num_requests is not None:
            times_s = times_s[:num_requests]
        if duration_s is not None:
            times_s = times_s[times_s < duration_s]
    else:
        if num_requests is None and duration_s is None:
            raise ValueError(f"{arrival.kind} arrivals need num_requests or duration_s")
        times_s = arrival.times_s(arrival_rng, num_requests, duration_s, until_s)
    if until_s is not None and not isinstance(arrival, ClosedLoopArrivals):
        kept = np.asarray(times_s) < until_s
        times_s = np.asarray(times_s)[kept]
        rows = rows[kept] if rows is not None else None
    count = len(times_s)

    if paired_lengths is not None:
        _load(paired_lengths, "workload.paired_lengths")
        prompts, outputs = _located(lambda: paired_lengths.sample(paired_rng, count), "workload.paired_lengths")
    else:
        prompts = _slot(prompt_tokens, "prompt", prompt_rng, count, trace, rows)
        outputs = _slot(output_tokens, "output", output_rng, count, trace, rows)
    prefix = None
    if isinstance(prompt_tokens, TaskLength) and prompt_tokens.column in (None, "prompt") \
            and prompt_tokens.prefix_tokens > 0:
        task_id = zlib.crc32(prompt_tokens.name.encode())  # one id per task: its prompts share the prefix
        prefix = PrefixIdentity.whole(np.full(count, task_id), np.full(count, prompt_tokens.prefix_tokens))
    elif trace is not None and trace.prefix is not None and prompt_tokens is None and output_tokens is None:
        assert rows is not None
        prefix = trace.prefix.take(rows)
    think_s = None
    if isinstance(arrival, ClosedLoopArrivals):  # the arrival stream's own draws: lengths are unchanged by them
        think_s = arrival.think_time.sample(arrival_rng, count)
    return RequestTable(np.arange(count, dtype=np.int64), np.asarray(times_s, dtype=float), prompts, outputs,
                        think_s, prefix)


def _slot(
    dist: Length | None,
    column: Literal["prompt", "output"],
    rng: np.random.Generator,
    count: int,
    trace: RequestTrace | None,
    rows: np.ndarray | None,
) -> np.ndarray:
    key = f"workload.{column}_tokens"
    if dist is None:  # trace arrivals: the trace's own lengths, row by row
        assert trace is not None and rows is not None
        return _located(lambda: trace.column(column)[rows], key)
    if isinstance(dist, (EmpiricalLength, TaskLength)):  # the slot's column of a trace or a task, unless it names one
        return _located(lambda: dist.sample(rng, count, column), key)
    return dist.sample(rng, count)


def _load(source: TraceFile, key: str) -> RequestTrace:
    return _located(source.load, key)


def _located(action: Callable[[], _T], key: str) -> _T:
    """Run ``action``; an ``InputError`` it raises is prefixed with the workload key it concerns."""
    try:
        return action()
    except InputError as exc:
        raise InputError(f"{key}: {exc.where}" if exc.where else key, exc.problem) from None
