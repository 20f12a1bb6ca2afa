"""The simpy side: request lifecycle, continuous-batching scheduler, KV-cache pool, one replica."""

from lynxsim.engine.kv_cache import BlockPool
from lynxsim.engine.replica import Replica, RoutingStep
from lynxsim.engine.request import Request
from lynxsim.engine.scheduler import ScheduledBatch, Scheduler

__all__ = ["BlockPool", "Replica", "Request", "RoutingStep", "ScheduledBatch", "Scheduler"]
