"""``cohort``: request-level (static) batching, as servers batched before continuous batching.

A cohort of at most ``cohort_size`` waiting requests is admitted only when nothing runs, and no request joins
until the whole cohort has finished: the batching rule continuous batching replaced (Orca, OSDI 2022). A
scheduler subclasses ``lynxsim.engine.Scheduler`` and replaces ``schedule`` with the steps that class provides;
the KV-cache accounting, preemption and completion stay lynxsim's.
"""

from __future__ import annotations

import numpy as np

from lynxsim.engine import BlockPool, ScheduledBatch, Scheduler


class CohortScheduler(Scheduler):
    """Static batching: the running cohort alone until it is done, then the next one."""

    def __init__(
        self,
        pool: BlockPool,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        chunked_prefill: bool,
        cohort_size: int,
    ) -> None:
        if isinstance(cohort_size, bool) or not isinstance(cohort_size, int) or cohort_size < 1:
            raise ValueError(f"cohort_size must be a whole number >= 1, got {cohort_size!r}")
        super().__init__(
            pool,
            max_num_seqs=min(max_num_seqs, cohort_size),
            max_num_batched_tokens=max_num_batched_tokens,
            chunked_prefill=chunked_prefill,
        )

    def schedule(self, now_s: float) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        if len(self.running):
            tokens, left, _ = self.schedule_running(budget)
            return self.make_batch(0, tokens, budget - left)
        admitted, left = self.admit_waiting(budget, now_s, whole_prompts=not self.chunked_prefill)
        return self.make_batch(0, np.asarray(admitted, dtype=np.int64), budget - left)
