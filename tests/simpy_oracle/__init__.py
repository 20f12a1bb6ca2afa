"""The simpy oracle: lynxsim's serving rules as the first engine stated them, in plain Python over simpy
processes (``Replica``, ``Cluster``, ``Scheduler`` over ``Request`` objects). The package's engine
(``lynxsim.engine.compiled``) is held to it: the same experiment gives the same records on both
(tests/test_compiled_engine.py). It is a test oracle, not a second engine: runs never take it."""

from __future__ import annotations

import pandas as pd

from lynxsim.config import PolicyConfig
from lynxsim.policies import Policy
from lynxsim.runner import Setup, kv_transfer, routing_step
from simpy_oracle.cluster import Cluster, requests_frame, run_alone
from simpy_oracle.kv_cache import BlockPool
from simpy_oracle.replica import Replica
from simpy_oracle.scheduler import Scheduler

__all__ = ["BlockPool", "Cluster", "Replica", "Scheduler", "oracle_run", "run_alone"]


def oracle_scheduler(setup: Setup) -> Scheduler:
    """A fresh oracle scheduler with the run's limits (vLLM's rule)."""
    serving = setup.config.serving
    return Scheduler(BlockPool(setup.kv_cache_blocks, serving.block_size_tokens),
                     max_num_seqs=serving.max_num_seqs, max_num_batched_tokens=serving.max_num_batched_tokens,
                     chunked_prefill=serving.chunked_prefill)


def oracle_run(setup: Setup, entry: PolicyConfig, policy: Policy) -> tuple[pd.DataFrame, pd.DataFrame, float]:
    """``policy``'s simulation of ``setup`` on the oracle: the requests' and iterations' records (the tables
    ``runner.simulate_policy`` gives) and the simulated end."""
    step = routing_step(setup, entry, policy)
    deployment = setup.config.deployment
    cluster = Cluster.build(
        deployment.roles,
        lambda env, index, role: Replica(oracle_scheduler(setup), setup.cost_model, step, setup.model.num_moe_layers,
                                         env=env, index=index, role=role),
        router=setup.router,
        transfer=kv_transfer(setup) if deployment.mode == "disaggregated" else None,
    )
    end_s = cluster.run(setup.requests, setup.config.simulation.cutoff_s)
    return requests_frame(cluster.arrived, cluster.statuses), cluster.iterations(), end_s
