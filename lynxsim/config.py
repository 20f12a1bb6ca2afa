"""The experiment schema: what one YAML file may say, validated before anything runs.

Validation happens up front so that a typo in the last policy never costs the user the runs before it, and every
error names the key path and the YAML line it came from (``quickstart.yaml:14: workload.arrival.rate_per_s: ...``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from lynxsim.errors import InputError
from lynxsim.plugins import COST_MODELS, ROUTERS, ROUTING_SOURCES, SCHEDULERS, Registry
from lynxsim.routing.statistical import DEFAULT_SAMPLES
from lynxsim.routing.synthetic import SyntheticRoutingParams
from lynxsim.routing.trace_format import DEFAULT_FILL, FillStrategy
from lynxsim.sections.report import ReportSection
from lynxsim.sections.sweep import SweepConfig
from lynxsim.workload.arrivals import ArrivalProcess, TraceArrivals
from lynxsim.workload.lengths import EmpiricalLength, LengthDistribution, PairedLengths
from lynxsim.yaml_input import error_message, read_yaml_mapping_with_nodes, value_problem

SHORTHAND_KEYS = {"model": "name", "hardware": "profile"}
"""Top-level sections that may be written as one string, and the key that string stands for
(``hardware: h200`` is ``hardware: {profile: h200}``); ``apply_override`` expands them so that ``--set`` and sweep
keys can reach their sub-keys (``hardware.overrides.efficiency.iteration_overhead_s``) whichever way the file
wrote the section."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    omitted_when_default: ClassVar[tuple[str, ...]] = ()
    """Keys left out of the dump while they hold their default: keys added after results were stored under a
    config's hash (``lynxsim.sweep.points.config_hash``), so that a config that does not set them dumps, and so
    hashes, as it did before they existed, and its stored sweep runs stay valid."""

    @model_serializer(mode="wrap")
    def _without_default_new_keys(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        fields = type(self).model_fields
        for key in self.omitted_when_default:
            if getattr(self, key) == fields[key].get_default(call_default_factory=True):
                data.pop(key, None)
        return data


class _Choice(BaseModel):
    """A registered component chosen by name, with its parameters: ``name`` alone, or ``{name: ..., <parameter>:
    <value>, ...}``. The name is checked against the kind's registry (``lynxsim.plugins``) here, so that a typo
    is reported with the YAML line; the parameters are checked against the component's signature when the run
    is prepared. A choice without parameters dumps as its bare name, as the key was written before plug-ins."""

    model_config = ConfigDict(extra="allow", frozen=True)

    registry: ClassVar[Registry[Any]]
    name: str

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"name": value}
        if not isinstance(value, (dict, _Choice)):
            raise ValueError("give a name, or a mapping of 'name' and the parameters")
        return value

    @model_validator(mode="after")
    def _registered(self) -> _Choice:
        self.registry.check(self.name)
        return self

    @model_serializer(mode="wrap")
    def _bare_name(self, handler: SerializerFunctionWrapHandler) -> str | dict[str, Any]:
        return self.name if not self.model_extra else handler(self)

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @property
    def is_plugin(self) -> bool:
        return not self.registry.is_builtin(self.name)


class SchedulerChoice(_Choice):
    """A scheduler of ``lynxsim.plugins.SCHEDULERS`` (built in: ``vllm``)."""

    registry = SCHEDULERS


class RouterChoice(_Choice):
    """A request router of ``lynxsim.plugins.ROUTERS`` (built in: ``round_robin``, ``least_outstanding``)."""

    registry = ROUTERS


class CostModelChoice(_Choice):
    """A cost model of ``lynxsim.plugins.COST_MODELS`` (built in: ``profile``)."""

    registry = COST_MODELS


