"""The simulator's policies inside the model's forward pass: a ``RouteFn`` built from a ``lynxsim.policies`` policy.

Evaluation runs N held-out sequences in one forward pass. The first ``prefill_tokens`` positions of every
sequence are its prompt, routed by plain top-k (a serving engine applies batch-aware policies to pure-decode
iterations only). Every later position is a decode step: the tokens of that position in ``batch_size``
consecutive sequences form one decode batch, and the policy selects their experts together, from exactly
their router logits, through the same ``Policy.select`` the simulator calls. Causal attention makes this the
same computation as decoding the B sequences step by step with a KV cache, each step teacher-forced with
the held-out text's next byte: position p's hidden state depends only on positions <= p, each computed under
the policy at its own step.

One ``select`` call per layer covers every decode batch of the pass (the policies take stacked
``[batches, tokens, experts]`` logits, each leading index its own batch). That leading axis is the one a policy
with per-layer parameters reads as MoE layers, so such a policy (calibrated ``skip`` and ``prune``, per-layer
Lynx) is first cut down to the one layer being routed (``layer_policy``). The same call's quality proxies
(``lynxsim.policies.proxies``) and distinct experts per batch are accumulated per layer, so a measured loss
change and the proxies describe the very same selections.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lynxsim.datatypes import DROPPED, Selection
from lynxsim.policies import Lynx, Policy, Prune, Skip, TopK
from lynxsim.policies.activity import distinct_experts
from lynxsim.policies.proxies import quality_proxies

PROXY_NAMES = ("retained_mass", "top1_kept", "assignments_changed", "assignments_dropped")


def dense_weights(selection: Selection, num_experts: int) -> np.ndarray:
    """float64 ``[..., tokens, experts]``: each token's weight on every expert (0 where not selected)."""
    ids = np.where(selection.expert_ids == DROPPED, num_experts, selection.expert_ids)  # spare column for drops
    dense = np.zeros((*ids.shape[:-1], num_experts + 1))
    np.put_along_axis(dense, ids, selection.weights, axis=-1)
    return dense[..., :num_experts]


def layer_policy(policy: Policy, layer: int) -> Policy:
    """``policy`` with per-layer parameters replaced by their value at MoE layer ``layer`` (the policy itself
    when it has none). The policies that accept per-layer parameters are listed explicitly: Lynx (alpha, beta),
    Skip (beta) and Prune (kept_experts)."""
    if isinstance(policy, Lynx) and policy.num_layers is not None:
        return Lynx(alpha=_at(policy.alpha, layer), beta=_at(policy.beta, layer))
    if isinstance(policy, Skip) and isinstance(policy.beta, tuple):
        return Skip(beta=policy.beta[layer])
    if isinstance(policy, Prune) and policy.per_layer:
        assert policy.kept_experts is not None
        kept = policy.kept_experts[layer]
        assert isinstance(kept, tuple)  # per_layer: one tuple of expert ids per layer
        return Prune(keep=policy.keep, kept_experts=kept)
    return policy


def _at(value: Any, layer: int) -> Any:
    return value[layer] if isinstance(value, tuple) else value


@dataclass
class LayerTotals:
    """Sums over the decode batches of one MoE layer, of each proxy and of the distinct experts."""

    batches: int = 0
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys((*PROXY_NAMES, "distinct_experts"), 0.0))


class PolicyRouting:
    """``route(layer, logits)`` applying ``policy`` to decode batches of ``batch_size`` sequences (module
    docstring); ``means()`` then gives the proxies and distinct experts, mean over batches and layers."""

    def __init__(self, policy: Policy, top_k: int, renormalize: bool, prefill_tokens: int, batch_size: int) -> None:
        self.policy = policy
        self.top_k = top_k
        self.renormalize = renormalize
        self.prefill_tokens = prefill_tokens
        self.batch_size = batch_size
        self.layers: dict[int, LayerTotals] = {}

    def __call__(self, layer: int, logits: torch.Tensor) -> torch.Tensor:
        sequences, positions, num_experts = logits.shape
        if sequences % self.batch_size:
            raise ValueError(f"{sequences} sequences do not form batches of {self.batch_size}")
        prefill = self.prefill_tokens
        x = logits.detach().to("cpu", torch.float64).numpy()
        weights = np.empty(x.shape)

        prompt = x[:, :prefill].reshape(1, sequences * prefill, num_experts)  # top-k needs no batching
        selected = TopK().select(prompt, self.top_k, renormalize=self.renormalize)
        weights[:, :prefill] = dense_weights(selected, num_experts).reshape(sequences, prefill, num_experts)

        decode_steps = positions - prefill
        groups = sequences // self.batch_size
        # [seq, step, E] -> [step, seq, E] -> [step * groups, B, E]: one decode batch per (step, group).
        batches = np.ascontiguousarray(x[:, prefill:].transpose(1, 0, 2)).reshape(
            decode_steps * groups, self.batch_size, num_experts
        )
        policy = layer_policy(self.policy, layer)
        selected = policy.select(batches, self.top_k, renormalize=self.renormalize)
        decode = dense_weights(selected, num_experts).reshape(decode_steps, sequences, num_experts)
        weights[:, prefill:] = decode.transpose(1, 0, 2)
        self._accumulate(layer, batches, selected, num_experts)
        return torch.from_numpy(weights).to(device=logits.device, dtype=torch.float32)

    def _accumulate(self, layer: int, batches: np.ndarray, selected: Selection, num_experts: int) -> None:
        totals = self.layers.setdefault(layer, LayerTotals())
        proxies = quality_proxies(batches, selected, self.top_k)
        for name in PROXY_NAMES:
            totals.sums[name] += float(getattr(proxies, name).sum())
        totals.sums["distinct_experts"] += float(distinct_experts(selected.expert_ids, num_experts).sum())
        totals.batches += batches.shape[0]

    def means(self) -> dict[str, float]:
        """Each proxy and the distinct experts per layer: mean over decode batches, then over layers (every
        batch holds the same number of tokens, so this is also the token-weighted mean)."""
        if not self.layers:
            raise ValueError("no forward pass has been routed yet")
        keys = (*PROXY_NAMES, "distinct_experts")
        per_layer = [{k: t.sums[k] / t.batches for k in keys} for t in self.layers.values()]
        return {k: float(np.mean([layer[k] for layer in per_layer])) for k in keys}
