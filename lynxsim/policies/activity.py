"""Per-layer expert activity of a selection: what the cost model needs from a policy's choice.

Decode cost grows with the number of distinct experts a layer activates (each one's weights are read from
HBM) and grouped-GEMM cost with the tokens each expert serves. The engine asks for both every iteration, so
both are one ``np.bincount`` over all layers at once.
"""

from __future__ import annotations

import math

import numpy as np

from lynxsim.datatypes import DROPPED


def expert_token_counts(expert_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """int64 ``[..., experts]``: tokens assigned to each expert, per layer, for ids ``[..., tokens, slots]``.

    ``DROPPED`` slots are ignored. Ids are distinct per token (the ``Selection`` contract), so slot counts
    are token counts. Ids outside ``[DROPPED, num_experts)`` raise ``ValueError``: with the per-layer offsets
    used here they would otherwise be counted silently against a neighbouring layer's expert.
    """
    ids = np.asarray(expert_ids)
    if ids.ndim < 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"expert_ids must be integers [..., tokens, slots], got {ids.dtype} {ids.shape}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    lead = ids.shape[:-2]
    flat = ids.reshape(math.prod(lead), ids.shape[-2] * ids.shape[-1]).astype(np.int64, copy=False)
    if flat.size and (flat.min() < DROPPED or flat.max() >= num_experts):
        raise ValueError(
            f"expert ids must lie in [{DROPPED}, {num_experts}), got [{flat.min()}, {flat.max()}]"
        )
    # Column 0 of each layer's block of num_experts + 1 bins collects DROPPED, then is cut off.
    width = num_experts + 1
    offsets = np.arange(flat.shape[0], dtype=np.int64)[:, None] * width + 1
    counts = np.bincount((flat + offsets).ravel(), minlength=flat.shape[0] * width)
    return counts.reshape(-1, width)[:, 1:].astype(np.int64, copy=False).reshape(*lead, num_experts)


def distinct_experts(expert_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """int64 ``[...]``: number of distinct experts each layer activates (``DROPPED`` ignored).

    When the per-expert counts are needed too, take ``(expert_token_counts(...) > 0).sum(-1)`` instead of
    calling both: this is exactly that.
    """
    return np.asarray(np.count_nonzero(expert_token_counts(expert_ids, num_experts), axis=-1), dtype=np.int64)
