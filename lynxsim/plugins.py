"""What users extend, found by name: one ``Registry`` per kind of component, built-ins and plug-ins alike.

Five kinds of component may come from outside lynxsim: expert-selection policies, schedulers (an instance's
batching rule), request routers (which instance receives a request), cost models (an iteration's latency) and
routing sources (the router logits). Each kind has one registry holding its built-ins by name plus whatever
installed packages declare in the kind's entry-point group (``lynxsim.policies``, ``lynxsim.schedulers``,
``lynxsim.routers``, ``lynxsim.cost_models``, ``lynxsim.routing_sources``; docs/extending.md walks through
one of each). An experiment names a component and gives its parameters; the registry finds the factory, checks
the parameters against its signature and binds them, so a new component needs no wiring beyond its entry point.

A registry entry is a factory: a class or function returning the component. The engine passes its own arguments
by keyword (``engine_arguments``: a scheduler's KV-cache pool and serving limits, a cost model's or routing
source's ``context``); the experiment's parameters are the factory's other keyword parameters.

Built-ins are written the way entry points are, ``module:attribute`` strings imported on first use. That keeps
this module at the bottom of the import graph, so the config layer checks a name without importing the engine
that runs it. Entry points are looked up once per process and only when a name is not built in, so a run of
built-ins never scans the installed packages; each factory is imported once. A plug-in cannot replace a
built-in: an entry point with a built-in's name is ignored with a warning.
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from collections.abc import Callable, Mapping
from functools import partial
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:  # the types of what the registries hold; their modules import this one
    from lynxsim.engine.routers import RequestRouter
    from lynxsim.engine.scheduler import Scheduler
    from lynxsim.instance_cost import InstanceCostModel
    from lynxsim.policies.base import Policy
    from lynxsim.routing.base import RoutingSource

T = TypeVar("T")

BUILTIN_ORIGIN = "lynxsim"


class Registry(Generic[T]):
    """The factories of one kind of component (each returning a ``T``), by name."""

    def __init__(
        self, kind: str, plural: str, group: str, builtins: Mapping[str, str], engine_arguments: tuple[str, ...] = ()
    ) -> None:
        self.kind = kind
        self.plural = plural
        self.group = group
        self.engine_arguments = engine_arguments
        self._builtins = dict(builtins)
        self._plugins: dict[str, list[EntryPoint]] | None = None
        self._loaded: dict[str, Callable[..., T]] = {}

    # ----- names -----

    @property
    def builtin_names(self) -> tuple[str, ...]:
        return tuple(sorted(self._builtins))

    def plugin_names(self) -> tuple[str, ...]:
        """Names that installed packages add (entry points of ``group``), sorted."""
        return tuple(sorted(self._discovered()))

    def is_builtin(self, name: str) -> bool:
        return name in self._builtins

    def known(self) -> str:
        """The names an error lists: the built-ins, then the plug-ins'."""
        plugins = self.plugin_names()
        builtins = ", ".join(self.builtin_names)
        return f"{builtins}; from plug-ins: {', '.join(plugins)}" if plugins else builtins

    def check(self, name: str) -> None:
        """``ValueError`` naming the known names when ``name`` is neither built in nor declared by a package."""
        if isinstance(name, str) and name in self._builtins:
            return
        found = self._discovered().get(name) if isinstance(name, str) else None
        if not found:
            raise ValueError(f"unknown {self.kind} {name!r}; known {self.plural}: {self.known()}")
        if len(found) > 1:
            packages = ", ".join(sorted(_origin(entry) for entry in found))
            raise ValueError(f"{self.kind} {name!r} is declared by several installed packages: {packages}")

    def origin(self, name: str) -> str:
        """Where ``name`` comes from: ``lynxsim``, or the package (and version) declaring it."""
        self.check(name)
        return BUILTIN_ORIGIN if name in self._builtins else _origin(self._discovered()[name][0])

    # ----- factories -----

    def load(self, name: str) -> Callable[..., T]:
        """The factory registered as ``name``, imported on first use; ``ValueError`` for an unknown name."""
        self.check(name)
        factory = self._loaded.get(name)
        if factory is None:
            if name in self._builtins:
                module, _, attribute = self._builtins[name].partition(":")
                factory = getattr(importlib.import_module(module), attribute)
            else:
                factory = self._discovered()[name][0].load()
            self._loaded[name] = factory
        return factory

    def parameters(self, name: str) -> tuple[str, ...]:
        """The parameters an experiment may give ``name``, in the factory's order (the engine's left out)."""
        return tuple(
            p.name for p in self._signature(name).parameters.values()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in self.engine_arguments
        )

    def takes_any_parameter(self, name: str) -> bool:
        """Whether the factory of ``name`` takes keyword parameters beyond those it names (``**params``)."""
        return any(p.kind == p.VAR_KEYWORD for p in self._signature(name).parameters.values())

    def bind(self, name: str, params: Mapping[str, Any]) -> Callable[..., T]:
        """The factory of ``name`` with the experiment's ``params`` bound, to be called with the engine's
        arguments by keyword. ``ValueError`` for an unknown name, an unknown or missing parameter, or a factory
        that does not take the engine's arguments."""
        accepted = self._signature(name).parameters
        takes_any = self.takes_any_parameter(name)
        refused = [a for a in self.engine_arguments if a not in accepted and not takes_any]
        if refused:
            raise ValueError(
                f"{self.kind} {name!r} ({self.origin(name)}) does not take {', '.join(refused)}: every {self.kind} "
                f"factory is called with {', '.join(self.engine_arguments)} by keyword"
            )
        own = self.parameters(name)
        known = f"known parameters: {', '.join(own) or 'none'}"
        unknown = sorted(p for p in params if p in self.engine_arguments or (p not in own and not takes_any))
        if unknown:
            raise ValueError(f"{self.kind} {name!r}: unknown parameter(s) {', '.join(unknown)}; {known}")
        missing = [
            p.name for p in accepted.values()
            if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            and p.name not in params and p.name not in self.engine_arguments
        ]
        if missing:
            raise ValueError(f"{self.kind} {name!r}: missing parameter(s) {', '.join(missing)}; {known}")
        return partial(self.load(name), **params)

    def _signature(self, name: str) -> inspect.Signature:
        return inspect.signature(self.load(name))

    def _discovered(self) -> dict[str, list[EntryPoint]]:
        """The group's entry points by name, looked up once; those named like a built-in are left out."""
        if self._plugins is None:
            found: dict[str, list[EntryPoint]] = {}
            for entry in entry_points(group=self.group):
                if entry.name in self._builtins:
                    warnings.warn(
                        f"lynxsim: {_origin(entry)} declares the {self.kind} {entry.name!r}, which is built in: "
                        "the built-in one is used", stacklevel=2,
                    )
                    continue
                found.setdefault(entry.name, []).append(entry)
            self._plugins = found
        return self._plugins


