"""The two model shapes the quality measurements use, and the training recipe, as plain data (no torch).

The shapes copy the routing of two published model families at a size that trains on one GPU in minutes:

* ``mixtral-like``: 8 experts, top-2, top-k weights renormalized, no shared expert: the routing of
  Mixtral-8x7B (Hugging Face ``mistralai/Mixtral-8x7B-v0.1`` config.json: num_local_experts 8,
  num_experts_per_tok 2; its router renormalizes the top-2 softmax weights).
* ``qwen2moe-like``: 64 fine-grained experts, top-8, weights not renormalized, one shared expert that every
  token runs: the routing of Qwen2-57B-A14B (``Qwen/Qwen2-57B-A14B`` config.json: num_experts 64,
  num_experts_per_tok 8, norm_topk_prob false, a shared expert). The shared expert here is ungated, as
  DeepSeek-V2's are; Qwen2-MoE multiplies its shared expert by a sigmoid gate.

Both carry the Lynx constants the paper (arXiv 2411.08982) publishes for the real model of their expert count:
Mixtral-8x7B (alpha 0.7, beta 1) and Qwen2-57B-A14B (alpha 3, beta 4) (the model catalog holds them:
`lynx_alpha`, `lynx_beta`).

Text is byte-level (vocabulary 256): no tokenizer to train or ship, and every byte string is encodable.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

VOCAB_SIZE = 256
"""Byte-level: one token per byte."""


@dataclass(frozen=True)
class MoEShape:
    """Architecture of a decoder-only MoE language model (pre-norm, RMSNorm, rotary, GQA, SwiGLU experts)."""

    name: str
    hidden_size: int
    num_layers: int  # every layer is an MoE layer
    num_heads: int
    num_kv_heads: int  # grouped-query attention: num_heads / num_kv_heads query heads share each K/V head
    head_dim: int
    num_experts: int
    top_k: int
    expert_hidden: int  # SwiGLU width of one routed expert
    shared_expert_hidden: int  # SwiGLU width of the always-run shared expert; 0 for none
    renormalize: bool  # top-k weights renormalized to sum to 1 (Mixtral) or raw softmax probabilities (Qwen2-MoE)
    lynx_alpha: float  # Lynx's published constants for the real model of this expert count
    lynx_beta: int
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    vocab_size: int = VOCAB_SIZE

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k {self.top_k} must be in [1, num_experts {self.num_experts}]")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even (rotary pairs)")


SHAPES: dict[str, MoEShape] = {
    shape.name: shape
    for shape in (
        MoEShape(
            name="mixtral-like",
            hidden_size=384,
            num_layers=6,
            num_heads=6,
            num_kv_heads=2,
            head_dim=64,
            num_experts=8,
            top_k=2,
            expert_hidden=768,
            shared_expert_hidden=0,
            renormalize=True,
            lynx_alpha=0.7,
            lynx_beta=1,
        ),
        MoEShape(
            name="qwen2moe-like",
            hidden_size=384,
            num_layers=6,
            num_heads=6,
            num_kv_heads=2,
            head_dim=64,
            num_experts=64,
            top_k=8,
            expert_hidden=192,
            shared_expert_hidden=384,
            renormalize=False,
            lynx_alpha=3.0,
            lynx_beta=4,
        ),
    )
}


def tiny(shape: MoEShape) -> MoEShape:
    """The same routing (experts, top-k, shared expert, renormalization) at a width that trains in seconds on a
    CPU: for tests and smoke runs."""
    return replace(
        shape,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
        expert_hidden=16,
        shared_expert_hidden=16 if shape.shared_expert_hidden else 0,
        max_seq_len=128,
    )


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe. Together with the shape, the seed and the corpus it fixes the trained weights."""

    steps: int
    batch_sequences: int = 64
    seq_len: int = 512
    peak_lr: float = 1.5e-3
    warmup_steps: int = 200
    final_lr_fraction: float = 0.1  # cosine decay from peak_lr to this fraction of it
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    aux_loss_coef: float = 0.01  # Switch Transformer's load-balancing coefficient (arXiv 2101.03961, alpha = 1e-2)
    text_fraction: float = 0.2  # share of each batch's sequences from the prose corpus (1 MB), the rest code (~12 MB)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_sequences < 2 or self.seq_len < 2:
            raise ValueError("steps >= 1, batch_sequences >= 2 and seq_len >= 2 are required")
        if not 1 <= self.text_sequences < self.batch_sequences:
            raise ValueError(f"a batch of {self.batch_sequences} sequences at text_fraction {self.text_fraction} "
                             "leaves one source without a sequence")

    @property
    def text_sequences(self) -> int:
        """Prose sequences in each batch; the rest are code."""
        return round(self.batch_sequences * self.text_fraction)
