"""Every shipped experiment is priced by measured kernel tables wherever its hardware profile has them.

A run whose deployment has no tables silently falls back to the roofline, which under-predicts what a serving
engine measures; so every point of every experiment in ``experiments/`` (sweep points included) must resolve
to a measured cost model, unless it asks for the roofline itself (a profile without tables, or
``measured_tables: false``). A new experiment or deployment without tables fails here, naming the point.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lynxsim.config import load_experiment
from lynxsim.models import load_catalog_model
from lynxsim.parallel import ParallelPlan, make_instance_cost_model
from lynxsim.runner import resolve_hardware, resolve_model
from lynxsim.sweep.points import load_sweep

EXPERIMENTS = sorted(Path(__file__).resolve().parent.parent.glob("experiments/**/*.yaml"))


def _configs(path: Path) -> list[tuple[str, object]]:
    """(label, config) of the experiment, or of each point of its sweep."""
    base = load_experiment(path)
    if base.sweep is None:
        return [(path.name, base)]
    return [(f"{path.name} {point.point.values}", point.config) for point in load_sweep(path).points]


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.name for p in EXPERIMENTS])
def test_every_experiment_point_is_priced_by_measured_tables(path: Path) -> None:
    unmeasured = []
    for label, config in _configs(path):
        hardware = resolve_hardware(config)
        if not hardware.measured.tables:  # a roofline profile, or measured_tables: false
            continue
        parallelism = config.deployment.parallelism
        plan = ParallelPlan(parallelism.tensor_parallel, parallelism.expert_parallel)
        cost = make_instance_cost_model(resolve_model(config), hardware, config.model.name, plan)
        if cost.source.startswith("roofline") or "measured" not in cost.source:
            unmeasured.append(f"{label}: {cost.source}")
    assert not unmeasured, "priced by the roofline although the profile has tables:\n" + "\n".join(unmeasured)


def test_a_deployment_without_tables_is_caught() -> None:
    """The check above can fail: an EP8 DeepSeek-V3 instance on the H200 profile has no tables."""
    hardware = resolve_hardware(load_experiment(EXPERIMENTS[0]))
    model = load_catalog_model("deepseek-v3")
    cost = make_instance_cost_model(model, hardware, "deepseek-v3", ParallelPlan(expert_parallel=8))
    assert cost.source.startswith("roofline")
