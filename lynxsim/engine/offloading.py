"""Expert offloading: which experts of each MoE layer live in GPU memory, and what fetching the others costs.

A GPU too small for a model's experts keeps some of each MoE layer's experts resident and the rest in host memory.
When an iteration's routing activates an expert that is not resident, its weights cross the host link (PCIe,
NVLink-C2C; the hardware profile's ``sustained_host_link_bytes_per_s`` and ``host_transfer_latency_s``) before it
can compute. Two residencies (``offloading.residency``):

* ``static``: a fixed set per layer (the most popular experts under the run's routing, or listed), as engines that
  pin the hot experts do; a missing expert is copied into a staging buffer for its layer and dropped after it.
* ``lru``: each layer's resident set is a cache of its ``capacity`` most recently used experts (Mixtral-offloading,
  Eliseev & Mazur 2023, arXiv 2312.17238, keeps an LRU cache of experts per layer): a missing expert is fetched into
  the slot of the least recently used one not active in this iteration; where every resident expert is active, it
  is streamed through the staging buffer like a static miss. The cache advances in iteration order, in the engine's
  loop (``compiled.offloading.fetch``), so a decode run routed ahead of time stays exact.

Overlap (``cost_formulas.exposed_fetch_s``): a layer's missing experts are known once its router has run, and are
fetched on a copy stream while its resident experts compute; the layer then computes the fetched ones. So a
layer's MoE time is ``max(resident experts' time, fetch) + missing experts' time``, and the iteration waits for
``max(0, fetch - resident experts' time)`` per layer, the ``offload_s`` of its latency breakdown. Nothing is
prefetched before the router (MoE-Infinity's and Mixtral-offloading's speculative prefetch are not modelled): an
on-demand fetch, the pessimistic end, and what an engine without a predictor does. That copies and expert GEMMs
overlap with little interference was measured on the H100 whose link the profile cites: one expert's 6.54 ms copy
beside 5.85 ms of bf16 GEMMs took 6.58 ms together.

Memory: the GPU holds the resident experts plus a staging buffer for one layer's missing experts (the most any layer
can miss); the KV cache gets the rest (``host_expert_bytes``, ``lynxsim.runner``).

Offloading needs each iteration's active experts by identity, so it runs with exact routing only (the statistical
mode samples counts), on one GPU per instance (a TP or EP shard's experts and links are not modelled) and with a
built-in cost model (whose per-layer expert time the overlap needs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lynxsim.config import ExperimentConfig, OffloadingConfig
from lynxsim.errors import InputError
from lynxsim.hardware import HardwareProfile
from lynxsim.models import ModelSpec
from lynxsim.policies import make
from lynxsim.policies.kernels import route_counts
from lynxsim.routing.base import RoutingSource

POPULARITY_REQUESTS = 64
POPULARITY_POSITIONS = 16
"""The tokens that rank each layer's experts for a static resident set: the first ``POPULARITY_POSITIONS``
positions of requests ``0 .. POPULARITY_REQUESTS - 1`` under the run's routing source, routed by top-k (1,024
tokens: thousands of choices per layer, enough to order 8 to 256 experts by how often top-k picks them)."""


@dataclass(frozen=True)
class ExpertOffloading:
    """Where each MoE layer's experts start and how they move: ``resident`` (``bool [layers, experts]``) the
    experts in GPU memory at the start, ``capacity`` (``[layers]``) how many each layer keeps (LRU: its cache's
    slots), ``lru`` whether the resident sets follow use; the host link's sustained bandwidth and per-copy
    latency."""

    resident: np.ndarray
    capacity: np.ndarray
    lru: bool
    host_bytes_per_s: float
    latency_s: float


def host_expert_bytes(config: ExperimentConfig, model: ModelSpec, hardware: HardwareProfile) -> float:
    """Expert weight bytes the run's offloading leaves off the GPU (0 without offloading): the experts beyond
    every layer's resident ones and a staging buffer for the most experts one layer can miss (its non-resident
    ones), which the KV cache may use instead. Raises ``InputError`` where offloading cannot apply."""
    capacity = offload_capacity(config, model, hardware)
    if capacity is None:
        return 0.0
    gpu_experts = int(capacity.sum() + (model.num_experts - capacity).max())
    return (model.num_moe_layers * model.num_experts - gpu_experts) * model.expert_bytes


def offload_capacity(config: ExperimentConfig, model: ModelSpec, hardware: HardwareProfile) -> np.ndarray | None:
    """Resident experts per MoE layer under the run's ``offloading`` section (None without one), checked against
    the run: ``InputError`` (key path, one line) where offloading cannot apply."""
    section = config.offloading
    if section is None:
        return None
    if config.simulation.routing_mode != "exact":
        raise InputError("offloading", "needs exact routing (simulation.routing_mode: exact): which experts are "
                                       "resident depends on the identities the statistical mode does not draw")
    if config.deployment.parallelism.gpus > 1:
        raise InputError("offloading", "models one GPU per instance: set deployment.parallelism to 1 GPU")
    if config.hardware.cost_model.name != "profile":
        raise InputError("offloading", "needs the built-in cost model (hardware.cost_model: profile)")
    if hardware.sustained_host_link_bytes_per_s is None:
        raise InputError("offloading", f"the hardware profile {hardware.name!r} gives no host link: set "
                                       "host_link_bandwidth_bytes_per_s in it")
    return _capacity(section, model.num_moe_layers, model.num_experts, model.expert_bytes)


def plan_offloading(config: ExperimentConfig, model: ModelSpec, hardware: HardwareProfile,
                    routing: RoutingSource) -> ExpertOffloading | None:
    """The run's ``offloading`` section resolved against its model, GPU and routing (None without one): the
    starting resident sets, listed or the most popular experts under ``routing``."""
    section = config.offloading
    capacity = offload_capacity(config, model, hardware)
    if section is None or capacity is None:
        return None
    layers, experts = model.num_moe_layers, model.num_experts
    host_bytes_per_s = hardware.sustained_host_link_bytes_per_s
    assert host_bytes_per_s is not None  # offload_capacity refuses a profile without a host link
    if section.resident_experts is not None:
        resident = _listed(section.resident_experts, layers, experts)
    else:
        resident = _most_popular(routing, model, capacity)
    return ExpertOffloading(resident, capacity, section.residency == "lru", float(host_bytes_per_s),
                            float(hardware.efficiency.host_transfer_latency_s))


def _capacity(section: OffloadingConfig, layers: int, experts: int, expert_bytes: float) -> np.ndarray:
    """Resident experts per layer; ``host_expert_bytes`` leaves that many bytes' whole experts in host memory,
    one more in each of the last layers where they do not divide evenly."""
    if section.resident_experts is not None:
        return np.array([len(listed) for listed in section.resident_experts], dtype=np.int64)
    if section.resident_experts_per_layer is not None:
        if section.resident_experts_per_layer > experts:
            raise InputError("offloading.resident_experts_per_layer",
                             f"{section.resident_experts_per_layer} is more than the model's {experts} experts")
        return np.full(layers, section.resident_experts_per_layer, dtype=np.int64)
    assert section.host_expert_bytes is not None
    offloaded = int(np.ceil(section.host_expert_bytes / expert_bytes))
    if offloaded > layers * experts:
        raise InputError("offloading.host_expert_bytes",
                         f"{section.host_expert_bytes:.3g} B is more than the model's {layers * experts} experts "
                         f"({layers * experts * expert_bytes:.3g} B)")
    per_layer, extra = divmod(offloaded, layers)
    host = np.full(layers, per_layer, dtype=np.int64)
    host[layers - extra:] += 1
    return experts - host


def _listed(listed: list[list[int]], layers: int, experts: int) -> np.ndarray:
    """``offloading.resident_experts`` as ``bool [layers, experts]``."""
    if len(listed) != layers:
        raise InputError("offloading.resident_experts", f"has {len(listed)} lists, the model {layers} MoE layers")
    resident = np.zeros((layers, experts), dtype=np.bool_)
    for layer, chosen in enumerate(listed):
        if any(e >= experts for e in chosen):
            raise InputError(f"offloading.resident_experts[{layer}]", f"expert indices must be below {experts}")
        resident[layer, chosen] = True
    return resident


def _most_popular(routing: RoutingSource, model: ModelSpec, capacity: np.ndarray) -> np.ndarray:
    """Each layer's ``capacity`` experts that top-k chooses most often on the popularity sample
    (``POPULARITY_REQUESTS``), ties to the lower index."""
    request_ids = np.repeat(np.arange(POPULARITY_REQUESTS, dtype=np.int64), POPULARITY_POSITIONS)
    positions = np.tile(np.arange(POPULARITY_POSITIONS, dtype=np.int64), POPULARITY_REQUESTS)
    logits = routing.logits(request_ids, positions)
    counts = route_counts(logits, make("topk"), model.top_k, model.renormalize)[0]
    resident = np.zeros(counts.shape, dtype=np.bool_)
    for layer in range(counts.shape[0]):
        order = np.argsort(-counts[layer], kind="stable")
        resident[layer, order[: capacity[layer]]] = True
    return resident
