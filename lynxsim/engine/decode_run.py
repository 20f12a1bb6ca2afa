"""Decode runs: several consecutive pure-decode iterations of one instance computed in one step.

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
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from lynxsim.engine.kv_cache import BlockPool
from lynxsim.engine.request import Request

MAX_RUN_ITERATIONS = 64
"""Most iterations routed in one call: long enough to amortise the per-call overhead, short enough that the
``[layers, iterations, batch, experts]`` logits of a 256-sequence DeepSeek-V3 batch stay within ~1 GB."""


def kv_horizon(pool: BlockPool, contexts: np.ndarray, held_blocks: np.ndarray, most: int) -> int:
    """How many decode iterations (at most ``most``) the pool can grow every request for: iteration ``j`` needs
    ``blocks_for(context + j + 1)`` blocks per request."""
    steps = np.arange(1, most + 1, dtype=np.int64)
    needed = -(-(contexts[None, :] + steps[:, None]) // pool.block_size_tokens)  # [steps, requests]
    extra = (needed - held_blocks[None, :]).clip(min=0).sum(axis=1)
    short = np.flatnonzero(extra > pool.free_blocks)
    return int(short[0]) if short.size else most


class DecodeRun(NamedTuple):
    """A decode run about to start: at most ``length`` iterations of the running requests, whose cached tokens
    (``contexts``) and KV blocks (``held``) are read once, here, for sizing it and for running it."""

    length: int
    contexts: np.ndarray
    held: np.ndarray


def plan_decode_run(
    running: Sequence[Request], pool: BlockPool, *, last_latency_s: float, until_arrival_s: float
) -> DecodeRun | None:
    """The decode run that may start now, or None when it would be a single iteration (step it alone)."""
    remaining = min(r.spec.output_tokens - r.generated_tokens for r in running)
    most = min(remaining, MAX_RUN_ITERATIONS)
    if last_latency_s > 0 and math.isfinite(until_arrival_s):
        most = min(most, max(4, 2 * int(until_arrival_s / last_latency_s) + 2))
    if most <= 1:
        return None
    contexts = np.fromiter((r.num_computed_tokens for r in running), dtype=np.int64, count=len(running))
    held = np.fromiter((r.num_blocks for r in running), dtype=np.int64, count=len(running))
    length = kv_horizon(pool, contexts, held, most)
    return DecodeRun(length, contexts, held) if length > 1 else None
