"""Recorded routing, fitted profiles and calibrated policies inside whole runs, and the `routing` CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lynxsim.cli import main
from lynxsim.config import validate_experiment
from lynxsim.errors import InputError
from lynxsim.routing.fit import load_profile
from lynxsim.routing.profiles import adapt_profile, profile_path
from lynxsim.runner import prepare, run_experiment
from shared_data import FLAME_DIR

REPO = Path(__file__).resolve().parents[1]


def experiment(routing: dict, policies: list[dict], model: str = "deepseek-v2-lite") -> dict:
    return {
        "name": "routing",
        "model": model,
        "hardware": "h200",
        "workload": {
            "arrival": {"kind": "poisson", "rate_per_s": 20.0},
            "prompt_tokens": {"kind": "uniform", "low_tokens": 8, "high_tokens": 64},
            "output_tokens": {"kind": "uniform", "low_tokens": 4, "high_tokens": 24},
        },
        "routing": routing,
        "serving": {"max_num_seqs": 32, "max_num_batched_tokens": 256},
        "policies": policies,
        "simulation": {"seed": 3, "num_requests": 24},
    }


REPLAY = {"kind": "trace", "path": str(FLAME_DIR)}
ALL_POLICIES = [
    {"name": "topk"},
    {"name": "lynx", "alpha": 3, "beta": 2},
    {"name": "skip"},
    {"name": "prune", "keep": 16},
    {"name": "capacity", "capacity_factor": 1.0, "apply_to": "all"},
    {"name": "vote", "budget": 16},
]


def test_replay_runs_every_policy_and_accounts_for_every_request() -> None:
    result = run_experiment(validate_experiment(experiment(REPLAY, ALL_POLICIES)))
    summaries = {run.label: run.summary for run in result.runs}
    for run in result.runs:
        assert (run.requests["status"] == "finished").all(), run.label
        assert (run.requests["generated_tokens"] == run.requests["output_tokens"]).all()
    assert summaries["lynx"]["mean_distinct_experts"] < summaries["topk"]["mean_distinct_experts"]
    assert summaries["prune"]["mean_distinct_experts"] <= 16 and summaries["vote"]["mean_distinct_experts"] <= 16
    assert summaries["capacity"]["assignments_dropped"] > 0 and summaries["skip"]["assignments_dropped"] > 0
    # dropping assignments shortens MoE time only through fewer assignments, never below the topk floor of 0
    capacity = result.runs[4].iterations
    assert (capacity["moe_s"] > 0).all()


def test_calibrated_policies_measure_one_value_per_model_layer() -> None:
    setup = prepare(validate_experiment(experiment(REPLAY, ALL_POLICIES)))
    policies = {label: policy for label, _, policy in setup.policies}
    assert len(policies["skip"].beta) == setup.model.num_moe_layers  # type: ignore[attr-defined]
    kept = policies["prune"].kept_experts  # type: ignore[attr-defined]
    assert len(kept) == setup.model.num_moe_layers and all(len(layer) == 16 for layer in kept)


def test_replay_on_a_model_with_other_expert_count_is_an_input_error() -> None:
    with pytest.raises(InputError) as info:
        prepare(validate_experiment(experiment(REPLAY, [{"name": "topk"}], model="mixtral-8x7b")))
    assert str(info.value).startswith("routing.path") and "64" in str(info.value)


def test_missing_trace_is_an_input_error() -> None:
    with pytest.raises(InputError, match="routing.path"):
        prepare(validate_experiment(experiment({"kind": "trace", "path": "/nowhere/trace.npz"}, [{"name": "topk"}])))


def test_shipped_profile_runs_and_unknown_profile_lists_known() -> None:
    result = run_experiment(
        validate_experiment(
            experiment(
                {"kind": "profile", "name": "flame-moe-290m"},
                [{"name": "topk"}, {"name": "lynx", "alpha": 3, "beta": 2}],
            )
        )
    )
    assert (result.runs[1].requests["status"] == "finished").all()
    with pytest.raises(InputError, match="flame-moe-290m"):
        prepare(validate_experiment(experiment({"kind": "profile", "name": "nope"}, [{"name": "topk"}])))


def test_adapt_profile_maps_layers_and_drops_bias_of_other_expert_counts() -> None:
    fitted = load_profile(profile_path("flame-moe-290m"))  # 8 layers, 64 experts
    same_experts = adapt_profile(fitted, 26, 64)
    assert len(same_experts.persistence) == 26 and same_experts.persistence[0] == fitted.persistence[0]  # type: ignore[arg-type,index]
    assert same_experts.persistence[-1] == fitted.persistence[-1]  # type: ignore[index]
    assert same_experts.expert_bias is not None and len(same_experts.expert_bias) == 26
    other_experts = adapt_profile(fitted, 32, 8)
    assert other_experts.expert_bias is None
    assert other_experts.popularity_skew[0] == pytest.approx(float(np.std(fitted.expert_bias[0])))  # type: ignore[index]


def test_shipped_experiments_are_valid() -> None:
    from lynxsim.config import load_experiment

    for name in ("flame_policies.yaml", "flame_profile.yaml"):
        setup = prepare(load_experiment(REPO / "experiments" / name))
        assert len(setup.policies) == 9


def test_cli_routing_fit_compare_and_import(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    profile = tmp_path / "flame.yaml"
    assert main(["routing", "fit", str(FLAME_DIR), "--out", str(profile)]) == 0
    assert load_profile(profile) == load_profile(profile_path("flame-moe-290m"))
    assert main(["routing", "compare", str(FLAME_DIR), "--profile", str(profile), "--out", str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr().out
    assert "distinct experts" in printed and "layer mean" in printed
    assert (tmp_path / "cmp" / "distinct_experts.csv").is_file()
    assert (tmp_path / "cmp" / "routing_distinct_experts.png").is_file()
    assert main(["routing", "import-flame", str(FLAME_DIR), str(tmp_path / "flame.npz")]) == 0
    assert main(["routing", "fit", str(tmp_path / "missing"), "--out", str(profile)]) == 2
