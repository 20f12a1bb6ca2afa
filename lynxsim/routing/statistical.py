"""Statistical routing mode: sample each iteration's expert activity from a table built once per policy.

In exact mode every iteration asks the routing source for the logits of its tokens and runs the policy on them;
for a large model (DeepSeek-V3: 58 MoE layers of 256 experts) that is most of a simulation's wall time, and it
is repeated for every point of a sweep. What the cost model needs from it, though, is only each MoE layer's
``ExpertActivity`` (distinct experts and token-expert assignments, per EP rank under expert parallelism), and
what the summary needs are the quality proxies. For a given routing source and policy both depend on the
iteration mostly through its token count, so this mode measures their distribution once, for a grid of batch
sizes, and each simulated iteration draws one sample.

Building (``build_activity_table``). For each of ``samples`` samples, a pool of ``sizes[-1]`` tokens is routed,
in one ``logits`` call per chunk of samples (as many as fit in ``logits_chunk_bytes``). The batch of size ``n`` of
a sample is the first ``n`` tokens of its pool: each size's batches are fresh tokens, which is all a draw needs,
at the routing cost of the largest size alone rather than of every size. A pool is laid out as vLLM fills an
iteration: first one token from each of ``max_sequences`` synthetic requests (a decode batch: ids from
``TABLE_REQUEST_ID_BASE``, a range no workload or calibration uses; positions drawn in ``[0, TABLE_POSITIONS)``),
then, since no iteration holds more sequences, one request's prefill chunk at consecutive positions. A chunk's
tokens share their request's routing where the router persists (synthetic ``persistence``, replayed traces), so
they activate fewer distinct experts and load EP ranks more unevenly than as many unrelated tokens: with tokens
all unrelated, DeepSeek-V3's EP8 mixed iterations came out 5% faster than exact mode and its TPOT 2-4% low.
The policy then selects on each batch as its own batch (a batch-aware policy's choice depends on the whole
batch), and the table keeps ``activity(counts)`` (the cost model's own reduction, so the per-rank arrays come with
expert parallelism) and the proxies. Top-k chooses per token, so its table takes each pool's top-k choice once
(``topk_mask``, the rule ``TopK.select`` applies) and accumulates counts over growing prefixes, and stores no
proxies (those of top-k are 1, 1, 0, 0 by definition).

Sampling (``ActivityTable.draw``). A token count on the grid draws one of its samples uniformly: the whole
iteration's sample, every layer from the same batch, so the correlation between layers is kept. Between two grid
sizes ``lo < n < hi`` it takes ``hi`` with probability ``(n - lo) / (hi - lo)``, else ``lo``, so the mean of any
statistic is interpolated linearly between the grid points; the sample's assignments (per rank too) are rescaled
by ``n / size`` (every policy assigns about ``top_k`` experts per token, so assignments scale with tokens) and
its distinct experts are kept as they are (they do not scale). Each iteration's draw takes a pair of uniforms
from its instance's ``UniformStream``, the next pair not yet used, so that the engine draws the iterations of a
decode run together, in one indexing of the table, and the draws are the same whether it groups iterations into
decode runs or steps them one by one.

Where it departs from exact mode (measured in README, "Statistical routing mode"):

* interpolation: distinct experts grow concavely with the batch, so between grid points (at most 10% apart
  above 16 tokens) the linear mixture slightly underestimates the mean, and the per-layer spread is that of a
  neighbouring size; proxies are taken from the neighbour as they are;
* composition: a table batch is as many decode tokens as an iteration may hold plus one prefill chunk; a real
  mixed iteration usually holds fewer decodes, and chunks of several prompts (whole prompts without chunked
  prefill), so its tokens are a little more or less related than the table's; and successive iterations of one
  simulation draw independent samples, where in exact mode they share their running requests;
* pairing: exact mode gives every policy the same logits per token; here policies' tables are built from the
  same tokens (same seed) and the engine's draws are seeded alike, but they coincide only while the policies'
  iterations have the same token counts.

Caching (``lynxsim.routing.table_cache``). A table is a function of its policy's code as well as of its name and
parameters, and a plug-in's author edits the code under an unchanged name: a table cached by name and parameters
alone came back after such an edit (5.25 experts per layer reported for a policy that now picks 3.88). So the
cache key holds ``code_digest(policy)`` too.
"""

