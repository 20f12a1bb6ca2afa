"""Request-length distributions (tokens), used for prompt and output lengths, and paired lengths from a trace.

``fixed``, ``uniform``, ``lognormal``: parametric. ``empirical``: draws with replacement from one column of a
trace (so it reproduces that column's distribution, but prompt and output are drawn independently).
``PairedLengths`` draws whole trace rows with replacement, keeping each request's prompt and output together.
``task``: a named benchmark task's lengths (``lynxsim.workload.tasks``): a prompt is the task's shared few-shot
prefix (``TaskLength.prefix_tokens``) plus the question's own tokens; an output is a reference-solution length.
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lynxsim.workload.tasks import load_task, task_names
from lynxsim.workload.traces import MAX_REQUEST_TOKENS, TraceFile


class FixedLength(BaseModel):
    """Every request has the same length."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["fixed"] = "fixed"
    tokens: int = Field(gt=0, le=MAX_REQUEST_TOKENS)

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        return np.full(size, self.tokens, dtype=np.int64)


class UniformLength(BaseModel):
    """Lengths drawn uniformly from ``low_tokens..high_tokens`` inclusive."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["uniform"] = "uniform"
    low_tokens: int = Field(gt=0, le=MAX_REQUEST_TOKENS)
    high_tokens: int = Field(gt=0, le=MAX_REQUEST_TOKENS)

    @model_validator(mode="after")
    def _ordered(self) -> UniformLength:
        if self.high_tokens < self.low_tokens:
            raise ValueError("high_tokens must be >= low_tokens")
        return self

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        return rng.integers(self.low_tokens, self.high_tokens + 1, size=size, dtype=np.int64)


class LognormalLength(BaseModel):
    """Heavy-tailed lengths, as real prompt and output lengths are: ``median_tokens * exp(sigma * N(0,1))``,
    rounded and clipped to ``1..max_tokens``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["lognormal"] = "lognormal"
    median_tokens: float = Field(gt=0, le=MAX_REQUEST_TOKENS)
    sigma: float = Field(ge=0, description="standard deviation of the log-length")
    max_tokens: int = Field(gt=0, le=MAX_REQUEST_TOKENS)

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        draws = self.median_tokens * np.exp(self.sigma * rng.standard_normal(size))
        return np.clip(np.rint(draws), 1, self.max_tokens).astype(np.int64)


class EmpiricalLength(TraceFile):
    """Lengths drawn with replacement from one column of a trace: ``column`` (``prompt`` or ``output``; default:
    the column named like the slot it fills, so ``prompt_tokens`` samples prompts), clipped to ``max_tokens``."""

    kind: Literal["empirical"] = "empirical"
    column: Literal["prompt", "output"] | None = Field(default=None, description="trace column (default: the slot's)")
    max_tokens: int | None = Field(default=None, gt=0, le=MAX_REQUEST_TOKENS, description="clip longer draws to this")

    def sample(
        self, rng: np.random.Generator, size: int, column: Literal["prompt", "output"] | None = None
    ) -> np.ndarray:
        name = self.column or column
        if name is None:
            raise ValueError("say which trace column to sample: column: prompt | output")
        values = self.load().column(name)
        draws = values[rng.integers(0, len(values), size=size)]
        return np.minimum(draws, self.max_tokens) if self.max_tokens is not None else draws.copy()


class TaskLength(BaseModel):
    """Lengths of a named benchmark task (``task_names()``: gsm8k, humaneval, mbpp, minerva_math, sharegpt), from the
    quantile tables shipped in ``lynxsim/workload/data/tasks``. ``column`` (``prompt`` or ``output``; default: the
    slot's, so ``prompt_tokens`` samples prompts) picks the table. Every prompt is ``prefix_tokens`` (the task's
    standard few-shot prompt, shared by all its requests; 0 for a zero-shot task) plus the question's own tokens."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["task"] = "task"
    name: str = Field(description="benchmark task: gsm8k | humaneval | mbpp | minerva_math | sharegpt")
    column: Literal["prompt", "output"] | None = Field(
        default=None, description="lengths to draw (default: the slot's)"
    )

    @field_validator("name")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in task_names():
            raise ValueError(f"unknown task {value!r}: known tasks are {', '.join(task_names())}")
        return value

    @property
    def prefix_tokens(self) -> int:
        """Tokens of the task's shared few-shot prefix: the first ``prefix_tokens`` of every prompt are the same."""
        return load_task(self.name).prefix_tokens

    def sample(
        self, rng: np.random.Generator, size: int, column: Literal["prompt", "output"] | None = None
    ) -> np.ndarray:
        name = self.column or column
        if name is None:
            raise ValueError("say which lengths to sample: column: prompt | output")
        return load_task(self.name).sample(rng, size, name)


LengthDistribution = Annotated[
    FixedLength | UniformLength | LognormalLength | EmpiricalLength | TaskLength, Field(discriminator="kind")
]


class PairedLengths(TraceFile):
    """Prompt and output lengths drawn together: whole rows of a trace, with replacement."""

    @model_validator(mode="after")
    def _both_columns(self) -> PairedLengths:
        if self.columns is not None and (self.columns.prompt is None or self.columns.output is None):
            raise ValueError("paired lengths need both columns.prompt and columns.output")
        return self

    def sample(self, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
        trace = self.load()
        prompts, outputs = trace.column("prompt"), trace.column("output")
        rows = rng.integers(0, len(trace), size=size)
        return prompts[rows], outputs[rows]
