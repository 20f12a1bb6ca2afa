"""The serving engine: one compiled implementation of an instance's serving step (``compiled/``: scheduling,
KV-cache blocks, preemption, decode runs, pricing, routing hand-off), used by every deployment; the orchestrator
between instances (request routers, KV-cache transfers); and what users extend: schedulers (batching rules) and
request routers."""

from lynxsim.engine.deployment import ROLES, InstanceLoad, KVTransfer, Role
from lynxsim.engine.kv_cache import BlockPool
from lynxsim.engine.routers import LeastOutstandingRouter, RequestRouter, RoundRobinRouter, RouterFactory
from lynxsim.engine.routing_step import RoutingStep
from lynxsim.engine.scheduler import RequestQueue, ScheduledBatch, Scheduler

__all__ = [
    "ROLES",
    "BlockPool",
    "InstanceLoad",
    "KVTransfer",
    "LeastOutstandingRouter",
    "RequestQueue",
    "RequestRouter",
    "RoundRobinRouter",
    "RouterFactory",
    "Role",
    "RoutingStep",
    "ScheduledBatch",
    "Scheduler",
]
