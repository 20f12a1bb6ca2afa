"""Correctness of the MLA kernels in ``lynxsim.calib.kernels.mla`` against float64 references.

CPU tests use small dims (H=4 or 20, R=64, Dr=16, Dn=Dv=32) and run the Triton kernels through Triton's
interpreter (``TRITON_INTERPRET=1``, set here when no GPU is present), as ``test_calib_kernels`` does. The
decode reference is the unabsorbed math (latent decompressed with ``w_kv_b``, attention per head), so
agreement proves the weight absorption. Tests marked ``gpu`` run DeepSeek-V2-Lite and a DeepSeek-Coder-V2
TP4 shard on CUDA, including a CUDA-graph capture, and are skipped without a GPU.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from kernel_checks import (  # noqa: E402  (switches the interpreter on before the kernels are imported)
    BF16_BOUND,
    cpu_only,
    gpu,
    needs_cuda,
    needs_triton,
    rel_err,
)
from lynxsim.calib.kernels import mla  # noqa: E402

SENTINEL = -7.0  # exactly representable in bf16; never produced by a normed, roped row of these inputs


def small_dims(H: int = 4, q_lora: int = 0) -> mla.MlaDims:
    return mla.MlaDims(hidden=64, num_heads=H, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
                       v_head_dim=32, q_lora_rank=q_lora)


def weights(d: mla.MlaDims, seed: int = 0, device: str = "cpu", std: float = 0.1) -> mla.MlaWeights:
    """std 0.1 at R=64 gives decompressed keys of O(1) entries: a softmax far from uniform."""
    return mla.build_mla_weights(d, device=device, generator=torch.Generator(device=device).manual_seed(seed), std=std)


def rand_q(B: int, d: mla.MlaDims, seed: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, d.num_heads, d.qk_head_dim, generator=gen).to(device, torch.bfloat16)
    return q[..., :d.qk_nope_head_dim], q[..., d.qk_nope_head_dim:]


# ------------------------------------------------------------------------------------------------ dims, weights

def test_dims_from_catalog_and_weight_bytes():
    models = pytest.importorskip("lynxsim.models")
    lite_spec = models.load_catalog_model("deepseek-v2-lite")
    lite = mla.MlaDims.from_spec(lite_spec)
    assert (lite.hidden, lite.num_heads, lite.kv_lora_rank, lite.qk_rope_head_dim, lite.qk_nope_head_dim,
            lite.v_head_dim, lite.q_lora_rank) == (2048, 16, 512, 64, 128, 128, 0)
    assert lite.cache_row_elements == 576 and lite.kv_bytes_per_token == 1152
    assert lite.softmax_scale == pytest.approx(192 ** -0.5)
    coder = mla.MlaDims.from_spec(models.load_catalog_model("deepseek-coder-v2"), tp_size=4)
    assert (coder.hidden, coder.num_heads, coder.q_lora_rank) == (5120, 32, 1536)
    v3 = mla.MlaDims.from_spec(models.load_catalog_model("deepseek-v3"), tp_size=8)
    assert (v3.hidden, v3.num_heads, v3.kv_bytes_per_token) == (7168, 16, 1152)
    with pytest.raises(ValueError):
        mla.MlaDims.from_spec(models.load_catalog_model("mixtral-8x7b"))
    # the weights hold exactly the spec's attention parameters (bf16), views counted once
    w = mla.build_mla_weights(lite)
    assert w.nbytes() == 2 * lite_spec.attention.params(lite_spec.hidden_size)
    assert w.w_uk.shape == (16, 128, 512) and w.w_uv.shape == (16, 128, 512) and w.w_q.shape == (16 * 192, 2048)
    assert w.w_uk.data_ptr() == w.w_kv_b.data_ptr()
    assert torch.equal(w.w_uv[3], w.w_kv_b[3 * 256 + 128: 4 * 256])
    assert 0.018 < w.w_kv_b.float().std().item() < 0.022
    dq = small_dims(q_lora=48)
    wq = weights(dq)
    assert wq.w_qkv_a.shape == (48 + 64 + 16, 64) and wq.w_q is None
    assert wq.w_kv_a.data_ptr() == wq.w_qkv_a[48:].data_ptr() and wq.w_q_b.shape == (4 * 48, 48)


def test_costs():
    d = mla.MlaDims(hidden=2048, num_heads=16, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                    v_head_dim=128)
    c = mla.mla_decode_cost(d, [100, 300])
    assert c.flops == 2 * 2 * 16 * 512 * 256 + 2 * 16 * 400 * (1024 + 64)
    assert c.bytes_floor == 2 * 400 * 576 + 2 * 16 * 512 * 256 + 2 * 2 * 16 * 192 + 2 * 2 * 16 * 128 + 8
    assert mla.mla_decode_cost(d, [100, 300], num_splits=4).bytes_impl > c.bytes_impl > c.bytes_floor
    p = mla.mla_prefill_cost(d, T=4, C=6)
    pairs = 4 * 6 + 10
    assert p.flops == 2 * 10 * 512 * 16 * 256 + 2 * 16 * pairs * 192 + 2 * 16 * pairs * 128
    assert p.bytes_impl > p.bytes_floor


def test_decode_config():
    """The launch shapes the H100 sweep picked (about one wave of programs)."""
    cfg = mla.mla_decode_config
    assert cfg(64, 16, 4096) == mla.MlaDecodeConfig(16, 4, 4)
    assert cfg(128, 16, 2048).num_splits == 2 and cfg(256, 16, 2048).num_splits == 1
    assert cfg(4, 16, 8192).num_splits == 64 and cfg(1, 16, 100, block_n=32).num_splits == 1
    assert cfg(64, 32, 4096) == mla.MlaDecodeConfig(32, 4, 4)
    assert cfg(64, 128, 4096) == mla.MlaDecodeConfig(64, 8, 1)
    assert cfg(4, 128, 4096).num_splits == 16
    assert cfg(64, 128, 4096, block_h=16) == mla.MlaDecodeConfig(16, 4, 1)
    assert mla._split_plan(70, 3, 16) == (3, 32) and mla._split_plan(50, 64, 16) == (4, 16)


# ------------------------------------------------------------------------------------------------ projection

@needs_triton
@cpu_only
@pytest.mark.parametrize("q_lora,neox", [(0, True), (48, True), (48, False)])
def test_mla_project_cpu(q_lora, neox):
    d = small_dims(H=4, q_lora=q_lora)
    w = weights(d, seed=q_lora + neox)
    T, page, num_pages = 7, 16, 6
    gen = torch.Generator().manual_seed(5)
    h = torch.randn(T, d.hidden, generator=gen).bfloat16()
    positions = torch.randint(0, 100, (T,), generator=gen)
    cs = mla.make_cos_sin_cache(128, d.qk_rope_head_dim)
    slots = torch.randperm(num_pages * page, generator=gen)[:T]
    slots[3] = -1  # a padding token: no write
    kv_cache = torch.full((num_pages, page, d.cache_row_elements), SENTINEL, dtype=torch.bfloat16)
    latent = torch.full((T, d.cache_row_elements), float("nan"), dtype=torch.bfloat16)
    q_nope, q_pe = mla.mla_project(h, w, d, cos_sin_cache=cs, positions=positions, kv_cache=kv_cache,
                                   slot_mapping=slots, latent_out=latent, neox_style=neox)
    rq_nope, rq_pe, rrow = mla.mla_project_reference(h, w, d, cos_sin_cache=cs, positions=positions,
                                                     neox_style=neox)
    assert q_nope.shape == (T, 4, 32) and q_pe.shape == (T, 4, 16)
    assert rel_err(q_nope, rq_nope) < BF16_BOUND
    assert rel_err(q_pe, rq_pe) < BF16_BOUND
    assert rel_err(latent, rrow) < BF16_BOUND
    flat = kv_cache.view(-1, d.cache_row_elements)
    written = slots[slots >= 0]
    assert rel_err(flat[written], rrow[slots >= 0]) < BF16_BOUND
    # the latent is normed (kv_a_norm = 1: mean square 1) and the rope part really rotated
    assert torch.allclose(flat[written, :64].float().pow(2).mean(-1), torch.ones(len(written)), atol=0.03)
    _, _, unroped = mla.mla_project_reference(h, w, d, cos_sin_cache=torch.cat(
        [torch.ones(128, 8), torch.zeros(128, 8)], -1), positions=positions)
    assert rel_err(flat[written, 64:], unroped[slots >= 0, 64:]) > 0.1
    # every other row untouched, the padding token's included
    untouched = torch.ones(flat.shape[0], dtype=torch.bool)
    untouched[written] = False
    assert (flat[untouched] == SENTINEL).all()
    assert int(untouched.sum()) == num_pages * page - (T - 1)


# ------------------------------------------------------------------------------------------------ decode

DECODE_CASES = [
    ([1], 4, None, None),  # B = 1, one token
    ([37], 4, 2, None),  # B = 1, two splits
    ([5, 70, 33, 1, 48], 4, 3, None),  # splits that end past shorter sequences
    ([70, 17], 20, 1, 16),  # H = 20 in blocks of 16: the second block masked; one split (direct write)
    ([64, 9, 40, 16], 20, None, None),  # default config (one block of 32 heads), heuristic split count
    ([50, 3], 36, 64, None),  # more splits asked than tiles: capped; a block of 64 heads
]


@needs_triton
@cpu_only
@pytest.mark.parametrize("lens,H,splits,block_h", DECODE_CASES)
def test_mla_decode_cpu(lens, H, splits, block_h):
    d = small_dims(H=H)
    w = weights(d, seed=len(lens))
    cache = mla.make_mla_cache(lens, d, page_size=16, seed=H + len(lens), extra_pages=2)
    q_nope, q_pe = rand_q(len(lens), d, seed=sum(lens))
    ref = mla.mla_decode_reference(q_nope, q_pe, w, d, kv_cache=cache.kv_cache, block_table=cache.block_table,
                                   seq_lens=cache.seq_lens)
    out = torch.full((len(lens), H, d.v_head_dim), float("nan"), dtype=torch.bfloat16)
    res = mla.mla_decode(q_nope, q_pe, w, d, kv_cache=cache.kv_cache, block_table=cache.block_table,
                         seq_lens=cache.seq_lens, max_seq_len=cache.max_seq_len, out=out, num_splits=splits,
                         block_n=16, block_h=block_h)
    assert res is out
    assert rel_err(out, ref) < BF16_BOUND


@needs_triton
@cpu_only
def test_mla_decode_attends():
    """Not a near-uniform softmax: attending to a shuffled cache gives a clearly different answer."""
    d = small_dims()
    w = weights(d)
    cache = mla.make_mla_cache([60, 30], d, page_size=16, seed=3)
    q_nope, q_pe = rand_q(2, d, seed=4)
    kw = dict(kv_cache=cache.kv_cache, block_table=cache.block_table, seq_lens=cache.seq_lens)
    ref = mla.mla_decode_reference(q_nope, q_pe, w, d, **kw)
    uniform = mla.mla_decode_reference(q_nope, q_pe, w, d, scale=0.0, **kw)
    assert rel_err(uniform, ref) > 0.1
    out = mla.mla_decode(q_nope, q_pe, w, d, max_seq_len=60, block_n=16, **kw)
    assert rel_err(out, ref) < BF16_BOUND


@needs_triton
@cpu_only
@pytest.mark.parametrize("q_lora", [0, 48])
def test_mla_decode_step_cpu(q_lora):
    """One decode step end to end: project the new tokens into the cache at position seq_lens, then decode."""
    d = small_dims(H=4, q_lora=q_lora)
    w = weights(d, seed=9)
    lens = [4, 31, 16]
    cache = mla.make_mla_cache(lens, d, page_size=16, spare_tokens=1, seed=2)
    h = torch.randn(3, d.hidden, generator=torch.Generator().manual_seed(1)).bfloat16()
    cs = mla.make_cos_sin_cache(64, d.qk_rope_head_dim)
    positions = cache.seq_lens.long()
    q_nope, q_pe = mla.mla_project(h, w, d, cos_sin_cache=cs, positions=positions, kv_cache=cache.kv_cache,
                                   slot_mapping=cache.slots(positions))
    cache.seq_lens += 1
    ref = mla.mla_decode_reference(q_nope, q_pe, w, d, kv_cache=cache.kv_cache, block_table=cache.block_table,
                                   seq_lens=cache.seq_lens)
    out = mla.mla_decode(q_nope, q_pe, w, d, kv_cache=cache.kv_cache, block_table=cache.block_table,
                         seq_lens=cache.seq_lens, max_seq_len=cache.max_seq_len, block_n=16, num_splits=2)
    assert rel_err(out, ref) < BF16_BOUND


# ------------------------------------------------------------------------------------------------ prefill

@pytest.mark.parametrize("T,C,H", [(7, 0, 4), (5, 23, 4), (16, 40, 20), (1, 9, 4)])
def test_mla_prefill_cpu(T, C, H):
    d = small_dims(H=H)
    w = weights(d, seed=T)
    gen = torch.Generator().manual_seed(T + C)
    latent = torch.randn(C + T, d.cache_row_elements, generator=gen).bfloat16()
    q = torch.randn(T, H, d.qk_head_dim, generator=gen).bfloat16()
    q_nope, q_pe = q[..., :32], q[..., 32:]
    ref = mla.mla_prefill_reference(q_nope, q_pe, w, d, latent=latent)
    out = torch.full((T, H, d.v_head_dim), float("nan"), dtype=torch.bfloat16)
    assert mla.mla_prefill(q_nope, q_pe, w, d, latent=latent, out=out) is out
    assert rel_err(out, ref) < BF16_BOUND
    assert mla._joined(q_nope, q_pe).data_ptr() == q.data_ptr()  # adjacent views: no concatenation
    # separate tensors (concatenated), and the first query sees only C + 1 keys
    apart = mla.mla_prefill(q_nope.clone(), q_pe.clone(), w, d, latent=latent)
    assert rel_err(apart, ref) < BF16_BOUND
    first = mla.mla_prefill_reference(q_nope[:1], q_pe[:1], w, d, latent=latent[: C + 1])
    assert rel_err(out[:1], first) < BF16_BOUND


@needs_triton
@cpu_only
def test_mla_prefill_after_project_cpu():
    """A chunk projected with latent_out into the rows after C cached ones, then prefilled."""
    d = small_dims(H=4, q_lora=48)
    w = weights(d, seed=12)
    T, C = 6, 10
    gen = torch.Generator().manual_seed(12)
    latent = torch.empty(C + T, d.cache_row_elements, dtype=torch.bfloat16)
    latent[:C] = torch.randn(C, d.cache_row_elements, generator=gen).bfloat16()
    h = torch.randn(T, d.hidden, generator=gen).bfloat16()
    kv_cache = torch.zeros(2, 16, d.cache_row_elements, dtype=torch.bfloat16)
    positions = torch.arange(C, C + T)
    q_nope, q_pe = mla.mla_project(h, w, d, cos_sin_cache=mla.make_cos_sin_cache(32, 16), positions=positions,
                                   kv_cache=kv_cache, slot_mapping=positions, latent_out=latent[C:])
    assert torch.equal(kv_cache.view(-1, d.cache_row_elements)[C:C + T], latent[C:])
    ref = mla.mla_prefill_reference(q_nope, q_pe, w, d, latent=latent)
    assert rel_err(mla.mla_prefill(q_nope, q_pe, w, d, latent=latent), ref) < BF16_BOUND


# ------------------------------------------------------------------------------------------------ GPU

GPU_DIMS = {
    "v2-lite": mla.MlaDims(hidden=2048, num_heads=16, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                           v_head_dim=128),
    "coder-v2-tp4": mla.MlaDims(hidden=5120, num_heads=32, kv_lora_rank=512, qk_nope_head_dim=128,
                                qk_rope_head_dim=64, v_head_dim=128, q_lora_rank=1536),
}


@gpu
@needs_cuda
@pytest.mark.parametrize("name", list(GPU_DIMS))
def test_mla_gpu(name):
    """Model-sized decode step (project + decode) and prefill vs the references, then the decode step
    captured in a CUDA graph and replayed on new inputs."""
    d = GPU_DIMS[name]
    dev = "cuda"
    w = mla.build_mla_weights(d, device=dev, generator=torch.Generator(device=dev).manual_seed(0), std=0.05)
    lens = [1, 500, 4097, 64, 1000]
    B = len(lens)
    cache = mla.make_mla_cache(lens, d, page_size=64, spare_tokens=1, device=dev, seed=1)
    cs = mla.make_cos_sin_cache(8192, d.qk_rope_head_dim, device=dev)
    gen = torch.Generator(device=dev).manual_seed(2)
    h = torch.randn(B, d.hidden, device=dev, generator=gen).bfloat16()
    positions = cache.seq_lens.long()
    slots = cache.slots(positions)
    seq_after = cache.seq_lens + 1
    max_len = cache.max_seq_len
    out = torch.full((B, d.num_heads, d.v_head_dim), float("nan"), device=dev, dtype=torch.bfloat16)

    def step():
        q_nope, q_pe = mla.mla_project(h, w, d, cos_sin_cache=cs, positions=positions, kv_cache=cache.kv_cache,
                                       slot_mapping=slots)
        mla.mla_decode(q_nope, q_pe, w, d, kv_cache=cache.kv_cache, block_table=cache.block_table,
                       seq_lens=seq_after, max_seq_len=max_len, out=out)
        return q_nope, q_pe

    def check(q_nope, q_pe):
        ref = mla.mla_decode_reference(q_nope, q_pe, w, d, kv_cache=cache.kv_cache, block_table=cache.block_table,
                                       seq_lens=seq_after)
        rq_nope, rq_pe, rrow = mla.mla_project_reference(h, w, d, cos_sin_cache=cs, positions=positions)
        assert rel_err(q_nope, rq_nope) < BF16_BOUND and rel_err(q_pe, rq_pe) < BF16_BOUND
        assert rel_err(cache.kv_cache.view(-1, d.cache_row_elements)[slots], rrow) < BF16_BOUND
        assert rel_err(out, ref) < BF16_BOUND

    q_nope, q_pe = step()
    torch.cuda.synchronize()
    check(q_nope, q_pe)
    for splits in (1, 7):
        out.fill_(float("nan"))
        mla.mla_decode(q_nope, q_pe, w, d, kv_cache=cache.kv_cache, block_table=cache.block_table,
                       seq_lens=seq_after, max_seq_len=max_len, out=out, num_splits=splits)
        assert rel_err(out, mla.mla_decode_reference(q_nope, q_pe, w, d, kv_cache=cache.kv_cache,
                                                     block_table=cache.block_table, seq_lens=seq_after)) < BF16_BOUND

    # CUDA graph: warm up on a side stream, capture, then replay on new hidden states
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gq_nope, gq_pe = step()
    h.copy_(torch.randn(B, d.hidden, device=dev, generator=gen).bfloat16())
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    check(gq_nope, gq_pe)

    # prefill: a chunk of 300 after 1000 cached rows, eager and captured
    T, C = 300, 1000
    latent = torch.randn(C + T, d.cache_row_elements, device=dev, generator=gen).bfloat16()
    q = torch.randn(T, d.num_heads, d.qk_head_dim, device=dev, generator=gen).bfloat16()
    qn, qp = q[..., :d.qk_nope_head_dim], q[..., d.qk_nope_head_dim:]
    pout = torch.full((T, d.num_heads, d.v_head_dim), float("nan"), device=dev, dtype=torch.bfloat16)
    ref = mla.mla_prefill_reference(qn, qp, w, d, latent=latent, dtype=torch.float32)
    mla.mla_prefill(qn, qp, w, d, latent=latent, out=pout)
    assert rel_err(pout, ref) < BF16_BOUND
    pgraph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s):
        mla.mla_prefill(qn, qp, w, d, latent=latent, out=pout)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(pgraph):
        mla.mla_prefill(qn, qp, w, d, latent=latent, out=pout)
    pout.fill_(float("nan"))
    pgraph.replay()
    torch.cuda.synchronize()
    assert rel_err(pout, ref) < BF16_BOUND
