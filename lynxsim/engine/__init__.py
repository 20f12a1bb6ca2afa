"""The simpy side: request lifecycle, continuous-batching scheduler, KV-cache pool, serving instances, and the
cluster of instances behind a request router (co-located replicas, or disaggregated prefill and decode)."""

from lynxsim.engine.cluster import Cluster, KVTransfer, RequestRouter, RouterFactory, run_alone
from lynxsim.engine.kv_cache import BlockPool
from lynxsim.engine.replica import ROLES, Replica, Role, RoutingStep
from lynxsim.engine.request import Request
from lynxsim.engine.scheduler import ScheduledBatch, Scheduler

__all__ = [
    "ROLES",
    "BlockPool",
    "Cluster",
    "KVTransfer",
    "Replica",
    "Request",
    "RequestRouter",
    "RouterFactory",
    "Role",
    "RoutingStep",
    "ScheduledBatch",
    "Scheduler",
    "run_alone",
]
