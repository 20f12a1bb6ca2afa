"""Expert-selection policies behind one interface (``Policy.select``), found by name.

A policy is registered once, in ``_REGISTRY``, as ``name -> constructor``; its parameters are the
constructor's keyword arguments, so the config layer and ``make`` learn them from the signature and a new
policy needs no other wiring. ``make`` raises ``ValueError`` naming the policy, the bad parameter and what is
known; the config layer turns that into the user-facing ``InputError`` with the key path.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from lynxsim.policies.base import DROPPED, Policy, Selection
from lynxsim.policies.lynx import Lynx
from lynxsim.policies.topk import TopK

_REGISTRY: dict[str, Callable[..., Policy]] = {
    TopK.name: TopK,
    Lynx.name: Lynx,
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


__all__ = ["DROPPED", "POLICY_NAMES", "Lynx", "Policy", "Selection", "TopK", "make", "policy_parameters"]