class ModelConfig(_Section):
    """Which model: a catalog key (``lynxsim models`` lists them) or a Hugging Face ``config.json``."""

    name: str | None = Field(default=None, description="catalog key, e.g. mixtral-8x7b")
    hf_config: Path | None = Field(default=None, description="path to a Hugging Face config.json")
    overrides: dict[str, Any] = Field(default_factory=dict, description="ModelSpec fields to replace")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {SHORTHAND_KEYS["model"]: value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if (self.name is None) == (self.hf_config is None):
            raise ValueError("give exactly one of 'name' (catalog key) or 'hf_config' (path to config.json)")
        return self


class EfficiencyOverrides(_Section):
    """The profile's ``efficiency`` figures an experiment may replace (None: the profile's own).

    Only the host overhead is here: it is a property of the serving engine (how much CPU work per iteration it
    leaves on the GPU's critical path; README, "Host overhead"), not of the GPU, so one profile must serve both
    an engine that overlaps that work and one that does not. The GPU's own figures are measured and stay the
    profile's."""

    iteration_overhead_s: float | None = Field(
        default=None,
        ge=0,
        allow_inf_nan=False,
        description="CPU time per iteration that the GPU waits for (s), replacing efficiency.iteration_overhead_s",
    )


class HardwareOverrides(_Section):
    """Profile fields an experiment replaces, at the profile's own key paths (``efficiency.iteration_overhead_s``
    in the profile is ``hardware.overrides.efficiency.iteration_overhead_s`` in an experiment)."""

    efficiency: EfficiencyOverrides = Field(default_factory=EfficiencyOverrides)


class HardwareConfig(_Section):
    """Which GPU: a profile key (``./hw_profiles/`` first, then the shipped ``lynxsim/hw_profiles/``) or a path
    to a profile YAML."""

    profile: str = Field(description="profile key (h200, h100-sxm, ...) or path to a YAML file")
    measured_tables: bool = Field(
        default=True,
        description="false: price every kernel with the roofline even where the profile has measured tables, "
        "so that a GPU with tables can be compared on equal terms with GPUs that have none",
    )
    overrides: HardwareOverrides = Field(
        default_factory=HardwareOverrides, description="profile figures this experiment replaces"
    )
    cost_model: CostModelChoice = Field(
        default=CostModelChoice(name="profile"),
        description="what prices an iteration: profile (the profile's measured tables where it has the model's, "
        "else the roofline), or a plug-in's cost model by name, with its parameters",
    )

    omitted_when_default = ("overrides", "cost_model")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {SHORTHAND_KEYS["hardware"]: value} if isinstance(value, str) else value


class WorkloadConfig(_Section):
    """Arrivals and request lengths (tokens).

    Lengths come from exactly one place: ``paired_lengths`` (whole rows of a trace: each request's prompt and output
    together), or ``prompt_tokens`` and ``output_tokens`` (each its own distribution). With ``trace`` arrivals
    either may be left out: a length not given is the trace's own, row by row.
    """

    arrival: ArrivalProcess
    paired_lengths: PairedLengths | None = Field(
        default=None, description="prompt and output lengths drawn together: rows of a trace, with replacement"
    )
    prompt_tokens: LengthDistribution | None = Field(default=None, validate_default=True)
    output_tokens: LengthDistribution | None = Field(default=None, validate_default=True)

    @field_validator("prompt_tokens", "output_tokens")
    @classmethod
    def _one_length_source(cls, value: Any, info: ValidationInfo) -> Any:
        paired = info.data.get("paired_lengths")
        arrival = info.data.get("arrival")
        if value is not None and paired is not None:
            raise ValueError(f"paired_lengths gives both lengths already: remove {info.field_name} (or paired_lengths)")
        if value is None and paired is None and arrival is not None and not isinstance(arrival, TraceArrivals):
            raise ValueError(
                f"required: give {info.field_name} (or paired_lengths instead of prompt_tokens and output_tokens;"
                " trace arrivals default to the trace's own lengths)"
            )
        return value

    @property
    def needs_request_count(self) -> bool:
        """Random arrivals go on forever: they need simulation.num_requests or duration_s."""
        return self.arrival.kind in ("poisson", "gamma")

    @property
    def needs_num_requests(self) -> bool:
        """Closed-loop clients and batch jobs send requests without a time to stop at: they need
        simulation.num_requests."""
        return self.arrival.kind in ("closed_loop", "batch")


class SyntheticRoutingConfig(SyntheticRoutingParams):
    """Router logits from lynxsim's seeded generator (see lynxsim/routing/synthetic.py for each parameter)."""

    kind: Literal["synthetic"] = "synthetic"


class ProfileRoutingConfig(_Section):
    """The seeded generator with parameters fitted to a recorded trace (``lynxsim routing fit``): a shipped
    profile by name (lynxsim/routing/data/profiles/NAME.yaml) or a profile file."""

    kind: Literal["profile"]
    name: str | None = Field(default=None, description="shipped profile, e.g. flame-moe-290m")
    path: Path | None = Field(default=None, description="routing profile YAML written by `lynxsim routing fit`")

    @model_validator(mode="after")
    def _one_source(self) -> ProfileRoutingConfig:
        if (self.name is None) == (self.path is None):
            raise ValueError("give exactly one of 'name' (shipped profile) or 'path' (profile file)")
        return self


class TraceRoutingConfig(_Section):
    """Replay of recorded router outputs: each simulated request follows one recorded sequence in order."""

    kind: Literal["trace"]
    path: Path = Field(description="a lynxsim .npz trace, or a folder of FLAME-MoE layerNN.csv files")
    fill: FillStrategy = Field(
        default=DEFAULT_FILL, description="how the logits a top-k-only trace lacks are filled in"
    )


class PluginRoutingConfig(BaseModel):
    """Router logits from a plug-in's routing source (an entry point of ``lynxsim.routing_sources``): its
    ``name``, and its parameters as the section's other keys, passed as written (a relative path stays relative
    to the current directory)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    kind: Literal["plugin"]
    name: str = Field(description="the routing source's name, as its package declares it")

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        ROUTING_SOURCES.check(name)
        if ROUTING_SOURCES.is_builtin(name):
            raise ValueError(f"{name!r} is built in: write kind: {name}")
        return name

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ModelRoutingConfig(_Section):
    """The model's own routing, the default: its shipped routing profile
    (``lynxsim/routing/data/profiles/<catalog key>.yaml``, the generator fitted to the model's published routing
    statistics) where the catalog model has one, else the plain generator with its defaults (an assumption, which
    the run's ``routing_evidence`` states)."""

    kind: Literal["model"] = "model"


RoutingConfig = Annotated[
    ModelRoutingConfig | SyntheticRoutingConfig | ProfileRoutingConfig | TraceRoutingConfig | PluginRoutingConfig,
    Field(discriminator="kind"),
]


class ServingConfig(_Section):
    """The serving engine's scheduler and its limits, as vLLM names them."""

    max_num_seqs: int = Field(default=256, gt=0, le=1 << 16, description="most sequences in one iteration's batch")
    max_num_batched_tokens: int = Field(
        default=2048, gt=0, le=1 << 22, description="most tokens (prefill + decode) per iteration")
    chunked_prefill: bool = Field(default=True, description="split long prompts across iterations, mixed with decodes")
    block_size_tokens: int = Field(default=16, gt=0, le=1 << 12, description="tokens per KV-cache block")
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1, description="share of GPU memory for weights + KV")
    activation_reserve_bytes: float = Field(default=2e9, ge=0, description="memory kept for activations")
    scheduler: SchedulerChoice = Field(
        default=SchedulerChoice(name="vllm"),
        description="the batching rule: vllm (continuous batching; chunked_prefill chooses v1's or v0's), or a "
        "plug-in's scheduler by name, with its parameters",
    )
    prefix_caching: bool = Field(
        default=True,
        description="reuse the KV cache of prompt prefixes that requests share (vLLM v1's automatic prefix caching, "
        "on by default there too); the workload says which share one (task prefixes, trace hash_ids, sessions)",
    )

    omitted_when_default = ("scheduler", "prefix_caching")


class OffloadingConfig(_Section):
    """Expert offloading (``lynxsim.engine.offloading``): each MoE layer keeps some experts in GPU memory, the
    others in host memory, fetched over the host link when an iteration activates them. The GPU's share is given
    by exactly one of ``resident_experts_per_layer``, ``host_expert_bytes`` or ``resident_experts``."""

    residency: Literal["static", "lru"] = Field(
        default="static",
        description="static: the resident set never changes (missing experts are streamed in for the layer and "
        "dropped); lru: each layer's resident set is a cache of the experts used most recently",
    )
    resident_experts_per_layer: int | None = Field(
        default=None, ge=0, le=1 << 16, description="experts each MoE layer keeps in GPU memory")
    host_expert_bytes: float | None = Field(
        default=None, gt=0, allow_inf_nan=False,
        description="bytes of expert weights left in host memory (whole experts, spread over the layers)",
    )
    resident_experts: list[list[int]] | None = Field(
        default=None,
        description="static residency: the experts each MoE layer keeps, one list per layer (default: the most "
        "popular experts under the run's routing, by top-k choices on a sample of its tokens)",
    )

    @model_validator(mode="after")
    def _one_size(self) -> OffloadingConfig:
        given = [key for key in ("resident_experts_per_layer", "host_expert_bytes", "resident_experts")
                 if getattr(self, key) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of resident_experts_per_layer, host_expert_bytes or resident_experts"
                             + (f" (got {', '.join(given)})" if given else ""))
        if self.resident_experts is not None:
            for layer, experts in enumerate(self.resident_experts):
                if len(set(experts)) != len(experts) or any(e < 0 for e in experts):
                    raise ValueError(f"resident_experts[{layer}] must list distinct non-negative expert indices")
        return self


class ParallelismConfig(_Section):
    """How one instance splits the model over GPUs (see ``lynxsim.parallel``). An instance spans
    ``max(tensor_parallel, expert_parallel)`` GPUs; attention and the dense layers run tensor-parallel over all of
    them; the routed experts are TP-sharded when ``expert_parallel`` is 1 and placed whole on ``expert_parallel``
    ranks otherwise (vLLM's ``--enable-expert-parallel``), so ``expert_parallel`` is 1 or the instance's GPU count."""

    tensor_parallel: int = Field(
        default=1, ge=1, le=1024, description="GPUs that attention and dense layers are split over")
    expert_parallel: int = Field(
        default=1, ge=1, le=1024, description="ranks the routed experts are placed on (1: TP-sharded)")

    @field_validator("tensor_parallel", "expert_parallel", mode="before")
    @classmethod
    def _strict_int(cls, value: Any) -> Any:
        if isinstance(value, (bool, str)) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"must be a whole number of GPUs, got {value!r}")
        return value

    @model_validator(mode="after")
    def _one_rule(self) -> ParallelismConfig:
        if self.expert_parallel > 1 and self.tensor_parallel not in (1, self.expert_parallel):
            raise ValueError(
                f"expert_parallel {self.expert_parallel} with tensor_parallel {self.tensor_parallel}: "
                "experts are placed over all of an instance's GPUs, so tensor_parallel must be 1 or equal "
                "expert_parallel"
            )
        return self

    @property
    def gpus(self) -> int:
        """GPUs per instance."""
        return max(self.tensor_parallel, self.expert_parallel)


