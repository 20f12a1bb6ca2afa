"""Decode runs: consecutive pure-decode iterations of the same requests, routed together.

Between two scheduler decisions nothing about a decode batch changes but each sequence's length: when every
running request is decoding and nothing waits, iteration ``j`` computes the token at position ``context_r + j`` of
every running request ``r``. The compiled loop (``lynxsim.engine.compiled.kernel``) routes such a stretch in one
call (its iterations' tokens as groups of the same requests) and then steps it iteration by iteration, each with
its own routing, expert activity, latency and record; the length only changes what is routed ahead.
"""

from __future__ import annotations

import numpy as np

MAX_RUN_ITERATIONS = 64
"""Most iterations routed in one call: long enough to amortise the per-call overhead, short enough that the
``[layers, iterations, batch, experts]`` logits of a 256-sequence DeepSeek-V3 batch stay within ~1 GB."""


def run_token_ids(request_ids: np.ndarray, contexts: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """(request id, position) of the tokens of ``length`` decode iterations of requests ``request_ids`` with
    ``contexts`` cached tokens: iteration by iteration, each the requests in order (iteration ``j`` computes
    position ``context + j``), as one routing call takes them."""
    return np.tile(request_ids, length), (contexts[None, :] + np.arange(length)[:, None]).ravel()
