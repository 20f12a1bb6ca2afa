"""The simpy oracle's decode runs: several consecutive pure-decode iterations of one instance in one step.

Between two scheduler decisions nothing about a decode batch changes but each sequence's length: when every
running request is decoding, nothing waits, and no arrival, completion or KV-cache shortage intervenes, iteration
``j`` of the run computes the token at position ``context_r + j`` of every running request ``r``, exactly the batch
the scheduler would form again and again. Such a run is routed in one call (its ``n`` iterations' tokens as ``n``
groups of the same requests), priced iteration by iteration, and advanced with one simulated timeout, which takes
the per-iteration Python work of the engine off the hot path without changing a number: each iteration keeps its
own tokens, routing, expert activity and latency, and is recorded as its own row.

Where a run stops (``plan_decode_run``):

* the first completion: request ``r`` samples its last token in iteration ``output_tokens - generated - 1``, after
  which the batch changes;
* the KV cache: iteration ``j`` grows each request to ``context + j + 1`` tokens; the run ends before the first
  iteration whose new blocks exceed the free ones (that iteration preempts, which the scheduler decides);
* the next arrival: an iteration starting at or after it would have admitted the new request, so the run keeps
  only the iterations that start before it, known once their latencies are (the replica prices the run's
  iterations one by one and stops there, so no iteration is priced that does not happen);
* the simulation's cut-off: only iterations that end by it, as the iteration-by-iteration engine records them;
* ``MAX_RUN_ITERATIONS``, and an estimate of how many iterations fit before the next arrival (twice the last
  latency's count, at least 4), which bounds the work routed and then discarded when an arrival cuts the run.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from lynxsim.engine.decode_run import MAX_RUN_ITERATIONS
from simpy_oracle.kv_cache import BlockPool
from simpy_oracle.running import RunningSet


def grown_blocks(block_size_tokens: int, contexts: np.ndarray, held_blocks: np.ndarray, most: int) -> np.ndarray:
    """Blocks the requests hold beyond ``held_blocks`` after each of ``most`` decode iterations: iteration ``j``
    (from 0) grows each request to ``context + j + 1`` tokens, ``blocks_for`` of that."""
    steps = np.arange(1, most + 1, dtype=np.int64)
    needed = -(-(contexts[None, :] + steps[:, None]) // block_size_tokens)  # [steps, requests]
    return (needed - held_blocks[None, :]).clip(min=0).sum(axis=1)


def fitting_iterations(grown: np.ndarray, free_blocks: int) -> int:
    """How many decode iterations the pool can grow every request for, of those ``grown`` describes (blocks
    held beyond the present ones after each): up to the first that needs more than ``free_blocks``."""
    short = np.flatnonzero(grown > free_blocks)
    return int(short[0]) if short.size else int(grown.size)


class DecodeRun(NamedTuple):
    """A decode run about to start: at most ``length`` iterations of the running requests, whose cached tokens
    (``contexts``) are read once, here, for sizing it and for running it; ``grown[j]`` is the KV blocks they
    hold after iteration ``j`` beyond those they hold now."""

    length: int
    contexts: np.ndarray
    grown: np.ndarray


def plan_decode_run(
    running: RunningSet, pool: BlockPool, *, last_latency_s: float, until_arrival_s: float
) -> DecodeRun | None:
    """The decode run of every running request (all decoding) that may start now, or None when it would be a
    single iteration (step it alone)."""
    n = len(running)
    remaining = int((running.output[:n] - running.generated[:n]).min())
    most = min(remaining, MAX_RUN_ITERATIONS)
    if last_latency_s > 0 and math.isfinite(until_arrival_s):
        most = min(most, max(4, 2 * int(until_arrival_s / last_latency_s) + 2))
    if most <= 1:
        return None
    contexts = running.computed[:n].copy()
    grown = grown_blocks(pool.block_size_tokens, contexts, running.blocks[:n], most)
    length = fitting_iterations(grown, pool.free_blocks)
    return DecodeRun(length, contexts, grown[:length]) if length > 1 else None