class DeploymentConfig(_Section):
    """How many serving instances, in which roles, behind which request router (one co-located instance by
    default). Every instance spans ``parallelism.gpus`` GPUs (one by default) holding the whole model, with its
    own KV cache sized by ``serving``."""

    mode: Literal["colocated", "disaggregated"] = Field(
        default="colocated",
        description="colocated: every instance prefills and decodes (continuous batching, chunked prefill); "
        "disaggregated: prefill instances compute prompts, then the KV cache moves to a decode instance",
    )
    replicas: int = Field(default=1, gt=0, le=1024, description="colocated: number of instances")
    prefill_instances: int = Field(default=1, gt=0, le=1024, description="disaggregated: number of prefill instances")
    decode_instances: int = Field(default=1, gt=0, le=1024, description="disaggregated: number of decode instances")
    router: RouterChoice = Field(
        default=RouterChoice(name="round_robin"),
        description="which instance receives a request: round_robin (in turn), least_outstanding (the one with the "
        "fewest outstanding requests), or a plug-in's router by name, with its parameters",
    )
    transfer_bandwidth_bytes_per_s: float | None = Field(
        default=None,
        gt=0,
        description="disaggregated: KV-cache transfer bandwidth, one direction (default: the hardware profile's "
        "sustained interconnect, i.e. NVLink within a node; across nodes use the NIC's, e.g. 50e9 for "
        "400 Gb/s InfiniBand)",
    )
    transfer_latency_s: float = Field(default=0.0, ge=0, description="disaggregated: fixed cost of each KV transfer")
    parallelism: ParallelismConfig = Field(
        default_factory=ParallelismConfig, description="tensor/expert parallelism of every instance"
    )

    @model_validator(mode="after")
    def _counts_of_the_mode(self) -> DeploymentConfig:
        other = ("prefill_instances", "decode_instances") if self.mode == "colocated" else ("replicas",)
        stray = [key for key in other if key in self.model_fields_set]
        if stray:
            wanted = "replicas" if self.mode == "colocated" else "prefill_instances and decode_instances"
            raise ValueError(f"{', '.join(stray)} does not apply to mode {self.mode} (it takes {wanted})")
        return self

    @property
    def roles(self) -> list[Literal["colocated", "prefill", "decode"]]:
        """Each instance's role, in instance-index order (prefill instances first)."""
        if self.mode == "colocated":
            return ["colocated"] * self.replicas
        prefill: list[Literal["colocated", "prefill", "decode"]] = ["prefill"] * self.prefill_instances
        return prefill + ["decode"] * self.decode_instances


