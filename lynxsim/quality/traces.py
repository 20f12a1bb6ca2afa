"""Router logits of held-out text: routing traces for the simulator, and the calibration sample of ``skip``/``prune``.

The sequences are fixed windows of the calibration part of each source (half prose, then half code), run
through the model with its own top-k routing in one teacher-forced pass. Each MoE layer's logits are stored as
log-probabilities (lynxsim's convention), float16 in the file, so a trace of a few thousand tokens stays
within a few MB even at 64 experts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lynxsim.quality.checkpoint import Checkpoint
from lynxsim.quality.corpus import Corpus, windows
from lynxsim.quality.train import autocast
from lynxsim.routing.trace import RoutingTrace
from lynxsim.routing.trace_format import save_trace

TRACE_LICENSE = (
    "Apache-2.0 (lynxsim); the text is tinyshakespeare (public domain) and the CPython standard library "
    "(PSF License Agreement)"
)


def calibration_tokens(corpus: Corpus, sequences: int, length: int) -> np.ndarray:
    """uint8 ``[sequences, length]``: the first ``sequences // 2`` windows of the prose calibration part, then as
    many of the code calibration part (``sequences`` must be even)."""
    if sequences < 2 or sequences % 2:
        raise ValueError(f"trace sequences must be an even number >= 2, got {sequences}")
    half = sequences // 2
    return np.concatenate(
        [windows(corpus.text.calibration, length, half), windows(corpus.code.calibration, length, half)]
    )


@torch.no_grad()
def router_log_probs(checkpoint: Checkpoint, tokens: np.ndarray, device: torch.device) -> np.ndarray:
    """float32 ``[layers, sequences * length, experts]``: each MoE layer's router log-probabilities under
    top-k routing, tokens in sequence-major order."""
    batch = torch.from_numpy(tokens.astype(np.int64)).to(device)
    with autocast(device):
        out = checkpoint.model(batch, keep_router_logits=True)
    stacked = torch.stack([logits.log_softmax(dim=-1) for logits in out.router_logits])
    return stacked.flatten(1, 2).float().cpu().numpy()


def routing_trace(
    checkpoint: Checkpoint, corpus: Corpus, sequences: int, length: int, device: torch.device
) -> RoutingTrace:
    """The trace of ``sequences`` calibration windows of ``length`` tokens (module docstring)."""
    tokens = calibration_tokens(corpus, sequences, length)
    shape, train = checkpoint.model.shape, checkpoint.train
    return RoutingTrace(
        name=f"lynxsim-{shape.name}",
        source=f"lynxsim quality: router of the {shape.name} model on held-out text (calibration part)",
        logits=router_log_probs(checkpoint, tokens, device),
        sequence_ids=np.repeat(np.arange(sequences, dtype=np.int64), length),
        positions=np.tile(np.arange(length, dtype=np.int64), sequences),
        layer_ids=tuple(range(shape.num_layers)),
        license=TRACE_LICENSE,
        model=(f"{shape.name}: {shape.num_layers} MoE layers, {shape.num_experts} experts, top-{shape.top_k}, "
               f"{'1 shared expert, ' if shape.shared_expert_hidden else ''}seed {train.seed}, {train.steps} steps "
               f"(lynxsim quality train)"),
        notes=(f"sequences 0-{sequences // 2 - 1}: prose (tinyshakespeare), {sequences // 2}-{sequences - 1}: "
               f"Python code (standard library); byte tokens; corpus sha256 " + ", ".join(
                   f"{k} {v[:16]}" for k, v in checkpoint.corpus.items())),
    )


def export_trace(checkpoint: Checkpoint, corpus: Corpus, path: Path, sequences: int, length: int,
                 device: torch.device) -> Path:
    """Write the trace (float16 log-probabilities) to ``path``."""
    return save_trace(routing_trace(checkpoint, corpus, sequences, length, device), path, logits_dtype="float16")
