"""A run's timeline as a Chrome trace (the JSON trace event format that Perfetto and chrome://tracing open).

Serving simulators are explained by their timelines: which iterations mixed prefill and decode, where a request
waited, when the KV cache filled. Vidur writes a Chrome trace of every run for that; this writes one per policy of a
lynxsim run, from the records on disk (``requests.parquet``, ``iterations.parquet``), so an existing run can be
traced without simulating it again.

What a trace holds (trace event format: https://docs.google.com/document/d/1CvAClvFfyA5R-PhYUmn5OOQtYMH4h6I0nSsKchNAySU):

* a process per instance (``instance 0 (colocated)``), a thread per GPU rank of it (``GPU 0`` ...: under tensor or
  expert parallelism every rank runs the instance's iterations in lockstep, so each rank's slices are the same
  iterations; the arguments are on rank 0's slices only, to keep the file small);
* every iteration as a complete slice (``X``) named by its kind (``prefill``, ``decode``, ``mixed``), with its batch
  (sequences, prefill and decode tokens, sampled tokens), its latency and breakdown in ms, the distinct experts per
  MoE layer (mean, min, max) and whether the policy applied;
* counter tracks per instance: KV-cache use (% of blocks, at each iteration's start) and the requests waiting and
  running there (a request waits from its arrival to its first scheduling, runs from then to its first token on a
  prefill instance, or to its finish; on a decode instance it runs from its KV cache's arrival to its finish;
  preemptions are not in the records, so a preempted request counts as running);
* every request as an async slice from arrival to finish (or to the end of the trace), in a ``requests`` process,
  with its phases nested: ``queued``, ``prefill``, ``awaiting transfer`` and ``KV transfer`` (disaggregated), and
  ``decode``; its lengths, cached tokens, status, TTFT and TPOT as arguments.

Large runs stay openable (``max_events``): first only the iterations and requests within ``window_s`` are kept;
if the requests still exceed the budget, every k-th one is kept; if the iterations alone do, the window is cut
where they reach it. The file's ``otherData`` says what was kept.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from lynxsim.errors import InputError, file_problem
from lynxsim.metrics import BREAKDOWN_COLUMNS, per_layer
from lynxsim.plots import PolicyRecords, load_run
from lynxsim.records import slug
from lynxsim.yaml_input import read_yaml_mapping

MAX_EVENTS = 1_000_000
"""Events per trace by default: about 150 MB of JSON, which Perfetto's UI opens (chrome://tracing struggles past
a few hundred MB)."""
REQUESTS_PID = 1_000_000
"""The process id of the requests' async slices: after every instance's."""
US_PER_S = 1e6


@dataclass(frozen=True)
class TraceWritten:
    """One policy's trace: where it is, how many events it holds, what it kept, how long it took to write."""

    path: Path
    events: int
    notes: tuple[str, ...]
    seconds: float


@dataclass(frozen=True)
class _Layout:
    """How the run was deployed: each instance's role and its GPU ranks."""

    roles: dict[int, str]
    ranks: int