from __future__ import annotations

import bisect
import hashlib
import importlib.util
import inspect
import itertools
import pkgutil
import sys
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from lynxsim import __version__
from lynxsim.datatypes import ExpertActivity
from lynxsim.policies import Policy, TopK
from lynxsim.policies.kernels import route_counts
from lynxsim.policies.proxies import QualityProxies
from lynxsim.policies.topk import topk_mask
from lynxsim.routing.base import RoutingSource

TABLE_REQUEST_ID_BASE = 1 << 41
"""First request id of table tokens: above any workload's ids and the calibration sample's (from ``1 << 40``)."""
TABLE_REQUEST_ID_STRIDE = 1 << 24
"""Request ids of one sample's pool: ``base + sample * stride + [0, pool size)``; a pool is at most this long."""
TABLE_POSITIONS = 2048
"""Table tokens sit at positions drawn uniformly in ``[0, TABLE_POSITIONS)`` of their request."""
DEFAULT_SAMPLES = 64
EXACT_SIZES_UP_TO = 16
"""Every batch size up to this is on the grid: that is where distinct experts change fastest with the batch."""
GRID_STEP = 0.10
"""Relative step of the grid above ``EXACT_SIZES_UP_TO``."""
LOGITS_CHUNK_BYTES = 256 * 2**20
"""Most float32 logits routed in one ``logits`` call while building (one sample's pool at the least)."""

_PROXY_FIELDS = QualityProxies._fields


def default_sizes(largest: int) -> np.ndarray:
    """The default grid of batch sizes (tokens): every size ``1 .. 16``, then steps of about 10% up to
    ``largest``, which is always the last point. 67 sizes for ``largest`` 2048, 45 for 256."""
    if largest < 1:
        raise ValueError(f"the largest batch must hold at least one token, got {largest}")
    sizes = list(range(1, min(EXACT_SIZES_UP_TO, largest) + 1))
    size = sizes[-1]
    while size < largest:
        size = min(largest, max(size + 1, round(size * (1.0 + GRID_STEP))))
        sizes.append(size)
    return np.asarray(sizes, dtype=np.int64)


def _read_only(array: np.ndarray | None) -> np.ndarray | None:
    if array is not None:
        array.flags.writeable = False
    return array


