"""Where router logits come from.

The engine asks a routing source for the logits of exactly the tokens in an iteration's batch, named by
(request id, position in that request's sequence). A source must return the same logits for the same token
whatever else is in the batch and whichever policy runs: that is what makes comparisons between policies paired.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class RoutingSource(Protocol):
    """Router logits for the MoE layers of one model."""

    num_moe_layers: int
    num_experts: int

    def logits(self, request_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Float32 ``[num_moe_layers, tokens, num_experts]`` for tokens ``(request_ids[i], positions[i])``."""
        ...