def write_traces(run_dir: Path, out_dir: Path | None = None, *, window_s: tuple[float, float] | None = None,
                 max_events: int = MAX_EVENTS) -> list[TraceWritten]:
    """One Chrome trace per policy of the run in ``run_dir``, as ``<out_dir>/<policy>.trace.json`` (default
    ``<run_dir>/trace``)."""
    if not (run_dir / "summary.json").is_file() or not (run_dir / "config.resolved.yaml").is_file():
        raise InputError(str(run_dir), "not a run directory (no summary.json and config.resolved.yaml)")
    if window_s is not None and not window_s[0] < window_s[1]:
        raise InputError("--window", f"the window's start must be before its end, got {window_s[0]:g} {window_s[1]:g}")
    if max_events < 1000:
        raise InputError("--max-events", f"a trace needs room for at least 1000 events, got {max_events}")
    resolved = read_yaml_mapping(run_dir / "config.resolved.yaml", "resolved experiment")
    out_dir = out_dir or run_dir / "trace"
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        runs = load_run(run_dir)
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as exc:
        detail = file_problem(exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
        raise InputError(str(run_dir), f"a run directory whose records cannot be read ({detail})") from None
    written = []
    for records in runs:
        started = time.perf_counter()
        layout = _layout(resolved, records.iterations)
        events, notes = trace_events(records, layout, window_s=window_s, max_events=max_events)
        path = out_dir / f"{slug(records.label)}.trace.json"
        document = {
            "traceEvents": events,
            "displayTimeUnit": "ms",
            "otherData": {"experiment": str(resolved.get("name", "")), "policy": records.label,
                          "time_unit": "simulated microseconds", "kept": "; ".join(notes) or "everything"},
        }
        temporary = path.with_suffix(".partial")
        with temporary.open("w") as file:
            json.dump(document, file, separators=(",", ":"))
        temporary.replace(path)
        written.append(TraceWritten(path, len(events), tuple(notes), time.perf_counter() - started))
    return written


def _layout(resolved: dict[str, Any], iterations: pd.DataFrame) -> _Layout:
    gpus = int(resolved.get("resolved", {}).get("gpus_per_instance", 1))
    roles = {}
    if len(iterations):
        pairs = iterations[["instance", "role"]].drop_duplicates()
        roles = {int(i): str(r) for i, r in zip(pairs["instance"], pairs["role"], strict=True)}
    return _Layout(roles, max(gpus, 1))


def trace_events(records: PolicyRecords, layout: _Layout, *, window_s: tuple[float, float] | None = None,
                 max_events: int = MAX_EVENTS) -> tuple[list[dict[str, Any]], list[str]]:
    """The trace events of one policy's records, and notes on what was left out to stay within ``max_events``."""
    iterations, requests = records.iterations, records.requests
    notes: list[str] = []
    end_s = float((iterations["start_s"] + iterations["latency_s"]).max()) if len(iterations) else 0.0
    start_s, stop_s = window_s if window_s is not None else (0.0, max(end_s, 0.0))
    if window_s is not None:
        notes.append(f"window {start_s:g} to {stop_s:g} s")
    per_iteration = layout.ranks + 1  # a slice per rank and a KV-cache counter
    if len(iterations):
        ends = iterations["start_s"] + iterations["latency_s"]
        iterations = iterations[(ends > start_s) & (iterations["start_s"] < stop_s)]
    budget = max_events - 4 * (len(layout.roles) + layout.ranks + 2)  # metadata
    if len(iterations) * per_iteration > budget // 2:
        kept = budget // 2 // per_iteration
        stop_s = float(iterations["start_s"].iloc[kept])
        iterations = iterations.iloc[:kept]
        notes.append(f"window cut at {stop_s:g} s: the iterations after it exceed {max_events:,} events")
    finish = requests["finish_s"].fillna(np.inf)
    requests = requests[(requests["arrival_s"] < stop_s) & (finish > start_s)]
    room = budget - len(iterations) * per_iteration
    per_request = 16  # at most: 5 phases and the whole (begin, end each), 4 counter changes
    every = max(1, math.ceil(len(requests) * per_request / max(room, 1)))
    if every > 1:
        requests = requests.iloc[::every]
        notes.append(f"every {every}th request (counters count the kept ones only)")
    events: list[dict[str, Any]] = _metadata(layout)
    events += _iteration_events(iterations, layout)
    phased = [(request, _phases(request, start_s, stop_s)) for request in requests.itertuples(index=False)]
    events += _request_events(phased, start_s, stop_s)
    events += _load_counters(phased)
    events.sort(key=lambda event: event["ts"])  # stable: a request's phases stay in order at equal times
    return events, notes


def _us(seconds: float) -> float:
    return round(seconds * US_PER_S, 3)


def _metadata(layout: _Layout) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    for instance, role in sorted(layout.roles.items()):
        events.append({"ph": "M", "name": "process_name", "pid": instance, "tid": 0, "ts": 0,
                       "args": {"name": f"instance {instance} ({role})"}})
        events.append({"ph": "M", "name": "process_sort_index", "pid": instance, "tid": 0, "ts": 0,
                       "args": {"sort_index": instance}})
        for rank in range(layout.ranks):
            events.append({"ph": "M", "name": "thread_name", "pid": instance, "tid": rank, "ts": 0,
                           "args": {"name": f"GPU {rank}"}})
    events.append({"ph": "M", "name": "process_name", "pid": REQUESTS_PID, "tid": 0, "ts": 0,
                   "args": {"name": "requests"}})
    return events


def _iteration_events(iterations: pd.DataFrame, layout: _Layout) -> list[dict[str, Any]]:
    if not len(iterations):
        return []
    distinct = per_layer(iterations["distinct_experts"])
    breakdown = [*BREAKDOWN_COLUMNS, *(["offload_s"] if "offload_s" in iterations else [])]  # expert offloading
    columns = {name: iterations[name].to_numpy() for name in (
        "instance", "start_s", "latency_s", "prefill_tokens", "decode_tokens", "sequences", "sampled_tokens",
        "policy_applied", "kv_used_fraction", *breakdown)}
    events: list[dict[str, Any]] = []
    for row in range(len(iterations)):
        prefill, decode = int(columns["prefill_tokens"][row]), int(columns["decode_tokens"][row])
        name = "mixed" if prefill and decode else "prefill" if prefill else "decode"
        instance = int(columns["instance"][row])
        start = float(columns["start_s"][row])
        ts = _us(start)
        dur = round(_us(start + float(columns["latency_s"][row])) - ts, 3)  # ends where the next slice starts
        args = {
            "sequences": int(columns["sequences"][row]), "prefill_tokens": prefill, "decode_tokens": decode,
            "sampled_tokens": int(columns["sampled_tokens"][row]),
            "policy_applied": bool(columns["policy_applied"][row]),
            "latency_ms": round(float(columns["latency_s"][row]) * 1e3, 4),
            **{f"{c.removesuffix('_s')}_ms": round(float(columns[c][row]) * 1e3, 4) for c in breakdown},
            "distinct_experts_mean": round(float(distinct[row].mean()), 3),
            "distinct_experts_min": int(distinct[row].min()), "distinct_experts_max": int(distinct[row].max()),
        }
        for rank in range(layout.ranks):
            event = {"ph": "X", "name": name, "cat": "iteration", "pid": instance, "tid": rank, "ts": ts, "dur": dur}
            if rank == 0:
                event["args"] = args
            events.append(event)
        events.append({"ph": "C", "name": "KV cache used %", "pid": instance, "tid": 0, "ts": ts,
                       "args": {"used": round(float(columns["kv_used_fraction"][row]) * 100, 3)}})
    return events


def _phases(request: Any, start_s: float, stop_s: float) -> list[tuple[str, float, float]]:
    """A request's phases (name, start s, end s) as its record tells them, each cut to ``start_s .. stop_s``."""
    arrival = float(request.arrival_s)
    scheduled = arrival + float(request.scheduling_delay_s) if not math.isnan(request.scheduling_delay_s) else math.nan
    first = float(request.first_token_s)
    finish = float(request.finish_s) if not math.isnan(request.finish_s) else stop_s
    phases = []
    if math.isnan(scheduled):
        return [("queued", arrival, stop_s)] if request.status.startswith("cutoff") else []
    phases.append(("queued", arrival, scheduled))
    if math.isnan(first):
        return [*phases, ("prefill", scheduled, stop_s)]
    phases.append(("prefill", scheduled, first))
    decode_from = first
    if not math.isnan(request.transfer_wait_s):
        transfer_start = first + float(request.transfer_wait_s)
        phases.append(("awaiting transfer", first, transfer_start))
        if not math.isnan(request.transfer_s):
            decode_from = transfer_start + float(request.transfer_s)
            phases.append(("KV transfer", transfer_start, decode_from))
        else:
            decode_from = transfer_start
    if finish > decode_from or request.status == "finished":
        phases.append(("decode", decode_from, finish))
    return [(name, max(a, start_s), min(b, stop_s)) for name, a, b in phases if a < stop_s and b > start_s]


Phased = list[tuple[Any, list[tuple[str, float, float]]]]
"""Each kept request (a row of requests.parquet) with its ``_phases``."""


def _request_events(phased: Phased, start_s: float, stop_s: float) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    for request, phases in phased:
        arrival = max(float(request.arrival_s), start_s)
        end = min(float(request.finish_s), stop_s) if not math.isnan(request.finish_s) else stop_s
        ident = int(request.request_id)
        args = {"prompt_tokens": int(request.prompt_tokens), "output_tokens": int(request.output_tokens),
                "generated_tokens": int(request.generated_tokens), "cached_tokens": int(request.cached_tokens),
                "status": str(request.status), "preemptions": int(request.preemptions)}
        for key in ("ttft_s", "tpot_s"):
            value = float(getattr(request, key))
            if not math.isnan(value):
                args[key.replace("_s", "_ms")] = round(value * 1e3, 4)
        common = {"cat": "request", "id": ident, "pid": REQUESTS_PID, "tid": 0}
        events.append({"ph": "b", "name": f"request {ident}", "ts": _us(arrival), "args": args, **common})
        for name, begin, finish in phases:
            events.append({"ph": "b", "name": name, "ts": _us(begin), **common})
            events.append({"ph": "e", "name": name, "ts": _us(max(finish, begin)), **common})
        events.append({"ph": "e", "name": f"request {ident}", "ts": _us(max(end, arrival)), **common})
    return events


def _load_counters(phased: Phased) -> list[dict[str, Any]]:
    """Waiting and running requests per instance, from each request's phases."""
    changes: dict[int, list[tuple[float, int, int]]] = {}  # instance -> (time, d waiting, d running)
    for request, phases in phased:
        entry = int(request.prefill_instance)
        if entry < 0:
            continue
        decode_instance = int(request.decode_instance)
        for name, begin, end in phases:
            if name == "queued":
                changes.setdefault(entry, []).extend([(begin, 1, 0), (end, -1, 0)])
            elif name == "prefill" or (name == "decode" and decode_instance == entry):
                changes.setdefault(entry, []).extend([(begin, 0, 1), (end, 0, -1)])
            elif name == "decode" and decode_instance >= 0:
                changes.setdefault(decode_instance, []).extend([(begin, 0, 1), (end, 0, -1)])
    events: list[dict[str, Any]] = []
    for instance, moves in changes.items():
        moves.sort(key=lambda move: move[0])
        waiting = running = 0
        for k, (at, d_waiting, d_running) in enumerate(moves):
            waiting += d_waiting
            running += d_running
            if k + 1 == len(moves) or moves[k + 1][0] != at:  # one value per time: every change then applied
                events.append({"ph": "C", "name": "requests", "pid": instance, "tid": 0, "ts": _us(at),
                               "args": {"waiting": waiting, "running": running}})
    return events
