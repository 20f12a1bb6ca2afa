"""``lynxsim quality evaluate``: what each policy does to the model's next-token predictions, per decode batch size.

For every batch size B and policy point, one teacher-forced forward pass over the same N held-out sequences
(``routing_adapter``: prompt positions routed by top-k, each later position a decode step whose B tokens the
policy routes together). Against the ``topk`` pass on the same tokens it measures, over the decode positions:

* ``delta_loss_nats``: mean change of the next-token cross-entropy, with ``delta_loss_se_nats``, its standard
  error over tokens (paired: both passes score the same tokens; tokens treated as independent);
* ``delta_accuracy``: change of top-1 accuracy (fraction of tokens whose most likely next byte is right);
* ``kl_nats``: mean KL divergence from top-k's next-token distribution to the policy's, a measure of change
  that, unlike the loss, does not need the change to be for the worse;
* the quality proxies of the same selections and the mean distinct experts per MoE layer and decode batch.

The N sequences are half prose and half code windows of the evaluation part, in a fixed shuffled order, so
each decode batch mixes the two as a server's batch mixes requests.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from lynxsim.policies import calibrate_if_needed
from lynxsim.quality.checkpoint import Checkpoint
from lynxsim.quality.corpus import Corpus, windows
from lynxsim.quality.points import PolicyPoint
from lynxsim.quality.routing_adapter import PolicyRouting
from lynxsim.quality.train import autocast

ORDER_SEED = 0
"""Seed of the fixed order in which the held-out sequences are grouped into decode batches."""


@dataclass(frozen=True)
class EvalSettings:
    batch_sizes: tuple[int, ...] = (1, 4, 16, 64)
    sequences: int = 128
    prefill_tokens: int = 128
    decode_tokens: int = 128

    def __post_init__(self) -> None:
        if self.sequences < 2 or self.sequences % 2:
            raise ValueError(f"sequences must be an even number >= 2, got {self.sequences}")
        bad = [b for b in self.batch_sizes if b < 1 or self.sequences % b]
        if bad:
            raise ValueError(f"batch sizes {bad} do not divide the {self.sequences} sequences into whole batches")
        if self.prefill_tokens < 1 or self.decode_tokens < 1:
            raise ValueError("prefill_tokens and decode_tokens must be >= 1")


@dataclass(frozen=True)
class QualityRow:
    """One policy point at one batch size: the measured change against top-k and the proxies."""

    model: str
    policy: str
    label: str
    sweep: bool
    batch_size: int
    decode_tokens: int
    loss_nats: float
    delta_loss_nats: float
    delta_loss_se_nats: float
    accuracy: float
    delta_accuracy: float
    kl_nats: float
    retained_mass: float
    top1_kept: float
    assignments_changed: float
    assignments_dropped: float
    distinct_experts: float


@dataclass
class _Pass:
    nll: torch.Tensor  # [N, D] nats
    correct: torch.Tensor  # [N, D] bool
    log_probs: torch.Tensor  # [N, D, vocab]
    means: dict[str, float]


def evaluation_tokens(corpus: Corpus, settings: EvalSettings) -> np.ndarray:
    """uint8 ``[sequences, prefill + decode + 1]``: half prose and half code windows, in a fixed shuffled order."""
    length = settings.prefill_tokens + settings.decode_tokens + 1
    half = settings.sequences // 2
    rows = np.concatenate(
        [windows(corpus.text.evaluation, length, half), windows(corpus.code.evaluation, length, half)]
    )
    return rows[np.random.default_rng(ORDER_SEED).permutation(settings.sequences)]


@torch.no_grad()
def _run(checkpoint: Checkpoint, tokens: torch.Tensor, routing: PolicyRouting, prefill: int) -> _Pass:
    with autocast(tokens.device):
        logits = checkpoint.model(tokens[:, :-1], routing).logits.float()
    log_probs = logits[:, prefill:].log_softmax(dim=-1)
    targets = tokens[:, prefill + 1 :]
    nll = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return _Pass(nll, log_probs.argmax(dim=-1) == targets, log_probs, routing.means())


def evaluate_policies(
    checkpoint: Checkpoint,
    corpus: Corpus,
    points: list[PolicyPoint],
    settings: EvalSettings,
    calibration_logits: np.ndarray,
    device: torch.device,
    log: Callable[[str], None] = print,
) -> list[QualityRow]:
    """Every point at every batch size (module docstring). ``calibration_logits`` ``[layers, tokens, experts]``
    calibrate the policies that need it (``skip``, ``prune``). The first point must be ``topk``."""
    if not points or points[0].policy != "topk":
        raise ValueError("the first policy point must be topk, the reference")
    shape = checkpoint.model.shape
    policies = [calibrate_if_needed(p.build(), calibration_logits, shape.top_k) for p in points]
    tokens = torch.from_numpy(evaluation_tokens(corpus, settings).astype(np.int64)).to(device)
    rows: list[QualityRow] = []
    for batch_size in settings.batch_sizes:
        reference: _Pass | None = None
        for point, policy in zip(points, policies, strict=True):
            start_s = time.perf_counter()
            routing = PolicyRouting(policy, shape.top_k, shape.renormalize, settings.prefill_tokens, batch_size)
            result = _run(checkpoint, tokens, routing, settings.prefill_tokens)
            reference = reference or result
            rows.append(_row(shape.name, point, batch_size, result, reference))
            log(f"{shape.name} B={batch_size:<3d} {point.label:24s} dloss {rows[-1].delta_loss_nats:+.4f}  "
                f"dacc {rows[-1].delta_accuracy:+.4f}  mass {rows[-1].retained_mass:.3f}  "
                f"experts {rows[-1].distinct_experts:5.2f}  {time.perf_counter() - start_s:5.1f} s")
    return rows


def _row(model: str, point: PolicyPoint, batch_size: int, result: _Pass, reference: _Pass) -> QualityRow:
    delta = (result.nll - reference.nll).double().flatten()
    p_ref = reference.log_probs.exp()
    kl = (p_ref * (reference.log_probs - result.log_probs)).sum(dim=-1)
    return QualityRow(
        model=model,
        policy=point.policy,
        label=point.label,
        sweep=point.sweep,
        batch_size=batch_size,
        decode_tokens=int(delta.numel()),
        loss_nats=float(result.nll.double().mean()),
        delta_loss_nats=float(delta.mean()),
        delta_loss_se_nats=float(delta.std() / delta.numel() ** 0.5) if delta.numel() > 1 else 0.0,
        accuracy=float(result.correct.double().mean()),
        delta_accuracy=float((result.correct.double() - reference.correct.double()).mean()),
        kl_nats=float(kl.double().mean()),
        **result.means,
    )


def rows_as_records(rows: list[QualityRow]) -> list[dict[str, object]]:
    return [asdict(row) for row in rows]