class PolicyConfig(BaseModel):
    """One selection policy to simulate: ``name`` plus that policy's parameters."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str
    label: str | None = Field(default=None, description="name shown in tables and figures")
    apply_to: Literal["decode_only", "all"] = Field(
        default="decode_only", description="iterations the policy runs on; the others use plain top-k"
    )

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class SimulationConfig(_Section):
    """How long to simulate and what to leave out of the statistics."""

    omitted_when_default = ("max_wall_s",)

    seed: int = Field(default=0, ge=0)
    num_requests: int | None = Field(
        default=None, gt=0, le=10**8, description="requests to generate (trace and list arrivals: at most the first N)"
    )
    duration_s: float | None = Field(
        default=None, gt=0, description="generate arrivals during this many seconds (trace arrivals: after scaling)"
    )
    warmup_s: float = Field(default=0.0, ge=0, description="requests arriving earlier are left out of statistics")
    cutoff_s: float | None = Field(default=None, gt=0, description="stop the simulation here (default: drain)")
    routing_mode: Literal["exact", "statistical"] = Field(
        default="exact",
        description="exact: route every iteration's tokens through the policy; statistical: draw each iteration's "
        "expert activity from a table of batches routed once per policy (lynxsim.routing.statistical)",
    )
    statistical_samples: int = Field(
        default=DEFAULT_SAMPLES,
        gt=0,
        description="statistical mode: batches tabulated per batch size (exact mode ignores it)",
    )
    max_wall_s: float = Field(
        default=86400.0,
        gt=0,
        description="refuse a run whose simulation may take longer than this many seconds (lynxsim.preflight's "
        "upper bound from measured speeds): a typo in a request count is stopped at once, not after a day",
    )
    statistical_cache: bool = Field(
        default=True,
        description="statistical mode: keep built tables on disk (LYNXSIM_CACHE_DIR, else ~/.cache/lynxsim) and "
        "reuse them in later runs with the same routing, model, policy and grid",
    )

    @model_validator(mode="after")
    def _length(self) -> SimulationConfig:
        if self.cutoff_s is not None and self.cutoff_s <= self.warmup_s:
            raise ValueError("cutoff_s must be later than warmup_s")
        return self


class SLOConfig(_Section):
    """Latency targets per request; a run reports the share of requests meeting all of them (attainment) and
    their rate (goodput), and `lynxsim capacity` finds the highest arrival rate at which attainment holds."""

    ttft_s: float | None = Field(default=None, gt=0, description="time-to-first-token target (s)")
    tpot_s: float | None = Field(default=None, gt=0, description="time-per-output-token target (s)")
    attainment: float = Field(default=0.99, gt=0, le=1, description="share of requests that must meet the targets")
    max_scheduling_delay_s: float = Field(
        default=5.0,
        gt=0,
        description="capacity search only: a rate is sustainable while the p99 wait from arrival to first "
        "scheduling stays under this (Vidur's capacity criterion, Agrawal et al., MLSys 2024, uses 5 s)",
    )

    @property
    def has_target(self) -> bool:
        """Whether a latency target is set: without one, attainment and goodput mean nothing."""
        return self.ttft_s is not None or self.tpot_s is not None


class OutputConfig(_Section):
    """Where results go."""

    dir: Path = Field(default=Path("runs/experiment"), description="run directory (created)")
    figures: bool = Field(default=True, description="write PNG figures")


@dataclass(frozen=True, eq=False)
class _Origin:
    """Where an experiment's keys were written: its file, the file's YAML nodes and the ``--set`` overrides. Not
    part of the experiment's value: two configs with the same keys are equal wherever they were written (every
    config has one, an empty one where it came from no file)."""

    raw: dict[str, Any]
    source: Path | None
    node: yaml.Node | None
    overrides: tuple[str, ...]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Origin)

    __hash__ = object.__hash__

    def where(self, loc: tuple[Any, ...]) -> str:
        """The place of pydantic location ``loc``, as an error message starts."""
        key_path = _key_path(loc, self.raw)
        return f"{self._prefix(loc, key_path)}{key_path}"

    def locate(self, where: str) -> str:
        """``where``, which starts with a key path, prefixed with that key's place (``ExperimentConfig.locate``)."""
        key_path = where.partition(":")[0].strip()
        loc = _parse_key_path(key_path)
        return where if loc is None else f"{self._prefix(loc, key_path)}{where}"

    def _prefix(self, loc: tuple[Any, ...], key_path: str) -> str:
        assignment = _override_of(key_path, self.overrides)
        if assignment is not None:
            return f"--set {assignment}: "
        if self.source is None:
            return ""
        line = line_of(self.node, loc) if self.node is not None else None
        return f"{self.source}:{line}: " if line else f"{self.source}: "