def _origin(entry: EntryPoint) -> str:
    dist = entry.dist
    return f"{dist.name} {dist.version}" if dist is not None else entry.value


POLICIES: Registry[Policy] = Registry(
    "policy", "policies", "lynxsim.policies",
    {
        "capacity": "lynxsim.policies.capacity:Capacity",
        "lynx": "lynxsim.policies.lynx:Lynx",
        "oea": "lynxsim.policies.oea:OEA",
        "prune": "lynxsim.policies.prune:Prune",
        "skip": "lynxsim.policies.skip:Skip",
        "topk": "lynxsim.policies.topk:TopK",
        "topp": "lynxsim.policies.topp:TopP",
        "vote": "lynxsim.policies.vote:Vote",
    },
)
"""Expert-selection policies (``lynxsim.policies.base.Policy``), built from their parameters alone."""

SCHEDULERS: Registry[Scheduler] = Registry(
    "scheduler", "schedulers", "lynxsim.schedulers",
    {"vllm": "lynxsim.engine.scheduler:Scheduler"},
    engine_arguments=("pool", "max_num_seqs", "max_num_batched_tokens", "chunked_prefill"),
)
"""An instance's batching rule (``lynxsim.engine.scheduler.Scheduler`` and its subclasses), one per instance."""

ROUTERS: Registry[RequestRouter] = Registry(
    "router", "routers", "lynxsim.routers",
    {
        "least_outstanding": "lynxsim.engine.routers:LeastOutstandingRouter",
        "round_robin": "lynxsim.engine.routers:RoundRobinRouter",
    },
)
"""Request routers (``lynxsim.engine.routers.RequestRouter``), one per pool of instances."""

COST_MODELS: Registry[InstanceCostModel] = Registry(
    "cost model", "cost models", "lynxsim.cost_models",
    {"profile": "lynxsim.instance_cost:profile_cost_model"},
    engine_arguments=("context",),
)
"""An instance's cost model (``lynxsim.instance_cost.InstanceCostModel``), given a ``CostModelContext``."""

ROUTING_SOURCES: Registry[RoutingSource] = Registry(
    "routing source", "routing sources", "lynxsim.routing_sources",
    {
        "model": "lynxsim.routing.sources:model_routing",
        "profile": "lynxsim.routing.sources:profile_routing",
        "synthetic": "lynxsim.routing.sources:synthetic_routing",
        "trace": "lynxsim.routing.sources:trace_routing",
    },
    engine_arguments=("context",),
)
"""Router logits (``lynxsim.routing.base.RoutingSource``), given a ``RoutingContext``."""

REGISTRIES: tuple[Registry[Any], ...] = (POLICIES, SCHEDULERS, ROUTERS, COST_MODELS, ROUTING_SOURCES)
