"""What the kernel tests share: where the Triton kernels run, the markers that skip a test, and the error measure.

Importing this module switches Triton's CPU interpreter on (``TRITON_INTERPRET=1``) where no GPU is present, before
any kernel module is imported, so the same tests check the Triton kernels on the CPU; tests marked ``gpu`` run at
model sizes on CUDA and are skipped without a GPU. Import it after ``pytest.importorskip("torch")``."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
HAS_TRITON = importlib.util.find_spec("triton") is not None

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
cpu_only = pytest.mark.skipif(HAS_CUDA, reason="interpreter test; the gpu tests cover CUDA")

BF16_BOUND = 1e-2
"""Relative error of bf16 operands with float32 accumulation: between 1e-3 and 1e-2."""


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64 on the CPU; a non-finite ``out`` (an element left unwritten, a
    poisoned output) fails at once."""
    out, ref = out.double().cpu(), ref.double().cpu()
    assert torch.isfinite(out).all(), "non-finite output (an element left unwritten?)"
    return ((out - ref).norm() / ref.norm()).item()