class ExperimentConfig(_Section):
    """A whole experiment: one model on one GPU type, one workload, several policies compared pairwise."""

    name: str = "experiment"
    description: str = ""
    model: ModelConfig
    hardware: HardwareConfig
    workload: WorkloadConfig
    routing: RoutingConfig = Field(default_factory=ModelRoutingConfig)
    serving: ServingConfig = Field(default_factory=ServingConfig)
    deployment: DeploymentConfig = Field(default_factory=DeploymentConfig)
    policies: list[PolicyConfig] = Field(min_length=1)
    simulation: SimulationConfig = Field(default_factory=SimulationConfig)
    slo: SLOConfig = Field(default_factory=SLOConfig)
    offloading: OffloadingConfig | None = Field(
        default=None, description="expert offloading to host memory (default: every expert in GPU memory)")
    output: OutputConfig = Field(default_factory=OutputConfig)
    sweep: SweepConfig | None = Field(
        default=None, description="keys to vary, one run per point (`lynxsim sweep`; `lynxsim run` ignores it)"
    )
    report: ReportSection | None = Field(
        default=None, description="how `lynxsim report` draws this sweep's results (other commands ignore it)"
    )
    _origin: _Origin = PrivateAttr(default_factory=lambda: _Origin({}, None, None, ()))

    omitted_when_default = ("offloading",)

    def locate(self, where: str) -> str:
        """``where`` (a key path such as ``policies[1].alpha``, maybe followed by more of a message) with the place
        the user wrote that key: the ``--set`` that set it, else the file and line of the key (or of the nearest
        key above it); unchanged for a config that came from no file. Problems found after validation (a policy's
        parameters, a routing source's, a trace's content) are located as validation's own are."""
        return self._origin.locate(where)

    @field_validator("routing", mode="before")
    @classmethod
    def _routing_kind(cls, value: Any) -> Any:
        if isinstance(value, dict) and "kind" not in value:
            raise ValueError("say which routing with 'kind': model (the default when 'routing' is left out), "
                             "synthetic, profile, trace, or a routing source's name (`lynxsim plugins`)")
        return value

    @field_validator("policies")
    @classmethod
    def _unique_labels(cls, policies: list[PolicyConfig]) -> list[PolicyConfig]:
        labels = [p.label or p.name for p in policies]
        duplicated = sorted({x for x in labels if labels.count(x) > 1})
        if duplicated:
            raise ValueError(f"policies share the label {duplicated}: give each a distinct 'label'")
        folded = [label.casefold() for label in labels]  # one folder each, also where file names ignore case
        same = sorted({x for x, f in zip(labels, folded, strict=True) if folded.count(f) > 1})
        if same:
            raise ValueError(f"policy labels {same} differ only in case: give each a distinct 'label'")
        return policies

    @model_validator(mode="after")
    def _request_count(self) -> ExperimentConfig:
        given = self.simulation.num_requests is not None or self.simulation.duration_s is not None
        if self.workload.needs_request_count and not given:
            raise ValueError(
                f"simulation needs num_requests or duration_s with {self.workload.arrival.kind} arrivals"
            )
        if self.workload.needs_num_requests and self.simulation.num_requests is None:
            raise ValueError(f"simulation needs num_requests with {self.workload.arrival.kind} arrivals")
        return self