@dataclass(frozen=True, eq=False)  # arrays have no truth value: tables compare by identity
class ActivityTable:
    """Per-MoE-layer expert activity and quality proxies of ``samples`` batches at each size of ``sizes``.

    Arrays are indexed ``[size index, sample, layer]`` (``[..., rank]`` for the per-EP-rank arrays, present
    when the cost model places experts on ranks). ``proxies`` stacks the four ``QualityProxies`` fields first;
    ``None`` for the top-k policy, whose proxies are the reference values. Arrays are made read-only: ``sample``
    returns views of them.
    """

    policy: str
    sizes: np.ndarray  # int64 [sizes], strictly increasing
    distinct: np.ndarray  # int16 [sizes, samples, layers]
    assignments: np.ndarray  # int32 [sizes, samples, layers]
    rank_distinct: np.ndarray | None  # int16 [sizes, samples, layers, ranks]
    rank_assignments: np.ndarray | None  # int32 [sizes, samples, layers, ranks]
    proxies: np.ndarray | None  # float64 [4, sizes, samples, layers]
    build_s: float
    from_cache: bool = False  # read from lynxsim.routing.table_cache rather than built by this run
    _size_list: list[int] = field(init=False, repr=False)
    _topk_proxies_array: np.ndarray = field(init=False, repr=False)  # [4, layers]: top-k's proxies, by definition
    _flat: dict[str, np.ndarray] = field(init=False, repr=False)  # the arrays as [sizes * samples, ...] views

    def __post_init__(self) -> None:
        sizes = [int(s) for s in self.sizes]
        if not sizes or sizes[0] < 1 or any(b <= a for a, b in itertools.pairwise(sizes)):
            raise ValueError(f"sizes must be strictly increasing positive token counts, got {sizes}")
        if self.distinct.shape[0] != len(sizes) or self.assignments.shape != self.distinct.shape:
            raise ValueError(
                f"distinct {self.distinct.shape} and assignments {self.assignments.shape} must both be "
                f"[{len(sizes)} sizes, samples, layers]"
            )
        if (self.rank_distinct is None) != (self.rank_assignments is None):
            raise ValueError("rank_distinct and rank_assignments come together (expert parallelism) or not at all")
        for array in (self.sizes, self.distinct, self.assignments, self.rank_distinct, self.rank_assignments,
                      self.proxies):
            _read_only(array)
        object.__setattr__(self, "_size_list", sizes)
        reference = QualityProxies.of_topk(self.num_layers)
        object.__setattr__(self, "_topk_proxies_array", _read_only(np.stack(reference)))
        rows = len(sizes) * self.samples
        flat = {name: getattr(self, name).reshape(rows, *getattr(self, name).shape[2:])
                for name in ("distinct", "assignments", "rank_distinct", "rank_assignments")
                if getattr(self, name) is not None}
        if self.proxies is not None:
            flat["proxies"] = self.proxies.reshape(len(_PROXY_FIELDS), rows, self.num_layers)
        object.__setattr__(self, "_flat", flat)

    @property
    def samples(self) -> int:
        return int(self.distinct.shape[1])

    @property
    def num_layers(self) -> int:
        return int(self.distinct.shape[2])

    @property
    def largest(self) -> int:
        """The most tokens ``draw`` accepts."""
        return self._size_list[-1]

    @property
    def nbytes(self) -> int:
        """Memory the table's arrays hold."""
        arrays = (self.sizes, self.distinct, self.assignments, self.rank_distinct, self.rank_assignments, self.proxies)
        return sum(a.nbytes for a in arrays if a is not None)

    def draw(self, num_tokens: int, uniforms: np.ndarray) -> ActivityDraws:
        """Iterations of ``num_tokens`` tokens each, one per row of ``uniforms`` (``[iterations, 2]``, in
        ``[0, 1)``): each a whole sample of a grid size (the size itself, or between two grid sizes the upper one
        when ``uniforms[:, 0]`` falls below the position between them, else the lower one), sample
        ``uniforms[:, 1] * samples`` of it, assignments rescaled to ``num_tokens`` (see the module docstring).
        ``ValueError`` outside ``[1, largest]``."""
        sizes = self._size_list
        if not 1 <= num_tokens <= sizes[-1]:
            raise ValueError(f"the table covers 1 to {sizes[-1]} tokens per iteration, got {num_tokens}")
        index = bisect.bisect_left(sizes, num_tokens)
        size = sizes[index]
        lower = sizes[index - 1] if size != num_tokens else size
        samples = self.samples
        # Rows of the tables flattened to [sizes * samples, ...], one per iteration (a few: a Python loop is
        # cheaper than numpy's per-call overhead), then one ``take`` per array reads every iteration.
        rows: list[int] = []
        scales: list[float] = []
        for u_size, u_sample in uniforms.tolist():
            if size != num_tokens and u_size * (size - lower) >= num_tokens - lower:  # lower: 1 - (n - lo) / (hi - lo)
                rows.append((index - 1) * samples + int(u_sample * samples))
                scales.append(num_tokens / lower)
            else:
                rows.append(index * samples + int(u_sample * samples))
                scales.append(num_tokens / size)
        scale = None if size == num_tokens else np.array(scales)[:, None]
        flat = self._flat
        distinct = flat["distinct"].take(rows, axis=0)
        assignments = flat["assignments"].take(rows, axis=0)
        rank_distinct = rank_assignments = None
        if "rank_distinct" in flat:
            rank_distinct = flat["rank_distinct"].take(rows, axis=0)
            rank_assignments = flat["rank_assignments"].take(rows, axis=0)
        if scale is not None:
            # A distinct expert holds at least one assignment, however the rescaling rounds.
            assignments = np.maximum(np.rint(assignments * scale).astype(np.int64), distinct)
            if rank_distinct is not None and rank_assignments is not None:
                rank_assignments = np.maximum(
                    np.rint(rank_assignments * scale[:, :, None]).astype(np.int64), rank_distinct
                )
        activities = [
            ExpertActivity(distinct[k], assignments[k],
                           None if rank_distinct is None else rank_distinct[k],
                           None if rank_assignments is None else rank_assignments[k])
            for k in range(len(rows))
        ]
        proxies = self._topk_proxies_array[:, None, :] if self.proxies is None else flat["proxies"].take(rows, axis=1)
        return ActivityDraws(activities, distinct, proxies)


