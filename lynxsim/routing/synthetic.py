"""A seeded synthetic router: logits with the three structures that decide what batch-aware selection buys.

How many distinct experts a batch activates, and how much routing quality a policy gives up by remapping,
depend on three properties of real routers, each with one parameter here:

* **expert popularity** within a layer (some experts are chosen more often than others): a fixed
  per-(layer, expert) bias ``b[l, e] ~ Normal(0, popularity_skew**2)``;
* **confidence** (how peaked a token's router softmax is; a confident token loses more when moved off its
  top-1): a per-(token, layer) scale ``s[t, l] = mean * exp(spread * n - spread**2 / 2)``, ``n ~ Normal(0, 1)``,
  log-normal with mean ``confidence_mean`` and log-standard-deviation ``confidence_spread``;
* **persistence** (a request's successive tokens tend to reuse its experts): a per-(request, layer, expert)
  latent ``z_req`` shared by all the request's tokens, mixed with fresh per-token noise ``z_tok``.

Together, for token ``t`` = (request ``r``, position ``p``), MoE layer ``l`` and expert ``e``::

    logits[l, t, e] = s[t, l] * (b[l, e] + sqrt(rho) * z_req[r, l, e] + sqrt(1 - rho) * z_tok[r, p, l, e])

``z_req`` and ``z_tok`` are standard normal, so the part that varies between tokens has unit variance
for every ``rho``; ``popularity_skew`` is measured in that unit and ``confidence_mean`` converts it to logits.
Each parameter moves its own statistic of a router trace: ``popularity_skew`` the imbalance of per-expert
load in a layer, ``confidence_mean`` the typical spread of a token's logits (hence its top-1 probability),
``confidence_spread`` how much that spread varies between tokens, ``persistence`` how often two tokens of one
request share experts. That keeps them identifiable when they are fitted to recorded traces.

Real routers differ between layers (in FLAME-MoE-290M the median top-1 probability grows from 0.03 in the first
MoE layer to 0.19 in the last, and tokens of one sequence share about three times as many experts beyond chance
in the last as in the first), so ``popularity_skew``, ``confidence_mean``, ``confidence_spread`` and
``persistence`` each take one value for every layer or a list with one value per MoE layer. ``expert_bias``, when
given, is ``b`` itself (one row of per-expert biases per layer, e.g. measured from a recorded trace by
``lynxsim.routing.fit``): it replaces the random draw, so that a fitted profile reproduces which experts of a
layer are popular, not only how unequal they are.

Every number is hashed from its name (see ``hashing``), so a token's logits do not depend on the batch.
"""

from __future__ import annotations

from types import ModuleType
from typing import Annotated, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from lynxsim.jit import kernels
from lynxsim.routing.hashing import NORMAL_TABLE, NORMALS_PER_WORD, combine, derive_key, exp_exact, normals
from lynxsim.routing.router import GroupLimit

# Stream tags: each random quantity hashes under its own key, so that e.g. the confidence of token
# (r, p) is unrelated to its noise even though both are keyed by (r, p).
_BIAS_STREAM = 1
_REQUEST_STREAM = 2
_TOKEN_STREAM = 3
_CONFIDENCE_STREAM = 4

_PER_LAYER = (
    " Either one value for every MoE layer or a list with one value per MoE layer (its length must equal the "
    "model's MoE layer count)."
)


