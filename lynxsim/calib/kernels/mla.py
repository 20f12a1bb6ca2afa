"""Multi-head latent attention (MLA, DeepSeek-V2/V3) of one layer, as vLLM runs it on Hopper.

Names: ``H`` heads (of this tensor-parallel shard), ``R`` = kv_lora_rank, ``Dr`` = qk_rope_head_dim,
``Dn`` = qk_nope_head_dim, ``Dv`` = v_head_dim, ``Q`` = q_lora_rank (0: none, DeepSeek-V2-Lite), ``X`` = hidden.

Weights (:class:`MlaWeights`, bf16, ``[out, in]``): with q_lora, ``w_qkv_a [Q + R + Dr, X]`` is q_a_proj and
kv_a_proj_with_mqa fused into one GEMM (vLLM's ``fused_qkv_a_proj``; ``w_q_a``, ``w_kv_a`` are row views of
it), then ``q_a_norm [Q]`` and ``w_q_b [H (Dn + Dr), Q]``; without, ``w_q [H (Dn + Dr), X]`` and
``w_kv_a [R + Dr, X]``. ``kv_a_norm [R]``; ``w_kv_b [H (Dn + Dv), R]`` (per head Dn rows of W_UK then Dv rows
of W_UV), with the absorbed views ``w_uk [H, Dn, R]`` and ``w_uv [H, Dv, R]`` of its storage (no copies);
``w_o [X, H Dv]`` (the caller's output projection).

Cache (vLLM's MLA layout): ``kv_cache [num_pages, page_size, R + Dr]`` bf16, one row ``[c_normed | k_pe_roped]``
per token, addressed by slot ``page * page_size + offset``; decode reads it through ``block_table
[B, max_pages] int32`` and ``seq_lens [B] int32`` (tokens cached, the current one included, >= 1).

* :func:`mla_project`: q path GEMM(s) (the q_a RMSNorm: ``norm``, e.g. the fused one of :mod:`.fused`;
  :func:`dense.rms_norm` by default), kv_a GEMM, then ONE Triton kernel (:mod:`._mla_triton`): latent
  RMSNorm, rotary of ``k_pe`` and of ``q_pe`` (in place), and the cache write (slot < 0 skipped).
  Launches: without q_lora 2 GEMMs (q, kv_a) + 1 Triton kernel; with q_lora 2 GEMMs (fused q_a + kv_a, then
  q_b) + the q_a RMSNorm (eagerly about 9 small torch kernels; one once a fused norm is swapped in) + 1
  Triton kernel.
* :func:`mla_decode`: absorbed decode (FlashMLA / Triton MLA): ``q_lat = q_nope W_UK`` (batched GEMM over
  heads), split-KV attention of the ``H`` heads ``[q_lat | q_pe]`` against each sequence's single latent
  "head" (keys the whole row, values its first ``R`` columns, scale ``1/sqrt(Dn + Dr)``), a reduce kernel
  over the splits (skipped with one split), ``o = o_lat W_UV^T`` (batched GEMM) into ``out [B, H, Dv]``.
  Launches: bmm + partial kernel + reduce kernel + bmm (3 with one split); launch shape (heads per program,
  warps, splits) from :func:`mla_decode_config`.
* :func:`mla_prefill`: unabsorbed prefill of one sequence's chunk of ``T`` tokens after ``C`` cached ones
  from the contiguous latent rows ``[C + T, R + Dr]``: decompress ``k_nope, v = c W_kv_b^T`` (1 GEMM),
  ``k = [k_nope | k_pe]`` (1 cat), ``v`` zero-padded to ``Dn + Dr`` (1 pad; FlashAttention needs equal head
  dims, vLLM pads the same way with FA2), causal SDPA with bottom-right alignment (FlashAttention on the
  GPU), the first ``Dv`` columns copied into ``out [T, H, Dv]`` (1 copy). ``[q_nope | q_pe]`` is used as one
  view when they are adjacent in memory (as :func:`mla_project` returns them), else concatenated (1 cat).
  Launches on CUDA: GEMM, cat, pad (a fill and a copy), FlashAttention forward, copy: 6.

All of them take only device tensors and host ints derived from shapes (``max_seq_len`` is a host-side upper
bound): no host sync, no data-dependent shape, so each can be captured in a CUDA graph. The ``*_reference``
functions are float64 loops for the tests (unabsorbed math, so decode == reference proves the absorption).
:func:`mla_decode_cost` / :func:`mla_prefill_cost` give the FLOPs and HBM bytes per call (roofline floors).

Rotary: vLLM's DeepSeek models use the GPT-J (interleaved) style (``is_neox_style=False``) and, with YaRN
scaling, a softmax scale of ``mscale^2 / sqrt(Dn + Dr)`` and an mscale folded into the cos/sin table;
``neox_style`` and ``scale`` select those. Neither changes the cost.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from lynxsim.calib.kernels import dense
from lynxsim.calib.kernels.paging import shuffled_block_table
from lynxsim.calib.kernels.triton_mode import interpreted

RMS_EPS = 1e-6  # DeepSeek-V2/V3 rms_norm_eps
BF16_BYTES = 2


@dataclass(frozen=True)
class MlaDims:
    """Plain numbers of one MLA layer (of one tensor-parallel shard: ``num_heads`` is the shard's)."""

    hidden: int
    num_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int = 0  # 0: queries projected directly from the hidden state

    def __post_init__(self) -> None:
        if self.qk_rope_head_dim % 2:
            raise ValueError("qk_rope_head_dim must be even (rotary pairs)")
        if min(self.hidden, self.num_heads, self.kv_lora_rank, self.qk_nope_head_dim, self.qk_rope_head_dim,
               self.v_head_dim) <= 0 or self.q_lora_rank < 0:
            raise ValueError("MLA dims must be positive")

    @classmethod
    def from_spec(cls, spec: Any, tp_size: int = 1) -> MlaDims:
        """From a ``lynxsim.models.ModelSpec`` (duck-typed: ``hidden_size`` and ``attention``'s MLA fields);
        ``tp_size`` shards the heads as vLLM's tensor parallelism does (q_b/q/kv_b column-parallel, o
        row-parallel; q_a and kv_a replicated)."""
        att = spec.attention
        if not getattr(att, "kv_lora_rank", None):
            raise ValueError("not an MLA model (attention.kv_lora_rank unset)")
        if att.num_heads % tp_size:
            raise ValueError(f"{att.num_heads} heads do not split over tp_size={tp_size}")
        return cls(hidden=spec.hidden_size, num_heads=att.num_heads // tp_size, kv_lora_rank=att.kv_lora_rank,
                   qk_nope_head_dim=att.qk_nope_head_dim, qk_rope_head_dim=att.qk_rope_head_dim,
                   v_head_dim=att.v_head_dim, q_lora_rank=att.q_lora_rank or 0)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def cache_row_elements(self) -> int:
        """Elements per cached token per layer: the latent plus the shared rope key, ``R + Dr``."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes per cached token per layer in bf16 (independent of the head count and of TP)."""
        return BF16_BYTES * self.cache_row_elements

    @property
    def softmax_scale(self) -> float:
        """``1 / sqrt(Dn + Dr)``: the unabsorbed head dim, used by both decode and prefill."""
        return 1.0 / math.sqrt(self.qk_head_dim)

    @property
    def q_out(self) -> int:
        return self.num_heads * self.qk_head_dim


# ------------------------------------------------------------------------------------------------ weights

@dataclass
class MlaWeights:
    """One layer's MLA weights (see the module docstring for the layouts)."""

    w_kv_a: torch.Tensor  # [R + Dr, X]  (a row view of w_qkv_a with q_lora)
    kv_a_norm: torch.Tensor  # [R]
    w_kv_b: torch.Tensor  # [H (Dn + Dv), R]
    w_uk: torch.Tensor  # [H, Dn, R]  view of w_kv_b
    w_uv: torch.Tensor  # [H, Dv, R]  view of w_kv_b
    w_o: torch.Tensor  # [X, H Dv]
    w_q: torch.Tensor | None = None  # [H (Dn + Dr), X]  without q_lora
    w_qkv_a: torch.Tensor | None = None  # [Q + R + Dr, X]  with q_lora: q_a and kv_a fused
    w_q_a: torch.Tensor | None = None  # [Q, X]  row view of w_qkv_a
    q_a_norm: torch.Tensor | None = None  # [Q]
    w_q_b: torch.Tensor | None = None  # [H (Dn + Dr), Q]

    def tensors(self) -> list[torch.Tensor]:
        return [t for f in fields(self) if (t := getattr(self, f.name)) is not None]

    def nbytes(self) -> int:
        """Bytes held, each storage counted once (views share their base's)."""
        seen: dict[int, int] = {}
        for t in self.tensors():
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return sum(seen.values())

    @property
    def attention_bytes(self) -> int:
        """Bytes of the weights that :func:`mla_decode` reads per call (``w_uk`` and ``w_uv``)."""
        return self.w_kv_b.numel() * self.w_kv_b.element_size()


def build_mla_weights(dims: MlaDims, *, device: torch.device | str = "cpu", generator: torch.Generator | None = None,
                      dtype: torch.dtype = torch.bfloat16, std: float = 0.02) -> MlaWeights:
    """Random weights N(0, std^2) (drawn in float32, then cast), norms 1. ``generator`` must live on
    ``device``; default: a fresh one seeded 0."""
    dev = torch.device(device)
    if generator is None:
        generator = torch.Generator(device=dev)
        generator.manual_seed(0)
    H, R, Dr, Dn, Dv, X, Q = (dims.num_heads, dims.kv_lora_rank, dims.qk_rope_head_dim, dims.qk_nope_head_dim,
                              dims.v_head_dim, dims.hidden, dims.q_lora_rank)

    def rnd(*shape: int) -> torch.Tensor:
        t = torch.empty(*shape, device=dev, dtype=torch.float32)
        t.normal_(0.0, std, generator=generator)
        return t.to(dtype)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, device=dev, dtype=dtype)

    w_kv_b = rnd(H * (Dn + Dv), R)
    per_head = w_kv_b.view(H, Dn + Dv, R)
    common = dict(kv_a_norm=ones(R), w_kv_b=w_kv_b, w_uk=per_head[:, :Dn], w_uv=per_head[:, Dn:],
                  w_o=rnd(X, H * Dv))
    if Q:
        w_qkv_a = rnd(Q + R + Dr, X)
        return MlaWeights(w_kv_a=w_qkv_a[Q:], w_qkv_a=w_qkv_a, w_q_a=w_qkv_a[:Q], q_a_norm=ones(Q),
                          w_q_b=rnd(H * (Dn + Dr), Q), **common)
    return MlaWeights(w_kv_a=rnd(R + Dr, X), w_q=rnd(H * (Dn + Dr), X), **common)


