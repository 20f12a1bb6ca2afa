"""Which policies, at which parameters, the quality measurements run (no torch).

``default_points``: every registered policy at its default parameters; those without a default get the
values ``benchmarks/policy_table.py`` uses: Lynx at the paper's published constants for the model's expert
count (``MoEShape.lynx_alpha/beta``), ``vote`` budget and ``prune`` keep at half the experts. ``skip`` and
``prune`` are calibrated on the calibration part of the held-out text before they run.
``lynx_sweep``: Lynx over a grid of (alpha, beta).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lynxsim.policies import POLICY_NAMES, Policy, make
from lynxsim.quality.shapes import MoEShape

SWEEP_ALPHAS = (0.5, 0.7, 1.0, 2.0, 3.0, 5.0)
SWEEP_BETAS = (1, 2, 4)


@dataclass(frozen=True)
class PolicyPoint:
    """One policy at one parameter setting; ``label`` names it in tables (``lynx(a=0.7,b=1)``)."""

    policy: str
    params: dict[str, Any] = field(default_factory=dict)
    sweep: bool = False  # part of the Lynx sweep rather than the default-parameter set

    @property
    def label(self) -> str:
        if not self.params:
            return self.policy
        inner = ",".join(
            f"{_short(k)}={v:g}" if isinstance(v, float) else f"{_short(k)}={v}" for k, v in self.params.items()
        )
        return f"{self.policy}({inner})"

    def build(self) -> Policy:
        return make(self.policy, **self.params)


def _short(name: str) -> str:
    return {"alpha": "a", "beta": "b"}.get(name, name)


def default_points(shape: MoEShape) -> list[PolicyPoint]:
    """Every registered policy, ``topk`` first (module docstring for the parameters)."""
    half = shape.num_experts // 2
    params: dict[str, dict[str, Any]] = {
        "lynx": {"alpha": shape.lynx_alpha, "beta": shape.lynx_beta},
        "vote": {"budget": half},
        "prune": {"keep": half},
    }
    names = ["topk", *(name for name in POLICY_NAMES if name != "topk")]
    return [PolicyPoint(name, params.get(name, {})) for name in names]


def lynx_sweep(
    shape: MoEShape, alphas: tuple[float, ...] = SWEEP_ALPHAS, betas: tuple[int, ...] = SWEEP_BETAS
) -> list[PolicyPoint]:
    """Lynx at every (alpha, beta) of the grid except the published point (already in ``default_points``)."""
    published = (shape.lynx_alpha, shape.lynx_beta)
    return [
        PolicyPoint("lynx", {"alpha": float(a), "beta": int(b)}, sweep=True)
        for a in alphas
        for b in betas
        if (float(a), int(b)) != published
    ]
