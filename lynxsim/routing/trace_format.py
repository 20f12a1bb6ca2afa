"""lynxsim's on-disk routing-trace format, and the fill-in of logits that top-k-only recordings lack.

A trace is one ``.npz`` file (``numpy.savez_compressed``) holding these arrays (E experts, k kept per token):

* ``logits``: float16 or float32 ``[layers, tokens, E]``, router logits of every expert (up to an additive
  constant per token; lynxsim writes log-probabilities); *or*, for sources that kept only each token's top-k:
* ``topk_ids``: int16 ``[layers, tokens, k]``, the experts the router selected, and
  ``topk_probs``: float32 ``[layers, tokens, k]``, their router softmax probabilities (over all E experts), so
  the other E - k experts together had 1 - their sum;
* ``sequence_ids``, ``positions``: int32 ``[tokens]``, the sequence of each token and its position in it
  ((sequence, position) pairs are unique; positions >= 0);
* ``layer_ids``: int32 ``[layers]``, the model's own index of each MoE layer;
* ``meta``: a 0-d unicode array holding a JSON object: ``format_version`` (1), ``name``, ``source``,
  ``license``, ``model``, ``notes`` (strings) and ``num_experts`` (E, an integer).

A file holds exactly one of the two forms. The top-k form stores only what was recorded: filled-in logits are
never written back, so a file cannot pass an assumption off as data. Files are read with ``allow_pickle=False``.

Filling in a top-k-only trace
-----------------------------
A policy such as Lynx looks at every expert's logit, so the ``E - k`` experts a recording left out need values.
Only two facts about them are known: together they had the remaining mass ``r = 1 - sum(top-k probabilities)``,
and each had at most the k-th probability ``p_k`` (the router did not choose them). Every strategy below keeps
both facts, so ``softmax(filled logits)`` gives back the recorded top-k probabilities and the recorded top-k ids;
they differ only in how ``r`` is shared out, which is exactly what is unknown. Logits are log-probabilities
(the softmax of ``log p`` is ``p``). Each strategy is a pure, deterministic function of the file's contents.

* ``uniform``: ``r`` spread evenly, every missing expert at ``r / (E - k)``. The flattest tail the mass allows;
  all missing experts exactly tied, so wherever a policy picks among them the lower expert id wins every time,
  a bias toward low ids that real routers do not have.
* ``tail`` (the default): a geometric tail below ``p_k``: the missing experts get ``p_k * rho**j`` for
  ``j = 1 .. E - k``, with ``rho`` in (0, 1) solved per token so that they sum to ``r``. Which missing expert
  gets which place ``j`` is decided by a hash of (layer id, sequence id, position, expert), so no expert is
  systematically favoured and a token's order is unrelated to its neighbours'. The default because it continues
  the decay the recorded probabilities already show, without exact ties: in the FLAME-MoE-290M trace the
  solved ``rho`` has per-layer medians 0.92-0.99, just above the recorded ratios of neighbouring ranks
  (median ``p_6 / p_5`` 0.86-0.99), as the gaps between the sorted softmax values of a router keep narrowing
  down the ranking. And it is the one that reproduces the truth where the truth is known
  (``benchmarks/fill_sensitivity.py``): lynxsim's synthetic router, cut to its top-6 of 64 experts and filled
  in again, gives Lynx (alpha 3, beta 2, batch 16) within 1.4 distinct experts per layer and 0.006 retained
  mass of its result on the complete logits, for top-6 masses 0.18-0.67; ``uniform`` and ``floor`` overstate
  the distinct experts by up to 11 (of 38) in the flattest routers and misstate the retained mass by up to 0.06.
* ``floor``: adversarial for batch-aware selection: as many missing experts as the mass allows sit at
  ``FLOOR_FACTOR * p_k`` (0.5: nearly tied with the k-th; which ones by the same hash as ``tail``) and the
  rest share what is left evenly; when ``r`` exceeds ``(E - k) * FLOOR_FACTOR * p_k`` every missing expert is at
  ``r / (E - k)``, closer still. Lynx bins logits by their gap to the token's best, so a block of runner-ups
  tied near ``p_k`` gives it the most room to move assignments among equals, for small ``alpha`` (Mixtral's
  0.7 and 1: bins 1.4 and 1 nat wide). At ``alpha = 3, beta = 2`` Lynx keeps the same experts as under
  ``uniform`` (measured on FLAME-MoE): an expert at ``0.5 * p_k`` is at least log 2 = 0.69 nats below the
  token's best, in the deepest bin (edge 2/3 nat), and so are ``uniform``'s wherever the two differ. Putting
  *every* missing expert at ``0.5 * p_k`` whatever ``r`` is would change the recorded probabilities, so it is
  not done.

Two guards keep the logits well-formed if a file's numbers are inconsistent, which rounding of stored
probabilities can cause but a real router cannot: no missing expert gets more than ``p_k * (1 - 1e-3)`` (it must
never outrank or tie a recorded expert) nor less than ``1e-30`` (its log-probability stays finite). Where a guard
binds, the filled probabilities no longer sum to 1 and the softmax rescales the recorded ones slightly.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lynxsim.errors import InputError
from lynxsim.routing.hashing import combine, derive_key
from lynxsim.routing.trace import RoutingTrace

FORMAT_VERSION = 1
"""The ``format_version`` this module writes and the only one it reads."""

FillStrategy = Literal["uniform", "tail", "floor"]
FILL_STRATEGIES: tuple[FillStrategy, ...] = ("tail", "uniform", "floor")
"""Every fill strategy, the default first."""

DEFAULT_FILL: FillStrategy = "tail"

FLOOR_FACTOR = 0.5
"""``floor`` puts missing experts at this fraction of the k-th probability: log 2 = 0.69 nats below it."""

_BELOW_KTH = 1.0 - 1e-3
"""A missing expert's probability is at most this fraction of the k-th one: far enough below it that the two
float32 log-probabilities differ (by 1e-3 nats, against float32 steps of about 4e-6 at ``|log p| <= 69``)."""

_MIN_PROB = 1e-30
"""Smallest filled probability: its log, -69, is finite in float32 and its softmax weight negligible."""

_TAIL_STREAM = 0x7A11
"""Hash stream of the fill order (a fixed key, not a seed: the fill is a function of the file alone)."""

_TAIL_BISECTION_STEPS = 64
"""Bisection halvings of rho's interval (0, 1): 2**-64 is below float64's resolution near 1."""

_META_STRINGS = ("name", "source", "license", "model", "notes")

_ARRAYS = ("logits", "topk_ids", "topk_probs", "sequence_ids", "positions", "layer_ids", "meta")


@dataclass(frozen=True)
class TopKTrace:
    """A recording that kept only each token's top-k router choices: the top-k form of a trace file, in memory.

    ``topk_ids[l, t]`` are the k experts token ``t`` chose at MoE layer ``l`` and ``topk_probs[l, t]`` their
    router softmax probabilities over all ``num_experts`` experts. ``filled`` turns it into the ``RoutingTrace``
    every consumer uses. Invalid contents raise ``ValueError`` naming the array.
    """

    name: str
    source: str
    license: str
    model: str
    notes: str
    num_experts: int
    topk_ids: np.ndarray  # int [layers, tokens, k]
    topk_probs: np.ndarray  # float [layers, tokens, k]
    sequence_ids: np.ndarray  # int [tokens]
    positions: np.ndarray  # int [tokens]
    layer_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        problem = _topk_trace_problem(
            self.topk_ids, self.topk_probs, self.num_experts, self.sequence_ids, self.positions, self.layer_ids
        )
        if problem is not None:
            raise ValueError(problem)

    @property
    def top_k(self) -> int:
        return int(self.topk_ids.shape[2])

    def filled(self, fill: FillStrategy = DEFAULT_FILL) -> RoutingTrace:
        """The ``RoutingTrace`` with the missing logits filled in by ``fill`` (see the module docstring)."""
        logits = fill_logits(
            self.topk_ids,
            self.topk_probs,
            self.num_experts,
            fill=fill,
            sequence_ids=self.sequence_ids,
            positions=self.positions,
            layer_ids=self.layer_ids,
        )
        return RoutingTrace(
            name=self.name,
            source=self.source,
            logits=logits,
            sequence_ids=np.asarray(self.sequence_ids, dtype=np.int64),
            positions=np.asarray(self.positions, dtype=np.int64),
            layer_ids=tuple(self.layer_ids),
            recorded_top_k=self.top_k,
            fill=fill,
            license=self.license,
            model=self.model,
            notes=self.notes,
        )


def fill_logits(
    topk_ids: np.ndarray,
    topk_probs: np.ndarray,
    num_experts: int,
    *,
    fill: FillStrategy = DEFAULT_FILL,
    sequence_ids: np.ndarray,
    positions: np.ndarray,
    layer_ids: tuple[int, ...] | np.ndarray,
) -> np.ndarray:
    """Float32 log-probabilities ``[layers, tokens, num_experts]`` of a top-k recording, the missing ones filled.

    The recorded experts get ``log(topk_probs)``; the others get ``fill`` (module docstring). The token names
    (``sequence_ids``, ``positions``, ``layer_ids``) only seed the hash that orders ``tail`` and ``floor``.
    """
    problem = _topk_trace_problem(topk_ids, topk_probs, num_experts, sequence_ids, positions, layer_ids)
    if problem is not None:
        raise ValueError(problem)
    if fill not in FILL_STRATEGIES:
        raise ValueError(f"unknown fill {fill!r}; known fills: {', '.join(FILL_STRATEGIES)}")
    ids = np.asarray(topk_ids, dtype=np.int64)
    probs = np.asarray(topk_probs, dtype=np.float64)
    num_layers, num_tokens, _ = ids.shape
    token_keys = combine(
        combine(derive_key(0, _TAIL_STREAM), np.asarray(sequence_ids, dtype=np.int64)),
        np.asarray(positions, dtype=np.int64),
    )
    out = np.empty((num_layers, num_tokens, num_experts), dtype=np.float32)
    # One layer at a time: a layer's temporaries are [tokens, experts], so memory stays bounded on long traces.
    for layer, layer_id in enumerate(np.asarray(layer_ids, dtype=np.int64)):
        out[layer] = _fill_layer(ids[layer], probs[layer], num_experts, fill, combine(token_keys, layer_id))
    return out


def _fill_layer(
    ids: np.ndarray, probs: np.ndarray, num_experts: int, fill: FillStrategy, token_keys: np.ndarray
) -> np.ndarray:
    """``fill_logits`` for one layer: ids and probabilities ``[T, k]``, one hash key per token ``[T]``."""
    out = np.empty((ids.shape[0], num_experts), dtype=np.float64)
    missing_count = num_experts - ids.shape[1]
    if missing_count > 0:
        kth = probs.min(axis=-1, keepdims=True)
        remaining = 1.0 - probs.sum(axis=-1, keepdims=True)
        if fill == "uniform":
            out[:] = remaining / missing_count
        else:
            rank = _tail_ranks(ids, num_experts, token_keys)
            if fill == "tail":
                rho = _tail_ratio(remaining / kth, missing_count)
                out[:] = kth * rho ** (rank + 1.0)
            else:
                floor = FLOOR_FACTOR * kth
                spread = remaining / missing_count
                at_floor = np.minimum(np.floor(np.maximum(remaining, 0.0) / floor), missing_count)
                rest = (remaining - at_floor * floor) / np.maximum(missing_count - at_floor, 1.0)
                out[:] = np.where(spread >= floor, spread, np.where(rank < at_floor, floor, rest))
        np.clip(out, _MIN_PROB, kth * _BELOW_KTH, out=out)
    np.put_along_axis(out, ids, probs, axis=-1)
    return np.log(out)


def _tail_ranks(ids: np.ndarray, num_experts: int, token_keys: np.ndarray) -> np.ndarray:
    """float64 ``[T, E]``: each missing expert's place 0 .. m-1 in its token's tail, ordered by the hash of
    (token key, expert). Recorded experts get the largest hash, so they sort after every missing one (their
    ranks, m and up, are overwritten by the recorded values)."""
    keys = combine(token_keys[:, None], np.arange(num_experts, dtype=np.int64)[None, :])
    np.put_along_axis(keys, ids, np.uint64(np.iinfo(np.uint64).max), axis=-1)
    order = np.argsort(keys, axis=-1, kind="stable")
    rank = np.empty(keys.shape, dtype=np.float64)
    np.put_along_axis(rank, order, np.arange(num_experts, dtype=np.float64)[None, :], axis=-1)
    return rank


def _tail_ratio(target: np.ndarray, terms: int) -> np.ndarray:
    """``rho`` in [0, 1) with ``rho + rho**2 + ... + rho**terms = target`` (elementwise; float64).

    The sum rises from 0 at rho = 0 to ``terms`` at rho = 1, so bisection finds the root; targets outside
    (0, terms), which only inconsistent files give, end at the nearest end. The sum is evaluated as
    ``rho * expm1(terms * log rho) / expm1(log rho)``, which keeps its precision near rho = 1.
    """
    low = np.zeros_like(target)
    high = np.ones_like(target)
    with np.errstate(divide="ignore", invalid="ignore"):
        for _ in range(_TAIL_BISECTION_STEPS):
            mid = 0.5 * (low + high)
            log_mid = np.log(mid)
            total = mid * np.expm1(terms * log_mid) / np.expm1(log_mid)
            below = total < target
            low = np.where(below, mid, low)
            high = np.where(below, high, mid)
    return low


def save_trace(
    trace: RoutingTrace | TopKTrace, path: str | Path, *, logits_dtype: Literal["float32", "float16"] = "float32"
) -> Path:
    """Write ``trace`` to ``path`` (``.npz``) in lynxsim's format; returns the path written.

    A ``TopKTrace``, or a ``RoutingTrace`` whose ``recorded_top_k`` is set, is written in the top-k form: only
    the recorded ids and probabilities, recovered from the filled logits by their softmax (which the fill
    strategies keep exact), never the filled values. Other traces are written as ``logits`` in ``logits_dtype``
    (float16 halves the file and keeps about 3 significant digits).
    """
    target = Path(path)
    if isinstance(trace, RoutingTrace) and trace.recorded_top_k is not None:
        trace = _recorded_topk(trace, trace.recorded_top_k)
    int32 = np.iinfo(np.int32)
    for name, values in (("sequence_ids", trace.sequence_ids), ("positions", trace.positions)):
        if np.size(values) and (np.min(values) < int32.min or np.max(values) > int32.max):
            raise ValueError(f"{name} must fit in int32, the format's dtype")
    meta = {
        "format_version": FORMAT_VERSION,
        "name": trace.name,
        "source": trace.source,
        "license": trace.license,
        "model": trace.model,
        "num_experts": trace.num_experts,
        "notes": trace.notes,
    }
    arrays: dict[str, Any] = {
        "sequence_ids": np.asarray(trace.sequence_ids, dtype=np.int32),
        "positions": np.asarray(trace.positions, dtype=np.int32),
        "layer_ids": np.asarray(trace.layer_ids, dtype=np.int32),
        "meta": np.array(json.dumps(meta)),
    }
    if isinstance(trace, TopKTrace):
        if trace.num_experts > np.iinfo(np.int16).max + 1:
            raise ValueError(f"the top-k form stores int16 expert ids; {trace.num_experts} experts do not fit")
        arrays["topk_ids"] = np.asarray(trace.topk_ids, dtype=np.int16)
        arrays["topk_probs"] = np.asarray(trace.topk_probs, dtype=np.float32)
    else:
        if logits_dtype not in ("float32", "float16"):
            raise ValueError(f"logits_dtype must be 'float32' or 'float16', got {logits_dtype!r}")
        arrays["logits"] = np.asarray(trace.logits, dtype=logits_dtype)
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("wb") as handle:  # a file handle, so numpy does not append ".npz" to the name
        np.savez_compressed(handle, **arrays)
    return target


def _recorded_topk(trace: RoutingTrace, k: int) -> TopKTrace:
    """The recorded part of a filled trace: its top-k ids (ties: lower id) and their softmax probabilities."""
    x = trace.logits.astype(np.float64)
    ids = np.argsort(-x, axis=-1, kind="stable")[..., :k]
    top = x.max(axis=-1, keepdims=True)
    log_z = top + np.log(np.exp(x - top).sum(axis=-1, keepdims=True))
    probs = np.exp(np.take_along_axis(x, ids, axis=-1) - log_z)
    return TopKTrace(
        name=trace.name,
        source=trace.source,
        license=trace.license,
        model=trace.model,
        notes=trace.notes,
        num_experts=trace.num_experts,
        topk_ids=ids,
        topk_probs=probs.astype(np.float32),
        sequence_ids=trace.sequence_ids,
        positions=trace.positions,
        layer_ids=trace.layer_ids,
    )


def load_trace(path: str | Path, *, fill: FillStrategy = DEFAULT_FILL) -> RoutingTrace:
    """Read a lynxsim trace file; a top-k-only file has its missing logits filled in by ``fill``.

    A file that is missing, unreadable, lacks an array, or holds an array of the wrong dtype, shape or values
    raises ``InputError(path, problem)`` naming the array.
    """
    if fill not in FILL_STRATEGIES:
        raise ValueError(f"unknown fill {fill!r}; known fills: {', '.join(FILL_STRATEGIES)}")
    trace = read_trace_file(path)
    return trace.filled(fill) if isinstance(trace, TopKTrace) else trace


def read_trace_file(path: str | Path) -> RoutingTrace | TopKTrace:
    """A trace file as stored: a ``RoutingTrace`` for the logits form, a ``TopKTrace`` (unfilled) for the
    top-k form. Bad files raise ``InputError`` as in ``load_trace``."""
    source = Path(path)
    where = str(source)
    if not source.is_file():
        raise InputError(where, "no such trace file")
    try:
        npz = np.load(source, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(where, f"not a readable .npz trace file ({exc})") from None
    arrays: dict[str, np.ndarray] = {}
    with npz:
        unknown = sorted(set(npz.files) - set(_ARRAYS))
        if unknown:
            raise InputError(where, f"unknown array(s) {', '.join(unknown)}; a trace holds {', '.join(_ARRAYS)}")
        for name in npz.files:
            try:
                arrays[name] = npz[name]
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
                raise InputError(where, f"array '{name}' cannot be read ({exc})") from None

    meta = _read_meta(where, arrays)
    num_experts = meta["num_experts"]
    for name in ("sequence_ids", "positions", "layer_ids"):
        array = _require(where, arrays, name)
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
            raise InputError(where, f"array '{name}' must be 1-D integers, got {array.dtype} {array.shape}")
    sequence_ids = arrays["sequence_ids"].astype(np.int64)
    positions = arrays["positions"].astype(np.int64)
    layer_ids = tuple(int(i) for i in arrays["layer_ids"])

    has_logits = "logits" in arrays
    has_topk = "topk_ids" in arrays or "topk_probs" in arrays
    if has_logits and has_topk:
        raise InputError(where, "holds both array 'logits' and top-k arrays; a trace holds one form")
    if not (has_logits or has_topk):
        raise InputError(where, "missing array 'logits' (or arrays 'topk_ids' and 'topk_probs')")
    if has_logits:
        logits = arrays["logits"]
        if logits.dtype not in (np.float16, np.float32) or logits.ndim != 3:
            raise InputError(where, f"array 'logits' must be float16 or float32 [layers, tokens, experts], "
                             f"got {logits.dtype} {logits.shape}")
        if logits.shape[2] != num_experts:
            raise InputError(where, f"array 'logits' has {logits.shape[2]} experts, meta num_experts is {num_experts}")
        if not np.isfinite(logits).all():
            raise InputError(where, "array 'logits' holds NaN or infinite values")
        shape_problem = _token_names_problem(sequence_ids, positions, logits.shape[1])
        if shape_problem is None and len(layer_ids) != logits.shape[0]:
            shape_problem = f"array 'layer_ids' names {len(layer_ids)} layers, array 'logits' holds {logits.shape[0]}"
        if shape_problem is not None:
            raise InputError(where, shape_problem)
        return RoutingTrace(
            name=meta["name"],
            source=meta["source"],
            logits=logits.astype(np.float32),
            sequence_ids=sequence_ids,
            positions=positions,
            layer_ids=layer_ids,
            license=meta["license"],
            model=meta["model"],
            notes=meta["notes"],
        )
    try:
        return TopKTrace(
            name=meta["name"],
            source=meta["source"],
            license=meta["license"],
            model=meta["model"],
            notes=meta["notes"],
            num_experts=num_experts,
            topk_ids=_require(where, arrays, "topk_ids"),
            topk_probs=_require(where, arrays, "topk_probs"),
            sequence_ids=sequence_ids,
            positions=positions,
            layer_ids=layer_ids,
        )
    except ValueError as exc:
        raise InputError(where, str(exc)) from None


def _require(where: str, arrays: dict[str, np.ndarray], name: str) -> np.ndarray:
    if name not in arrays:
        raise InputError(where, f"missing array '{name}'")
    return arrays[name]


def _read_meta(where: str, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    raw = _require(where, arrays, "meta")
    if raw.ndim != 0 or raw.dtype.kind != "U":
        raise InputError(where, f"array 'meta' must be a JSON string, got {raw.dtype} {raw.shape}")
    try:
        meta = json.loads(str(raw[()]))
    except json.JSONDecodeError as exc:
        raise InputError(where, f"array 'meta' is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise InputError(where, "array 'meta' must be a JSON object")
    if meta.get("format_version") != FORMAT_VERSION:
        raise InputError(where, f"array 'meta': format_version must be {FORMAT_VERSION}, "
                         f"got {meta.get('format_version')!r}")
    for key in _META_STRINGS:
        if not isinstance(meta.get(key), str):
            raise InputError(where, f"array 'meta': '{key}' must be a string, got {meta.get(key)!r}")
    experts = meta.get("num_experts")
    if isinstance(experts, bool) or not isinstance(experts, int) or experts < 2:
        raise InputError(where, f"array 'meta': 'num_experts' must be an integer >= 2, got {experts!r}")
    return meta


def _topk_trace_problem(
    topk_ids: np.ndarray,
    topk_probs: np.ndarray,
    num_experts: int,
    sequence_ids: np.ndarray,
    positions: np.ndarray,
    layer_ids: tuple[int, ...] | np.ndarray,
) -> str | None:
    """What is wrong with a top-k recording and its token and layer names, or None."""
    problem = _topk_problem(topk_ids, topk_probs, num_experts)
    if problem is None:
        problem = _token_names_problem(sequence_ids, positions, np.shape(topk_ids)[1])
    if problem is None and len(layer_ids) != np.shape(topk_ids)[0]:
        problem = f"array 'layer_ids' names {len(layer_ids)} layers, array 'topk_ids' holds {np.shape(topk_ids)[0]}"
    return problem


def _topk_problem(topk_ids: np.ndarray, topk_probs: np.ndarray, num_experts: int) -> str | None:
    """What is wrong with a top-k recording, or None. The checks every fill relies on."""
    ids, probs = np.asarray(topk_ids), np.asarray(topk_probs)
    if ids.ndim != 3 or not np.issubdtype(ids.dtype, np.integer):
        return f"array 'topk_ids' must be integers [layers, tokens, k], got {ids.dtype} {ids.shape}"
    if probs.shape != ids.shape or not np.issubdtype(probs.dtype, np.floating):
        return f"array 'topk_probs' must be floats shaped like topk_ids {ids.shape}, got {probs.dtype} {probs.shape}"
    if not 1 <= ids.shape[2] <= num_experts:
        return f"array 'topk_ids' keeps {ids.shape[2]} experts per token, need 1 to num_experts = {num_experts}"
    if ids.size == 0:
        return None
    if ids.min() < 0 or ids.max() >= num_experts:
        return f"array 'topk_ids' holds ids in [{ids.min()}, {ids.max()}], outside [0, {num_experts})"
    ordered = np.sort(ids, axis=-1)
    if (ordered[..., 1:] == ordered[..., :-1]).any():
        return "array 'topk_ids' repeats an expert within a token"
    if not np.isfinite(probs).all() or probs.min() <= 0.0 or probs.max() > 1.0:
        return "array 'topk_probs' must hold probabilities in (0, 1]"
    largest = float(probs.astype(np.float64).sum(axis=-1).max())
    if largest > 1.0 + 1e-3:
        return f"array 'topk_probs' sums to {largest:.6f} > 1 for some token"
    return None


def _token_names_problem(sequence_ids: np.ndarray, positions: np.ndarray, num_tokens: int) -> str | None:
    """What is wrong with the per-token names of a trace of ``num_tokens`` tokens, or None."""
    for name, array in (("sequence_ids", sequence_ids), ("positions", positions)):
        if np.shape(array) != (num_tokens,):
            return f"array '{name}' must have one entry per token ({num_tokens}), got shape {np.shape(array)}"
    if num_tokens and np.min(positions) < 0:
        return "array 'positions' holds a negative position"
    pairs = np.stack([np.asarray(sequence_ids, dtype=np.int64), np.asarray(positions, dtype=np.int64)], axis=1)
    if np.unique(pairs, axis=0).shape[0] != num_tokens:
        return "arrays 'sequence_ids' and 'positions' name one token twice"
    return None
