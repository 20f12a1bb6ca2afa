"""Expert-selection policies behind one interface (``Policy.select``), found by name.

A policy is registered once, in ``lynxsim.plugins.POLICIES``, as ``name -> constructor`` (the built-ins below, and
any an installed package declares in the ``lynxsim.policies`` entry-point group); its parameters are the
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

from typing import Any

from lynxsim.datatypes import DROPPED, Selection
from lynxsim.plugins import POLICIES
from lynxsim.policies.base import CalibratablePolicy, Policy, calibrate_if_needed, check_policy, needs_calibration
from lynxsim.policies.capacity import Capacity
from lynxsim.policies.lynx import Lynx
from lynxsim.policies.oea import OEA
from lynxsim.policies.prune import Prune
from lynxsim.policies.skip import Skip
from lynxsim.policies.topk import TopK
from lynxsim.policies.topp import TopP
from lynxsim.policies.vote import Vote

POLICY_NAMES: tuple[str, ...] = POLICIES.builtin_names
"""Every built-in policy name, sorted (plug-ins add theirs: ``POLICIES.plugin_names()``)."""


def policy_parameters(name: str) -> tuple[str, ...]:
    """The parameter names ``make(name, ...)`` accepts, in constructor order."""
    return POLICIES.parameters(name)


def make(name: str, **params: Any) -> Policy:
    """Build the policy ``name`` (built in or a plug-in's) with ``params``; ``ValueError`` for an unknown name, an
    unknown or missing parameter, or a value the policy refuses."""
    return POLICIES.bind(name, params)()


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
