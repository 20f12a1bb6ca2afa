"""Where router logits come from.

The engine asks a routing source for the logits of exactly the tokens in an iteration's batch, named by
(request id, position in that request's sequence). A source must return the same logits for the same token
whatever else is in the batch and whichever policy runs: that is what makes comparisons between policies paired.

Every source an experiment can name (``routing.kind``, or ``kind: plugin`` with a plug-in's ``name``) is made by
a factory of ``lynxsim.plugins.ROUTING_SOURCES``, called with a ``RoutingContext`` as ``context=`` and the
section's other keys as parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from lynxsim.models.spec import ModelSpec


class RoutingSource(Protocol):
    """Router logits for the MoE layers of one model."""

    num_moe_layers: int
    num_experts: int

    def logits(self, request_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Float32 ``[num_moe_layers, tokens, num_experts]`` for tokens ``(request_ids[i], positions[i])``."""
        ...


@dataclass(frozen=True)
class RoutingContext:
    """What a routing-source factory is given: the simulated model, its catalog key (None for a Hugging Face
    config) and the seed the source must draw from, so that a run is reproducible."""

    model: ModelSpec
    model_key: str | None
    seed: int
