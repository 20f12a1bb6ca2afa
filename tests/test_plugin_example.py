"""The example plug-in package (tests/plugin_example) installed as a user would install one, then run: an
experiment naming one plug-in of each kind, each seen at work in the records (the router's assignment pattern,
the scheduler's cohorts, the scaled latencies, the hot experts, the dropped slots), the engine it forced said
out loud, and the plug-ins' own parameter errors reported as input errors.

The package is installed with pip into a folder of this test session (not into the environment, which other
checkouts may share) and put on ``sys.path`` for this module's tests only, as ``pip install`` would make it
visible; the registries forget what they discovered before and after."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from lynxsim.cli import main
from lynxsim.config import validate_experiment
from lynxsim.datatypes import BatchShape
from lynxsim.hardware import load_hardware
from lynxsim.instance_cost import CostModelContext, profile_cost_model
from lynxsim.models import load_catalog_model
from lynxsim.parallel import ParallelPlan
from lynxsim.plugins import REGISTRIES
from lynxsim.runner import prepare, simulate_policy
from simpy_oracle import oracle_run

EXAMPLE = Path(__file__).resolve().parent / "plugin_example"
EXPERIMENT = EXAMPLE / "experiment.yaml"
SETTINGS = yaml.safe_load(EXPERIMENT.read_text())
POLICIES = ("topk", "top_n")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The example package installed by pip (from a copy, so that the build leaves nothing in the checkout) into a
    folder on ``sys.path``, with fresh registries."""
    source = tmp_path_factory.mktemp("plugin-source") / "plugin_example"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = tmp_path_factory.mktemp("plugin-install")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-index", "--no-deps",
         "--no-build-isolation", "--target", str(target), str(source)],
        check=True, capture_output=True, text=True,
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(target))
        for registry in REGISTRIES:
            patch.setattr(registry, "_plugins", None)
            patch.setattr(registry, "_loaded", {})
        yield target
    for module in [name for name in sys.modules if name.split(".")[0] == "lynxsim_plugin_example"]:
        del sys.modules[module]


@dataclass(frozen=True)
class ExampleRun:
    out: Path
    printed: str

    def summary(self) -> dict:
        return json.loads((self.out / "summary.json").read_text())

    def records(self, policy: str, kind: str) -> pd.DataFrame:
        return pd.read_parquet(self.out / "policies" / policy / f"{kind}.parquet")


@pytest.fixture(scope="module")
def example_run(installed: Path, tmp_path_factory: pytest.TempPathFactory) -> ExampleRun:
    """``lynxsim run tests/plugin_example/experiment.yaml``, as a user types it."""
    out = tmp_path_factory.mktemp("plugin-run")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["run", str(EXPERIMENT), "--out", str(out), "--no-figures"]) == 0
    return ExampleRun(out, printed.getvalue())


