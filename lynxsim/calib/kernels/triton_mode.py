"""Where the Triton kernels run: on a GPU, or on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``).

Two questions every kernel wrapper and the layer composition ask, answered once: whether a Triton kernel can
run on a tensor's device at all, and whether it runs interpreted (the interpreter's ``tl.dot`` multiplies bf16
operands as raw integers, so the kernels upcast them there: their ``DOT_F32`` flag)."""

from __future__ import annotations

import os

import torch


def interpreted(t: torch.Tensor) -> bool:
    """Whether a kernel launched on ``t`` runs under the interpreter (any CPU tensor, or ``TRITON_INTERPRET=1``)."""
    return t.device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def triton_runs(t: torch.Tensor) -> bool:
    """Whether a Triton kernel can run on ``t`` at all: on a GPU, or on the CPU with the interpreter switched on
    (tests). Elsewhere (a CPU smoke run of the commands) callers use the torch references instead."""
    return t.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
