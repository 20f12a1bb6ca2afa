"""Validation of policy parameters, scalar or per MoE layer.

A parameter given as a list (YAML sequence, tuple, 1-D array) holds one value per MoE layer, in layer order.
It is stored as a tuple (policies are immutable), and the policy then needs the stacked
``[layers, tokens, experts]`` input with exactly that many layers: ``require_layers`` checks it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from numbers import Integral, Real
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")


def is_sequence(value: Any) -> bool:
    """A list-like parameter (one value per layer); strings and bytes are not."""
    return isinstance(value, (Sequence, np.ndarray)) and not isinstance(value, (str, bytes))


def scalar_or_per_layer(value: Any, check: Callable[[Any], T]) -> T | tuple[T, ...]:
    """``check(value)`` for a scalar; a tuple of ``check(v)`` for a non-empty list of per-layer values."""
    if is_sequence(value):
        values = list(np.asarray(value, dtype=object).ravel()) if isinstance(value, np.ndarray) else list(value)
        if not values:
            raise ValueError("a scalar or a non-empty list with one value per MoE layer, got an empty list")
        return tuple(check(v) for v in values)
    return check(value)


def real(value: Any, *, low: float, low_inclusive: bool, high: float = math.inf, high_inclusive: bool = True) -> float:
    """A finite real number (not a bool) in the given interval, as float; ``ValueError`` naming the value."""
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        above = value >= low if low_inclusive else value > low
        below = value <= high if high_inclusive else value < high
        ok = above and below
    if not ok:
        lo = "[" if low_inclusive else "("
        hi = "]" if high_inclusive and math.isfinite(high) else ")"
        raise ValueError(f"a finite number in {lo}{low:g}, {high:g}{hi}, got {shown(value)}")
    return float(value)


def positive_int(value: Any) -> int:
    """An integer >= 1 (an integral float such as 2.0 is accepted; bools are not)."""
    ok = (
        isinstance(value, Real)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and float(value) >= 1
        and (isinstance(value, Integral) or float(value).is_integer())
    )
    if not ok:
        raise ValueError(f"an integer >= 1, got {shown(value)}")
    return int(value)


def shown(value: Any) -> str:
    """``value`` as a message shows it: a numpy scalar (a calibrated or computed parameter) as the Python number it
    holds, ``0.3`` rather than ``np.float64(0.3)``."""
    return repr(value.item() if isinstance(value, np.generic) else value)


def parameter_error(policy: str, parameter: str, exc: ValueError) -> ValueError:
    """The uniform message: ``<policy> parameter <name> must be ...``."""
    return ValueError(f"{policy} parameter {parameter} must be {exc}")


def num_per_layer(*values: Any) -> int | None:
    """The layer count the per-layer (tuple) values among ``values`` imply; ``None`` if all are scalars.
    Per-layer values of different lengths are refused."""
    lengths = {len(v) for v in values if isinstance(v, tuple)}
    if len(lengths) > 1:
        raise ValueError(f"per-layer parameters disagree on the number of MoE layers: {sorted(lengths)}")
    return lengths.pop() if lengths else None


def require_layers(policy: str, num_layers: int | None, logits_shape: tuple[int, ...], what: str) -> None:
    """With per-layer parameters (``num_layers`` not None), the logits must be ``[num_layers, tokens, experts]``."""
    if num_layers is None:
        return
    if len(logits_shape) != 3 or logits_shape[0] != num_layers:
        raise ValueError(
            f"policy {policy!r}: {what} has {num_layers} per-layer values, so select needs stacked "
            f"[layers, tokens, experts] logits with {num_layers} layers; got logits of shape {tuple(logits_shape)}"
        )


def layer_column(values: float | tuple[float, ...], num_layers: int) -> np.ndarray:
    """float64 ``[layers, 1, 1]`` of a scalar or per-layer value, to broadcast over ``[layers, tokens, ...]``."""
    column = np.asarray(values, dtype=np.float64)
    if column.ndim == 0:
        column = np.full(num_layers, float(column))
    return column.reshape(num_layers, 1, 1)
