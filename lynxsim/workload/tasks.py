"""Benchmark-task request lengths: named prompt and output length distributions of common evaluation tasks.

Each task is a package data file ``lynxsim/workload/data/tasks/<name>.yaml`` holding derived statistics only (never
the dataset's text): the task's ``prefix_tokens`` (the standard few-shot prompt that every request of the task
starts with, so that prompts of one task share it; 0 for a zero-shot task or chat), 101 quantiles (0, 1, ..., 100 %)
of the question's own tokens after that prefix, and 101 quantiles of the output tokens (reference solutions, or a
chat's reply), plus a ``source`` block naming where and how the numbers were derived (repository, licence, split,
few-shot format, the token counting used, and the date). A prompt length is ``prefix_tokens`` plus a question length
drawn from the quantile table by inverse-CDF sampling (linear between quantiles), so every prompt is at least
``prefix_tokens``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lynxsim.errors import InputError
from lynxsim.yaml_input import read_yaml_mapping

TASKS_DIR = Path(__file__).parent / "data" / "tasks"
SOURCE_KEYS = ("url", "dataset", "licence", "split", "few_shot", "tokens", "derived")
NUM_QUANTILES = 101


@dataclass(frozen=True)
class TaskProfile:
    """One task's shipped statistics: the shared few-shot prefix and quantile tables (tokens)."""

    name: str
    description: str
    source: dict[str, Any]
    prefix_tokens: int
    question_quantiles: np.ndarray
    output_quantiles: np.ndarray

    def sample(self, rng: np.random.Generator, size: int, column: Literal["prompt", "output"]) -> np.ndarray:
        """``size`` lengths: prompts are ``prefix_tokens`` plus a question length; outputs are output lengths."""
        table = self.question_quantiles if column == "prompt" else self.output_quantiles
        draws = np.interp(rng.random(size) * (NUM_QUANTILES - 1), np.arange(NUM_QUANTILES), table)
        tokens = np.maximum(np.rint(draws), 1).astype(np.int64)
        return tokens + self.prefix_tokens if column == "prompt" else tokens


def task_names() -> tuple[str, ...]:
    """The shipped tasks, by name (the data files' stems)."""
    return tuple(sorted(p.stem for p in TASKS_DIR.glob("*.yaml")))


@functools.cache
def load_task(name: str) -> TaskProfile:
    """Read and check one task's data file; an unknown name or a malformed file is an ``InputError``."""
    if name not in task_names():
        raise InputError("", f"unknown task {name!r}: known tasks are {', '.join(task_names())}")
    path = TASKS_DIR / f"{name}.yaml"
    raw = read_yaml_mapping(path, "task file")
    source = raw.get("source")
    missing = [k for k in SOURCE_KEYS if not isinstance(source, dict) or not source.get(k)]
    if missing:
        raise InputError(str(path), f"source is missing {', '.join(missing)}")
    assert isinstance(source, dict)
    prefix = raw.get("prefix_tokens")
    if not isinstance(prefix, int) or prefix < 0:
        raise InputError(str(path), "prefix_tokens must be an integer >= 0")
    tables = {}
    for key in ("question_quantiles", "output_quantiles"):
        values = np.asarray(raw.get(key, []), dtype=float)
        if values.shape != (NUM_QUANTILES,) or np.any(np.diff(values) < 0) or values[0] < 1:
            raise InputError(str(path), f"{key} must be {NUM_QUANTILES} non-decreasing token counts >= 1")
        tables[key] = values
    return TaskProfile(name, str(raw.get("description", "")), dict(source), prefix,
                       tables["question_quantiles"], tables["output_quantiles"])
