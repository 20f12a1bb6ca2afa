"""What a deployment's instances are to one another: their roles, the load a request router reads of each, and
how long a KV cache takes to move from a prefill to a decode instance (disaggregated serving).

The rules (``lynxsim.engine.compiled.orchestrator`` runs them). A deployment is either

* **co-located**: ``replicas`` instances, each doing prefill and decode (continuous batching with chunked prefill);
  the router gives each arriving request to one of them; or
* **disaggregated** (DistServe, Splitwise, vLLM's prefill/decode disaggregation): ``prefill`` instances compute
  prompts, ``decode`` instances generate the other tokens. The router gives each arriving request to a prefill
  instance; the iteration that completes its prompt samples its first token (TTFT is measured there); the router
  then picks a decode instance among the decode instances, which allocates the request's KV blocks (the prompt and
  the first token's slot; while its pool is short the request waits in its queue, and the prefill instance keeps
  its blocks) and pulls the prompt's KV cache. The transfer takes ``KVTransfer.time_s``: the prompt's KV bytes
  (``ModelSpec.kv_bytes_per_token`` * tokens) over the transfer bandwidth, plus a fixed latency. When it ends the
  prefill instance frees the request's blocks and the decode instance decodes it from its next iteration on.

  This is the pull order of vLLM's NixlConnector and of Mooncake: the decode side allocates, then reads, so a full
  decode pool pushes back on the prefill instances (whose blocks stay held) rather than losing KV data. Transfers
  do not contend: each runs at the full bandwidth whatever else is in flight (the per-GPU link is shared in reality,
  so many concurrent long transfers come out optimistic). A request preempted on a decode instance is recomputed
  there (its prompt and generated tokens become a prefill on that instance, priced like any prefill, with plain
  top-k under ``apply_to: decode_only``): upstream vLLM's decode instances recompute locally too, as far as we can
  tell (the remote-prefill parameters are consumed by the first KV load); vLLM-Ascend's RecomputeScheduler instead
  sends the request back to a prefill instance, which is not modelled.

Routers (``router``, a name of ``lynxsim.plugins.ROUTERS``): ``round_robin`` gives requests to the instances of
a pool in turn; ``least_outstanding`` to the instance with the fewest requests assigned and not yet done there
(co-located and decode instances: not finished; prefill instances: not finished and KV cache not yet transferred
out), ties to the lowest index; a plug-in's ``RequestRouter`` by its own rule. Each pool (the co-located or
prefill instances; the decode instances) has its own router, made fresh for each simulation. A router only
considers instances that could ever hold the request (all of them when the instances are alike); a request that
fits no instance of a pool is rejected on arrival with that instance's reason.

Every arrived request ends with a status: ``finished``, ``rejected_<reason>``, or, at the cut-off,
``cutoff_running``, ``cutoff_waiting`` (queued, or preempted, on an instance), ``cutoff_awaiting_transfer``
(prefilled, waiting for KV blocks on its decode instance) or ``cutoff_transferring`` (KV cache in transfer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

Role = Literal["colocated", "prefill", "decode"]
ROLES: tuple[Role, ...] = ("colocated", "prefill", "decode")
"""``colocated``: prefill and decode on the same GPUs (the usual vLLM deployment); ``prefill``: computes prompts
and hands each request off once its first token is sampled; ``decode``: receives prefilled requests, pulls their
KV caches and generates the other tokens."""


class InstanceLoad(Protocol):
    """What a request router reads of an instance (and must not change)."""

    @property
    def index(self) -> int:
        """Its position in the deployment (what the records call ``instance``)."""

    @property
    def role(self) -> str:
        """One of ``ROLES``."""

    @property
    def outstanding(self) -> int:
        """Requests given to it and not yet done there (co-located and decode instances: not finished; prefill
        instances: not finished and KV cache not yet moved out)."""


@dataclass(frozen=True)
class KVTransfer:
    """How long moving a request's KV cache from a prefill to a decode instance takes.

    ``bandwidth_bytes_per_s`` is one direction of the link; the default a run uses is the hardware profile's
    ``interconnect_bandwidth_bytes_per_s`` (NVLink within a node). Instances on different nodes move KV caches over
    the NICs (e.g. 400 Gb/s InfiniBand, 50e9 B/s per direction), roughly ten times slower: set the bandwidth then.
    """

    kv_bytes_per_token: float
    bandwidth_bytes_per_s: float
    latency_s: float = 0.0

    def __post_init__(self) -> None:
        if self.kv_bytes_per_token <= 0 or self.bandwidth_bytes_per_s <= 0 or self.latency_s < 0:
            raise ValueError(f"invalid KV transfer parameters {self}")

    def time_s(self, tokens: int) -> float:
        """Seconds to move the KV cache of ``tokens`` tokens (``cost_formulas.kv_transfer_s``)."""
        from lynxsim.cost_formulas import kv_transfer_s  # numba: imported once a transfer is priced

        return float(kv_transfer_s(tokens, self.kv_bytes_per_token, self.bandwidth_bytes_per_s, self.latency_s))
