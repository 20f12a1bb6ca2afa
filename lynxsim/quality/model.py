"""A decoder-only MoE language model whose expert selection can be replaced from outside, layer by layer.

Pre-norm blocks: RMSNorm, causal grouped-query attention with rotary positions, RMSNorm, MoE feed-forward (a
softmax router over the routed SwiGLU experts plus, optionally, an always-run shared SwiGLU expert).

The routed experts are computed *densely*: one matmul of every token with all experts' stacked weights, each
expert's hidden block scaled by that token's routing weight (0 for experts it does not use), then one matmul
back. That equals the sparse sum over the chosen experts exactly (a zero weight zeroes the expert's
contribution and its gradient), needs no scatter or sort (so it is deterministic and has no capacity limit),
and makes any selection, from any policy, a dense ``[tokens, experts]`` weight matrix. It costs E/k times the
FLOPs of a sparse kernel, which at these sizes is affordable: a training step of 64 x 512 tokens took 65 ms
(8 experts) and 105 ms (64 experts) on an H200 in bf16 (docs/measurements/quality_device_log.txt).

``forward(tokens, route=...)`` takes an optional ``route(layer, logits) -> weights``: given a layer's float32
router logits ``[batch, seq, experts]`` it returns the routing weights of the same shape. Without it every
layer uses the router's own top-k. That hook is how ``lynxsim quality`` runs the simulator's policies inside
the forward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from lynxsim.quality.shapes import MoEShape

RouteFn = Callable[[int, torch.Tensor], torch.Tensor]
"""``route(layer_index, logits [batch, seq, experts] float32) -> weights [batch, seq, experts]``."""

INIT_STD = 0.02


@dataclass
class ForwardOutput:
    """Next-token logits ``[batch, seq, vocab]``, the mean load-balancing loss over MoE layers, and each layer's
    float32 router logits (``[batch, seq, experts]``) when asked for."""

    logits: torch.Tensor
    aux_loss: torch.Tensor
    router_logits: list[torch.Tensor]


def topk_weights(logits: torch.Tensor, top_k: int, renormalize: bool) -> torch.Tensor:
    """Dense routing weights of the router's own top-k: the softmax probabilities of each token's k best
    experts (renormalized to sum to 1 when ``renormalize``), 0 elsewhere. Used in training."""
    probs = logits.softmax(dim=-1)
    values, ids = probs.topk(top_k, dim=-1)
    if renormalize:
        values = values / values.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter(-1, ids, values)


def load_balancing_loss(logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Switch Transformer's auxiliary loss (arXiv 2101.03961, eq. 4), for k experts per token:
    ``E * sum_e f_e * P_e`` with ``f_e`` the fraction of the token-expert assignments that go to expert ``e``
    and ``P_e`` its mean router probability. 1 when both are uniform; only ``P`` carries a gradient."""
    num_experts = logits.shape[-1]
    assigned = (weights > 0).reshape(-1, num_experts).float()
    fraction = assigned.sum(dim=0) / assigned.sum().clamp(min=1.0)
    mean_prob = logits.reshape(-1, num_experts).softmax(dim=-1).mean(dim=0)
    return num_experts * (fraction * mean_prob).sum()


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rotary_tables(seq_len: int, head_dim: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[seq, head_dim / 2]`` of rotary position embeddings (RoFormer, arXiv 2104.09864)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [batch, heads, seq, head_dim]`` by position (first and second halves form the pairs)."""
    first, second = x.float().chunk(2, dim=-1)
    rotated = torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1)
    return rotated.to(x.dtype)


class Attention(nn.Module):
    """Causal grouped-query self-attention with rotary positions."""

    def __init__(self, shape: MoEShape) -> None:
        super().__init__()
        self.shape = shape
        self.q = nn.Linear(shape.hidden_size, shape.num_heads * shape.head_dim, bias=False)
        self.kv = nn.Linear(shape.hidden_size, 2 * shape.num_kv_heads * shape.head_dim, bias=False)
        self.out = nn.Linear(shape.num_heads * shape.head_dim, shape.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        s = self.shape
        q = self.q(x).view(batch, seq, s.num_heads, s.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(batch, seq, 2, s.num_kv_heads, s.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        group = s.num_heads // s.num_kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(batch, seq, s.num_heads * s.head_dim))


class SwiGLU(nn.Module):
    """One SwiGLU feed-forward (the shared expert)."""

    def __init__(self, hidden_size: int, inner: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(hidden_size, 2 * inner, bias=False)
        self.down = nn.Linear(inner, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class MoEFeedForward(nn.Module):
    """Router, routed SwiGLU experts (computed densely, module docstring) and the optional shared expert."""

    def __init__(self, shape: MoEShape) -> None:
        super().__init__()
        self.shape = shape
        inner = shape.num_experts * shape.expert_hidden
        self.router = nn.Linear(shape.hidden_size, shape.num_experts, bias=False)
        self.gate_up = nn.Linear(shape.hidden_size, 2 * inner, bias=False)  # [gate of all experts | up of all]
        self.down = nn.Linear(inner, shape.hidden_size, bias=False)
        self.shared = SwiGLU(shape.hidden_size, shape.shared_expert_hidden) if shape.shared_expert_hidden else None

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """float32 router logits (the router runs in float32 under autocast: its logits are what policies see)."""
        return F.linear(x.float(), self.router.weight.float())

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``x [batch, seq, hidden]``, dense routing ``weights [batch, seq, experts]``."""
        s = self.shape
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        hidden = F.silu(gate) * up  # [batch, seq, experts * expert_hidden]
        scaled = hidden.unflatten(-1, (s.num_experts, s.expert_hidden)) * weights.to(hidden.dtype).unsqueeze(-1)
        out = self.down(scaled.flatten(-2))
        return out + self.shared(x) if self.shared is not None else out


class Block(nn.Module):
    def __init__(self, shape: MoEShape) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(shape.hidden_size)
        self.attention = Attention(shape)
        self.moe_norm = RMSNorm(shape.hidden_size)
        self.moe = MoEFeedForward(shape)


class MoELanguageModel(nn.Module):
    """The whole model: byte embeddings, ``num_layers`` MoE blocks, final norm, output projection."""

    def __init__(self, shape: MoEShape) -> None:
        super().__init__()
        self.shape = shape
        self.embed = nn.Embedding(shape.vocab_size, shape.hidden_size)
        self.blocks = nn.ModuleList(Block(shape) for _ in range(shape.num_layers))
        self.norm = RMSNorm(shape.hidden_size)
        self.head = nn.Linear(shape.hidden_size, shape.vocab_size, bias=False)
        self.apply(_init_weights)
        # GPT-2's scaled init of the projections into the residual stream (std / sqrt(2 * layers)).
        for block in self.iter_blocks():
            for layer in (block.attention.out, block.moe.down):
                nn.init.normal_(layer.weight, std=INIT_STD / (2 * shape.num_layers) ** 0.5)

    def iter_blocks(self) -> Iterator[Block]:
        """The blocks in order (as ``Block``: iterating an ``nn.ModuleList`` is typed as yielding any module)."""
        return cast(Iterator[Block], iter(self.blocks))

    def forward(
        self, tokens: torch.Tensor, route: RouteFn | None = None, *, keep_router_logits: bool = False
    ) -> ForwardOutput:
        """``tokens`` int64 ``[batch, seq]`` (seq <= ``max_seq_len``)."""
        seq = tokens.shape[1]
        if seq > self.shape.max_seq_len:
            raise ValueError(f"sequence of {seq} tokens exceeds max_seq_len {self.shape.max_seq_len}")
        cos, sin = rotary_tables(seq, self.shape.head_dim, self.shape.rope_theta, tokens.device)
        x = self.embed(tokens)
        aux = x.new_zeros((), dtype=torch.float32)
        kept: list[torch.Tensor] = []
        for index, block in enumerate(self.iter_blocks()):
            x = x + block.attention(block.attention_norm(x), cos, sin)
            h = block.moe_norm(x)
            logits = block.moe.router_logits(h)
            if route is None:
                weights = topk_weights(logits, self.shape.top_k, self.shape.renormalize)
            else:
                weights = route(index, logits.detach())
            aux = aux + load_balancing_loss(logits, weights)
            if keep_router_logits:
                kept.append(logits.detach())
            x = x + block.moe(h, weights)
        return ForwardOutput(self.head(self.norm(x)), aux / self.shape.num_layers, kept)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=INIT_STD)