# ---------------------------------------------------------------------------------------------------------------
# Loading, overrides and error locations


def load_experiment(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read, override and validate an experiment file; every problem becomes an ``InputError``."""
    path = Path(path)
    raw, root = read_yaml_mapping_with_nodes(path, "experiment file")
    for assignment in overrides or []:
        apply_override(raw, assignment)
    return validate_experiment(raw, source=path, node=root, base_dir=path.parent, overrides=overrides)


def validate_experiment(
    raw: dict[str, Any], *, source: Path | None = None, node: yaml.Node | None = None, base_dir: Path | None = None,
    overrides: list[str] | None = None,
) -> ExperimentConfig:
    """Validate a raw mapping; relative file paths in it are taken relative to ``base_dir`` (``_paths_relative_to``).
    A problem in a key that an entry of ``overrides`` (``--set KEY=VALUE``) set is reported at that ``--set``,
    not at the line of the file it replaced."""

    origin = _Origin(raw, source, node, tuple(overrides or ()))
    try:
        config = ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        raise InputError(origin.where(tuple(error["loc"])), error_message(error)) from None
    problem = value_problem(raw, config.model_dump(mode="python"))
    if problem is not None:
        raise InputError(origin.where(problem[0]), problem[1])
    config._origin = origin
    if base_dir is not None:
        config = _paths_relative_to(config, base_dir)
    return config


def _override_of(key_path: str, overrides: Sequence[str]) -> str | None:
    """The last ``--set`` assignment that set ``key_path`` (``a.b[1].c``), a key above it or a key below it."""
    dotted = key_path.replace("[", ".").replace("]", "")
    for assignment in reversed(overrides):
        key = assignment.partition("=")[0].strip()
        if dotted == key or dotted.startswith(key + ".") or key.startswith(dotted + "."):
            return assignment
    return None


def _paths_relative_to(config: ExperimentConfig, base_dir: Path) -> ExperimentConfig:
    """One rule for every file path an experiment names (README, "Paths"): a relative path, in the file or in a
    ``--set`` value, is taken from the experiment file's folder, wherever the command runs."""

    def resolve(path: Path) -> Path:
        return path if path.is_absolute() else base_dir / path

    if config.model.hf_config is not None:
        model = config.model.model_copy(update={"hf_config": resolve(config.model.hf_config)})
        config = config.model_copy(update={"model": model})
    routing = config.routing
    if isinstance(routing, (ProfileRoutingConfig, TraceRoutingConfig)) and routing.path is not None:
        config = config.model_copy(update={"routing": routing.model_copy(update={"path": resolve(routing.path)})})
    workload = config.workload
    updates = {
        key: entry.model_copy(update={"path": resolve(entry.path)})
        for key in ("arrival", "paired_lengths", "prompt_tokens", "output_tokens")
        if isinstance(entry := getattr(workload, key), (TraceArrivals, PairedLengths, EmpiricalLength))
    }
    if updates:
        config = config.model_copy(update={"workload": workload.model_copy(update=updates)})
    return config


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML; list items by index: ``policies.1.alpha=0.5``). A section
    written as one string (``hardware: h200``) is expanded to its mapping (``SHORTHAND_KEYS``) when a key below
    it is set."""
    key, sep, value_text = assignment.partition("=")
    if not sep or not key.strip():
        raise InputError(f"--set {assignment}", "expected KEY.PATH=VALUE")
    try:
        value = yaml.safe_load(value_text)
    except yaml.YAMLError:
        raise InputError(f"--set {assignment}", "the value is not valid YAML") from None
    parts = key.strip().split(".")
    target: Any = raw
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = f"--set {'.'.join(parts[: depth + 1])}"
        if isinstance(target, list):
            if not part.isdigit() or int(part) >= len(target):
                raise InputError(where, f"list index out of range (the list has {len(target)} items)")
            if last:
                target[int(part)] = value
            else:
                target = target[int(part)]
        else:
            if last:
                target[part] = value
            else:
                child = target.get(part)
                if child is None:
                    child = target[part] = {}
                elif depth == 0 and isinstance(child, str) and part in SHORTHAND_KEYS:
                    child = target[part] = {SHORTHAND_KEYS[part]: child}
                elif not isinstance(child, (dict, list)):
                    raise InputError(where, f"is {child!r}, which has no sub-keys")
                target = child


def _key_path(loc: tuple[Any, ...], raw: Any) -> str:
    """Pydantic's location as a dotted key path. Walking the raw data alongside drops the parts of ``loc`` that
    are not keys (the tags of discriminated unions, validator names); the last part is kept even when absent,
    since a missing key is reported at its own name."""
    parts: list[str] = []
    node = raw
    for position, item in enumerate(loc):
        is_last = position == len(loc) - 1
        if isinstance(node, dict) and item in node:
            node = node[item]
        elif isinstance(node, list) and isinstance(item, int) and item < len(node):
            node = node[item]
        elif not is_last:
            continue
        parts.append(f"[{item}]" if isinstance(item, int) else ("." if parts else "") + str(item))
    return "".join(parts) or "(top level)"


def _parse_key_path(key_path: str) -> tuple[Any, ...] | None:
    """``policies[1].alpha`` as ``("policies", 1, "alpha")``; None for what is not a key path."""
    if not re.fullmatch(r"[A-Za-z_][\w-]*(\[\d+\]|\.[A-Za-z_][\w-]*)*", key_path):
        return None
    return tuple(int(part) if part.isdigit() else part for part in re.findall(r"[A-Za-z_][\w-]*|\d+", key_path))


def line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the deepest YAML node on ``loc``: the key itself when the key exists."""
    line = node.start_mark.line + 1 if node is not None else None
    for item in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == item), None)
            if match is None:
                continue
            line = match[0].start_mark.line + 1
            node = match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(item, int) and item < len(node.value):
            node = node.value[item]
            line = node.start_mark.line + 1
    return line
