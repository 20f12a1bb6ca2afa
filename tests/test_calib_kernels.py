"""Correctness of the real layer kernels in ``lynxsim.calib.kernels`` against float64 references.

CPU tests use small shapes; the Triton kernels run on the CPU through Triton's interpreter
(``TRITON_INTERPRET=1``, set here when no GPU is present; needs a triton whose interpreter works with the
installed numpy: 3.9 does, 3.6 fails with numpy >= 2.4 at ``range()`` over a runtime bound). Tests marked
``gpu`` run the same checks on CUDA at model-sized shapes and are skipped without a GPU. The whole file is
skipped when torch is absent (the simulator installs without it). Error bounds are relative Frobenius norms;
bf16 operands with float32 accumulation land between 1e-3 and 1e-2.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from kernel_checks import (  # noqa: E402  (switches the interpreter on before the kernels are imported)
    BF16_BOUND,
    HAS_CUDA,
    gpu,
    needs_cuda,
    needs_triton,
    rel_err,
)
from lynxsim.calib.kernels import attention as att  # noqa: E402
from lynxsim.calib.kernels import dense, moe  # noqa: E402
from lynxsim.calib.kernels.weights import (  # noqa: E402
    LayerShape,
    build_model_weights,
    copies_to_defeat_l2,
)


def random_routing(T: int, E: int, k: int, gen: torch.Generator, renormalize: bool = True):
    logits = torch.randn(T, E, generator=gen)
    w, ids = torch.topk(torch.softmax(logits, -1), k)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    return w, ids.to(torch.int32)


def moe_inputs(T, H, F, E, k, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen).bfloat16()
    w13 = (torch.randn(E, 2 * F, H, generator=gen) * 0.05).bfloat16()
    w2 = (torch.randn(E, H, F, generator=gen) * 0.05).bfloat16()
    w, ids = random_routing(T, E, k, gen)
    return [t.to(device) for t in (x, w13, w2, w, ids)]


# ------------------------------------------------------------------------------------------------ dense ops

def test_rms_norm_matches_float64():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 64, generator=gen)
    w = torch.rand(64, generator=gen) + 0.5
    ref = x.double() / torch.sqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
    assert rel_err(dense.rms_norm(x, w), ref) < 1e-6
    assert rel_err(dense.rms_norm(x.bfloat16(), w.bfloat16()), ref) < BF16_BOUND


def test_qkv_proj_splits_heads():
    gen = torch.Generator().manual_seed(1)
    T, H, Hq, Hkv, D = 5, 32, 4, 2, 8
    x = torch.randn(T, H, generator=gen)
    w = torch.randn(Hq * D + 2 * Hkv * D + 3, H, generator=gen)  # 3 extra columns: ignored
    b = torch.randn(w.shape[0], generator=gen)
    q, k, v = dense.qkv_proj(x, w, b, Hq, Hkv, D)
    full = x.double() @ w.double().T + b.double()
    assert q.shape == (T, Hq, D) and k.shape == (T, Hkv, D) and v.shape == (T, Hkv, D)
    assert rel_err(q.reshape(T, -1), full[:, : Hq * D]) < 1e-6
    assert rel_err(v.reshape(T, -1), full[:, Hq * D + Hkv * D: Hq * D + 2 * Hkv * D]) < 1e-6
    o = dense.o_proj(q, torch.randn(H, Hq * D, generator=gen))
    assert o.shape == (T, H)


@pytest.mark.parametrize("renormalize", [True, False])
def test_router_topk(renormalize):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(9, 32, generator=gen)
    wr = torch.randn(8, 32, generator=gen)
    w, ids, logits = dense.router_topk(x, wr, 2, renormalize)
    probs = torch.softmax(x.double() @ wr.double().T, -1)
    ref_w, ref_ids = torch.topk(probs, 2)
    if renormalize:
        ref_w = ref_w / ref_w.sum(-1, keepdim=True)
        assert torch.allclose(w.sum(-1), torch.ones(9), atol=1e-5)
    assert ids.dtype == torch.int32 and torch.equal(ids.long(), ref_ids)
    assert rel_err(w, ref_w) < 1e-5
    assert logits.shape == (9, 8)


def test_swiglu_ffn_and_lm_head():
    gen = torch.Generator().manual_seed(3)
    T, H, Fd, V = 6, 32, 48, 100
    x = torch.randn(T, H, generator=gen)
    w13 = torch.randn(2 * Fd, H, generator=gen) * 0.1
    w2 = torch.randn(H, Fd, generator=gen) * 0.1
    h = x.double() @ w13.double().T
    ref = (torch.nn.functional.silu(h[:, :Fd]) * h[:, Fd:]) @ w2.double().T
    assert rel_err(dense.swiglu_ffn(x, w13, w2), ref) < 1e-5
    assert rel_err(dense.swiglu_ffn(x.bfloat16(), w13.bfloat16(), w2.bfloat16()), ref) < BF16_BOUND
    wl = torch.randn(V, H, generator=gen)
    assert rel_err(dense.lm_head(x, wl), x.double() @ wl.double().T) < 1e-5


# ------------------------------------------------------------------------------------------------ weights

def test_layer_shape_from_spec_and_builder():
    models = pytest.importorskip("lynxsim.models")
    mix = LayerShape.from_spec(models.load_catalog_model("mixtral-8x7b"))
    assert (mix.hidden, mix.num_experts, mix.top_k, mix.expert_ffn) == (4096, 8, 2, 14336)
    assert mix.expert_bytes == 3 * 4096 * 14336 * 2
    assert mix.kv_bytes_per_token() == 2 * 8 * 128 * 2
    ds = models.load_catalog_model("deepseek-v2-lite")
    dsl = LayerShape.from_spec(ds)
    assert dsl.is_mla_approx and dsl.num_kv_heads == 1
    # MLA approximation keeps the latent cache's bytes per token (576 elements, bf16)
    assert dsl.kv_bytes_per_token("reference") == dsl.kv_bytes_per_token("production") == 2 * (512 + 64)
    assert dsl.mla is not None and (dsl.mla.num_heads, dsl.mla.kv_lora_rank) == (16, 512)
    assert dsl.qkv_size * dsl.hidden >= ds.attention_params - ds.attention.num_heads * 128 * ds.hidden_size
    tiny = LayerShape(hidden=32, num_heads=4, num_kv_heads=2, head_dim=8, v_head_dim=8, num_experts=4, top_k=2,
                      expert_ffn=16, num_shared_experts=2, shared_ffn=8, dense_ffn=24, vocab=50)
    mw = build_model_weights(tiny, num_copies=3, dtype=torch.float32)
    assert mw.num_copies == 3 and mw.layer(4) is mw.layers[1]
    lw = mw.layer(0)
    assert lw.w13.shape == (4, 32, 32) and lw.w2.shape == (4, 32, 16)
    assert lw.shared_w13.shape == (32, 32) and lw.shared_w2.shape == (32, 16)
    assert lw.w_qkv.shape == (4 * 8 + 2 * 2 * 8, 32) and mw.lm_head.shape == (50, 32)
    assert not torch.equal(mw.layers[0].w13, mw.layers[1].w13)
    assert 0.015 < mw.layers[0].w13.std().item() < 0.025
    dense_l = build_model_weights(tiny, moe=False, lm_head=False).layer(0)
    assert dense_l.dense_w13.shape == (48, 32) and dense_l.w13 is None
    assert copies_to_defeat_l2(2 * 352e6) == 1 and copies_to_defeat_l2(75e6) == 4


# ------------------------------------------------------------------------------------------------ MoE

def test_moe_reference_matches_dense_loop():
    x, w13, w2, w, ids = moe_inputs(5, 16, 8, 4, 2, seed=4)
    ref = moe.moe_reference(x, w13, w2, w, ids, dtype=torch.float64)
    manual = torch.zeros(5, 16, dtype=torch.float64)
    for t in range(5):
        for j in range(2):
            e = int(ids[t, j])
            h = w13[e].double() @ x[t].double()
            manual[t] += w[t, j].double() * (w2[e].double() @ (torch.nn.functional.silu(h[:8]) * h[8:]))
    assert rel_err(ref, manual) < 1e-12


def test_moe_grouped_gemm_cpu():
    if not moe.has_grouped_mm():
        pytest.skip("torch._grouped_mm missing")
    x, w13, w2, w, ids = moe_inputs(12, 64, 32, 6, 2, seed=5)
    ref = moe.moe_reference(x, w13, w2, w, ids, dtype=torch.float64)
    out = torch.full((12, 64), float("nan"), dtype=torch.bfloat16)
    moe.moe_grouped_gemm(x, w13, w2, w, ids, out=out)
    assert rel_err(out, ref) < BF16_BOUND


@needs_triton
@pytest.mark.parametrize(
    "T,H,F,E,k,cfg",
    [
        (3, 64, 96, 4, 2, None),  # default config; some experts idle
        (20, 64, 64, 8, 2, moe.MoeConfig(block_m=16, block_n1=32, block_k1=32, block_n2=32, block_k2=32, split_k=2)),
        (5, 48, 40, 6, 3, moe.MoeConfig(block_m=16, block_n1=16, block_k1=32, block_n2=16, block_k2=16, split_k=3)),
        (40, 64, 64, 4, 2, moe.MoeConfig(block_m=32, block_n1=32, block_k1=32, block_n2=32, block_k2=32)),
        # split-K that does not divide the K tiles (6 tiles, 4 asked -> 3 splits of 2), and a masked last tile
        (6, 32, 96, 4, 2, moe.MoeConfig(block_m=16, block_n1=16, block_k1=16, block_n2=16, block_k2=16, split_k=4)),
        (6, 32, 40, 4, 2, moe.MoeConfig(block_m=16, block_n1=16, block_k1=16, block_n2=16, block_k2=16, split_k=2)),
    ],
)
def test_moe_fused_cpu_interpreter(T, H, F, E, k, cfg):
    """Tails in K (48 % 32, 40 % 16), N (40 % 16 is 8), several blocks per expert, split-K 1..4."""
    if HAS_CUDA:
        pytest.skip("interpreter test; the gpu tests cover CUDA")
    x, w13, w2, w, ids = moe_inputs(T, H, F, E, k, seed=T)
    ref = moe.moe_reference(x, w13, w2, w, ids, dtype=torch.float64)
    out = torch.full((T, H), float("nan"), dtype=torch.bfloat16)
    moe.moe_fused(x, w13, w2, w, ids, config=cfg, out=out)
    assert rel_err(out, ref) < BF16_BOUND


@needs_triton
def test_moe_fused_two_kernel_alignment(monkeypatch):
    """The count + place path taken above SINGLE_PROGRAM_MAX_PAIRS pairs, forced at a tiny size."""
    if HAS_CUDA:
        pytest.skip("interpreter test")
    monkeypatch.setattr(moe, "SINGLE_PROGRAM_MAX_PAIRS", 4)
    x, w13, w2, w, ids = moe_inputs(9, 32, 32, 5, 2, seed=9)
    ref = moe.moe_reference(x, w13, w2, w, ids, dtype=torch.float64)
    assert rel_err(moe.moe_fused(x, w13, w2, w, ids), ref) < BF16_BOUND


def test_default_moe_config_regimes():
    small = moe.default_moe_config(2, 8, 4096, 14336)
    assert small.block_m == 16 and small.split_k > 1
    big = moe.default_moe_config(512, 8, 4096, 14336)
    assert big.block_m == 64


# ------------------------------------------------------------------------------------------------ attention

@pytest.mark.parametrize("impl", ["sdpa", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize(
    "lens,Hq,Hkv,D,page,splits",
    [([5, 37, 130], 8, 2, 64, 16, None), ([1, 70], 4, 4, 32, 8, 3), ([33], 16, 1, 40, 16, 2)],
)
def test_attention_decode_cpu(impl, lens, Hq, Hkv, D, page, splits):
    """GQA groups 4/1/16, a head dim that is not a power of two (40), splits that end past a sequence."""
    if impl == "triton" and HAS_CUDA:
        pytest.skip("interpreter test")
    cache = att.make_paged_kv_cache(lens, Hkv, D, page_size=page, seed=len(lens))
    q = torch.randn(len(lens), Hq, D, generator=torch.Generator().manual_seed(7)).bfloat16()
    ref = att.attention_decode_reference(q, cache)
    kw = dict(num_splits=splits, block_n=16) if impl == "triton" else {}
    assert rel_err(att.attention_decode(q, cache, impl=impl, **kw), ref) < BF16_BOUND


def test_append_kv_then_decode():
    cache = att.make_paged_kv_cache([3, 17], 2, 16, page_size=4, spare_tokens=2, seed=1)
    gen = torch.Generator().manual_seed(8)
    k_new, v_new = torch.randn(2, 2, 16, generator=gen), torch.randn(2, 2, 16, generator=gen)
    att.append_kv(cache, k_new, v_new)
    assert cache.seq_lens.tolist() == [4, 18]
    page = int(cache.block_table[1, 17 // 4])
    assert torch.equal(cache.k_cache[page, 17 % 4], k_new[1].bfloat16())
    q = torch.randn(2, 4, 16, generator=gen).bfloat16()
    assert rel_err(att.attention_decode(q, cache, impl="sdpa"), att.attention_decode_reference(q, cache)) < BF16_BOUND


@pytest.mark.parametrize("T,C,Hq,Hkv,D", [(7, 0, 8, 2, 64), (5, 11, 4, 4, 32), (16, 40, 8, 1, 64)])
def test_attention_prefill_cpu(T, C, Hq, Hkv, D):
    gen = torch.Generator().manual_seed(T + C)
    q = torch.randn(T, Hq, D, generator=gen).bfloat16()
    k = torch.randn(C + T, Hkv, D, generator=gen).bfloat16()
    v = torch.randn(C + T, Hkv, D, generator=gen).bfloat16()
    ref = att.attention_prefill_reference(q, k, v)
    assert rel_err(att.attention_prefill(q, k, v), ref) < BF16_BOUND
    # the last query sees everything, the first one C + 1 keys
    first = att.attention_prefill_reference(q[:1], k[: C + 1], v[: C + 1])
    assert rel_err(att.attention_prefill(q, k, v)[:1], first) < BF16_BOUND


# ------------------------------------------------------------------------------------------------ GPU

@gpu
@needs_cuda
@pytest.mark.parametrize("T,A", [(1, 2), (16, 8), (64, 4), (256, 8)])
def test_moe_gpu_mixtral_shape(T, A):
    """Both implementations at Mixtral-8x7B's expert shape on fresh inputs, output poisoned first."""
    H, F, E, k = 4096, 14336, 8, 2
    gen = torch.Generator().manual_seed(T * 10 + A)
    dev = torch.device("cuda")
    x = torch.randn(T, H, generator=gen).to(dev, torch.bfloat16)
    w13 = (torch.randn(E, 2 * F, H, device=dev) * 0.02).bfloat16()
    w2 = (torch.randn(E, H, F, device=dev) * 0.02).bfloat16()
    subset = torch.randperm(E, generator=gen)[:A]
    ids = subset[(torch.arange(T)[:, None] * k + torch.arange(k)[None, :]) % A].to(dev, torch.int32)
    w = torch.softmax(torch.randn(T, k, generator=gen), -1).to(dev)
    ref = moe.moe_reference(x, w13, w2, w, ids)
    for fn in (moe.moe_fused, moe.moe_grouped_gemm):
        out = torch.full((T, H), float("nan"), device=dev, dtype=torch.bfloat16)
        fn(x, w13, w2, w, ids, out=out)
        assert rel_err(out, ref) < BF16_BOUND, fn.__name__


