"""Attention of one layer: decode over a paged KV cache, and prefill of a chunk with prior context.

KV-cache layout (vLLM's, for its FlashAttention backend): ``k_cache [num_pages, page_size, Hkv, D]``,
``v_cache [num_pages, page_size, Hkv, Dv]`` (bf16), ``block_table [B, max_pages_per_seq]`` int32 of page
ids, ``seq_lens [B]`` int32 of cached tokens per sequence; token ``p`` of sequence ``b`` lives in page
``block_table[b, p // page_size]`` at slot ``p % page_size``. :func:`make_paged_kv_cache` builds one for
given lengths with its pages in random order (as a long-running server's allocator leaves them).

Decode (:func:`attention_decode`): one query token per sequence, ``q [B, Hq, D]`` -> ``[B, Hq, Dv]``. The
default ``impl="triton"`` is a split-KV (flash-decoding) kernel (:mod:`._attn_triton`): each program takes one
(sequence, KV head, split) and serves all ``Hq / Hkv`` query heads of that KV head, so every cached K/V byte
of each sequence is read exactly once and only up to that sequence's own length (memory-bound, as vLLM's
decode attention is); splits along the sequence give the 132 SMs enough programs at small batches.
``impl="sdpa"`` gathers the pages into a padded ``[B, Hkv, max_len, D]`` tensor and calls
``torch.nn.functional.scaled_dot_product_attention`` with a length mask and ``enable_gqa``; it reads
``max_len`` tokens for every sequence plus the copy, so it is the CPU path and a cross-check, not a timing
target.

Prefill (:func:`attention_prefill`): one sequence's chunk of ``T`` new tokens after ``C`` cached ones, with
contiguous ``k, v [C + T, Hkv, D]`` (the prior context followed by the chunk's own keys): causal within the
chunk, full over the prior context (``torch.nn.attention.bias.causal_lower_right``, which SDPA runs as
FlashAttention with bottom-right-aligned causality on the GPU). vLLM reads the prior context from the paged
cache inside its varlen kernel; the bytes and FLOPs are the same. Several chunks: one call per sequence
(:func:`attention_prefill_batch`).

MLA models (DeepSeek-V2/V3) are approximated by multi-query attention (one KV head) whose K+V hold the same
bytes per token as MLA's latent cache (see :class:`lynxsim.calib.kernels.weights.LayerShape`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lynxsim.calib.kernels.paging import shuffled_block_table
from lynxsim.calib.kernels.triton_mode import interpreted


@dataclass
class PagedKVCache:
    """One layer's paged KV cache for a batch of sequences (see the module docstring)."""

    k_cache: torch.Tensor  # [num_pages, page_size, Hkv, D]
    v_cache: torch.Tensor  # [num_pages, page_size, Hkv, Dv]
    block_table: torch.Tensor  # [B, max_pages_per_seq] int32
    seq_lens: torch.Tensor  # [B] int32
    max_seq_len: int  # host-side upper bound of seq_lens (sizes the split-KV grid without a device sync)

    @property
    def page_size(self) -> int:
        return self.k_cache.shape[1]

    @property
    def batch(self) -> int:
        return self.block_table.shape[0]

    def kv_bytes(self, seq_lens: list[int] | None = None) -> int:
        """Bytes of K and V that a decode step reads for the given lengths (default: ``seq_lens``, synced)."""
        lens = seq_lens if seq_lens is not None else self.seq_lens.tolist()
        per_token = (self.k_cache.shape[2] * self.k_cache.shape[3] + self.v_cache.shape[2] * self.v_cache.shape[3])
        return int(sum(lens)) * per_token * self.k_cache.element_size()


def make_paged_kv_cache(
    seq_lens: list[int], num_kv_heads: int, head_dim: int, v_head_dim: int | None = None, *,
    page_size: int = 16, spare_tokens: int = 0, device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16,
    seed: int = 0, shuffle_pages: bool = True,
) -> PagedKVCache:
    """A cache holding ``seq_lens[b]`` random tokens (N(0,1)) for each sequence, with room for
    ``spare_tokens`` more per sequence (for :func:`append_kv`); pages shuffled across sequences."""
    dv = v_head_dim or head_dim
    dev = torch.device(device)
    pages_per_seq = [max(1, math.ceil((n + spare_tokens) / page_size)) for n in seq_lens]
    num_pages = sum(pages_per_seq)
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed)
    k = torch.empty(num_pages, page_size, num_kv_heads, head_dim, device=dev, dtype=torch.float32)
    v = torch.empty(num_pages, page_size, num_kv_heads, dv, device=dev, dtype=torch.float32)
    k.normal_(generator=gen)
    v.normal_(generator=gen)
    table = shuffled_block_table(pages_per_seq, num_pages, seed, shuffle_pages)
    return PagedKVCache(k.to(dtype), v.to(dtype), table.to(dev),
                        torch.tensor(seq_lens, dtype=torch.int32, device=dev), max(seq_lens) + spare_tokens)