class ActivityDraws(NamedTuple):
    """Iterations drawn from a table: each one's expert activity, and all of theirs distinct experts
    (``[iterations, layers]``) and quality proxies (``[4, iterations, layers]``, the ``QualityProxies`` fields
    in order; ``[4, 1, layers]`` where every iteration has the same, top-k's) stacked, as the engine records
    them."""

    activities: list[ExpertActivity]
    distinct: np.ndarray
    proxies: np.ndarray


class UniformStream:
    """The statistical mode's random numbers for one serving instance: a pair of uniforms in ``[0, 1)`` per
    simulated iteration, generated ahead in blocks. An iteration's pair is the next one not yet used, so the
    draws of iterations planned but not simulated (a decode run cut short by an arrival) pass on to the
    iterations that happen: a run's numbers do not depend on how the engine groups its iterations."""

    BLOCK = 1024

    def __init__(self, rng: np.random.Generator) -> None:
        self._rng = rng
        self._buffer = np.zeros((0, 2))
        self._next = 0

    def peek(self, count: int) -> np.ndarray:
        """The next ``count`` pairs (``[count, 2]``), left unused until ``advance``."""
        if self._next + count > self._buffer.shape[0]:
            fresh = self._rng.random((max(self.BLOCK, count), 2))
            self._buffer = np.concatenate((self._buffer[self._next :], fresh))
            self._next = 0
        return self._buffer[self._next : self._next + count]

    def advance(self, count: int) -> None:
        """Mark the next ``count`` pairs used."""
        self._next += count


@dataclass(frozen=True, eq=False)
class StatisticalRouting:
    """What an engine in statistical mode holds instead of routing: the policy's table, for the iterations the
    policy applies to, and the top-k baseline's, for the others (mixed prefill/decode iterations under a
    decode-only policy; ``None`` when the policy applies to every iteration). The random draws are the engine's
    (one generator per instance), so that a run is reproducible whatever the instances' order of iterations."""

    policy: ActivityTable
    baseline: ActivityTable | None

    def draw(self, num_tokens: int, applied: bool, uniforms: np.ndarray) -> ActivityDraws:
        """Iterations of ``num_tokens`` tokens, one per row of ``uniforms`` (``ActivityTable.draw``), from the
        policy's table where it ``applied``, else from the baseline's."""
        if applied:
            return self.policy.draw(num_tokens, uniforms)
        if self.baseline is None:
            raise ValueError("this statistical routing has no baseline table: its policy applies to every iteration")
        return self.baseline.draw(num_tokens, uniforms)


