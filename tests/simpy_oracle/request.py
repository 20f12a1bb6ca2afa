"""A request's progress through the server, in the token accounting vLLM v1 uses.

A request holds ``num_tokens`` tokens (prompt plus those generated so far) of which ``num_computed_tokens`` are in
its KV cache. Each iteration computes some of the missing ones; when none are missing, the request samples one new
token. A prompt is then just many missing tokens, a decode step exactly one, and a preempted request (KV cache
dropped, recomputed later) simply has all its tokens missing again: one rule covers prefill, chunked prefill,
decode and recomputation.

While a request runs, its counters (``num_tokens``, ``num_computed_tokens``, ``generated_tokens``, ``num_blocks``)
live in its scheduler's ``RunningSet`` (lynxsim/engine/running.py) and are written back here when it leaves the
running set or the simulation ends.
"""

from __future__ import annotations

from dataclasses import dataclass

from lynxsim.datatypes import RequestSpec


@dataclass(slots=True)
class Request:
    spec: RequestSpec
    num_tokens: int
    num_computed_tokens: int = 0
    generated_tokens: int = 0
    num_blocks: int = 0
    num_preemptions: int = 0
    first_scheduled_s: float | None = None
    first_token_s: float | None = None
    finish_s: float | None = None
    # Where it ran (cluster-wide instance indices; -1: not yet) and, in disaggregated serving, when its KV cache
    # moved from the prefill instance (``instance``) to ``decode_instance``.
    instance: int = -1
    decode_instance: int = -1
    transfer_start_s: float | None = None
    transfer_end_s: float | None = None

    @classmethod
    def arriving(cls, spec: RequestSpec) -> Request:
        return cls(spec=spec, num_tokens=spec.prompt_tokens)

    @property
    def request_id(self) -> int:
        return self.spec.request_id

    @property
    def missing_tokens(self) -> int:
        """Tokens still to compute before the request can sample its next token."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_decoding(self) -> bool:
        """One missing token that the request generated itself: a decode step, not (re)prefill."""
        return self.generated_tokens > 0 and self.missing_tokens == 1

    @property
    def is_finished(self) -> bool:
        return self.generated_tokens >= self.spec.output_tokens

    @property
    def max_tokens(self) -> int:
        """Tokens the request holds in its KV cache at its longest (the last sampled token is never cached)."""
        return self.spec.prompt_tokens + self.spec.output_tokens - 1
