"""The per-layer units of a decoder iteration, written once and used by both calibration and validation.
Imports torch.

The measured cost model predicts an iteration as a sum of unit times, so calibration must time exactly the
code that validation executes. Both build every iteration from these functions; one MoE decoder layer is

    attention_in     RMSNorm, fused QKV GEMM, rotary embedding                      } ``dense_layer``
    write_kv         every new token's K and V into the paged KV cache              } (calibrated together)
    attention        decode rows (paged split-KV kernel)                                      ``attention_decode``
                     prefill chunks (their K/V behind their context, FlashAttention)          ``attention_prefill``
    attention_out    output GEMM + residual, RMSNorm, router GEMM + softmax top-k,  } ``dense_layer``
                     shared experts (added to the residual)                         }
    moe              routed experts over the layer's expert assignment (fused Triton kernel, or
                     grouped GEMM at large batches), added to the residual                    ``moe``

(a dense layer's ``ffn_out`` replaces ``attention_out``'s router and shared experts with its SwiGLU FFN:
``dense_ffn_layer``), plus ``embed`` (``embedding``) before the first layer and ``head`` (``lm_head``: the
last row of each sequence, final RMSNorm, LM-head GEMM, greedy argmax) after the last.

Tensor parallelism: ``attention_out``, ``ffn_out`` and ``moe`` take a ``reduce`` function (identity on one GPU,
an NCCL all-reduce over the TP group in a TP validation run) applied to the partial sums each rank produces
before they enter the residual: the attention output GEMM and the FFN/experts output, two all-reduces of
``[T, H]`` per layer as vLLM does. On a MoE layer with shared experts vLLM adds the shared output to the routed
output and reduces once; here the shared output enters the residual unreduced and the routed output is reduced:
the same bytes on the wire and the same number of collectives, which is what the timing needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lynxsim.calib.kernels import attention as attn_kernels
from lynxsim.calib.kernels import dense
from lynxsim.calib.kernels.moe import moe_fused, moe_grouped_gemm, moe_reference
from lynxsim.calib.kernels.weights import LayerShape, LayerWeights
from lynxsim.calib.plan import grouped_gemm_min_tokens

ROPE_THETA = 1e6
MAX_POSITIONS = 1 << 15
PAGE_SIZE = 16

Reduce = Callable[[torch.Tensor], torch.Tensor]


def no_reduce(partial: torch.Tensor) -> torch.Tensor:
    """One GPU holds the whole layer: its partial sums are already the sums."""
    return partial


@dataclass
class Rope:
    """cos/sin tables ``[MAX_POSITIONS, D/2]`` of the rotary embedding for head width ``D``."""

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


def rope_tables(rope: Rope, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cos/sin ``[T, 1, D/2]`` for int64 ``positions [T]`` (gathered once per iteration)."""
    return rope.cos[positions][:, None, :], rope.sin[positions][:, None, :]