def build_activity_table(
    routing: RoutingSource,
    policy: Policy,
    *,
    top_k: int,
    renormalize: bool,
    activity: Callable[[np.ndarray], ExpertActivity],
    sizes: Sequence[int] | np.ndarray,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    num_experts: int,
    max_sequences: int | None = None,
    logits_chunk_bytes: int = LOGITS_CHUNK_BYTES,
) -> ActivityTable:
    """Route ``samples`` batches of every size of ``sizes`` through ``routing`` and ``policy`` and tabulate what
    ``activity`` (the cost model's ``activity`` method) makes of their tokens per expert, with the quality
    proxies (module docstring). A batch holds one token from each of up to ``max_sequences`` requests (default:
    every token its own request), then one request's prefill chunk. ``seed`` draws the tokens' positions: the same
    seed gives the same tokens, so tables of several policies built with one seed see the same batches.
    ``build_s`` is the wall time taken."""
    started = time.perf_counter()
    size_array = np.array(sizes, dtype=np.int64)  # a copy: the table makes it read-only
    grid = [int(s) for s in size_array]
    if not grid or grid[0] < 1 or any(b <= a for a, b in itertools.pairwise(grid)):
        raise ValueError(f"sizes must be strictly increasing positive token counts, got {grid}")
    pool = grid[-1]
    if pool > TABLE_REQUEST_ID_STRIDE:
        raise ValueError(f"the largest size, {pool} tokens, exceeds the {TABLE_REQUEST_ID_STRIDE} a table supports")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    sequences = pool if max_sequences is None else min(pool, max_sequences)
    if sequences < 1:
        raise ValueError(f"max_sequences must be >= 1, got {max_sequences}")
    if routing.num_experts != num_experts:
        raise ValueError(f"the routing source has {routing.num_experts} experts, the model {num_experts}")
    layers = routing.num_moe_layers
    tokenwise = isinstance(policy, TopK)
    shape = (len(grid), samples, layers)
    distinct = np.zeros(shape, dtype=np.int16)
    assignments = np.zeros(shape, dtype=np.int32)
    proxies = None if tokenwise else np.zeros((len(_PROXY_FIELDS), *shape), dtype=np.float64)
    ranks: list[np.ndarray] = []  # rank_distinct, rank_assignments once the first activity shows ranks

    def store(g: int, s: int, act: ExpertActivity) -> None:
        distinct[g, s] = act.distinct
        assignments[g, s] = act.assignments
        if act.rank_distinct is not None and act.rank_assignments is not None:
            if not ranks:
                num_ranks = act.rank_distinct.shape[-1]
                ranks.extend((np.zeros((*shape, num_ranks), dtype=np.int16),
                              np.zeros((*shape, num_ranks), dtype=np.int32)))
            ranks[0][g, s] = act.rank_distinct
            ranks[1][g, s] = act.rank_assignments

    bytes_per_pool = layers * pool * num_experts * 4
    per_call = max(1, min(samples, logits_chunk_bytes // max(1, bytes_per_pool)))
    for first in range(0, samples, per_call):
        chunk = range(first, min(samples, first + per_call))
        request_ids = np.concatenate([_pool_requests(s, pool, sequences) for s in chunk])
        positions = np.concatenate([_pool_positions(seed, s, pool, sequences) for s in chunk])
        logits = routing.logits(request_ids, positions)
        for offset, s in enumerate(chunk):
            tokens = logits[:, offset * pool : (offset + 1) * pool]
            if tokenwise:
                # Which experts each token picks is all the counts need: no weights, no ids in order.
                chosen = topk_mask(tokens, top_k)
                counts = np.zeros((layers, num_experts), dtype=np.int64)
                done = 0
                for g, size in enumerate(grid):  # counts of each prefix, grown from the previous one
                    counts += np.count_nonzero(chosen[:, done:size], axis=1)
                    done = size
                    store(g, s, activity(counts))
                continue
            assert proxies is not None
            for g, size in enumerate(grid):
                counts, scored = route_counts(tokens[:, :size], policy, top_k, renormalize)
                store(g, s, activity(counts))
                proxies[:, g, s] = scored
    return ActivityTable(
        policy=policy.name,
        sizes=size_array,
        distinct=distinct,
        assignments=assignments,
        rank_distinct=ranks[0] if ranks else None,
        rank_assignments=ranks[1] if ranks else None,
        proxies=proxies,
        build_s=time.perf_counter() - started,
    )


def _pool_requests(sample: int, pool: int, sequences: int) -> np.ndarray:
    """Request ids of a sample's pool: one per decode token, then the chunk's request (the next id) repeated."""
    ids = TABLE_REQUEST_ID_BASE + sample * TABLE_REQUEST_ID_STRIDE + np.arange(pool, dtype=np.int64)
    if sequences < pool:
        ids[sequences:] = ids[sequences]
    return ids


def _pool_positions(seed: int, sample: int, pool: int, sequences: int) -> np.ndarray:
    """Positions of a sample's pool: drawn for the decode tokens; the chunk's consecutive from a drawn start."""
    drawn = np.random.default_rng([seed, sample]).integers(0, TABLE_POSITIONS, size=sequences + 1, dtype=np.int64)
    return np.concatenate([drawn[:sequences], drawn[sequences] + np.arange(pool - sequences, dtype=np.int64)])


def code_digest(component: object) -> str:
    """32 hex digits naming the code that ``component`` (a policy) runs, for the key of a table built by running
    it. Hashed: lynxsim's version (an upgrade may change a built-in policy, or the lynxsim code a plug-in calls);
    for every class of its type's MRO outside the standard library, the source of its module and of the other
    modules of that module's package folder (where a policy's helpers live: lynxsim's own policies are tabulated
    by the numba kernels beside them), or the class's own source where its module has none on file (a notebook);
    and the bytecode of each such class's functions, which is what this process runs, so that a class edited on
    disk but not re-imported does not key a table of its old code by its new source. What the code imports from
    elsewhere is not hashed (lynxsim's own code is covered by its version)."""
    classes = [c for c in type(component).__mro__ if c.__module__.partition(".")[0] not in sys.stdlib_module_names]
    sources: dict[str, str] = {}
    for kind in classes:
        found = _module_sources(kind.__module__)
        sources.update(found or {f"{kind.__module__}:{kind.__qualname__}": _class_source(kind)})
    sha = hashlib.sha256(f"lynxsim {__version__}".encode())
    for name, source in sorted(sources.items()):
        sha.update(f"\0source {name}\0{source}".encode())
    for kind in classes:
        for attribute, value in sorted(vars(kind).items()):
            for function in _functions(value):
                sha.update(f"\0code {kind.__qualname__}.{attribute}\0".encode())
                _hash_code(sha, function.__code__)
    return sha.hexdigest()[:32]


def _module_sources(module: str) -> dict[str, str]:
    """Source text by module name: of ``module`` and, if it is part of a package, of every module of the package's
    folder (not its subfolders); empty where no source is on file (``__main__`` of a notebook), or where the module
    was never imported (a class made by ``exec``: a file of its module's name would be another's code)."""
    loaded = sys.modules.get(module)
    if loaded is None:
        return {}
    parent = sys.modules.get(loaded.__package__) if loaded.__package__ else None
    names = [module]
    if parent is not None and hasattr(parent, "__path__"):
        names = [parent.__name__, *(f"{parent.__name__}.{info.name}" for info in pkgutil.iter_modules(parent.__path__))]
    sources = {name: _source(name) for name in sorted(set(names))}
    return {name: source for name, source in sources.items() if source is not None}


def _source(module: str) -> str | None:
    """A module's source as its loader reads it from disk now (``None`` where it has none), without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):  # ValueError: a module without a spec (``__main__`` of an interpreter)
        return None
    get_source = getattr(spec.loader, "get_source", None) if spec is not None else None
    try:
        source: str | None = get_source(module) if get_source is not None else None
    except (ImportError, OSError):
        return None
    return source


def _class_source(kind: type) -> str:
    try:
        return inspect.getsource(kind)
    except (OSError, TypeError):  # no source at all: the bytecode alone names the code
        return ""


def _functions(attribute: Any) -> list[types.FunctionType]:
    """The Python functions behind a class attribute: a method, a static or class method, a property's accessors,
    each unwrapped from decorators such as ``functools.cache``."""
    if isinstance(attribute, (staticmethod, classmethod)):
        attribute = attribute.__func__
    candidates = [attribute.fget, attribute.fset, attribute.fdel] if isinstance(attribute, property) else [attribute]
    unwrapped = [inspect.unwrap(c) for c in candidates if callable(c)]
    return [f for f in unwrapped if isinstance(f, types.FunctionType)]


def _hash_code(sha: hashlib._Hash, code: types.CodeType) -> None:
    """A code object's instructions, the names it uses and its constants (nested functions' code recursively)."""
    sha.update(code.co_code)
    sha.update(repr(code.co_names).encode())
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            _hash_code(sha, constant)
        else:
            sha.update(_constant_text(constant).encode())


def _constant_text(constant: object) -> str:
    """``repr`` of a code constant, a frozenset's members sorted (their order follows string hashing, which
    differs between processes)."""
    if isinstance(constant, frozenset):
        return "frozenset(" + ", ".join(sorted(_constant_text(c) for c in constant)) + ")"
    if isinstance(constant, tuple):
        return "(" + ", ".join(_constant_text(c) for c in constant) + ")"
    return repr(constant)