class SyntheticRoutingParams(BaseModel):
    """Shape of the synthetic router logits. Defaults mimic Mixtral-8x7B (8 experts, top-2); see each field."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    popularity_skew: Annotated[float, Field(ge=0.0)] | list[Annotated[float, Field(ge=0.0)]] = Field(
        default=0.15,
        description=(
            "Standard deviation of the fixed per-(layer, expert) logit bias, in units of the per-token logit "
            "noise (dimensionless). 0 = every expert equally popular. Default 0.15: with 8 experts the most "
            "popular expert of a layer takes about 2x the top-1 share of the least popular one (about 18% vs 9%; "
            "measured), a mild imbalance such as load-balancing training leaves (Mixtral-8x7B's per-layer expert "
            "load is close to uniform: Jiang et al. 2024, arXiv 2401.04088, fig. 7). It costs little at "
            "batch 16: 7.9 distinct experts of 8 for top-2, against 7.9 with no skew. Ignored where "
            "expert_bias is given." + _PER_LAYER
        ),
    )
    confidence_mean: Annotated[float, Field(gt=0.0)] | list[Annotated[float, Field(gt=0.0)]] = Field(
        default=1.4,
        description=(
            "Mean of the per-(token, layer) scale that multiplies the unit-variance logit structure, in logits "
            "(nats): about the standard deviation of one token's logits across experts. Larger = more peaked "
            "softmax, a more confident top-1. Default 1.4: with 8 experts and the other defaults, top-1 softmax "
            "probabilities have median 0.42, 10th-90th percentiles 0.27-0.70 and 72% of them in 0.3-0.7 "
            "(measured), the range of Mixtral-8x7B's router." + _PER_LAYER
        ),
    )
    confidence_spread: Annotated[float, Field(ge=0.0)] | list[Annotated[float, Field(ge=0.0)]] = Field(
        default=0.2,
        description=(
            "Standard deviation of the natural log of the per-(token, layer) scale (dimensionless); the scale is "
            "log-normal with mean confidence_mean whatever the spread. 0 = every token equally peaked, apart "
            "from the randomness of its logits. Default 0.2: the scale ranges 0.7x-1.36x its mean between the "
            "5th and 95th percentiles, so confident and hesitant tokens coexist without widening the top-1 "
            "probabilities past the 0.3-0.7 range (72% inside, against 76% with spread 0; measured)." + _PER_LAYER
        ),
    )
    persistence: Annotated[float, Field(ge=0.0, lt=1.0)] | list[Annotated[float, Field(ge=0.0, lt=1.0)]] = Field(
        default=0.3,
        description=(
            "Share rho of the between-token logit variance that is fixed per request (dimensionless, [0, 1)): "
            "the correlation between the logits of two tokens of one request in one layer. 0 = independent "
            "tokens. Default 0.3: with 8 experts a request's tokens repeat their top-1 expert 24% of the time, "
            "against 13% at rho 0 (measured), close to the twice-chance repetition of consecutive tokens that "
            "Mixtral-8x7B shows in its middle and last layers (Jiang et al. 2024, arXiv 2401.04088, section 5). "
            "The correlation does not decay with the distance between positions." + _PER_LAYER
        ),
    )
    expert_bias: list[list[float]] | None = Field(
        default=None,
        description=(
            "The per-(layer, expert) logit bias b itself, one row of num_experts values per MoE layer, in the unit "
            "of popularity_skew; replaces the random draw when given. Measured from a recorded trace (lynxsim "
            "routing fit), it makes the generator pick each expert of each layer about as often as the trace did. "
            "Only differences within a row matter (adding a constant to a row changes no softmax). Default: none, "
            "draw b at random with standard deviation popularity_skew."
        ),
    )

    @model_validator(mode="after")
    def _rectangular_bias(self) -> SyntheticRoutingParams:
        if self.expert_bias is not None:
            widths = {len(row) for row in self.expert_bias}
            if len(widths) != 1 or 0 in widths:
                raise ValueError("expert_bias must be a non-empty list of equally long, non-empty rows (one per layer)")
        return self


class SyntheticGenerator(NamedTuple):
    """A ``SyntheticRouting``'s parameters as its numba kernels take them (``SyntheticRouting.generator``):
    whether requests have their own means (``persistent``; else every token's mean is the bias), the hash keys,
    the bias ``[L, E]``, the per-layer weights of the request and token normals, the confidence scale's
    log-normal parameters and the normal table."""

    persistent: bool
    request_key: np.uint64
    token_key: np.uint64
    confidence_key: np.uint64
    bias: np.ndarray
    request_weight: np.ndarray
    token_weight: np.ndarray
    log_scale_spread: np.ndarray
    log_scale_offset: np.ndarray
    normal_table: np.ndarray


class SyntheticRouting:
    """Seeded synthetic router logits for ``num_moe_layers`` MoE layers of ``num_experts`` experts each.

    Implements ``RoutingSource``. The logits of a token are a pure function of (seed, params, request id,
    position), whatever the batch; the only state is a cache of values that are recomputed identically
    on a miss. ``request_cache_bytes`` bounds the per-request cache (see ``_request_means``); the default,
    128 MiB, holds the means of about 2,200 requests of a 58-layer, 256-expert model, more than the
    running requests of one replica, and 0 disables it.

    ``logits`` runs the numba kernels of ``synthetic_kernels`` where numba is available (see ``lynxsim.jit``)
    and ``numpy_logits``, the reference, otherwise; the two give the same bits.

    Where the normals come from (``hashing.normals``, four per hashed word): the word of counter
    ``l * W + j`` (``W = ceil(E / 4)`` words per layer) under a token's key gives the token noise of experts
    ``4j`` to ``4j + 3`` of layer ``l``; the same counters under a request's key give its ``z_req``, and under
    the seed's bias key the bias. The confidence normal of layer ``l`` is quarter ``l % 4`` of word ``l // 4``
    under ``combine(confidence key, token key)``.
    """

    def __init__(
        self,
        num_moe_layers: int,
        num_experts: int,
        params: SyntheticRoutingParams | None = None,
        seed: int = 0,
        *,
        request_cache_bytes: int = 128 * 2**20,
        group_limit: GroupLimit | None = None,
    ) -> None:
        if num_moe_layers < 1:
            raise ValueError(f"num_moe_layers must be >= 1, got {num_moe_layers}")
        if num_experts < 2:
            raise ValueError(f"num_experts must be >= 2, got {num_experts}")
        self.num_moe_layers = num_moe_layers
        self.num_experts = num_experts
        self.params = params if params is not None else SyntheticRoutingParams()
        self.seed = seed
        if group_limit is not None and group_limit.num_groups > 1:
            group_limit.check(num_experts)
        else:
            group_limit = None
        self.group_limit = group_limit  # the model's group-limited routing (lynxsim.routing.router), if any
        words = -(-num_experts // NORMALS_PER_WORD)
        self._counters = np.arange(num_moe_layers * words, dtype=np.uint64).reshape(num_moe_layers, words)
        self._request_key = np.uint64(derive_key(seed, _REQUEST_STREAM))
        self._token_key = np.uint64(derive_key(seed, _TOKEN_STREAM))
        self._confidence_key = np.uint64(derive_key(seed, _CONFIDENCE_STREAM))
        p = self.params
        if p.expert_bias is not None:
            self._bias = np.asarray(p.expert_bias, dtype=np.float32)
            if self._bias.shape != (num_moe_layers, num_experts):
                raise ValueError(
                    f"expert_bias must be {num_moe_layers} rows (MoE layers) of {num_experts} values (experts), "
                    f"got {self._bias.shape[0]} rows of {self._bias.shape[1]}"
                )
        else:
            skew = _per_layer(p.popularity_skew, "popularity_skew", num_moe_layers).astype(np.float32)
            bias = skew[:, None] * normals(derive_key(seed, _BIAS_STREAM), self._counters)
            self._bias = np.ascontiguousarray(bias[:, :num_experts])
        # log s[l, t] = spread[l] * n + log(mean[l]) - spread[l]**2 / 2, all in float64 (see _confidence).
        spread = _per_layer(p.confidence_spread, "confidence_spread", num_moe_layers)
        mean = _per_layer(p.confidence_mean, "confidence_mean", num_moe_layers)
        self._log_scale_spread = spread
        self._log_scale_offset = np.log(mean) - spread**2 / 2
        rho = _per_layer(p.persistence, "persistence", num_moe_layers)
        self._persistent = bool((rho > 0.0).any())
        self._request_weight = np.sqrt(rho).astype(np.float32)  # [L]
        self._token_weight = np.sqrt(1.0 - rho).astype(np.float32)  # [L]
        # The request cache: the cached request ids, sorted, and the slot of _pool [slots, L, E] holding each one's
        # mean; per slot, the call that last read it (the least recently used are evicted first).
        self._request_cache = np.empty(0, dtype=np.int64)
        self._cached_slots = np.empty(0, dtype=np.int64)
        self._pool = np.empty((0, num_moe_layers, num_experts), dtype=np.float32)
        self._last_use = np.empty(0, dtype=np.int64)
        self._calls = 0
        self._free_slots: list[int] = []  # slots of evicted requests
        self._slots_handed_out = 0  # slots [0, this) have held a request; the others were never used
        # An entry counts as its float32 data plus 256 bytes of bookkeeping (what an entry of the dictionary that
        # held the cache before cost: the same request_cache_bytes holds as many requests as it did).
        self._cache_capacity = max(0, request_cache_bytes) // (num_moe_layers * num_experts * 4 + 256)

    def generator(self) -> SyntheticGenerator:
        """What the kernels of ``lynxsim.routing.synthetic_kernels`` draw this source's logits from, for compiled
        code that calls them itself (the compiled engine routes in its own loop): the same arrays ``logits``
        passes them, so the logits are the same bits."""
        return SyntheticGenerator(
            self._persistent, self._request_key, self._token_key, self._confidence_key, self._bias,
            self._request_weight, self._token_weight, self._log_scale_spread, self._log_scale_offset, NORMAL_TABLE,
        )

    def logits(self, request_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Float32 ``[num_moe_layers, tokens, num_experts]`` for tokens ``(request_ids[i], positions[i])``.

        Any int64 request ids and positions are valid names; the output is a new array the caller may modify.
        """
        return self._logits(request_ids, positions, kernels("lynxsim.routing.synthetic_kernels"))

    def numpy_logits(self, request_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """``logits`` computed by the numpy reference path, whether or not numba is available: the same bits
        (what the tests check, and what the kernels are timed against)."""
        return self._logits(request_ids, positions, None)

    def _logits(self, request_ids: np.ndarray, positions: np.ndarray, fast: ModuleType | None) -> np.ndarray:
        requests = np.asarray(request_ids, dtype=np.int64)
        pos = np.asarray(positions, dtype=np.int64)
        if requests.ndim != 1 or requests.shape != pos.shape:
            raise ValueError(
                f"request_ids and positions must be 1-D of one length, got shapes {requests.shape} and {pos.shape}"
            )
        num_layers, num_experts = self.num_moe_layers, self.num_experts
        if requests.size == 0:
            return np.empty((num_layers, 0, num_experts), dtype=np.float32)
        means, slots = self._request_means(requests, fast)
        if fast is not None:
            out = np.empty((num_layers, requests.size, num_experts), dtype=np.float32)
            limit = self.group_limit
            fast.fill_logits(
                requests, pos, slots, means, self._token_key, self._confidence_key, self._token_weight,
                self._log_scale_spread, self._log_scale_offset, NORMAL_TABLE, out,
                limit.num_groups if limit else 1, limit.topk_groups if limit else 1, limit.score_code if limit else 0,
            )
            return out
        token_keys = combine(combine(self._token_key, requests), pos)
        # Per-token noise, scaled by sqrt(1 - rho), then shifted by the means and scaled: the output, in place.
        out = normals(token_keys[None, :, None], self._counters[:, None, :])[:, :, :num_experts]
        out *= self._token_weight[:, None, None]
        out += means[slots].transpose(1, 0, 2)
        out *= self._confidence(token_keys)[:, :, None]
        return self.group_limit.apply(out) if self.group_limit is not None else out

    def _request_means(self, requests: np.ndarray, fast: ModuleType | None) -> tuple[np.ndarray, np.ndarray]:
        """``b[l, e] + sqrt(rho) * z_req[r, l, e]`` of each token's request, as float32 ``means [slots, L, E]``
        and int64 ``slot [T]`` (token ``t``'s mean is ``means[slot[t]]``); the bias alone when rho is 0.

        A request's mean is the same in every iteration of its life, so it is drawn once and kept in a
        least-recently-used cache of at most ``request_cache_bytes`` between calls, in the slots of one pool
        array that the kernels read in place (no per-call gather). Drawing it costs as much as drawing the
        token noise, and a decode batch has one token per request, so the cache nearly halves the cost of a
        decode iteration. A cached value is the one a fresh draw would give, so the cache cannot change a result.
        The cache is looked up with whole-array operations (a sorted array of request ids), not request by
        request: a decode run's call names a few hundred tokens, whose lookup one at a time in Python cost as much
        as drawing their logits (measured).
        """
        if not self._persistent:
            return self._bias[None], np.zeros(requests.size, dtype=np.int64)
        if requests.size > self._cache_capacity:
            unique, inverse = np.unique(requests, return_inverse=True)
            if unique.size > self._cache_capacity:  # more requests than the cache holds: draw them all afresh
                means = np.empty((unique.size, self.num_moe_layers, self.num_experts), dtype=np.float32)
                self._draw_request_means(unique, means, np.arange(unique.size, dtype=np.int64), fast)
                return means, inverse.reshape(-1)
        self._calls += 1
        slots = self._cached(requests)
        missing = slots < 0
        self._last_use[slots[~missing]] = self._calls
        if missing.any():
            new = np.unique(requests[missing])
            self._evict(self._request_cache.size + new.size - self._cache_capacity)
            new_slots = np.array([self._allocate_slot() for _ in range(new.size)], dtype=np.int64)
            self._draw_request_means(new, self._pool, new_slots, fast)
            self._last_use[new_slots] = self._calls
            at = np.searchsorted(self._request_cache, new)
            self._request_cache = np.insert(self._request_cache, at, new)
            self._cached_slots = np.insert(self._cached_slots, at, new_slots)
            slots[missing] = new_slots[np.searchsorted(new, requests[missing])]
        return self._pool, slots

    def _cached(self, requests: np.ndarray) -> np.ndarray:
        """The pool slot of each request's cached mean, -1 where it is not cached."""
        keys = self._request_cache
        if keys.size == 0:
            return np.full(requests.size, -1, dtype=np.int64)
        at = np.minimum(np.searchsorted(keys, requests), keys.size - 1)
        return np.where(keys[at] == requests, self._cached_slots[at], -1)

    def _evict(self, count: int) -> None:
        """Frees the slots of the ``count`` least recently used cached requests (none of this call's: they were
        just marked used, and the call's requests fit in the cache)."""
        if count <= 0:
            return
        last_use = self._last_use[self._cached_slots]
        victims = np.argpartition(last_use, count - 1)[:count]
        self._free_slots.extend(self._cached_slots[victims].tolist())
        self._request_cache = np.delete(self._request_cache, victims)
        self._cached_slots = np.delete(self._cached_slots, victims)

    def _allocate_slot(self) -> int:
        """A free slot of the pool, growing it (doubling, up to the cache's capacity) when none is free."""
        if self._free_slots:
            return self._free_slots.pop()
        slot = self._slots_handed_out
        self._slots_handed_out += 1
        if slot == self._pool.shape[0]:
            size = min(self._cache_capacity, max(16, 2 * slot))
            grown = np.empty((size, self.num_moe_layers, self.num_experts), dtype=np.float32)
            grown[:slot] = self._pool
            self._pool = grown
            self._last_use = np.append(self._last_use, np.zeros(size - slot, dtype=np.int64))
        return slot

    def _draw_request_means(
        self, requests: np.ndarray, out: np.ndarray, slots: np.ndarray, fast: ModuleType | None
    ) -> None:
        """``b + sqrt(rho) * z_req`` of each of ``requests`` into ``out[slots]`` (``[L, E]`` each)."""
        if fast is not None:
            fast.fill_request_means(
                requests, self._request_key, self._bias, self._request_weight, NORMAL_TABLE, out, slots
            )
            return
        keys = combine(self._request_key, requests)
        z = normals(keys[:, None, None], self._counters[None, :, :])[:, :, : self.num_experts]
        z *= self._request_weight[:, None]
        z += self._bias[None, :, :]
        out[slots] = z

    def _confidence(self, token_keys: np.ndarray) -> np.ndarray:
        """Per-(layer, token) log-normal scale ``s[l, t]`` with mean ``confidence_mean[l]``, float32 ``[L, T]``.

        ``exp(spread * n + offset)`` in float64 with ``hashing.exp_exact``, then rounded once to float32: the
        numba kernel repeats these exact steps, which ``numpy.exp`` would not let it do bit for bit (nor would a
        per-layer table of ``exp`` over the 65,536 normal levels: 15 MB for 58 layers, slower than computing).
        """
        layers = np.arange(-(-self.num_moe_layers // NORMALS_PER_WORD), dtype=np.uint64)
        n = normals(combine(self._confidence_key, token_keys)[:, None], layers[None, :])[:, : self.num_moe_layers].T
        log_scale = n.astype(np.float64) * self._log_scale_spread[:, None] + self._log_scale_offset[:, None]
        return exp_exact(log_scale).astype(np.float32)


def _per_layer(value: float | list[float], name: str, num_moe_layers: int) -> np.ndarray:
    """A per-layer parameter as float64 ``[num_moe_layers]``; a list must give every MoE layer one value."""
    if isinstance(value, list):
        if len(value) != num_moe_layers:
            raise ValueError(f"{name} has {len(value)} values, the model has {num_moe_layers} MoE layers")
        return np.asarray(value, dtype=np.float64)
    return np.full(num_moe_layers, value, dtype=np.float64)
