"""Request-length distributions, used for both prompt and output lengths (in tokens)."""

from __future__ import annotations

from typing import Annotated, Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator


class FixedLength(BaseModel):
    """Every request has the same length."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["fixed"] = "fixed"
    tokens: int = Field(gt=0)

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        return np.full(size, self.tokens, dtype=np.int64)


class UniformLength(BaseModel):
    """Lengths drawn uniformly from ``low_tokens..high_tokens`` inclusive."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["uniform"] = "uniform"
    low_tokens: int = Field(gt=0)
    high_tokens: int = Field(gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> "UniformLength":
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
    median_tokens: float = Field(gt=0)
    sigma: float = Field(ge=0, description="standard deviation of the log-length")
    max_tokens: int = Field(gt=0)

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        draws = self.median_tokens * np.exp(self.sigma * rng.standard_normal(size))
        return np.clip(np.rint(draws), 1, self.max_tokens).astype(np.int64)


LengthDistribution = Annotated[Union[FixedLength, UniformLength, LognormalLength], Field(discriminator="kind")]