@gpu
@needs_cuda
@pytest.mark.parametrize("T,E,k", [(7, 128, 8), (300, 64, 8), (700, 128, 8)])
def test_moe_fused_gpu_many_experts(T, E, k):
    """128/64-expert shapes; 700 x 8 pairs takes the two-kernel alignment path."""
    x, w13, w2, w, ids = moe_inputs(T, 256, 128, E, k, seed=T, device="cuda")
    ref = moe.moe_reference(x, w13, w2, w, ids)
    assert rel_err(moe.moe_fused(x, w13, w2, w, ids), ref) < BF16_BOUND


@gpu
@needs_cuda
@pytest.mark.parametrize("lens,Hq,Hkv,D", [([1, 500, 4097], 32, 8, 128), ([64] * 40, 16, 16, 128), ([900], 16, 1, 288)])
def test_attention_gpu(lens, Hq, Hkv, D):
    cache = att.make_paged_kv_cache(lens, Hkv, D, device="cuda", seed=3)
    q = torch.randn(len(lens), Hq, D, device="cuda").bfloat16()
    ref = att.attention_decode_reference(q, cache, dtype=torch.float32)
    out = torch.full_like(q[..., :D], float("nan"))
    att.attention_decode(q, cache, out=out)
    assert rel_err(out, ref) < BF16_BOUND
    assert rel_err(att.attention_decode(q, cache, impl="sdpa"), ref) < BF16_BOUND
    T, C = 300, 1000
    qp = torch.randn(T, Hq, D, device="cuda").bfloat16()
    kp = torch.randn(C + T, Hkv, D, device="cuda").bfloat16()
    vp = torch.randn(C + T, Hkv, D, device="cuda").bfloat16()
    reference = att.attention_prefill_reference(qp, kp, vp, dtype=torch.float32)
    assert rel_err(att.attention_prefill(qp, kp, vp), reference) < BF16_BOUND