def append_kv(cache: PagedKVCache, k: torch.Tensor, v: torch.Tensor) -> None:
    """Write one new token per sequence (``k [B, Hkv, D]``, ``v [B, Hkv, Dv]``) at position ``seq_lens[b]``
    and advance ``seq_lens`` (vLLM's reshape_and_cache). No host sync; the caller keeps ``max_seq_len`` an
    upper bound (``make_paged_kv_cache(spare_tokens=...)`` leaves room)."""
    pos = cache.seq_lens.long()
    rows = torch.arange(cache.batch, device=pos.device)
    page = cache.block_table[rows, pos // cache.page_size].long()
    slot = pos % cache.page_size
    cache.k_cache[page, slot] = k.to(cache.k_cache.dtype)
    cache.v_cache[page, slot] = v.to(cache.v_cache.dtype)
    cache.seq_lens += 1


def _gather_padded(cache: PagedKVCache, max_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K, V as ``[B, Hkv, max_len, D]`` and a bool mask ``[B, max_len]`` of valid positions."""
    dev = cache.k_cache.device
    pos = torch.arange(max_len, device=dev)
    pages = cache.block_table[:, (pos // cache.page_size).clamp(max=cache.block_table.shape[1] - 1)].long()
    slots = (pos % cache.page_size)[None, :].expand_as(pages)
    k = cache.k_cache[pages, slots].transpose(1, 2)
    v = cache.v_cache[pages, slots].transpose(1, 2)
    mask = pos[None, :] < cache.seq_lens[:, None]
    return k, v, mask


def decode_num_splits(batch: int, num_kv_heads: int, max_seq_len: int, block_n: int = 64, sm_count: int = 132) -> int:
    """Splits per sequence so that ``batch * Hkv * splits`` programs cover the SMs about 4 times, with at
    least 4 ``block_n`` tiles per split."""
    want = math.ceil(4 * sm_count / max(1, batch * num_kv_heads))
    most = max(1, math.ceil(max_seq_len / (4 * block_n)))
    return int(max(1, min(want, most, 64)))


def attention_decode(
    q: torch.Tensor, cache: PagedKVCache, *, scale: float | None = None, impl: str = "triton",
    num_splits: int | None = None, block_n: int | None = None, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention: ``q [B, Hq, D]`` against each sequence's ``seq_lens[b]`` cached tokens -> ``[B, Hq, Dv]``
    in q's dtype. ``impl``: ``"triton"`` (paged split-KV kernel; CPU via ``TRITON_INTERPRET=1``) or
    ``"sdpa"`` (padded gather + torch SDPA)."""
    B, Hq, D = q.shape
    Hkv, Dv = cache.k_cache.shape[2], cache.v_cache.shape[3]
    if Hq % Hkv:
        raise ValueError("Hq must be a multiple of Hkv")
    scale = scale if scale is not None else 1.0 / math.sqrt(D)
    if impl == "sdpa":
        k, v, mask = _gather_padded(cache, cache.max_seq_len)
        o = F.scaled_dot_product_attention(q[:, :, None, :], k, v, attn_mask=mask[:, None, None, :], scale=scale,
                                           enable_gqa=Hq != Hkv)[:, :, 0, :]
        if out is None:
            return o
        out.copy_(o)
        return out
    if impl != "triton":
        raise ValueError(f"unknown impl {impl!r}")
    from lynxsim.calib.kernels import _attn_triton as kern

    G = Hq // Hkv
    if block_n is None:  # keep a K and a V tile (x2 pipeline stages) well inside shared memory
        widest = max(triton_next_pow2(D), triton_next_pow2(Dv))
        block_n = 64 if widest <= 128 else (32 if widest <= 256 else 16)
    S = num_splits or decode_num_splits(B, Hkv, cache.max_seq_len, block_n)
    tokens_per_split = math.ceil(math.ceil(cache.max_seq_len / S) / block_n) * block_n
    S = max(1, math.ceil(cache.max_seq_len / tokens_per_split))
    o_part = torch.empty(B, Hq, S, Dv, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, Hq, S, dtype=torch.float32, device=q.device)
    interp = interpreted(q)
    kc, vc = cache.k_cache, cache.v_cache
    if q.stride(2) != 1:
        q = q.contiguous()
    kern._decode_partial_kernel[(B, Hkv, S)](
        q, kc, vc, cache.block_table, cache.seq_lens, o_part, lse,
        q.stride(0), q.stride(1), kc.stride(0), kc.stride(1), kc.stride(2), vc.stride(0), vc.stride(1), vc.stride(2),
        cache.block_table.stride(0), o_part.stride(0), o_part.stride(1), o_part.stride(2), lse.stride(0), lse.stride(1),
        scale, tokens_per_split,
        G=G, G_P=max(16, triton_next_pow2(G)), D=D, D_P=max(16, triton_next_pow2(D)), DV=Dv,
        DV_P=max(16, triton_next_pow2(Dv)), PAGE=cache.page_size, BLOCK_N=block_n, DOT_F32=interp,
        num_warps=4, num_stages=2)
    if out is None:
        out = torch.empty(B, Hq, Dv, dtype=q.dtype, device=q.device)
    kern._decode_reduce_kernel[(B, Hq)](
        o_part, lse, out, o_part.stride(0), o_part.stride(1), o_part.stride(2), lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1), NUM_SPLITS=S, S_P=max(2, triton_next_pow2(S)), DV=Dv,
        DV_P=max(16, triton_next_pow2(Dv)), num_warps=4)
    return out


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def attention_decode_reference(q: torch.Tensor, cache: PagedKVCache, scale: float | None = None,
                               dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Per-sequence loop with an explicit softmax in ``dtype``; returns ``[B, Hq, Dv]`` in ``dtype``."""
    B, Hq, D = q.shape
    Hkv = cache.k_cache.shape[2]
    scale = scale if scale is not None else 1.0 / math.sqrt(D)
    lens = cache.seq_lens.tolist()
    outs = []
    for b in range(B):
        n = lens[b]
        pos = torch.arange(n, device=q.device)
        pages = cache.block_table[b, pos // cache.page_size].long()
        k = cache.k_cache[pages, pos % cache.page_size].to(dtype)  # [n, Hkv, D]
        v = cache.v_cache[pages, pos % cache.page_size].to(dtype)
        k = k.repeat_interleave(Hq // Hkv, dim=1)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
        s = torch.einsum("hd,nhd->hn", q[b].to(dtype), k) * scale
        outs.append(torch.einsum("hn,nhd->hd", torch.softmax(s, -1), v))
    return torch.stack(outs)


def attention_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """One sequence's prefill chunk: ``q [T, Hq, D]``, ``k [C+T, Hkv, D]``, ``v [C+T, Hkv, Dv]`` (prior
    context then the chunk) -> ``[T, Hq, Dv]``; query ``i`` sees keys ``0 .. C+i``."""
    from torch.nn.attention.bias import causal_lower_right

    T, Hq, _ = q.shape
    S, Hkv, _ = k.shape
    if S < T:
        raise ValueError("k/v must hold at least the chunk's own T tokens")
    qh, kh, vh = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    bias = causal_lower_right(T, S)
    o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=bias, scale=scale, enable_gqa=Hq != Hkv)
    return o[0].transpose(0, 1)


def attention_prefill_batch(qs: list[torch.Tensor], ks: list[torch.Tensor], vs: list[torch.Tensor], *,
                            scale: float | None = None) -> list[torch.Tensor]:
    """Several sequences' chunks, one :func:`attention_prefill` call each."""
    return [attention_prefill(q, k, v, scale=scale) for q, k, v in zip(qs, ks, vs, strict=True)]


def attention_prefill_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                                dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Explicit masked softmax in ``dtype``; returns ``[T, Hq, Dv]``."""
    T, Hq, D = q.shape
    S, Hkv, _ = k.shape
    scale = scale if scale is not None else 1.0 / math.sqrt(D)
    kk = k.to(dtype).repeat_interleave(Hq // Hkv, dim=1)
    vv = v.to(dtype).repeat_interleave(Hq // Hkv, dim=1)
    s = torch.einsum("thd,shd->hts", q.to(dtype), kk) * scale
    allowed = torch.arange(S, device=q.device)[None, :] <= (S - T + torch.arange(T, device=q.device))[:, None]
    s = s.masked_fill(~allowed[None], float("-inf"))
    return torch.einsum("hts,shd->thd", torch.softmax(s, -1), vv)
