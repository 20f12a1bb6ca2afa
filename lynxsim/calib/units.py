"""The per-layer units of a decoder iteration, written once and used by both calibration and validation, in
two kernel sets. Imports torch.

The measured cost model predicts an iteration as a sum of unit times, so calibration must time exactly the
code that validation executes. Both build every iteration from the methods of one ``LayerKernels`` object
(``make_kernels``); one MoE decoder layer is

    attention_in     norm, QKV projection(s), rotary embedding, KV-cache write          } ``dense_layer``
    attention        decode rows (paged split-KV kernel)                                      ``attention_decode``
                     prefill chunks (their K/V behind their context, FlashAttention)          ``attention_prefill``
    attention_out    output GEMM, norm, router GEMM + top-k, shared experts             } ``dense_layer``
    moe              routed experts over the layer's expert assignment (fused Triton kernel, or
                     grouped GEMM at large batches; FP8 experts: the fused FP8 W8A8 kernel)   ``moe``

(a dense layer's ``ffn_out`` replaces ``attention_out``'s router and shared experts with its SwiGLU FFN:
``dense_ffn_layer``), plus ``embed`` (``embedding``) before the first layer and ``head`` (``lm_head``: the
last row of each sequence, final norm, LM-head GEMM, greedy argmax) after the last.

Kernel sets (``KERNEL_SETS``):

* ``production`` (the default): the layer as vLLM runs it on Hopper. GEMMs go to cuBLAS; everything between
  them is one fused Triton op each (``lynxsim.calib.kernels.fused``): the residual add fused into the next
  RMSNorm (vLLM's fused_add_rms_norm: the stream is carried as ``(delta, residual)``), q/k RMSNorm + rotary +
  paged KV-cache write in one kernel, router softmax/sigmoid + (grouped) top-k in one kernel, SiLU-and-mul in
  one kernel. MLA models (DeepSeek-V2/V3) run real MLA (``lynxsim.calib.kernels.mla``): a latent KV cache of
  ``kv_lora_rank + qk_rope_head_dim`` elements per token, weight-absorbed decode (the per-head ``W_UK``/``W_UV``
  products run in the decode attention unit), unabsorbed prefill (the latent decompressed in the prefill
  attention unit). Every unit is timed inside a CUDA graph, one per grid point, as vLLM captures one graph
  per batch size.
* ``reference``: the first, unfused implementation, kept selectable (``lynxsim calibrate --kernels
  reference``) so the two can be compared: torch RMSNorm, rotary and residual adds as separate kernels, the
  router's softmax and top-k as torch ops, no q/k norm, and MLA approximated by single-KV-head attention
  with the latent cache's bytes (``lynxsim.calib.kernels.weights``).

Tensor parallelism: ``attention_out``, ``ffn_out`` and ``moe`` take a ``reduce`` function (identity on one GPU,
an NCCL all-reduce over the TP group in a TP validation run) applied to the partial sums each rank produces
before they enter the residual stream: the attention output and the FFN/experts output, two all-reduces of
``[T, H]`` per layer as vLLM does. On a MoE layer with shared experts the production set adds the shared output
to the routed output and reduces once, as vLLM does; the reference set lets the shared output enter the stream
unreduced and reduces the routed output: the same bytes on the wire and the same number of collectives.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

import torch
import torch.nn.functional as F

from lynxsim.calib.kernels import attention as attn_kernels
from lynxsim.calib.kernels import dense, fused, mla
from lynxsim.calib.kernels.moe import moe_fused, moe_fused_fp8, moe_grouped_gemm, moe_reference
from lynxsim.calib.kernels.paging import shuffled_block_table
from lynxsim.calib.kernels.triton_mode import triton_runs
from lynxsim.calib.kernels.weights import KERNEL_SETS, LayerShape, LayerWeights
from lynxsim.calib.plan import grouped_gemm_min_tokens

ROPE_THETA = 1e6
MAX_POSITIONS = 1 << 15
PAGE_SIZE = 16
NORM_EPS = 1e-6

Reduce = Callable[[torch.Tensor], torch.Tensor]


def no_reduce(partial: torch.Tensor) -> torch.Tensor:
    """One GPU holds the whole layer: its partial sums are already the sums."""
    return partial


# ----- the production set's fused ops, with their torch references standing in where Triton cannot run -------------


def _add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    if triton_runs(x):
        return fused.add_rms_norm(x, residual, weight, NORM_EPS)
    normed, summed = fused.add_rms_norm_reference(x, residual, weight, NORM_EPS)
    return normed.to(x.dtype), summed


def _rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if triton_runs(x):
        return fused.rms_norm(x, weight, NORM_EPS)
    return fused.rms_norm_reference(x, weight, NORM_EPS).to(x.dtype)


def _qk_norm_rope_cache(qkv: torch.Tensor, s: LayerShape, lw: LayerWeights, cos_sin: torch.Tensor,
                        positions: torch.Tensor, pool: KVPool, slots: torch.Tensor) -> torch.Tensor:
    assert pool.v is not None
    shapes: dict[str, Any] = dict(
        num_heads=s.num_heads, num_kv_heads=s.num_kv_heads, head_dim=s.head_dim, v_head_dim=s.v_head_dim,
        q_norm=lw.q_norm, k_norm=lw.k_norm, cos_sin_cache=cos_sin, positions=positions,
    )
    if triton_runs(qkv):
        return fused.qk_norm_rope_cache(qkv, **shapes, k_cache=pool.k, v_cache=pool.v, slot_mapping=slots,
                                        eps=NORM_EPS)
    q, k, v = fused.qk_norm_rope_reference(qkv, **shapes, eps=NORM_EPS)
    pool.k.view(-1, *pool.k.shape[2:])[slots] = k.to(pool.k.dtype)
    pool.v.view(-1, *pool.v.shape[2:])[slots] = v.to(pool.v.dtype)
    return q.to(qkv.dtype)


def _topk(logits: torch.Tensor, s: LayerShape, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    options: dict[str, Any] = dict(renormalize=s.renormalize, scoring=s.scoring, correction_bias=bias,
                                   num_groups=s.num_expert_groups, topk_groups=s.topk_groups)
    if triton_runs(logits):
        return fused.topk_softmax(logits, s.top_k, **options)
    weights, ids = fused.topk_softmax_reference(logits, s.top_k, **options)
    return weights.float(), ids.to(torch.int32)


def _silu_and_mul(h: torch.Tensor) -> torch.Tensor:
    return fused.silu_and_mul(h) if triton_runs(h) else fused.silu_and_mul_reference(h).to(h.dtype)


# ----- the state an iteration carries between units ---------------------------------------------------------------


@dataclass
class Hidden:
    """The residual stream between sub-layers. Production: ``x`` is the last sub-layer's output not yet added
    and ``residual`` the stream before it (the add happens inside the next fused norm; ``residual`` is None
    before the first layer). Reference: ``x`` is the stream itself and ``residual`` is None."""

    x: torch.Tensor
    residual: torch.Tensor | None = None


@dataclass
class Positions:
    """The iteration's token positions ``[T]`` (int64), and for the reference set the rotary cos/sin gathered
    per token (``[T, 1, D/2]``); the production set looks them up inside its fused kernel."""

    positions: torch.Tensor
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None


@dataclass
class KVPool:
    """One layer's KV storage. Paged (``[pages, PAGE_SIZE, ...]``) for the cache, contiguous (``[tokens, ...]``)
    for a prefill chunk's context buffer. GQA: ``k`` and ``v`` ``[..., Hkv, D]``; production MLA: ``k`` is the
    latent row ``[..., kv_lora_rank + qk_rope_head_dim]`` and ``v`` is None."""

    k: torch.Tensor
    v: torch.Tensor | None = None


@dataclass
class DecodeCache:
    """Where the decode rows' KV entries live: block table ``[B, max pages]`` (int32), lengths ``[B]`` (int32,
    the new token included) and a host-side upper bound of the lengths (sizes the split-KV grid)."""

    block_table: torch.Tensor
    seq_lens: torch.Tensor
    max_len: int


Query: TypeAlias = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
"""GQA: ``q [T, Hq, D]``; production MLA: ``(q_nope [T, H, Dn], q_pe [T, H, Dr])``."""


def _rows(q: Query, rows: slice) -> Query:
    return (q[0][rows], q[1][rows]) if isinstance(q, tuple) else q[rows]


@dataclass
class Rope:
    """cos/sin tables ``[MAX_POSITIONS, D/2]`` of the rotary embedding for head width ``D`` (reference set)."""

    cos: torch.Tensor
    sin: torch.Tensor

    @classmethod
    def build(cls, head_dim: int, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> Rope:
        half = head_dim // 2
        inv = 1.0 / (ROPE_THETA ** (torch.arange(half, device=device, dtype=torch.float32) / half))
        angles = torch.arange(MAX_POSITIONS, device=device, dtype=torch.float32)[:, None] * inv[None, :]
        return cls(angles.cos().to(dtype), angles.sin().to(dtype))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding of ``x [T, h, D]`` with per-token ``cos, sin [T, 1, D/2]``."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


# ----- kernel sets -----------------------------------------------------------------------------------------------


class ReferenceKernels:
    """The first, unfused implementation (module docstring)."""

    name = "reference"

    def __init__(self, shape: LayerShape, device: torch.device) -> None:
        self.shape = shape
        self.rope = Rope.build(shape.head_dim, device)

    # storage
    def attention_heads(self) -> tuple[int, int]:
        """Query heads and value width of the attention output ``[T, heads, Dv]``."""
        return self.shape.num_heads, self.shape.v_head_dim

    def kv_bytes_per_token(self) -> int:
        return self.shape.kv_bytes_per_token("reference")

    def new_pool(self, rows: tuple[int, ...], device: torch.device, gen: torch.Generator) -> KVPool:
        """Random KV storage of leading shape ``rows`` (``(pages, PAGE_SIZE)`` or ``(tokens,)``), never zeros."""
        s = self.shape
        k = torch.empty(*rows, s.num_kv_heads, s.head_dim, device=device, dtype=torch.bfloat16)
        v = torch.empty(*rows, s.num_kv_heads, s.v_head_dim, device=device, dtype=torch.bfloat16)
        k.normal_(generator=gen)
        v.normal_(generator=gen)
        return KVPool(k, v)

    # units
    def positions(self, positions: torch.Tensor) -> Positions:
        """The rotary cos/sin of the iteration's positions, gathered once (part of the ``embedding`` unit)."""
        return Positions(positions, self.rope.cos[positions][:, None, :], self.rope.sin[positions][:, None, :])

    def embed(self, token_ids: torch.Tensor, positions: torch.Tensor, table: torch.Tensor) -> tuple[Hidden, Positions]:
        """The iteration's input rows ``[T, H]`` and its positions in the form the layers consume."""
        return Hidden(F.embedding(token_ids, table)), self.positions(positions)

    def attention_in(self, hidden: Hidden, lw: LayerWeights, pos: Positions, pool: KVPool,
                     slots: torch.Tensor) -> tuple[Hidden, Query]:
        """RMSNorm, fused QKV GEMM, rotary embedding of q and k, and each token's K/V stored at its flat slot
        (``page * PAGE_SIZE + offset``; vLLM's reshape_and_cache with a slot mapping)."""
        s = self.shape
        assert lw.w_qkv is not None and pos.cos is not None and pos.sin is not None
        h = dense.rms_norm(hidden.x, lw.input_norm)
        q, k, v = dense.qkv_proj(h, lw.w_qkv, lw.b_qkv, s.num_heads, s.num_kv_heads, s.head_dim, s.v_head_dim)
        q, k = apply_rope(q, pos.cos, pos.sin), apply_rope(k, pos.cos, pos.sin)
        assert pool.v is not None
        pool.k.view(-1, *pool.k.shape[2:])[slots] = k
        pool.v.view(-1, *pool.v.shape[2:])[slots] = v
        return hidden, q

    def decode_attention(self, q: Query, rows: slice, lw: LayerWeights, pool: KVPool, cache: DecodeCache,
                         out: torch.Tensor) -> None:
        """Decode rows of ``q`` against their paged caches, written into ``out`` (those rows' attention output)."""
        assert isinstance(q, torch.Tensor) and pool.v is not None
        paged = attn_kernels.PagedKVCache(pool.k, pool.v, cache.block_table, cache.seq_lens, cache.max_len)
        impl = "triton" if q.device.type == "cuda" else "sdpa"
        attn_kernels.attention_decode(q[rows], paged, impl=impl, out=out)

    def prefill_attention(self, q: Query, rows: slice, lw: LayerWeights, pool: KVPool, chunk_slots: torch.Tensor,
                          context: KVPool, out: torch.Tensor) -> None:
        """One prefill chunk of ``n`` tokens: its K/V, read back from their cache slots, are copied behind its
        cached context in the contiguous buffers ``context [C + n, ...]``, then causal attention into ``out``."""
        assert isinstance(q, torch.Tensor) and pool.v is not None and context.v is not None
        n = chunk_slots.shape[0]
        context.k[-n:].copy_(pool.k.view(-1, *pool.k.shape[2:])[chunk_slots])
        context.v[-n:].copy_(pool.v.view(-1, *pool.v.shape[2:])[chunk_slots])
        out.copy_(attn_kernels.attention_prefill(q[rows], context.k, context.v))

    def attention_out(self, hidden: Hidden, attn: torch.Tensor, lw: LayerWeights, reduce: Reduce = no_reduce
                      ) -> tuple[Hidden, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Output GEMM (reduced over the TP group) into the residual, RMSNorm, router GEMM + softmax top-k, shared
        experts into the residual. Returns (stream, normed h for the experts, routing weights ``[T, k]``, top-k
        ids, None: the shared output is already in the stream)."""
        s = self.shape
        assert lw.w_o is not None and lw.router is not None
        x = hidden.x + reduce(dense.o_proj(attn, lw.w_o))
        h = dense.rms_norm(x, lw.post_attn_norm)
        weights, ids, _ = dense.router_topk(h, lw.router, s.top_k, s.renormalize)
        if lw.shared_w13 is not None:
            assert lw.shared_w2 is not None
            x = x + dense.swiglu_ffn(h, lw.shared_w13, lw.shared_w2)
        return Hidden(x), h, weights, ids, None

    def ffn_out(self, hidden: Hidden, attn: torch.Tensor, lw: LayerWeights, reduce: Reduce = no_reduce) -> Hidden:
        """A dense layer after attention: output GEMM into the residual, RMSNorm, SwiGLU FFN into the residual
        (both outputs reduced over the TP group)."""
        assert lw.w_o is not None and lw.dense_w13 is not None and lw.dense_w2 is not None
        x = hidden.x + reduce(dense.o_proj(attn, lw.w_o))
        h = dense.rms_norm(x, lw.post_attn_norm)
        return Hidden(x + reduce(dense.swiglu_ffn(h, lw.dense_w13, lw.dense_w2)))

    def moe(self, hidden: Hidden, h: torch.Tensor, lw: LayerWeights, weights: torch.Tensor, ids: torch.Tensor,
            shared: torch.Tensor | None, reduce: Reduce = no_reduce) -> Hidden:
        """Routed experts with expert ids ``ids [T, k]``, added to the residual."""
        return Hidden(hidden.x + reduce(routed_experts(h, lw, weights, ids)))

    def head(self, hidden: Hidden, last_rows: torch.Tensor, w_lm: torch.Tensor, final_norm: torch.Tensor
             ) -> torch.Tensor:
        """Greedy next tokens ``[S]`` from the last row of each sequence."""
        logits = dense.lm_head(hidden.x.index_select(0, last_rows), w_lm, final_norm)
        return logits.argmax(dim=-1)

    def gemms(self, h: torch.Tensor, attn: torch.Tensor, lw: LayerWeights) -> object:
        """The GEMMs of ``dense_layer`` alone (a diagnostic: the floor the fused ops are compared with)."""
        return _gqa_gemms(h, attn, lw)


class ProductionKernels(ReferenceKernels):
    """The layer as production engines run it on Hopper (module docstring)."""

    name = "production"

    def __init__(self, shape: LayerShape, device: torch.device) -> None:
        self.shape = shape
        rotary = shape.mla.qk_rope_head_dim if shape.mla is not None else shape.head_dim
        self.cos_sin = fused.rope_cos_sin_cache(rotary, MAX_POSITIONS, ROPE_THETA, device)

    def attention_heads(self) -> tuple[int, int]:
        if self.shape.mla is not None:
            return self.shape.mla.num_heads, self.shape.mla.v_head_dim
        return self.shape.num_heads, self.shape.v_head_dim

    def kv_bytes_per_token(self) -> int:
        return self.shape.kv_bytes_per_token("production")

    def new_pool(self, rows: tuple[int, ...], device: torch.device, gen: torch.Generator) -> KVPool:
        if self.shape.mla is None:
            return super().new_pool(rows, device, gen)
        latent = torch.empty(*rows, self.shape.mla.cache_row_elements, device=device, dtype=torch.bfloat16)
        latent.normal_(generator=gen)
        return KVPool(latent)

    def positions(self, positions: torch.Tensor) -> Positions:
        """The positions alone: the fused rotary kernel looks its cos/sin up itself."""
        return Positions(positions)

    def _norm(self, hidden: Hidden, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused residual add + RMSNorm: (normed rows, the stream after the add)."""
        return _add_rms_norm(hidden.x, hidden.residual, weight)

    def attention_in(self, hidden: Hidden, lw: LayerWeights, pos: Positions, pool: KVPool,
                     slots: torch.Tensor) -> tuple[Hidden, Query]:
        """Fused add + RMSNorm; GQA: fused QKV GEMM, then one kernel for q/k RMSNorm (where the model has it),
        rotary and the K/V cache write; MLA: the q and KV-down projections and one kernel for the latent
        norm, both rotaries and the latent cache write (``mla.mla_project``). The returned stream has no
        pending delta (``x`` holds the normed rows, which nothing reads): ``attention_out`` adds to
        ``residual``."""
        s = self.shape
        h, residual = self._norm(hidden, lw.input_norm)
        if s.mla is not None:
            assert lw.mla is not None
            return Hidden(h, residual), self._mla_project(h, lw, pos, pool, slots)
        assert lw.w_qkv is not None
        qkv = F.linear(h, lw.w_qkv, lw.b_qkv)
        return Hidden(h, residual), _qk_norm_rope_cache(qkv, s, lw, self.cos_sin, pos.positions, pool, slots)

    def _mla_project(self, h: torch.Tensor, lw: LayerWeights, pos: Positions, pool: KVPool,
                     slots: torch.Tensor) -> Query:
        assert lw.mla is not None and self.shape.mla is not None
        if triton_runs(h):
            return mla.mla_project(h, lw.mla, self.shape.mla, cos_sin_cache=self.cos_sin, positions=pos.positions,
                                   kv_cache=pool.k, slot_mapping=slots, norm=_rms_norm)
        q_nope, q_pe, row = mla.mla_project_reference(h, lw.mla, self.shape.mla, cos_sin_cache=self.cos_sin,
                                                      positions=pos.positions)
        pool.k.view(-1, pool.k.shape[-1])[slots] = row.to(pool.k.dtype)
        return q_nope.to(h.dtype), q_pe.to(h.dtype)

    def decode_attention(self, q: Query, rows: slice, lw: LayerWeights, pool: KVPool, cache: DecodeCache,
                         out: torch.Tensor) -> None:
        if self.shape.mla is None:
            super().decode_attention(q, rows, lw, pool, cache, out)
            return
        assert isinstance(q, tuple) and lw.mla is not None
        q_nope, q_pe = _rows(q, rows)
        where: dict[str, Any] = dict(kv_cache=pool.k, block_table=cache.block_table, seq_lens=cache.seq_lens)
        if triton_runs(q_nope):
            mla.mla_decode(q_nope, q_pe, lw.mla, self.shape.mla, **where, max_seq_len=cache.max_len, out=out)
        else:
            out.copy_(mla.mla_decode_reference(q_nope, q_pe, lw.mla, self.shape.mla, **where))

    def prefill_attention(self, q: Query, rows: slice, lw: LayerWeights, pool: KVPool, chunk_slots: torch.Tensor,
                          context: KVPool, out: torch.Tensor) -> None:
        if self.shape.mla is None:
            super().prefill_attention(q, rows, lw, pool, chunk_slots, context, out)
            return
        assert isinstance(q, tuple) and lw.mla is not None
        n = chunk_slots.shape[0]
        context.k[-n:].copy_(pool.k.view(-1, pool.k.shape[-1])[chunk_slots])
        q_nope, q_pe = _rows(q, rows)
        mla.mla_prefill(q_nope, q_pe, lw.mla, self.shape.mla, latent=context.k, out=out)

    def _o_proj(self, attn: torch.Tensor, lw: LayerWeights) -> torch.Tensor:
        w_o = lw.mla.w_o if lw.mla is not None else lw.w_o
        assert w_o is not None
        return F.linear(attn.reshape(attn.shape[0], -1), w_o)

    def _swiglu(self, h: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        return F.linear(_silu_and_mul(F.linear(h, w13)), w2)

    def attention_out(self, hidden: Hidden, attn: torch.Tensor, lw: LayerWeights, reduce: Reduce = no_reduce
                      ) -> tuple[Hidden, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Output GEMM (reduced), fused add + RMSNorm, router GEMM, one fused (grouped) top-k kernel, shared
        experts (kept apart: ``moe`` adds them to the routed output before the one reduction)."""
        s = self.shape
        assert lw.router is not None
        h, residual = self._norm(Hidden(reduce(self._o_proj(attn, lw)), hidden.residual), lw.post_attn_norm)
        weights, ids = _topk(F.linear(h, lw.router), s, lw.router_bias)
        shared = None
        if lw.shared_w13 is not None:
            assert lw.shared_w2 is not None
            shared = self._swiglu(h, lw.shared_w13, lw.shared_w2)
        return Hidden(h, residual), h, weights, ids, shared

    def ffn_out(self, hidden: Hidden, attn: torch.Tensor, lw: LayerWeights, reduce: Reduce = no_reduce) -> Hidden:
        assert lw.dense_w13 is not None and lw.dense_w2 is not None
        h, residual = self._norm(Hidden(reduce(self._o_proj(attn, lw)), hidden.residual), lw.post_attn_norm)
        return Hidden(reduce(self._swiglu(h, lw.dense_w13, lw.dense_w2)), residual)

    def moe(self, hidden: Hidden, h: torch.Tensor, lw: LayerWeights, weights: torch.Tensor, ids: torch.Tensor,
            shared: torch.Tensor | None, reduce: Reduce = no_reduce) -> Hidden:
        """Routed experts, plus the shared experts' output, reduced once; the next norm adds it to the stream."""
        routed = routed_experts(h, lw, weights, ids)
        if shared is not None:
            routed = routed.add_(shared)
        return Hidden(reduce(routed), hidden.residual)

    def head(self, hidden: Hidden, last_rows: torch.Tensor, w_lm: torch.Tensor, final_norm: torch.Tensor
             ) -> torch.Tensor:
        """The last row of each sequence: fused add + final RMSNorm, LM-head GEMM, greedy argmax."""
        delta = hidden.x.index_select(0, last_rows)
        residual = hidden.residual.index_select(0, last_rows) if hidden.residual is not None else None
        h, _ = self._norm(Hidden(delta, residual), final_norm)
        return F.linear(h, w_lm).argmax(dim=-1)

    def gemms(self, h: torch.Tensor, attn: torch.Tensor, lw: LayerWeights) -> object:
        if lw.mla is None:
            return _gqa_gemms(h, attn, lw)
        m = lw.mla
        if m.w_qkv_a is not None:  # q_a and kv_a in one GEMM, then q_b
            assert m.w_q_b is not None
            q_a = F.linear(h, m.w_qkv_a)[:, : m.w_q_b.shape[1]]
            outs = [F.linear(q_a, m.w_q_b)]
        else:
            assert m.w_q is not None
            outs = [F.linear(h, m.w_q), F.linear(h, m.w_kv_a)]
        return [*outs, F.linear(attn.reshape(attn.shape[0], -1), m.w_o), *_router_and_shared_gemms(h, lw)]


def _gqa_gemms(h: torch.Tensor, attn: torch.Tensor, lw: LayerWeights) -> object:
    """QKV, output, router and shared-expert GEMMs of one GQA layer, nothing between them."""
    assert lw.w_qkv is not None and lw.w_o is not None
    return [F.linear(h, lw.w_qkv, lw.b_qkv), F.linear(attn.reshape(attn.shape[0], -1), lw.w_o),
            *_router_and_shared_gemms(h, lw)]


def _router_and_shared_gemms(h: torch.Tensor, lw: LayerWeights) -> list[torch.Tensor]:
    """The router GEMM and, where the layer has shared experts, their two GEMMs (the activation left out)."""
    assert lw.router is not None
    outs = [F.linear(h, lw.router)]
    if lw.shared_w13 is not None:
        assert lw.shared_w2 is not None
        outs.append(F.linear(F.linear(h, lw.shared_w13)[:, : lw.shared_w2.shape[1]], lw.shared_w2))
    return outs


LayerKernels = ReferenceKernels
"""The interface both kernel sets implement (``ProductionKernels`` overrides each unit)."""


def make_kernels(name: str, shape: LayerShape, device: torch.device) -> LayerKernels:
    """The kernel set ``name`` (one of ``KERNEL_SETS``) for layers of ``shape`` on ``device``."""
    if name not in KERNEL_SETS:
        raise ValueError(f"unknown kernel set {name!r}; known: {', '.join(KERNEL_SETS)}")
    return ProductionKernels(shape, device) if name == "production" else ReferenceKernels(shape, device)


def routed_experts(h: torch.Tensor, lw: LayerWeights, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The routed experts' output ``[T, H]`` for expert ids ``ids [T, k]``: the fused Triton MoE kernel below
    ``grouped_gemm_min_tokens`` tokens, torch's grouped GEMM from there on (``lynxsim.calib.plan``); FP8 experts
    (``lw.w13_scale`` set) the fused FP8 kernel at every token count, as vLLM runs its Triton fused_moe with
    ``fp8_w8a8``; on a CPU, for smoke runs, the float32 reference."""
    assert lw.w13 is not None and lw.w2 is not None
    scales: dict[str, Any] = dict(w13_scale=lw.w13_scale, w2_scale=lw.w2_scale)
    if h.device.type != "cuda":
        return moe_reference(h, lw.w13, lw.w2, weights, ids, **scales).to(h.dtype)
    if lw.w13_scale is not None:
        assert lw.w2_scale is not None
        return moe_fused_fp8(h, lw.w13, lw.w13_scale, lw.w2, lw.w2_scale, weights, ids)
    experts, k = lw.w13.shape[0], ids.shape[1]
    if h.shape[0] >= grouped_gemm_min_tokens(experts, k):
        return moe_grouped_gemm(h, lw.w13, lw.w2, weights, ids)
    return moe_fused(h, lw.w13, lw.w2, weights, ids)


# ----- KV-cache construction --------------------------------------------------------------------------------------


def pages_for(lengths: list[int], page_size: int = PAGE_SIZE) -> int:
    return sum(max(1, math.ceil(n / page_size)) for n in lengths)


def block_table(lengths: list[int], num_pages: int, device: torch.device, seed: int = 0,
                page_size: int = PAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Pages for sequences of ``lengths`` tokens drawn at random from a pool of ``num_pages``
    (``paging.shuffled_block_table``): ``(block_table [B, max pages] int32, seq_lens [B] int32)``."""
    table = shuffled_block_table([max(1, math.ceil(n / page_size)) for n in lengths], num_pages, seed)
    return table.to(device), torch.tensor(lengths, dtype=torch.int32).to(device)


def token_slots(table: torch.Tensor, row: int, first: int, count: int, page_size: int = PAGE_SIZE) -> list[int]:
    """Flat cache slots (``page * page_size + offset``) of tokens ``first .. first + count - 1`` of sequence
    ``row`` of a block table (host-side; call with a CPU copy of the table)."""
    return [int(table[row, p // page_size]) * page_size + p % page_size for p in range(first, first + count)]