def make_cos_sin_cache(
    max_pos: int, rope_dim: int, *, base: float = 10000.0, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``[max_pos, rope_dim]`` float32: cos in the first ``rope_dim / 2`` columns, sin in the rest (vLLM's
    ``cos_sin_cache``, plain RoPE without YaRN)."""
    inv = 1.0 / (base ** (torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim))
    ang = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv[None, :]
    return torch.cat([ang.cos(), ang.sin()], dim=-1).to(device=torch.device(device), dtype=torch.float32)


# ------------------------------------------------------------------------------------------------ cache

@dataclass
class MlaPagedCache:
    """One layer's paged latent cache for a batch of sequences."""

    kv_cache: torch.Tensor  # [num_pages, page_size, R + Dr]
    block_table: torch.Tensor  # [B, max_pages] int32
    seq_lens: torch.Tensor  # [B] int32
    max_seq_len: int  # host-side upper bound of seq_lens

    @property
    def page_size(self) -> int:
        return self.kv_cache.shape[1]

    def slots(self, positions: torch.Tensor) -> torch.Tensor:
        """Slot of position ``positions[b]`` of sequence ``b`` (``[B]`` int64), e.g. ``seq_lens`` for the
        next decode token. No host sync."""
        pos = positions.long()
        rows = torch.arange(pos.shape[0], device=pos.device)
        return self.block_table[rows, pos // self.page_size].long() * self.page_size + pos % self.page_size


def make_mla_cache(seq_lens: Sequence[int], dims: MlaDims, *, page_size: int = 64, spare_tokens: int = 0,
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                   shuffle_pages: bool = True, extra_pages: int = 0) -> MlaPagedCache:
    """A cache holding ``seq_lens[b]`` random rows (N(0,1)) per sequence, with room for ``spare_tokens``
    more, pages shuffled across sequences (as a long-running server's allocator leaves them);
    ``extra_pages`` unused pages are added to the pool."""
    dev = torch.device(device)
    pages_per_seq = [max(1, math.ceil((n + spare_tokens) / page_size)) for n in seq_lens]
    num_pages = sum(pages_per_seq) + extra_pages
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed)
    kv = torch.empty(num_pages, page_size, dims.cache_row_elements, device=dev, dtype=torch.float32)
    kv.normal_(generator=gen)
    table = shuffled_block_table(pages_per_seq, num_pages, seed, shuffle_pages)
    return MlaPagedCache(kv.to(dtype), table.to(dev), torch.tensor(list(seq_lens), dtype=torch.int32, device=dev),
                         max(seq_lens) + spare_tokens)


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# ------------------------------------------------------------------------------------------------ projection

def mla_project(
    h: torch.Tensor, w: MlaWeights, dims: MlaDims, *, cos_sin_cache: torch.Tensor, positions: torch.Tensor,
    kv_cache: torch.Tensor, slot_mapping: torch.Tensor, latent_out: torch.Tensor | None = None,
    neox_style: bool = True, eps: float = RMS_EPS,
    norm: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h [T, X]`` -> ``(q_nope [T, H, Dn], q_pe [T, H, Dr])``, views of one ``[T, H, Dn + Dr]`` buffer,
    ``q_pe`` roped; writes ``[rms_norm(c) | rope(k_pe)]`` of token ``t`` into ``kv_cache`` at
    ``slot_mapping[t]`` (int64; < 0: skipped) and, if given, into ``latent_out [T, R + Dr]``. ``positions
    [T]`` int64 index ``cos_sin_cache [max_pos, Dr]`` float32."""
    T = h.shape[0]
    H, R, Dr, Dn, Q = dims.num_heads, dims.kv_lora_rank, dims.qk_rope_head_dim, dims.qk_nope_head_dim, dims.q_lora_rank
    if Q:
        assert w.w_qkv_a is not None and w.q_a_norm is not None and w.w_q_b is not None
        qkv_a = F.linear(h, w.w_qkv_a)  # [T, Q + R + Dr]: q_a and kv_a in one GEMM
        kv_a = qkv_a[:, Q:]
        normed = norm(qkv_a[:, :Q], w.q_a_norm) if norm is not None else dense.rms_norm(qkv_a[:, :Q], w.q_a_norm, eps)
        q = F.linear(normed, w.w_q_b)
    else:
        assert w.w_q is not None
        q = F.linear(h, w.w_q)
        kv_a = F.linear(h, w.w_kv_a)
    q = q.view(T, H, Dn + Dr)
    q_nope, q_pe = q[..., :Dn], q[..., Dn:]
    if R & (R - 1) or Dr & (Dr - 1) or Dr < 2:
        raise ValueError("the Triton MLA kernels need kv_lora_rank and qk_rope_head_dim powers of two")
    if T == 0:
        return q_nope, q_pe
    from lynxsim.calib.kernels import _mla_triton as kern

    lat = latent_out if latent_out is not None else kv_cache  # dummy pointer when not written
    kern._mla_project_kernel[(T,)](
        kv_a, q_pe, w.kv_a_norm, cos_sin_cache, positions, slot_mapping, kv_cache, lat,
        kv_a.stride(0), q_pe.stride(0), q_pe.stride(1), cos_sin_cache.stride(0), kv_cache.stride(0),
        kv_cache.stride(1), lat.stride(0), H, eps,
        R=R, DR=Dr, H_P=_pow2(H), PAGE=kv_cache.shape[1], NEOX=neox_style, WRITE_LATENT=latent_out is not None,
        num_warps=4 if R * 2 >= 1024 else 1)
    return q_nope, q_pe


def mla_project_reference(
    h: torch.Tensor, w: MlaWeights, dims: MlaDims, *, cos_sin_cache: torch.Tensor, positions: torch.Tensor,
    neox_style: bool = True, eps: float = RMS_EPS, dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q_nope [T,H,Dn], q_pe_roped [T,H,Dr], row [T, R+Dr])`` in ``dtype``: the torch math of
    :func:`mla_project` (``row`` is what the cache receives)."""
    H, R, Dn, Q = dims.num_heads, dims.kv_lora_rank, dims.qk_nope_head_dim, dims.q_lora_rank
    x = h.to(dtype)

    def norm(v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * g.to(dtype)

    if Q:
        assert w.w_qkv_a is not None and w.q_a_norm is not None and w.w_q_b is not None
        qkv_a = x @ w.w_qkv_a.to(dtype).T
        q = norm(qkv_a[:, :Q], w.q_a_norm) @ w.w_q_b.to(dtype).T
        kv_a = qkv_a[:, Q:]
    else:
        assert w.w_q is not None
        q = x @ w.w_q.to(dtype).T
        kv_a = x @ w.w_kv_a.to(dtype).T
    q = q.view(-1, H, Dn + dims.qk_rope_head_dim)
    cs = cos_sin_cache.to(dtype)[positions.long()]
    half = dims.qk_rope_head_dim // 2
    cos, sin = cs[:, :half], cs[:, half:]

    def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if neox_style:
            x1, x2 = x[..., :half], x[..., half:]
            return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).flatten(-2)

    q_pe = rope(q[..., Dn:], cos[:, None], sin[:, None])
    row = torch.cat([norm(kv_a[:, :R], w.kv_a_norm), rope(kv_a[:, R:], cos, sin)], -1)
    return q[..., :Dn], q_pe, row


# ------------------------------------------------------------------------------------------------ decode

@dataclass(frozen=True)
class MlaDecodeConfig:
    """Launch shape of the split-KV decode kernel."""

    block_h: int  # heads per program (a power of two >= 16, for tl.dot)
    num_warps: int
    num_splits: int  # KV splits per sequence asked for (see _split_plan for the count launched)


def mla_decode_config(batch: int, num_heads: int, max_seq_len: int, *, block_n: int = 32,
                      sm_count: int = 132, block_h: int | None = None) -> MlaDecodeConfig:
    """Head block, warps and KV splits, from a sweep on an H100 (R = 512, Dr = 64, block_n = 32, bf16):

    * ``block_h`` (unless given) 16 for H <= 16, 32 for H <= 32, else 64; 8 warps for 64-head blocks, else
      4. At H = 128, B = 64, 4096 tokens: 64-head blocks 1.6x faster than 16-head ones (which re-read each
      latent row 8 times from L2 and feed small MMA tiles), 12 % faster than 32-head ones;
    * splits: about one wave of programs, ``batch * ceil(H / block_h) * splits ~= slots``, with 2 resident
      programs per SM for 4-warp blocks (``[16 or 32, 512]`` float32 accumulators) and 1 for 64-head
      blocks; more waves, or a partial last wave, measured slower. At least 4 ``block_n`` tiles per split,
      at most 64 splits."""
    block_h = block_h or (16 if num_heads <= 16 else (32 if num_heads <= 32 else 64))
    num_warps = 8 if block_h >= 64 else 4
    slots = sm_count * (1 if block_h >= 64 else 2)
    programs = batch * math.ceil(num_heads / block_h)
    most = max(1, math.ceil(max_seq_len / (4 * block_n)))
    return MlaDecodeConfig(block_h, num_warps, int(max(1, min(slots // max(1, programs), most, 64))))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _split_plan(max_seq_len: int, num_splits: int, block_n: int) -> tuple[int, int]:
    """``(splits, tokens_per_split)``, the latter a multiple of ``block_n``; no split starts past the end."""
    tps = math.ceil(math.ceil(max(1, max_seq_len) / num_splits) / block_n) * block_n
    return max(1, math.ceil(max(1, max_seq_len) / tps)), tps


def mla_decode(
    q_nope: torch.Tensor, q_pe: torch.Tensor, w: MlaWeights, dims: MlaDims, *, kv_cache: torch.Tensor,
    block_table: torch.Tensor, seq_lens: torch.Tensor, max_seq_len: int, out: torch.Tensor | None = None,
    scale: float | None = None, num_splits: int | None = None, block_h: int | None = None,
    block_n: int | None = None, num_warps: int | None = None, num_stages: int = 2,
) -> torch.Tensor:
    """Absorbed MLA decode: ``q_nope [B, H, Dn]``, ``q_pe [B, H, Dr]`` (roped) against each sequence's
    ``seq_lens[b]`` cached latent rows -> ``out [B, H, Dv]`` (q's dtype). ``max_seq_len``: host-side upper
    bound of ``seq_lens`` (sizes the split grid). Every ``seq_lens[b]`` must be >= 1. ``num_splits``,
    ``block_h``, ``num_warps`` default to :func:`mla_decode_config`; ``block_n`` to 32 (16 interpreted)."""
    B, H, Dn = q_nope.shape
    R, Dr, Dv = dims.kv_lora_rank, dims.qk_rope_head_dim, dims.v_head_dim
    if R & (R - 1) or Dr & (Dr - 1) or R < 16 or Dr < 16:
        raise ValueError("the Triton MLA decode needs kv_lora_rank and qk_rope_head_dim powers of two >= 16")
    scale = scale if scale is not None else dims.softmax_scale
    interp = interpreted(q_nope)
    block_n = block_n or (16 if interp else 32)
    sms = _sm_count(q_nope.device.index or 0) if q_nope.device.type == "cuda" else 132
    cfg = mla_decode_config(B, H, max_seq_len, block_n=block_n, sm_count=sms, block_h=block_h)
    block_h, num_warps = cfg.block_h, num_warps or cfg.num_warps
    num_splits = num_splits or cfg.num_splits
    if block_h < 16 or block_h & (block_h - 1):
        raise ValueError("block_h must be a power of two >= 16 (tl.dot)")
    if out is None:
        out = torch.empty(B, H, Dv, dtype=q_nope.dtype, device=q_nope.device)
    from lynxsim.calib.kernels import _attn_triton, _mla_triton

    q_lat = torch.bmm(q_nope.transpose(0, 1), w.w_uk)  # [H, B, R]
    o_lat = torch.empty(H, B, R, dtype=q_nope.dtype, device=q_nope.device)
    S, tps = _split_plan(max_seq_len, num_splits, block_n)
    if q_pe.stride(2) != 1:
        q_pe = q_pe.contiguous()
    grid = (math.ceil(H / block_h), S, B)
    common = (q_lat, q_pe, kv_cache, block_table, seq_lens)
    q_strides = (q_lat.stride(1), q_lat.stride(0), q_pe.stride(0), q_pe.stride(1), kv_cache.stride(0),
                 kv_cache.stride(1), block_table.stride(0))
    meta = dict(R=R, DR=Dr, PAGE=kv_cache.shape[1], BLOCK_H=block_h, BLOCK_N=block_n, DOT_F32=interp,
                num_warps=num_warps, num_stages=num_stages)
    sm_scale_log2 = scale * 1.4426950408889634
    if S == 1:  # one split: the partial kernel writes the final (normalised) output directly
        _mla_triton._mla_decode_partial_kernel[grid](
            *common, o_lat, o_lat, *q_strides, o_lat.stride(1), o_lat.stride(0), 0, 0, 0,
            H, sm_scale_log2, tps, WRITE_LSE=False, **meta)
    else:
        o_part = torch.empty(B, H, S, R, dtype=torch.float32, device=q_nope.device)
        lse = torch.empty(B, H, S, dtype=torch.float32, device=q_nope.device)
        _mla_triton._mla_decode_partial_kernel[grid](
            *common, o_part, lse, *q_strides, o_part.stride(0), o_part.stride(1), o_part.stride(2),
            lse.stride(0), lse.stride(1), H, sm_scale_log2, tps, WRITE_LSE=True, **meta)
        _attn_triton._decode_reduce_kernel[(B, H)](
            o_part, lse, o_lat, o_part.stride(0), o_part.stride(1), o_part.stride(2), lse.stride(0),
            lse.stride(1), o_lat.stride(1), o_lat.stride(0), NUM_SPLITS=S, S_P=max(2, _pow2(S)), DV=R, DV_P=R,
            num_warps=4)
    torch.bmm(o_lat, w.w_uv.transpose(1, 2), out=out.transpose(0, 1))  # [H, B, R] x [H, R, Dv]
    return out


def mla_decode_reference(
    q_nope: torch.Tensor, q_pe: torch.Tensor, w: MlaWeights, dims: MlaDims, *, kv_cache: torch.Tensor,
    block_table: torch.Tensor, seq_lens: torch.Tensor, scale: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Unabsorbed decode, a loop over sequences in ``dtype``: decompress each sequence's cached latent with
    ``w_kv_b`` into per-head ``k_nope``, ``v`` and attend per head. Returns ``[B, H, Dv]`` in ``dtype``."""
    B, H, Dn = q_nope.shape
    R, Dv = dims.kv_lora_rank, dims.v_head_dim
    scale = scale if scale is not None else dims.softmax_scale
    page = kv_cache.shape[1]
    wkv = w.w_kv_b.to(dtype).view(H, Dn + Dv, R)
    outs = []
    for b, n in enumerate(seq_lens.tolist()):
        pos = torch.arange(n, device=kv_cache.device)
        rows = kv_cache[block_table[b, pos // page].long(), pos % page].to(dtype)  # [n, R + Dr]
        c, kpe = rows[:, :R], rows[:, R:]
        k_nope = torch.einsum("nr,hdr->nhd", c, wkv[:, :Dn])
        v = torch.einsum("nr,hdr->nhd", c, wkv[:, Dn:])
        s = (torch.einsum("hd,nhd->hn", q_nope[b].to(dtype), k_nope)
             + torch.einsum("he,ne->hn", q_pe[b].to(dtype), kpe)) * scale
        outs.append(torch.einsum("hn,nhd->hd", torch.softmax(s, -1), v))
    return torch.stack(outs)


# ------------------------------------------------------------------------------------------------ prefill

def _joined(q_nope: torch.Tensor, q_pe: torch.Tensor) -> torch.Tensor:
    """``[q_nope | q_pe]`` as one ``[T, H, Dn + Dr]`` tensor: a view when ``q_pe`` directly follows
    ``q_nope`` in memory (as :func:`mla_project` returns them), else a concatenation."""
    T, H, Dn = q_nope.shape
    Dr = q_pe.shape[2]
    if (q_nope.stride() == q_pe.stride() and q_nope.stride(2) == 1 and q_nope.dtype == q_pe.dtype
            and q_pe.data_ptr() == q_nope.data_ptr() + Dn * q_nope.element_size()
            and q_nope.stride(1) >= Dn + Dr):
        return q_nope.as_strided((T, H, Dn + Dr), q_nope.stride())
    return torch.cat([q_nope, q_pe], dim=-1)


def mla_prefill(
    q_nope: torch.Tensor, q_pe: torch.Tensor, w: MlaWeights, dims: MlaDims, *, latent: torch.Tensor,
    out: torch.Tensor | None = None, scale: float | None = None,
) -> torch.Tensor:
    """Unabsorbed prefill of one sequence's chunk: ``q_nope [T, H, Dn]``, ``q_pe [T, H, Dr]`` (roped),
    ``latent [C + T, R + Dr]`` (the C cached rows then the chunk's own, each ``[c_normed | k_pe_roped]``)
    -> ``out [T, H, Dv]``; query ``i`` sees keys ``0 .. C + i``."""
    from torch.nn.attention.bias import causal_lower_right

    T, H, Dn = q_nope.shape
    S = latent.shape[0]
    R, Dr, Dv = dims.kv_lora_rank, dims.qk_rope_head_dim, dims.v_head_dim
    if S < T:
        raise ValueError("latent must hold at least the chunk's own T rows")
    scale = scale if scale is not None else dims.softmax_scale
    kv = F.linear(latent[:, :R], w.w_kv_b).view(S, H, Dn + Dv)  # decompress: 1 GEMM
    k = torch.cat([kv[..., :Dn], latent[:, None, R:].expand(S, H, Dr)], dim=-1)  # [S, H, Dn + Dr]
    q = _joined(q_nope, q_pe)
    D = max(Dn + Dr, Dv)
    v = kv[..., Dn:]
    if Dv < D:
        v = F.pad(v, (0, D - Dv))
    if Dn + Dr < D:  # (no DeepSeek model) zero columns leave q k^T unchanged
        q, k = F.pad(q, (0, D - Dn - Dr)), F.pad(k, (0, D - Dn - Dr))
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                       attn_mask=causal_lower_right(T, S), scale=scale)  # [1, H, T, D]
    o = o[0, :, :, :Dv].transpose(0, 1)
    if out is None:
        return o.contiguous()
    out.copy_(o)
    return out


def mla_prefill_reference(
    q_nope: torch.Tensor, q_pe: torch.Tensor, w: MlaWeights, dims: MlaDims, *, latent: torch.Tensor,
    scale: float | None = None, dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Explicit masked softmax in ``dtype``; returns ``[T, H, Dv]``."""
    T, H, Dn = q_nope.shape
    S = latent.shape[0]
    R, Dv = dims.kv_lora_rank, dims.v_head_dim
    scale = scale if scale is not None else dims.softmax_scale
    lat = latent.to(dtype)
    wkv = w.w_kv_b.to(dtype).view(H, Dn + Dv, R)
    k_nope = torch.einsum("sr,hdr->shd", lat[:, :R], wkv[:, :Dn])
    v = torch.einsum("sr,hdr->shd", lat[:, :R], wkv[:, Dn:])
    s = (torch.einsum("thd,shd->hts", q_nope.to(dtype), k_nope)
         + torch.einsum("the,se->hts", q_pe.to(dtype), lat[:, R:])) * scale
    allowed = torch.arange(S, device=s.device)[None, :] <= (S - T + torch.arange(T, device=s.device))[:, None]
    s = s.masked_fill(~allowed[None], float("-inf"))
    return torch.einsum("hts,shd->thd", torch.softmax(s, -1), v)


# ------------------------------------------------------------------------------------------------ costs

class MlaCost(NamedTuple):
    """FLOPs and HBM bytes of one call. ``bytes_floor``: each input read once and each output written once
    (the roofline floor); ``bytes_impl``: plus the intermediates this implementation writes and reads back
    through HBM (in the worst case that none stays in L2)."""

    flops: int
    bytes_floor: int
    bytes_impl: int


def mla_decode_cost(dims: MlaDims, seq_lens: Sequence[int], num_splits: int = 1) -> MlaCost:
    """One :func:`mla_decode` call over ``B = len(seq_lens)`` sequences holding ``N = sum(seq_lens)`` tokens:

    * flops = ``2 B H R (Dn + Dv)`` (the two absorption bmm's) + ``2 H N (2R + Dr)`` (scores over ``R + Dr``,
      values over ``R``);
    * bytes_floor = ``2 N (R + Dr)`` (latent cache) + ``2 H R (Dn + Dv)`` (w_uk, w_uv) + ``2 B H (Dn + Dr)``
      (q) + ``2 B H Dv`` (out) + ``4 B`` (seq_lens; the block table's ``4 N / page_size`` bytes are left out);
    * bytes_impl = floor + ``2 * 2 B H R`` (q_lat written and read) + ``2 * 2 B H R`` (o_lat) + with ``S > 1``
      splits ``2 * 4 B H S (R + 1)`` (float32 partials and log-sum-exps, written and read).

    The kernel reads each latent row once per head block (``ceil(H / block_h)`` blocks; the blocks of one
    (sequence, split) are adjacent in the grid and run together, so the repeats come from L2)."""
    B, N = len(seq_lens), int(sum(seq_lens))
    H, R, Dr, Dn, Dv = dims.num_heads, dims.kv_lora_rank, dims.qk_rope_head_dim, dims.qk_nope_head_dim, dims.v_head_dim
    flops = 2 * B * H * R * (Dn + Dv) + 2 * H * N * (2 * R + Dr)
    floor = (BF16_BYTES * N * (R + Dr) + BF16_BYTES * H * R * (Dn + Dv) + BF16_BYTES * B * H * (Dn + Dr)
             + BF16_BYTES * B * H * Dv + 4 * B)
    impl = floor + 2 * 2 * BF16_BYTES * B * H * R
    if num_splits > 1:
        impl += 2 * 4 * B * H * num_splits * (R + 1)
    return MlaCost(flops, floor, impl)


def mla_prefill_cost(dims: MlaDims, T: int, C: int = 0) -> MlaCost:
    """One :func:`mla_prefill` call: a chunk of ``T`` tokens after ``C`` cached (``S = C + T`` rows), with
    ``P = T C + T (T + 1) / 2`` (query, key) pairs inside the causal mask:

    * flops = ``2 S R H (Dn + Dv)`` (decompression GEMM) + ``2 H P (Dn + Dr)`` (scores) + ``2 H P Dv``
      (values; the padded FlashAttention call multiplies ``Dn + Dr`` wide: ``2 H P (Dn + Dr)``, and computes
      whole tiles along the diagonal);
    * bytes_floor = ``2 S (R + Dr)`` (latent) + ``2 H R (Dn + Dv)`` (w_kv_b) + ``2 T H (Dn + Dr)`` (q) +
      ``2 T H Dv`` (out);
    * bytes_impl = floor + ``2 S H (Dn + Dv)`` (kv written) + ``2 S H Dn + 2 S Dr + 2 S H (Dn + Dr)`` (k
      assembled) + ``2 S H Dv + 2 S H D`` (v padded to ``D = max(Dn + Dr, Dv)``) + ``2 S H (Dn + Dr + D)``
      (k, v read once by the attention kernel) + ``2 T H D`` (its output) + ``2 T H Dv`` (the copy into
      ``out`` reads the first Dv columns of it; its write is the floor's). With ``q_nope``, ``q_pe`` not
      adjacent add ``2 * 2 T H (Dn + Dr)`` (their concatenation)."""
    S = C + T
    H, R, Dr, Dn, Dv = dims.num_heads, dims.kv_lora_rank, dims.qk_rope_head_dim, dims.qk_nope_head_dim, dims.v_head_dim
    D = max(Dn + Dr, Dv)
    P = T * C + T * (T + 1) // 2
    flops = 2 * S * R * H * (Dn + Dv) + 2 * H * P * (Dn + Dr) + 2 * H * P * Dv
    e = BF16_BYTES
    floor = e * S * (R + Dr) + e * H * R * (Dn + Dv) + e * T * H * (Dn + Dr) + e * T * H * Dv
    impl = (floor + e * S * H * (Dn + Dv) + e * (S * H * Dn + S * Dr + S * H * (Dn + Dr))
            + e * (S * H * Dv + S * H * D) + e * S * H * (Dn + Dr + D) + e * T * H * D + e * T * H * Dv)
    return MlaCost(flops, floor, impl)
