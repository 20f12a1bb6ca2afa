"""Automatic prefix caching as vLLM v1 does it, inside the engine's loop: KV-cache blocks shared by requests whose
prompts start alike.

vLLM v1 (``vllm/v1/core/block_pool.py``, ``kv_cache_manager.py``, on by default) gives every full KV-cache block a
hash of the tokens up to its end. A request being admitted takes the longest run of its leading blocks whose hashes
are cached (at most ``tokens - 1`` tokens, so that one is computed to sample from): those tokens are not computed
again, the blocks are shared (a reference count each), and they still occupy the cache. A block that fills while a
request computes it becomes cached. Released blocks (a finished or preempted request's, in reverse order, so that a
prompt's tail goes before its head) join the tail of one free queue; a block is allocated from its head, and a
cached block taken so is evicted (its hash forgotten). A hit on a cached block no request holds takes it out of the
queue again. The queue is therefore least recently freed first, over cached and plain blocks alike.

Here a block's identity replaces its hash: ``block_identities`` numbers the distinct (prefix, block) pairs of a
run's requests once, so the loop looks a block up by index (``entry_of``) instead of hashing. Blocks that no other
request can ever hit (past a request's shared prefix) are plain blocks: they are queued like vLLM's, in runs
(``ANONYMOUS`` nodes), since which plain block is evicted changes nothing. One deviation: when a block fills whose
identity is already cached (two requests computed the same new prefix at once), vLLM keeps both copies until one is
evicted; here the request takes a reference on the cached one and its copy is freed at once (memory only; which
tokens are computed is the same).

The queue is a doubly linked list of nodes: a node is a cached block (``node_block`` >= 0, its identity, with
``node_ref`` holders; in the queue only while none holds it) or a run of ``node_count`` plain free blocks. The
instance's free-block counter (``kernel.S_FREE_BLOCKS``) counts both kinds; ``meta[P_EVICTABLE]`` the cached ones.
With caching off (``meta[P_ON]`` 0) the loop counts blocks as it always did and none of this runs.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from lynxsim.datatypes import PrefixIdentity
from lynxsim.jit import compiled, internal

# Entries of ``PrefixCache.meta``: caching on, the queue's head and tail node (-1: empty), the free-node stack's
# depth, the cached blocks in the queue.
P_ON, P_HEAD, P_TAIL, P_FREE_NODES, P_EVICTABLE = range(5)
META_SIZE = 5
ANONYMOUS = -1
"""``node_block`` of a run of plain free blocks."""

# The slot of the free-block counter in the kernel's ``state`` array (``kernel.S_FREE_BLOCKS``; the kernel checks
# that they agree, this module cannot import the kernel).
S_FREE_BLOCKS = 4


class RunBlocks(NamedTuple):
    """A run's block identities (``block_identities``): request ``r``'s are ``ids[starts[r] : starts[r] + counts[r]]``
    (its leading blocks that another request may share), ``num_identities`` distinct ones in all."""

    starts: np.ndarray
    counts: np.ndarray
    ids: np.ndarray
    num_identities: int


class PrefixCache(NamedTuple):
    """One instance's prefix cache and the run's block identities (``block_identities``)."""

    block_ids: np.ndarray  # int64: each request's block identities, at its row's R_KEY_AT, R_KEYED of them
    entry_of: np.ndarray  # int64 [identities]: the node caching each identity, -1: none
    node_block: np.ndarray  # int64 [nodes]: the identity a node caches, ANONYMOUS: a run of plain free blocks
    node_ref: np.ndarray  # int64 [nodes]: requests holding a cached block
    node_count: np.ndarray  # int64 [nodes]: blocks of a plain run
    node_prev: np.ndarray  # int64 [nodes]: queue links (-1: none)
    node_next: np.ndarray
    free_nodes: np.ndarray  # int64 [nodes]: a stack of unused node indices, meta[P_FREE_NODES] deep
    meta: np.ndarray  # int64 [META_SIZE]


def block_identities(prefix: PrefixIdentity, block_tokens: int) -> RunBlocks:
    """The engine's block identities of requests described by ``prefix``, for ``block_tokens``-token blocks.

    Request ``r``'s block ``j`` (tokens ``j * b .. (j + 1) * b - 1``) has an identity when it ends within the
    request's shared tokens (``prefix.keyed_tokens[r]``) and its units: it is the pair (the unit holding the
    block's last token, where in that unit the block ends). Units are prefix-chained (two requests with the same
    unit id agree on every token up to that unit's end), so two blocks with the same pair hold the same tokens
    after the same prefix: the same KV cache. Distinct pairs are numbered 0, 1, ... in sorted order."""
    unit = prefix.unit_tokens
    counts = (np.minimum(prefix.unit_counts * unit, prefix.keyed_tokens) // block_tokens).astype(np.int64)
    starts = np.zeros(counts.size, dtype=np.int64)
    if counts.size > 1:
        np.cumsum(counts[:-1], out=starts[1:])
    total = int(counts.sum())
    if total == 0:
        return RunBlocks(starts, counts, np.zeros(0, dtype=np.int64), 0)
    owner = np.repeat(np.arange(counts.size), counts)
    block = np.arange(total, dtype=np.int64) - starts[owner]
    last_token = (block + 1) * block_tokens - 1
    unit_index = last_token // unit
    end_in_unit = last_token % unit
    _, units = np.unique(prefix.unit_ids[prefix.unit_starts[owner] + unit_index], return_inverse=True)
    span = int(end_in_unit.max()) + 1
    _, identities = np.unique(units.astype(np.int64) * span + end_in_unit, return_inverse=True)
    identities = identities.astype(np.int64)
    return RunBlocks(starts, counts, identities, int(identities.max()) + 1)


def make_prefix_cache(blocks: RunBlocks | None, num_blocks: int) -> PrefixCache:
    """A cache of ``num_blocks`` free blocks, none cached yet (one plain run), for requests whose block identities
    are ``blocks``; None: caching off, the loop counts blocks only (arrays of the same types, so that the loop is
    compiled once)."""
    on = blocks is not None
    nodes = num_blocks + 2 if on else 1
    meta = np.zeros(META_SIZE, dtype=np.int64)
    meta[P_ON] = on
    cache = PrefixCache(
        block_ids=blocks.ids if blocks is not None else np.zeros(0, dtype=np.int64),
        entry_of=np.full(blocks.num_identities if blocks is not None else 0, -1, dtype=np.int64),
        node_block=np.zeros(nodes, dtype=np.int64), node_ref=np.zeros(nodes, dtype=np.int64),
        node_count=np.zeros(nodes, dtype=np.int64), node_prev=np.full(nodes, -1, dtype=np.int64),
        node_next=np.full(nodes, -1, dtype=np.int64),
        free_nodes=np.arange(nodes - 1, -1, -1, dtype=np.int64), meta=meta,
    )
    meta[P_FREE_NODES] = nodes
    meta[P_HEAD] = meta[P_TAIL] = -1
    if on:
        _append_plain(cache, num_blocks)
    return cache


@compiled(inline="always")
def _new_node(cache: PrefixCache) -> int:
    cache.meta[P_FREE_NODES] -= 1
    return cache.free_nodes[cache.meta[P_FREE_NODES]]


@compiled(inline="always")
def _drop_node(cache: PrefixCache, node: int) -> None:
    cache.free_nodes[cache.meta[P_FREE_NODES]] = node
    cache.meta[P_FREE_NODES] += 1


@compiled(inline="always")
def _link_tail(cache: PrefixCache, node: int) -> None:
    tail = cache.meta[P_TAIL]
    cache.node_prev[node] = tail
    cache.node_next[node] = -1
    if tail >= 0:
        cache.node_next[tail] = node
    else:
        cache.meta[P_HEAD] = node
    cache.meta[P_TAIL] = node


@compiled(inline="always")
def _unlink(cache: PrefixCache, node: int) -> None:
    prev = cache.node_prev[node]
    after = cache.node_next[node]
    if prev >= 0:
        cache.node_next[prev] = after
    else:
        cache.meta[P_HEAD] = after
    if after >= 0:
        cache.node_prev[after] = prev
    else:
        cache.meta[P_TAIL] = prev


@compiled(cache=True)
def _append_plain(cache: PrefixCache, blocks: int) -> None:
    """``blocks`` plain blocks join the queue's tail (one run with the tail's if that is plain too)."""
    if blocks <= 0:
        return
    tail = cache.meta[P_TAIL]
    if tail >= 0 and cache.node_block[tail] == ANONYMOUS:
        cache.node_count[tail] += blocks
        return
    node = _new_node(cache)
    cache.node_block[node] = ANONYMOUS
    cache.node_count[node] = blocks
    _link_tail(cache, node)


@internal(inline="never")
def take_blocks(cache: PrefixCache, state: np.ndarray, blocks: int) -> None:
    """Allocate ``blocks`` free blocks (the caller checked that there are): from the queue's head, evicting the
    cached blocks taken."""
    state[S_FREE_BLOCKS] -= blocks
    if not cache.meta[P_ON]:
        return
    while blocks > 0:
        head = cache.meta[P_HEAD]
        if cache.node_block[head] == ANONYMOUS:
            taken = min(cache.node_count[head], blocks)
            cache.node_count[head] -= taken
            blocks -= taken
            if cache.node_count[head] == 0:
                _unlink(cache, head)
                _drop_node(cache, head)
        else:
            cache.entry_of[cache.node_block[head]] = -1
            _unlink(cache, head)
            _drop_node(cache, head)
            cache.meta[P_EVICTABLE] -= 1
            blocks -= 1


@compiled(inline="always")
def _hold(cache: PrefixCache, state: np.ndarray, node: int) -> None:
    """One more holder of cached block ``node``; out of the queue (no longer free) if it was in it."""
    if cache.node_ref[node] == 0:
        _unlink(cache, node)
        cache.meta[P_EVICTABLE] -= 1
        state[S_FREE_BLOCKS] -= 1
    cache.node_ref[node] += 1


@internal(inline="never")
def lookup(cache: PrefixCache, key_at: int, keyed: int, tokens: int, block_tokens: int) -> tuple[int, int]:
    """A request's cache hit: (its leading blocks cached, at most ``(tokens - 1) // block_tokens``; how many of
    those are in the free queue, which holding them takes from the free blocks)."""
    most = min(keyed, (tokens - 1) // block_tokens)
    hits = 0
    queued = 0
    while hits < most:
        node = cache.entry_of[cache.block_ids[key_at + hits]]
        if node < 0:
            break
        queued += cache.node_ref[node] == 0
        hits += 1
    return hits, queued


@internal(inline="never")
def hold_hits(cache: PrefixCache, state: np.ndarray, key_at: int, hits: int) -> None:
    """Take the ``hits`` leading blocks ``lookup`` found (the caller checked that the free blocks allow it)."""
    for j in range(hits):
        _hold(cache, state, cache.entry_of[cache.block_ids[key_at + j]])


@internal(inline="never")
def register(cache: PrefixCache, state: np.ndarray, key_at: int, first: int, end: int) -> None:
    """A request's blocks ``first .. end - 1`` have filled: each becomes cached, held by the request. A block whose
    identity is cached already (computed by another request meanwhile) is shared instead, the request's copy freed."""
    for j in range(first, end):
        identity = cache.block_ids[key_at + j]
        node = cache.entry_of[identity]
        if node < 0:
            node = _new_node(cache)
            cache.node_block[node] = identity
            cache.node_ref[node] = 1
            cache.entry_of[identity] = node
        else:
            _hold(cache, state, node)
            state[S_FREE_BLOCKS] += 1
            _append_plain(cache, np.int64(1))


@internal(inline="never")
def release(cache: PrefixCache, state: np.ndarray, key_at: int, blocks: int, cached: int) -> None:
    """A request lets go of its ``blocks`` blocks, the first ``cached`` of them cached ones: in reverse order,
    its plain blocks first, then its cached ones from the last (each queued once no request holds it)."""
    plain = blocks - cached
    state[S_FREE_BLOCKS] += plain
    if not cache.meta[P_ON]:
        return
    _append_plain(cache, plain)
    for j in range(cached - 1, -1, -1):
        node = cache.entry_of[cache.block_ids[key_at + j]]
        cache.node_ref[node] -= 1
        if cache.node_ref[node] == 0:
            _link_tail(cache, node)
            cache.meta[P_EVICTABLE] += 1
            state[S_FREE_BLOCKS] += 1
