"""The built-in routing sources as registered factories (``lynxsim.plugins.ROUTING_SOURCES``), one per
``routing.kind``: each takes the ``RoutingContext`` and the keys of its config section, already validated
(``lynxsim.config``), and raises ``InputError`` naming the key a problem comes from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lynxsim.errors import InputError
from lynxsim.routing.base import RoutingContext, RoutingSource
from lynxsim.routing.evidence import model_profile
from lynxsim.routing.loading import open_trace
from lynxsim.routing.profiles import load_routing_profile
from lynxsim.routing.replay import TraceReplayRouting
from lynxsim.routing.router import group_limit_of
from lynxsim.routing.synthetic import SyntheticRouting, SyntheticRoutingParams
from lynxsim.routing.trace_format import DEFAULT_FILL, FillStrategy


def model_routing(*, context: RoutingContext) -> RoutingSource:
    """``kind: model``: the model's shipped profile where the catalog model has one, else the plain generator."""
    model = context.model
    own = model_profile(context.model_key)
    params = (load_routing_profile(None, own, num_moe_layers=model.num_moe_layers, num_experts=model.num_experts)
              if own is not None else SyntheticRoutingParams())
    return _generator(context, params)


def profile_routing(*, context: RoutingContext, name: str | None = None, path: Path | None = None) -> RoutingSource:
    """``kind: profile``: the generator with a shipped profile (``name``) or a profile file (``path``)."""
    model = context.model
    params = load_routing_profile(name, path, num_moe_layers=model.num_moe_layers, num_experts=model.num_experts)
    return _generator(context, params)


def synthetic_routing(*, context: RoutingContext, **params: Any) -> RoutingSource:
    """``kind: synthetic``: the generator with the parameters the section sets (``SyntheticRoutingParams``)."""
    return _generator(context, SyntheticRoutingParams.model_validate(params))


def trace_routing(*, context: RoutingContext, path: Path, fill: FillStrategy = DEFAULT_FILL) -> RoutingSource:
    """``kind: trace``: replay of the recorded router outputs at ``path``."""
    trace = open_trace(path, fill=fill, where="routing.path")
    model = context.model
    try:
        return TraceReplayRouting(trace, seed=context.seed, num_moe_layers=model.num_moe_layers,
                                  num_experts=model.num_experts)
    except ValueError as exc:
        raise InputError("routing.path", f"{exc} (model {model.name})") from None


def _generator(context: RoutingContext, params: SyntheticRoutingParams) -> RoutingSource:
    model = context.model
    try:
        return SyntheticRouting(model.num_moe_layers, model.num_experts, params, context.seed,
                                group_limit=group_limit_of(model))
    except ValueError as exc:
        raise InputError("routing", str(exc)) from None
