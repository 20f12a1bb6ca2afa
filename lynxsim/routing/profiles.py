"""Routing profiles (generator parameters fitted to a recorded trace) made to fit the model being simulated.

A profile is fitted on one model's MoE layers and experts; the simulated model may have more or fewer of both.
Per-layer values are mapped the way trace replay maps layers (simulated layer ``i`` takes fitted layer
``i * fitted // simulated``), and a fitted per-expert bias is kept only when the expert counts match; otherwise
each layer's bias is replaced by its spread, which is what the generator's ``popularity_skew`` means.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lynxsim.errors import InputError
from lynxsim.routing.fit import load_profile
from lynxsim.routing.replay import layer_map
from lynxsim.routing.synthetic import SyntheticRoutingParams

# Package data, so that an installed copy routes a catalog model by its profile as a checkout does.
PROFILE_DIR = Path(__file__).resolve().parent / "data" / "profiles"
PER_LAYER_FIELDS = ("popularity_skew", "confidence_mean", "confidence_spread", "persistence")


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def profile_path(name: str) -> Path:
    path = PROFILE_DIR / f"{name}.yaml"
    if not path.is_file():
        raise InputError("routing.name", f"no shipped routing profile {name!r}; known: {', '.join(profile_names())}")
    return path


def adapt_profile(params: SyntheticRoutingParams, num_moe_layers: int, num_experts: int) -> SyntheticRoutingParams:
    """``params`` with every per-layer list resized to ``num_moe_layers`` and the expert bias to ``num_experts``."""
    update: dict[str, object] = {}
    for name in PER_LAYER_FIELDS:
        value = getattr(params, name)
        if isinstance(value, list):
            update[name] = [value[i] for i in layer_map(num_moe_layers, len(value))]
    bias = params.expert_bias
    if bias is not None:
        rows = [bias[i] for i in layer_map(num_moe_layers, len(bias))]
        if len(bias[0]) == num_experts:
            update["expert_bias"] = rows
        else:
            update["expert_bias"] = None
            update["popularity_skew"] = [float(np.std(row)) for row in rows]
    return params.model_copy(update=update)


def load_routing_profile(
    name: str | None, path: Path | None, *, num_moe_layers: int, num_experts: int
) -> SyntheticRoutingParams:
    """A shipped profile by ``name`` or a profile file at ``path``, adapted to the simulated model."""
    source = profile_path(name) if name is not None else path
    assert source is not None
    if not source.is_file():
        raise InputError("routing.path", f"{source} does not exist")
    return adapt_profile(load_profile(source), num_moe_layers, num_experts)