def attention_in(
    x: torch.Tensor, lw: LayerWeights, s: LayerShape, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RMSNorm, fused QKV GEMM and rotary embedding of q and k: ``q [T, Hq, D]``, ``k [T, Hkv, D]``, ``v``."""
    h = dense.rms_norm(x, lw.input_norm)
    q, k, v = dense.qkv_proj(h, lw.w_qkv, lw.b_qkv, s.num_heads, s.num_kv_heads, s.head_dim, s.v_head_dim)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def write_kv_paged(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pages: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """Store one token per row (``k [R, Hkv, D]``) at page ``pages[r]``, slot ``slots[r]`` (vLLM's
    reshape_and_cache with a slot mapping; the lengths are set by the iteration, not advanced here, so a
    replayed graph computes the same thing every time)."""
    k_cache[pages, slots] = k
    v_cache[pages, slots] = v


def attention_out(
    x: torch.Tensor, attn: torch.Tensor, lw: LayerWeights, s: LayerShape, reduce: Reduce = no_reduce
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Output GEMM (reduced over the TP group) into the residual, RMSNorm, router GEMM + softmax top-k, shared
    experts into the residual. Returns (residual x, normed h for the experts, routing weights ``[T, k]``)."""
    x = x + reduce(dense.o_proj(attn, lw.w_o))
    h = dense.rms_norm(x, lw.post_attn_norm)
    weights, _, _ = dense.router_topk(h, lw.router, s.top_k, s.renormalize)
    if lw.shared_w13 is not None:
        x = x + dense.swiglu_ffn(h, lw.shared_w13, lw.shared_w2)
    return x, h, weights


def ffn_out(x: torch.Tensor, attn: torch.Tensor, lw: LayerWeights, reduce: Reduce = no_reduce) -> torch.Tensor:
    """A dense layer after attention: output GEMM into the residual, RMSNorm, SwiGLU FFN into the residual
    (both outputs reduced over the TP group)."""
    x = x + reduce(dense.o_proj(attn, lw.w_o))
    h = dense.rms_norm(x, lw.post_attn_norm)
    return x + reduce(dense.swiglu_ffn(h, lw.dense_w13, lw.dense_w2))


def moe(
    x: torch.Tensor, h: torch.Tensor, lw: LayerWeights, weights: torch.Tensor, ids: torch.Tensor,
    reduce: Reduce = no_reduce,
) -> torch.Tensor:
    """Routed experts with expert ids ``ids [T, k]``, added to the residual: the fused Triton MoE kernel below
    ``grouped_gemm_min_tokens`` tokens, torch's grouped GEMM from there on (``lynxsim.calib.plan``); on a CPU,
    for smoke runs, the float32 reference."""
    if h.device.type != "cuda":
        return x + reduce(moe_reference(h, lw.w13, lw.w2, weights, ids).to(x.dtype))
    experts, k = lw.w13.shape[0], ids.shape[1]
    if h.shape[0] >= grouped_gemm_min_tokens(experts, k):
        return x + reduce(moe_grouped_gemm(h, lw.w13, lw.w2, weights, ids))
    return x + reduce(moe_fused(h, lw.w13, lw.w2, weights, ids))


def embed(
    token_ids: torch.Tensor, positions: torch.Tensor, table: torch.Tensor, rope: Rope
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The iteration's input rows ``[T, H]`` and the rotary cos/sin of its positions (gathered once)."""
    cos, sin = rope_tables(rope, positions)
    return F.embedding(token_ids, table), cos, sin


def head(x: torch.Tensor, last_rows: torch.Tensor, w_lm: torch.Tensor, final_norm: torch.Tensor) -> torch.Tensor:
    """Greedy next tokens ``[S]`` from the last row of each sequence."""
    logits = dense.lm_head(x.index_select(0, last_rows), w_lm, final_norm)
    return logits.argmax(dim=-1)


def decode_attention(q: torch.Tensor, cache: attn_kernels.PagedKVCache, out: torch.Tensor) -> torch.Tensor:
    """Decode rows ``q [B, Hq, D]`` against their paged caches, written into ``out [B, Hq, Dv]`` (the rows of
    the iteration's attention output that belong to decode sequences)."""
    impl = "triton" if q.device.type == "cuda" else "sdpa"
    return attn_kernels.attention_decode(q, cache, impl=impl, out=out)


def prefill_attention(
    q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """One prefill chunk of ``n`` tokens: its new K/V are copied behind its cached context in the contiguous
    buffers ``k, v [context + n, ...]``, then causal attention, written into ``out`` (the chunk's rows)."""
    n = q.shape[0]
    k[-n:].copy_(k_new)
    v[-n:].copy_(v_new)
    return out.copy_(attn_kernels.attention_prefill(q, k, v))


# ----- KV-cache construction --------------------------------------------------------------------------------------


def pages_for(lengths: list[int], page_size: int = PAGE_SIZE) -> int:
    return sum(max(1, math.ceil(n / page_size)) for n in lengths)


def random_pool(num_pages: int, s: LayerShape, device: torch.device, generator: torch.Generator,
                dtype: torch.dtype = torch.bfloat16, page_size: int = PAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V page pools ``[num_pages, page, Hkv, D]`` of random values (never zeros)."""
    k = torch.empty(num_pages, page_size, s.num_kv_heads, s.head_dim, device=device, dtype=dtype)
    v = torch.empty(num_pages, page_size, s.num_kv_heads, s.v_head_dim, device=device, dtype=dtype)
    k.normal_(generator=generator)
    v.normal_(generator=generator)
    return k, v


def block_table(lengths: list[int], num_pages: int, device: torch.device, seed: int = 0,
                page_size: int = PAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pages for sequences of ``lengths`` tokens drawn at random from a pool of ``num_pages`` (as a long-running
    server's allocator leaves them): ``(block_table [B, max pages] int32, seq_lens [B] int32, last_slot
    (page, slot) of each sequence's last token as two int64 tensors)``."""
    need = [max(1, math.ceil(n / page_size)) for n in lengths]
    if sum(need) > num_pages:
        raise ValueError(f"{sum(need)} pages needed, pool has {num_pages}")
    gen = torch.Generator()
    gen.manual_seed(seed)
    perm = torch.randperm(num_pages, generator=gen)[: sum(need)]
    table = torch.zeros(len(lengths), max(need), dtype=torch.int32)
    last_page = torch.empty(len(lengths), dtype=torch.int64)
    last_slot = torch.empty(len(lengths), dtype=torch.int64)
    i = 0
    for b, (n, p) in enumerate(zip(lengths, need)):
        table[b, :p] = perm[i:i + p].to(torch.int32)
        last_page[b] = table[b, (n - 1) // page_size]
        last_slot[b] = (n - 1) % page_size
        i += p
    lens = torch.tensor(lengths, dtype=torch.int32)
    return table.to(device), lens.to(device), torch.stack([last_page, last_slot]).to(device)


def paged_cache(k_pool: torch.Tensor, v_pool: torch.Tensor, table: torch.Tensor, lens: torch.Tensor,
                max_len: int) -> attn_kernels.PagedKVCache:
    return attn_kernels.PagedKVCache(k_pool, v_pool, table, lens, max_len)