def test_the_plugins_command_lists_each_kind(installed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins"]) == 0
    rows = {tuple(cell.strip() for cell in line.split("│")[1:3]) for line in capsys.readouterr().out.splitlines()}
    expected = {("policy", "top_n"), ("scheduler", "cohort"), ("router", "weighted_round_robin"),
                ("cost model", "scaled"), ("routing source", "hot_experts")}
    assert expected <= rows


def test_the_run_names_its_plugins(example_run: ExampleRun) -> None:
    summary = example_run.summary()
    assert summary["cost_model"].endswith(", scaled x2")
    assert summary["routing_evidence"].startswith("plug-in routing source 'hot_experts'")


@pytest.mark.parametrize("policy", POLICIES)
def test_the_router_assigns_by_weight(example_run: ExampleRun, policy: str) -> None:
    requests = example_run.records(policy, "requests").sort_values("request_id")
    assert (requests["status"] == "finished").all()
    weights = SETTINGS["deployment"]["router"]["weights"]  # [3, 1]: 0, 0, 0, 1, 0, 0, 0, 1, ...
    cycle = [position for position, weight in enumerate(weights) for _ in range(weight)]
    assert requests["instance"].tolist() == [cycle[i % len(cycle)] for i in range(len(requests))]


@pytest.mark.parametrize("policy", POLICIES)
def test_the_scheduler_runs_one_cohort_at_a_time(example_run: ExampleRun, policy: str) -> None:
    """Static batching: on each instance a request is admitted only once every request admitted before it has
    finished, and no iteration holds more than ``cohort_size`` sequences (continuous batching does neither)."""
    cohort_size = SETTINGS["serving"]["scheduler"]["cohort_size"]
    requests = example_run.records(policy, "requests")
    # to the nanosecond: arrival + delay restores the admission time up to rounding
    requests = requests.assign(admitted_s=(requests["arrival_s"] + requests["scheduling_delay_s"]).round(9))
    cohorts = 0
    for _, own in requests.groupby("instance"):
        for admitted_s, cohort in own.groupby("admitted_s"):
            earlier = own[own["admitted_s"] < admitted_s]
            assert (earlier["finish_s"] <= admitted_s + 1e-9).all()
            assert len(cohort) <= cohort_size
            cohorts += 1
    assert cohorts < len(requests)  # requests did wait for one another
    assert example_run.records(policy, "iterations")["sequences"].max() <= cohort_size


@pytest.mark.parametrize("policy", POLICIES)
def test_the_cost_model_scales_every_iteration(example_run: ExampleRun, policy: str) -> None:
    """Each iteration's dense part and overhead, which depend on its token and sequence counts only, are
    ``factor`` times what lynxsim's own cost model gives for those counts."""
    factor = SETTINGS["hardware"]["cost_model"]["factor"]
    model = load_catalog_model(SETTINGS["model"])
    base = profile_cost_model(context=CostModelContext(model, load_hardware("h200"), SETTINGS["model"],
                                                       ParallelPlan()))
    iterations = example_run.records(policy, "iterations")
    for row in iterations.itertuples():
        tokens, sequences = row.prefill_tokens + row.decode_tokens, row.sequences
        shape = BatchShape(prefill_chunk_tokens=np.array([tokens - sequences + 1]),
                           prefill_context_tokens=np.array([0]),
                           decode_context_tokens=np.ones(sequences - 1, dtype=np.int64))
        expected = base.iteration_activity(shape, base.activity(np.zeros((model.num_moe_layers, model.num_experts))))
        assert row.dense_s == pytest.approx(factor * expected.dense_s, rel=1e-12)
        assert row.overhead_s == pytest.approx(factor * expected.overhead_s, rel=1e-12)


@pytest.mark.parametrize("policy", POLICIES)
def test_the_routing_source_keeps_tokens_on_the_hot_experts(example_run: ExampleRun, policy: str) -> None:
    """Mixtral has 8 experts per layer; every token's top-k lies in the 3 hot ones, which a prompt fills."""
    hot = SETTINGS["routing"]["hot"]
    distinct = np.stack(example_run.records(policy, "iterations")["distinct_experts"].to_list())
    assert distinct.max() == hot


def test_the_policy_drops_the_weaker_slots(example_run: ExampleRun) -> None:
    """``top_n`` with n = 1 of Mixtral's top-2 drops half the slots of every iteration it applies to (pure decode),
    keeps every token's strongest expert, and leaves the other iterations to top-k."""
    summary = example_run.summary()["summary"]
    assert summary["topk"]["assignments_dropped"] == 0.0
    assert summary["top_n"]["assignments_dropped"] == 0.5 and summary["top_n"]["top1_kept"] == 1.0
    iterations = example_run.records("top_n", "iterations")
    applied = iterations["policy_applied"]
    assert applied.any() and (iterations.loc[applied, "mean_assignments_dropped"] == 0.5).all()
    assert (iterations.loc[~applied, "mean_assignments_dropped"] == 0.0).all()


def test_the_engine_runs_plugins_as_the_oracle_does(installed: Path) -> None:
    """Policies, routing sources, routers (between instances) and cost models (priced through their Python code)
    give the oracle's records on the engine (the oracle cannot run the cohort scheduler, whose steps are the
    engine's: its own test checks it)."""
    settings = {key: value for key, value in SETTINGS.items() if key != "serving"}
    setup = prepare(validate_experiment(settings))
    for label, entry, policy in setup.policies:
        run = simulate_policy(setup, label, entry, policy)
        requests, iterations, end_s = oracle_run(setup, entry, policy)
        pd.testing.assert_frame_equal(run.requests, requests, rtol=1e-12)
        pd.testing.assert_frame_equal(run.iterations, iterations, rtol=1e-12)
        assert set(run.requests["instance"]) == {0, 1}


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("serving.scheduler.cohort_size=0", "serving.scheduler: cohort_size must be a whole number >= 1, got 0"),
        ("deployment.router.speed=2",
         "deployment.router: router 'weighted_round_robin': unknown parameter(s) speed; known parameters: weights"),
        ("hardware.cost_model.factor=-1", "hardware.cost_model: factor must be positive, got -1"),
        ("routing.hot=9", "routing: hot must be a whole number in [1, 8], got 9"),
        ("policies.1.n=3", "policies[1]: n = 3 exceeds the model's top-k (2)"),
    ],
)
def test_a_plugin_refusing_a_value_is_an_input_error(
    installed: Path, capsys: pytest.CaptureFixture[str], assignment: str, message: str
) -> None:
    assert main(["check", str(EXPERIMENT), "--set", assignment]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and message in error
