"""Benchmark-task workloads: ``{kind: task, name: ...}`` lengths from the shipped quantile tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from lynxsim.config import load_experiment, validate_experiment
from lynxsim.errors import InputError
from lynxsim.workload.lengths import TaskLength
from lynxsim.workload.requests import generate_requests
from lynxsim.workload.tasks import NUM_QUANTILES, SOURCE_KEYS, TASKS_DIR, load_task, task_names

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = {"gsm8k", "humaneval", "mbpp", "minerva_math", "sharegpt"}


def _experiment(prompt: dict, output: dict) -> dict:
    return {
        "name": "t", "model": "mixtral-8x7b", "hardware": "h200",
        "workload": {"arrival": {"kind": "poisson", "rate_per_s": 2.0}, "prompt_tokens": prompt,
                     "output_tokens": output},
        "routing": {"kind": "synthetic"}, "policies": [{"name": "topk"}],
        "simulation": {"seed": 0, "num_requests": 10},
    }


def _draw(workload: Any, seed: int, count: int) -> Any:
    """The run's requests (``workload`` untyped: requests.Length may not list TaskLength yet)."""
    return generate_requests(workload.arrival, workload.prompt_tokens, workload.output_tokens, seed=seed,
                             num_requests=count)


def test_shipped_tasks() -> None:
    assert EXPECTED <= set(task_names())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_samples_in_range_with_prefix(name: str) -> None:
    task = load_task(name)
    dist = TaskLength(name=name)
    assert dist.prefix_tokens == task.prefix_tokens >= 0
    prompts = dist.sample(np.random.default_rng(1), 5000, "prompt")
    outputs = dist.sample(np.random.default_rng(2), 5000, "output")
    for draws in (prompts, outputs):
        assert draws.dtype == np.int64 and draws.shape == (5000,)
    assert np.all(prompts >= task.prefix_tokens + 1)  # the prefix is in every prompt, plus a question
    assert prompts.max() <= task.prefix_tokens + task.question_quantiles[-1]
    assert outputs.min() >= 1 and outputs.max() <= task.output_quantiles[-1]
    # the sample median is close to the table's
    question_median = np.median(prompts) - task.prefix_tokens
    assert abs(question_median - task.question_quantiles[50]) <= 0.1 * task.question_quantiles[50] + 2
    assert abs(np.median(outputs) - task.output_quantiles[50]) <= 0.1 * task.output_quantiles[50] + 2


def test_deterministic_for_a_seed() -> None:
    dist = TaskLength(name="gsm8k")
    a = dist.sample(np.random.default_rng(7), 100, "prompt")
    b = dist.sample(np.random.default_rng(7), 100, "prompt")
    c = dist.sample(np.random.default_rng(8), 100, "prompt")
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_column_field_overrides_and_missing_column_is_an_error() -> None:
    out = TaskLength(name="gsm8k", column="output").sample(np.random.default_rng(0), 50, "prompt")
    assert out.max() <= load_task("gsm8k").output_quantiles[-1]
    with pytest.raises(ValueError, match="column"):
        TaskLength(name="gsm8k").sample(np.random.default_rng(0), 5)


def test_generate_requests_with_explicit_columns() -> None:
    config = validate_experiment(_experiment({"kind": "task", "name": "mbpp", "column": "prompt"},
                                             {"kind": "task", "name": "mbpp", "column": "output"}))
    w = config.workload
    one, two = _draw(w, 3, 200), _draw(w, 3, 200)
    assert np.array_equal(one.prompt_tokens, two.prompt_tokens)
    assert np.all(np.asarray(one.prompt_tokens) >= load_task("mbpp").prefix_tokens)


def test_generate_requests_default_columns() -> None:
    config = validate_experiment(_experiment({"kind": "task", "name": "gsm8k"}, {"kind": "task", "name": "gsm8k"}))
    w = config.workload
    table = _draw(w, 0, 100)
    assert np.all(np.asarray(table.prompt_tokens) >= load_task("gsm8k").prefix_tokens)
    assert np.max(table.output_tokens) <= load_task("gsm8k").output_quantiles[-1]


def test_unknown_task_is_a_one_line_config_error() -> None:
    with pytest.raises(InputError) as info:
        validate_experiment(_experiment({"kind": "task", "name": "gsm9k"}, {"kind": "task", "name": "gsm8k"}))
    message = str(info.value)
    assert "\n" not in message
    assert "workload.prompt_tokens" in message and "gsm9k" in message and "gsm8k" in message


def test_unknown_task_name_in_load_task() -> None:
    with pytest.raises(InputError, match="unknown task 'nope'"):
        load_task("nope")


@pytest.mark.parametrize("path", sorted(TASKS_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_data_files_state_their_source(path: Path) -> None:
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert raw["name"] == path.stem
    for key in SOURCE_KEYS:
        assert raw["source"].get(key), f"{path.name}: source.{key} missing"
    assert "approximation" in raw["source"]["tokens"] or "tokenizer" in raw["source"]["tokens"]
    assert isinstance(raw["prefix_tokens"], int)
    for key in ("question_quantiles", "output_quantiles"):
        values = raw[key]
        assert len(values) == NUM_QUANTILES and values == sorted(values) and values[0] >= 1


def test_sharegpt_is_chat_within_vllms_filter() -> None:
    """ShareGPT has no shared prefix, and its table keeps to vLLM's benchmark_serving filter: prompt and output
    >= 4 tokens, prompt <= 1024, prompt + output <= 2048 (so no output above 2044)."""
    task = load_task("sharegpt")
    assert task.prefix_tokens == 0
    assert task.question_quantiles[0] >= 4 and task.output_quantiles[0] >= 4
    assert task.question_quantiles[-1] <= 1024 and task.output_quantiles[-1] <= 2048 - 4
    prompts = TaskLength(name="sharegpt").sample(np.random.default_rng(3), 2000, "prompt")
    assert prompts.min() >= 4 and prompts.max() <= 1024


def test_sharegpt_medians_match_the_vllm_papers_lengths() -> None:
    """The table's medians against the vLLM paper's own ShareGPT lengths (first round of each conversation, OPT
    tokens, same filter; sosp-ae-39/sosp-ae-astra datasets/sharegpt_opt_text_completion_length.pkl): median prompt
    34 and output 280 tokens. The tolerance covers the tokenizer (Llama-2 here) and the dataset version; it
    rejects vLLM benchmark_serving's role-mixed sample of the split file (medians 113 and 149)."""
    task = load_task("sharegpt")
    assert task.question_quantiles[50] == pytest.approx(34, rel=0.25)
    assert task.output_quantiles[50] == pytest.approx(280, rel=0.25)
    # chat is decode-heavy: the reply is ten times the prompt at the median
    assert task.output_quantiles[50] > 5 * task.question_quantiles[50]


def test_experiment_file_validates() -> None:
    config = load_experiment(ROOT / "experiments" / "task_workloads.yaml")
    assert isinstance(config.workload.prompt_tokens, TaskLength)
    assert config.workload.prompt_tokens.name == "gsm8k"
    assert config.workload.prompt_tokens.prefix_tokens == load_task("gsm8k").prefix_tokens
