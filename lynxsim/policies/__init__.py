"""Expert-selection policies behind one interface (``Policy.select``), found by name.

A policy is registered once, in ``_REGISTRY``, as ``name -> constructor``; its parameters are the
constructor's keyword arguments, so the config layer and ``make`` learn them from the signature and a new
policy needs no other wiring. ``make`` raises ``ValueError`` naming the policy, the bad parameter and what is
known; the config layer turns that into the user-facing ``InputError`` with the key path.

Registered policies (each module's docstring gives its source and every rule it decides):

* ``topk`` (``topk.py``): the router's own top-k, the baseline.
* ``lynx`` (``lynx.py``; alpha, beta, scalar or per MoE layer): Lynx AffinityBinning, arXiv 2411.08982.
* ``oea`` (``oea.py``; k0 = 1): Opportunistic Expert Activation, arXiv 2511.02237.
* ``skip`` (``skip.py``; beta, scalar, per layer, or calibrated): dynamic skipping, arXiv 2402.14800.
* ``topp`` (``topp.py``; p = 0.4): post-hoc top-p inside the top-k, after arXiv 2403.07652.
* ``prune`` (``prune.py``; keep (calibrated) or kept_experts): static pruning, arXiv 2402.14800 / 2404.05089.
* ``capacity`` (``capacity.py``; capacity_factor = 1.0): token dropping, arXiv 2006.16668 / 2101.03961.
* ``vote`` (``vote.py``; budget): lynxsim's own batch-vote budget baseline.

Policies whose parameters come from a calibration sample (``skip``, ``prune``) follow the protocol in
``base.py``: ``needs_calibration(policy)``, then ``policy.calibrate(logits, top_k)`` (or
``calibrate_if_needed``); ``check_policy`` validates a policy against a model before a simulation.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from lynxsim.policies.base import (
    DROPPED,
    CalibratablePolicy,
    Policy,
    Selection,
    calibrate_if_needed,
    check_policy,
    needs_calibration,
)
from lynxsim.policies.capacity import Capacity
from lynxsim.policies.lynx import Lynx
from lynxsim.policies.oea import OEA
from lynxsim.policies.prune import Prune
from lynxsim.policies.skip import Skip
from lynxsim.policies.topk import TopK
from lynxsim.policies.topp import TopP
from lynxsim.policies.vote import Vote

_REGISTRY: dict[str, Callable[..., Policy]] = {
    "topk": TopK,
    "lynx": Lynx,
    "oea": OEA,
    "skip": Skip,
    "topp": TopP,
    "prune": Prune,
    "capacity": Capacity,
    "vote": Vote,
}

POLICY_NAMES: tuple[str, ...] = tuple(sorted(_REGISTRY))
"""Every registered policy name, sorted."""


def policy_parameters(name: str) -> tuple[str, ...]:
    """The parameter names ``make(name, ...)`` accepts, in constructor order."""
    return tuple(inspect.signature(_factory(name)).parameters)


def make(name: str, **params: Any) -> Policy:
    """Build the policy ``name`` with ``params``; ``ValueError`` for an unknown name, an unknown or missing
    parameter, or a value the policy refuses."""
    factory = _factory(name)
    signature = inspect.signature(factory)
    known = ", ".join(signature.parameters) or "none"
    unknown = sorted(set(params) - set(signature.parameters))
    if unknown:
        raise ValueError(f"policy {name!r}: unknown parameter(s) {', '.join(unknown)}; known parameters: {known}")
    missing = [
        p.name for p in signature.parameters.values() if p.default is inspect.Parameter.empty and p.name not in params
    ]
    if missing:
        raise ValueError(f"policy {name!r}: missing parameter(s) {', '.join(missing)}; known parameters: {known}")
    return factory(**params)


def _factory(name: str) -> Callable[..., Policy]:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown policy {name!r}; known policies: {', '.join(POLICY_NAMES)}") from None


__all__ = [
    "DROPPED",
    "OEA",
    "POLICY_NAMES",
    "CalibratablePolicy",
    "Capacity",
    "Lynx",
    "Policy",
    "Prune",
    "Selection",
    "Skip",
    "TopK",
    "TopP",
    "Vote",
    "calibrate_if_needed",
    "check_policy",
    "make",
    "needs_calibration",
    "policy_parameters",
]
