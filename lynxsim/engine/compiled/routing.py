"""Exact routing inside the compiled loop, for the most common exact-mode run: synthetic routing, top-k or Lynx.

Between two kernel calls the driver routes a batch in Python (``RoutingStep.exact_activities``): building the
tokens' ids, the synthetic source's request-mean cache, the policy's dispatch and the reduction to each layer's
expert activity cost about 100 us per call, against about as much for the numba kernels that do the arithmetic,
and a run makes one call per decode run and per mixed iteration (38,000 for Mixtral-8x7B on the Azure conv
trace). Where the routing source is ``SyntheticRouting``, the policy top-k or Lynx and there is no expert
parallelism (whose per-rank activity the driver takes from the cost model), the loop calls those same kernels
itself, unless the run's policies share top-k unions (``TopKUnions``: several policies) of more than
``COLUMN_EXPERTS`` experts. Those unions route a prompt once per run rather than once per policy, which pays where
a top-k union needs many tokens to fill (Qwen3-30B-A3B's 128 experts: 20 policies took 130 s with them against
177 s routed in the loop) but not for few experts, whose unions fill within a few dozen tokens (Mixtral-8x7B: the
100-point two-policy sweep of ``benchmarks/sweep_scaling.py`` took 33 s routed in the loop against 54 s):

* the synthetic logits (``synthetic_kernels.fill_logits``), with each running request's mean kept in its running
  slot (``fill_request_means`` when it is admitted; moved with it when the running set closes up), where the
  Python source keeps them in a least-recently-used cache: the same values either way;
* the policy's counts and proxies (``topk_counts`` / ``lynx_counts`` of ``column_kernels`` up to
  ``COLUMN_EXPERTS`` experts, of ``selection_kernels`` above, as ``route_counts`` picks them; Lynx's bin weights
  tabulated per batch size by ``lynx.bin_weights``);
* a top-k iteration routed in doubling chunks until every layer's union of experts is full, as
  ``RoutingStep.union_of_topk`` does (the counts of top-k add up over chunks, so an iteration whose union never
  fills has its full counts at the end).

The logits, selections and counts are those of the Python path bit for bit (the same kernels on the same
inputs); tests compare every record. Imported only through ``lynxsim.jit.kernels``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cache
from typing import TYPE_CHECKING, Any, NamedTuple

import numba
import numpy as np
from numba import objmode
from numba.core.registry import CPUDispatcher

from lynxsim.engine.compiled import supported
from lynxsim.engine.compiled.background_compile import FunctionPointer
from lynxsim.engine.decode_run import MAX_RUN_ITERATIONS
from lynxsim.jit import compiled, kernels
from lynxsim.parallel import ParallelCostModel
from lynxsim.policies import Lynx, TopK, column_kernels, selection_kernels
from lynxsim.policies.kernels import COLUMN_EXPERTS
from lynxsim.policies.lynx import bin_weights
from lynxsim.policies.params import require_layers
from lynxsim.routing.synthetic import SyntheticRouting
from lynxsim.routing.synthetic_kernels import fill_logits, fill_request_means

if TYPE_CHECKING:  # the engine package imports this module's package
    from lynxsim.engine.routing_step import RoutingStep


LOGITS_SCRATCH_BYTES = 64 * 2**20
"""The loop's float32 logits scratch holds at least the largest batch and otherwise this much: a decode run is
routed in parts of as many iterations as fit (Mixtral-8x7B: 65,536 tokens, 64 iterations of 256 sequences;
Qwen3-30B-A3B: 2,730 tokens)."""


class FusedRouting(NamedTuple):
    """What the loop routes with; ``enabled`` False: the driver routes (the other arrays are placeholders of
    the same types, so that the loop is compiled once)."""

    enabled: bool
    lynx: bool  # the policy, where it applies, is Lynx (else top-k)
    top_k: int
    first_chunk: int  # tokens of a top-k iteration's first chunk (RoutingStep.first_saturation_chunk)
    persistent: bool  # requests have their own means (else every token's mean is the bias)
    request_key: np.uint64
    token_key: np.uint64
    confidence_key: np.uint64
    bias: np.ndarray  # float32 [L, E]
    request_weight: np.ndarray  # float32 [L]
    token_weight: np.ndarray  # float32 [L]
    log_scale_spread: np.ndarray  # float64 [L]
    log_scale_offset: np.ndarray  # float64 [L]
    normal_table: np.ndarray
    request_ids: np.ndarray  # int64 [requests]: the ids the logits are drawn for
    means: np.ndarray  # float32 [running slots, L, E] (persistent) or the bias as [1, L, E]
    alpha: np.ndarray  # float64 [L]: Lynx's alpha per layer
    floor: np.ndarray  # float64 [L]: -beta per layer (-inf: no floor)
    bin_weights: np.ndarray  # float64: lynx.bin_weights(n) for n = 0 .. largest batch, one after the other
    bin_offsets: np.ndarray  # int64: where each n's weights start (and the end)
    logits: np.ndarray  # float32 scratch, [L * tokens * E] of the largest routing call
    token_requests: np.ndarray  # int64 scratch [tokens]
    token_positions: np.ndarray
    token_slots: np.ndarray
    counts: np.ndarray  # int32 scratch [groups, L, E]
    retained: np.ndarray  # float64 scratch [groups, L]
    top1: np.ndarray
    changed: np.ndarray


RouteFunction = Callable[..., bool] | FunctionPointer
"""``route`` as the loop takes it (``route_function``): the function, or a pointer to its compiled code."""


@compiled(cache=True)
def admit_means(fused: FusedRouting, first_slot: int, end_slot: int, slot_requests: np.ndarray) -> None:
    """The means of the requests just admitted to running slots ``first_slot .. end_slot - 1``
    (``slot_requests``: each running slot's request index)."""
    if not fused.persistent or end_slot <= first_slot:
        return
    count = end_slot - first_slot
    requests = np.empty(count, dtype=np.int64)
    targets = np.empty(count, dtype=np.int64)
    for k in range(count):
        requests[k] = fused.request_ids[slot_requests[first_slot + k]]
        targets[k] = first_slot + k
    fill_request_means(requests, fused.request_key, fused.bias, fused.request_weight, fused.normal_table,
                       fused.means, targets)


@compiled(cache=True)
def route(
    fused: FusedRouting,
    slot_requests: np.ndarray,
    first: int,
    count: int,
    batch_new: np.ndarray,
    batch_before: np.ndarray,
    groups: int,
    applied: bool | np.bool_,
    out_distinct: np.ndarray,
    out_assignments: np.ndarray,
    out_proxies: np.ndarray,
) -> bool:
    """Route ``groups`` iterations into rows ``0 .. groups - 1`` of the ``out_*`` routing rows (``slot_requests``:
    each running slot's request index): one batch (``groups`` 1: the running slots ``first .. first + count - 1``,
    each computing ``batch_new`` tokens after its ``batch_before`` cached ones) or a decode run (every one of the
    ``count`` running slots' next ``groups`` tokens, one group per iteration). False: non-finite logits (the
    caller raises ``route_counts``' error)."""
    num_layers, num_experts = fused.bias.shape
    tokens = 0
    if groups == 1:
        for b in range(count):
            slot = first + b
            request = fused.request_ids[slot_requests[slot]]
            for j in range(batch_new[b]):
                fused.token_requests[tokens] = request
                fused.token_positions[tokens] = batch_before[b] + j
                fused.token_slots[tokens] = slot if fused.persistent else 0
                tokens += 1
    else:
        for g in range(groups):
            for slot in range(count):
                fused.token_requests[tokens] = fused.request_ids[slot_requests[slot]]
                fused.token_positions[tokens] = batch_before[slot] + g
                fused.token_slots[tokens] = slot if fused.persistent else 0
                tokens += 1
    per_group = tokens // groups
    # A batch of one token votes exactly its own top-k (README's "Policies"; lynx.py): its counts and proxies are
    # top-k's, which the top-k kernel gives at a sixth of Lynx's cost (32 layers of Mixtral: 0.7 us, 4.4 us).
    use_lynx = fused.lynx and applied and per_group > 1
    counts = fused.counts[:groups]
    counts[:] = 0
    if groups == 1 and not use_lynx and tokens > fused.first_chunk:
        start, size = 0, fused.first_chunk
        while start < tokens:
            end = min(start + size, tokens)
            if not _topk_tokens(fused, start, end, counts):
                return False
            full = True
            for layer in range(num_layers):
                for e in range(num_experts):
                    full &= counts[0, layer, e] > 0
            if full:  # more tokens cannot change the union: top-k assigns exactly tokens * top_k
                for layer in range(num_layers):
                    out_distinct[0, layer] = num_experts
                    out_assignments[0, layer] = tokens * fused.top_k
                _topk_proxies(out_proxies, 1, num_layers)
                return True
            start, size = end, 2 * size
        _topk_proxies(out_proxies, 1, num_layers)  # every token routed: counts of them all, below
    else:
        x = fused.logits[: num_layers * tokens * num_experts]
        _fill(fused, 0, tokens, x.reshape((num_layers, tokens, num_experts)))
        batches = x.reshape((num_layers, groups, per_group, num_experts))
        if use_lynx:
            n = max(per_group, 2)
            weights = fused.bin_weights[fused.bin_offsets[n] : fused.bin_offsets[n + 1]]
            retained, top1, changed = fused.retained[:groups], fused.top1[:groups], fused.changed[:groups]
            finite = _lynx_counts(batches, fused.top_k, fused.alpha, fused.floor, weights, counts,
                                  retained, top1, changed)
            if not finite:
                return False
            for g in range(groups):
                for layer in range(num_layers):
                    out_proxies[0, g, layer] = retained[g, layer]
                    out_proxies[1, g, layer] = top1[g, layer]
                    out_proxies[2, g, layer] = changed[g, layer]
                    out_proxies[3, g, layer] = 0.0
        else:
            if not _topk_counts(batches, fused.top_k, counts):
                return False
            _topk_proxies(out_proxies, groups, num_layers)
    for g in range(groups):
        for layer in range(num_layers):
            distinct = 0
            assignments = 0
            for e in range(num_experts):
                c = counts[g, layer, e]
                distinct += c > 0
                assignments += c
            out_distinct[g, layer] = distinct
            out_assignments[g, layer] = assignments
    return True


@compiled(inline="always")
def _fill(fused: FusedRouting, start: int, end: int, out: np.ndarray) -> None:
    """The synthetic logits of tokens ``start .. end - 1`` of the scratch token lists into ``out [L, T, E]``."""
    fill_logits(fused.token_requests[start:end], fused.token_positions[start:end], fused.token_slots[start:end],
                fused.means, fused.token_key, fused.confidence_key, fused.token_weight, fused.log_scale_spread,
                fused.log_scale_offset, fused.normal_table, out)


@compiled(inline="always")
def _topk_tokens(fused: FusedRouting, start: int, end: int, counts: np.ndarray) -> bool:
    """Top-k of tokens ``start .. end - 1``, their choices added to ``counts [1, L, E]``."""
    num_layers, num_experts = fused.bias.shape
    size = end - start
    x = fused.logits[: num_layers * size * num_experts]
    _fill(fused, start, end, x.reshape((num_layers, size, num_experts)))
    return _topk_counts(x.reshape((num_layers, 1, size, num_experts)), fused.top_k, counts)


@compiled(cache=True)
def _topk_counts(logits: np.ndarray, top_k: int, counts: np.ndarray) -> bool:
    """The top-k kernel ``route_counts`` picks for the expert count (``COLUMN_EXPERTS``). Many experts' kernel is
    called through Python (``objmode``): compiled the first time a run needs it, not with every loop (the loop then
    compiles once for every model), for a call that costs microseconds against its kernel's work on many experts."""
    if logits.shape[3] <= COLUMN_EXPERTS:
        return column_kernels.topk_counts(logits, top_k, counts)
    with objmode(finite="boolean"):
        finite = selection_kernels.topk_counts(logits, top_k, counts)
    return finite


@compiled(cache=True)
def _lynx_counts(logits: np.ndarray, top_k: int, alpha: np.ndarray, floor: np.ndarray, bin_weight: np.ndarray,
                 counts: np.ndarray, retained: np.ndarray, top1: np.ndarray, changed: np.ndarray) -> bool:
    """The Lynx kernel ``route_counts`` picks for the expert count (as ``_topk_counts``)."""
    if logits.shape[3] <= COLUMN_EXPERTS:
        return column_kernels.lynx_counts(logits, top_k, alpha, floor, bin_weight, counts, retained, top1, changed)
    with objmode(finite="boolean"):
        finite = selection_kernels.lynx_counts(logits, top_k, alpha, floor, bin_weight, counts, retained, top1,
                                               changed)
    return finite


@compiled(inline="always")
def _topk_proxies(out_proxies: np.ndarray, groups: int, num_layers: int) -> None:
    """Top-k's own proxies (``QualityProxies.of_topk``): retained mass and top-1 kept 1, nothing changed."""
    for g in range(groups):
        for layer in range(num_layers):
            out_proxies[0, g, layer] = 1.0
            out_proxies[1, g, layer] = 1.0
            out_proxies[2, g, layer] = 0.0
            out_proxies[3, g, layer] = 0.0


def route_function(fused: FusedRouting) -> RouteFunction:
    """``route`` as the loop takes it (``kernel.simulate``'s ``route``) for ``fused``'s types: a pointer to its
    compiled code, so that the loop's compilation neither includes nor waits for the routing's
    (``background_compile``: a cold start compiles both at once, the routing in a child process where it is not
    cached yet); the Python function where numba is off (``LYNXSIM_NO_NUMBA``)."""
    if not isinstance(route, CPUDispatcher):
        return route
    return route_pointer(numba.typeof(fused))


def compile_ahead() -> FunctionPointer | None:
    """Start compiling ``route`` in a child process now, where numba runs and the routing is not cached: a run
    calls this first, since building its cost tables and requests takes a second before its loop is compiled,
    and the child needs as long as the loop (``background_compile``). Its pointer, returned, is the one
    ``route_function`` then gives the run's instances, whose child is already running: the routing's types are the
    placeholder's, by design. None where numba is off."""
    if not isinstance(route, CPUDispatcher):
        return None
    return route_pointer(numba.typeof(_placeholder(1, 1)))


@cache
def route_pointer(fused_type: Any) -> FunctionPointer:
    """The pointer to ``route`` for a routing of type ``fused_type``, one per type (every run of a process shares
    it): ``route``'s argument types as the loop passes them."""
    int64, boolean = numba.types.int64, numba.types.boolean
    vector = numba.types.Array(int64, 1, "C")
    rows = numba.types.Array(int64, 2, "C")
    proxies = numba.types.Array(numba.types.float64, 3, "C")
    signature = boolean(fused_type, vector, int64, int64, vector, vector, int64, boolean, rows, rows, proxies)
    return FunctionPointer(__name__, "route", signature)


def fused_routing(
    step: RoutingStep, cost_model: object, request_ids: np.ndarray, *, max_call_tokens: int, max_slots: int,
    max_batch_tokens: int,
) -> FusedRouting:
    """The loop's routing for ``step`` (module docstring: where it applies), or a disabled placeholder.
    ``max_call_tokens``: the most tokens one routing call holds; ``max_slots``: running slots;
    ``max_batch_tokens``: the largest batch a policy selects on."""
    routing = step.routing
    num_layers, num_experts = routing.num_moe_layers, routing.num_experts
    expert_parallel = isinstance(cost_model, ParallelCostModel) and cost_model.plan.expert_parallel_on
    enabled = (
        step.statistical is None
        and isinstance(routing, SyntheticRouting)
        and routing.group_limit is None  # group-limited routers: the driver draws through SyntheticRouting
        and type(step.policy) in (TopK, Lynx)
        and (step.unions is None or num_experts <= COLUMN_EXPERTS)
        and not expert_parallel  # per-rank loads: the driver's path, through the cost model's activity
        and supported(cost_model)  # a plug-in cost model reduces counts to activity its own way
        and kernels("numba") is not None  # LYNXSIM_NO_NUMBA: the numpy reference paths route, from Python
    )
    if not enabled:
        return _placeholder(num_layers, num_experts)
    assert isinstance(routing, SyntheticRouting)
    generator = routing.generator()
    alpha = floor = np.zeros(num_layers)
    weights, offsets = np.zeros(1), np.zeros(2, dtype=np.int64)
    policy = step.policy
    if isinstance(policy, Lynx):
        require_layers(policy.name, policy.num_layers, (num_layers, 1, num_experts), "alpha/beta")
        alphas = policy.alpha if isinstance(policy.alpha, tuple) else (policy.alpha,) * num_layers
        betas = policy.beta if isinstance(policy.beta, tuple) else (policy.beta,) * num_layers
        alpha = np.array(alphas, dtype=np.float64)
        floor = np.array([-math.inf if b is None else -float(b) for b in betas])
        # Lynx selects on pure-decode batches (one token per running slot) unless it applies to every batch
        largest = max_batch_tokens if step.apply_to == "all" else min(max_batch_tokens, max_slots)
        tables = [np.zeros(0), np.zeros(0), *(bin_weights(n) for n in range(2, largest + 1))]
        offsets = np.concatenate(([0], np.cumsum([t.size for t in tables]))).astype(np.int64)
        weights = np.concatenate(tables)
    # The scratch holds the largest batch, and as many decode iterations as LOGITS_SCRATCH_BYTES allow.
    max_call_tokens = min(max_call_tokens,
                          max(max_batch_tokens, LOGITS_SCRATCH_BYTES // (4 * num_layers * num_experts)))
    means = (np.zeros((max_slots, num_layers, num_experts), dtype=np.float32) if generator.persistent
             else np.array(generator.bias[None]))
    return FusedRouting(
        True, isinstance(policy, Lynx), step.top_k, step.first_saturation_chunk, generator.persistent,
        generator.request_key, generator.token_key, generator.confidence_key,
        # writable copies: read-only arrays would be other numba types, and compile the loop a second time
        np.array(generator.bias), np.array(generator.request_weight), np.array(generator.token_weight),
        np.array(generator.log_scale_spread), np.array(generator.log_scale_offset), np.array(generator.normal_table),
        request_ids, means, alpha, floor, weights, offsets,
        np.zeros(num_layers * max_call_tokens * num_experts, dtype=np.float32),
        np.zeros(max_call_tokens, dtype=np.int64), np.zeros(max_call_tokens, dtype=np.int64),
        np.zeros(max_call_tokens, dtype=np.int64),
        np.zeros((MAX_RUN_ITERATIONS, num_layers, num_experts), dtype=np.int32),
        np.zeros((MAX_RUN_ITERATIONS, num_layers)), np.zeros((MAX_RUN_ITERATIONS, num_layers)),
        np.zeros((MAX_RUN_ITERATIONS, num_layers)),
    )


def _placeholder(num_layers: int, num_experts: int) -> FusedRouting:
    """A disabled ``FusedRouting`` with arrays of the enabled one's types."""
    zeros32 = np.zeros(num_layers, dtype=np.float32)
    return FusedRouting(
        False, False, 1, 1, False, np.uint64(0), np.uint64(0), np.uint64(0),
        np.zeros((num_layers, num_experts), dtype=np.float32), zeros32, zeros32.copy(), np.zeros(num_layers),
        np.zeros(num_layers), np.zeros(1, dtype=np.float32), np.zeros(1, dtype=np.int64),
        np.zeros((1, num_layers, num_experts), dtype=np.float32), np.zeros(num_layers), np.zeros(num_layers),
        np.zeros(1), np.zeros(2, dtype=np.int64), np.zeros(1, dtype=np.float32), np.zeros(1, dtype=np.int64),
        np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64),
        np.zeros((1, num_layers, num_experts), dtype=np.int32),
        np.zeros((1, num_layers)), np.zeros((1, num_layers)), np.zeros((1, num_layers)),
    )
