"""The fused non-GEMM ops of ``lynxsim.calib.kernels.fused`` against their float64 references.

As in ``test_calib_kernels.py``: without a GPU the Triton kernels run under Triton's interpreter
(``TRITON_INTERPRET=1``, set here), on small shapes; tests marked ``gpu`` run at model sizes on CUDA, capture
each op in a CUDA graph and count its kernel launches. Outputs are poisoned (NaN, or a sentinel for caches
and ids) before each run, so an element the kernel fails to write shows. Error bounds are relative
Frobenius norms; bf16 outputs of float32 math land near 3e-3.

The interpreter (triton 3.9) truncates float32 -> bf16 casts where the GPU rounds to nearest even, so on the
CPU a bf16 output can sit one bf16 ulp from the GPU's: exactness checks allow that there and are exact on
CUDA.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from kernel_checks import (  # noqa: E402  (switches the interpreter on before the kernels are imported)
    BF16_BOUND,
    HAS_CUDA,
    HAS_TRITON,
    cpu_only,
    gpu,
    needs_cuda,
    rel_err,
)
from lynxsim.calib.kernels import fused  # noqa: E402

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")

DEV = "cuda" if HAS_CUDA else "cpu"


def assert_bf16_equal(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Bit-equal on CUDA; within one bf16 ulp under the interpreter (it truncates instead of rounding)."""
    if out.is_cuda:
        assert torch.equal(out, ref)
    else:
        diff = (out.double() - ref.double()).abs()
        assert (diff <= ref.double().abs() * 2.0 ** -7 + 1e-30).all()


def randn(*shape: int, gen: torch.Generator, dtype: torch.dtype = torch.bfloat16, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * scale).to(DEV, dtype)


def nan_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))


# ------------------------------------------------------------------------------------------------ RMSNorm

@pytest.mark.parametrize("N,wdtype", [(192, torch.bfloat16), (200, torch.float32), (1536 // 4, torch.bfloat16)])
def test_rms_norm(N, wdtype):
    """MLA's q_a latent width scaled down, a width that is not a power of two, rows with a stride (a slice)."""
    gen = torch.Generator().manual_seed(N)
    wide = randn(5, N + 40, gen=gen, scale=3.0)
    x = wide[:, 8:8 + N]
    w = (torch.rand(N, generator=gen) + 0.5).to(DEV, wdtype)
    out = nan_like(x.contiguous())
    assert fused.rms_norm(x, w, 1e-6, out=out) is out
    assert rel_err(out, fused.rms_norm_reference(x, w, 1e-6)) < BF16_BOUND
    assert rel_err(fused.rms_norm(x, w), fused.rms_norm_reference(x, w)) < BF16_BOUND


def test_add_rms_norm_with_residual():
    gen = torch.Generator().manual_seed(1)
    T, H = 4, 320
    x, r = randn(T, H, gen=gen), randn(T, H, gen=gen, scale=4.0)
    w = (torch.rand(H, generator=gen) + 0.5).to(DEV, torch.bfloat16)
    out, r_out = nan_like(x), nan_like(x)
    got, got_r = fused.add_rms_norm(x, r, w, out=out, residual_out=r_out)
    assert got is out and got_r is r_out
    ref, ref_r = fused.add_rms_norm_reference(x, r, w)
    assert_bf16_equal(r_out, (x.float() + r.float()).bfloat16())
    assert_bf16_equal(r_out, ref_r)
    assert rel_err(out, ref) < BF16_BOUND
    # vLLM's in-place form: normed over x, the new residual over the old one
    x2, r2 = x.clone(), r.clone()
    fused.add_rms_norm(x2, r2, w, out=x2, residual_out=r2)
    assert torch.equal(r2, r_out) and torch.equal(x2, out)


def test_add_rms_norm_without_residual():
    gen = torch.Generator().manual_seed(2)
    x = randn(3, 256, gen=gen)
    w = (torch.rand(256, generator=gen) + 0.5).to(DEV)
    x_before = x.clone()
    out = nan_like(x)
    normed, r_out = fused.add_rms_norm(x, None, w, out=out)
    assert r_out is x and torch.equal(x, x_before)  # the residual is x itself, untouched
    assert rel_err(normed, fused.rms_norm_reference(x, w)) < BF16_BOUND
    with pytest.raises(ValueError):
        fused.add_rms_norm(x, None, w, residual_out=torch.empty_like(x))


def test_rms_norm_two_pass(monkeypatch):
    """Rows longer than RMS_MAX_BLOCK (forced small) take the chunked two-pass path, tail chunk masked."""
    monkeypatch.setattr(fused, "RMS_MAX_BLOCK", 64)
    gen = torch.Generator().manual_seed(3)
    T, H = 3, 200
    x, r = randn(T, H, gen=gen), randn(T, H, gen=gen)
    w = (torch.rand(H, generator=gen) + 0.5).to(DEV)
    out, r_out = nan_like(x), nan_like(x)
    fused.add_rms_norm(x, r, w, out=out, residual_out=r_out)
    ref, ref_r = fused.add_rms_norm_reference(x, r, w)
    assert_bf16_equal(r_out, ref_r)
    assert rel_err(out, ref) < BF16_BOUND
    assert rel_err(fused.rms_norm(x, w), fused.rms_norm_reference(x, w)) < BF16_BOUND
    x2, r2 = x.clone(), r.clone()  # in place through both passes
    fused.add_rms_norm(x2, r2, w, out=x2, residual_out=r2)
    assert torch.equal(r2, r_out) and torch.equal(x2, out)


# ------------------------------------------------------------------------------------------------ SiLU-and-mul

@pytest.mark.parametrize("T,F", [(3, 96), (2, 50), (1, 1100)])
def test_silu_and_mul(T, F):
    """Widths that are and are not a multiple of the block, input rows with a stride."""
    gen = torch.Generator().manual_seed(F)
    h = randn(T, 2 * F + 6, gen=gen, scale=2.0)[:, : 2 * F]
    out = torch.full((T, F), float("nan"), device=DEV, dtype=torch.bfloat16)
    assert fused.silu_and_mul(h, out=out) is out
    assert rel_err(out, fused.silu_and_mul_reference(h)) < BF16_BOUND


# ------------------------------------------------------------------------------------------------ rotary + cache

def test_rope_cos_sin_cache():
    cs = fused.rope_cos_sin_cache(8, 50, 10000.0)
    assert cs.shape == (50, 8) and cs.dtype == torch.float32
    assert torch.equal(cs[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    p, i = 37, 3
    ang = p * 10000.0 ** (-2 * i / 8)
    assert abs(cs[p, i].item() - torch.cos(torch.tensor(ang, dtype=torch.float64)).item()) < 1e-6
    assert abs(cs[p, 4 + i].item() - torch.sin(torch.tensor(ang, dtype=torch.float64)).item()) < 1e-6


def qk_case(T, Hq, Hkv, D, Dv, page, num_pages, seed, extra=5):
    """QKV rows (a strided slice, NaN in the columns past V), positions, slots (one of them -1), norms,
    cos/sin cache and caches filled with a sentinel."""
    gen = torch.Generator().manual_seed(seed)
    W = Hq * D + Hkv * D + Hkv * Dv
    buf = randn(T, W + extra + 3, gen=gen)
    buf[:, W:] = float("nan")  # the kernel must never read past V
    qkv = buf[:, : W + extra]
    max_pos = 64
    positions = torch.randint(0, max_pos, (T,), generator=gen).to(DEV)
    positions[0] = 0
    slots = torch.randperm(num_pages * page, generator=gen)[:T]
    if T > 1:
        slots[1] = -1  # a padding token
    norms = ((torch.rand(D, generator=gen) + 0.5).to(DEV, torch.bfloat16),
             (torch.rand(D, generator=gen) + 0.5).to(DEV, torch.bfloat16))
    sentinel = 123.0
    kc = torch.full((num_pages, page, Hkv, D), sentinel, device=DEV, dtype=torch.bfloat16)
    vc = torch.full((num_pages, page, Hkv, Dv), sentinel, device=DEV, dtype=torch.bfloat16)
    cs = fused.rope_cos_sin_cache(D, max_pos, 10000.0, DEV)
    return qkv, positions, slots.to(DEV), norms, kc, vc, cs, sentinel


def check_qk(T, Hq, Hkv, D, Dv, page, num_pages, with_norm, hpp, seed):
    qkv, pos, slots, (qn, kn), kc, vc, cs, sentinel = qk_case(T, Hq, Hkv, D, Dv, page, num_pages, seed)
    if not with_norm:
        qn = kn = None
    kc0, vc0 = kc.clone(), vc.clone()
    q_out = torch.full((T, Hq, D), float("nan"), device=DEV, dtype=torch.bfloat16)
    args = dict(num_heads=Hq, num_kv_heads=Hkv, head_dim=D, v_head_dim=Dv, q_norm=qn, k_norm=kn,
                cos_sin_cache=cs, positions=pos)
    got = fused.qk_norm_rope_cache(qkv, **args, k_cache=kc, v_cache=vc, slot_mapping=slots, q_out=q_out,
                                   heads_per_program=hpp)
    assert got is q_out
    rq, rk, rv = fused.qk_norm_rope_reference(qkv, **args)
    assert rel_err(q_out, rq) < BF16_BOUND
    # exactly the named slots changed; slot -1 wrote nothing
    written = (kc != sentinel).flatten(2).any(-1) | (vc != sentinel).flatten(2).any(-1)  # [pages, page]
    expect = torch.zeros_like(written)
    for s in slots.tolist():
        if s >= 0:
            expect[s // page, s % page] = True
    assert torch.equal(written, expect)
    ekc, evc = fused.scatter_kv_reference(rk, rv, kc0, vc0, slots)
    assert torch.equal(kc[~expect], kc0[~expect]) and torch.equal(vc[~expect], vc0[~expect])
    assert torch.equal(vc, evc)  # V is a copy
    live = slots >= 0
    s = slots[live].long()
    assert rel_err(kc[s // page, s % page], rk[live]) < BF16_BOUND
    if not with_norm:  # position 0 is the identity rotation
        assert_bf16_equal(q_out[0], qkv[0, : Hq * D].reshape(Hq, D))


@pytest.mark.parametrize(
    "Hq,Hkv,D,Dv,with_norm,hpp",
    [
        (8, 1, 64, 64, False, None),  # GQA 8, no norm (Mixtral / Llama style)
        (8, 1, 64, 64, True, None),
        (16, 2, 128, 128, True, None),  # GQA 8, q/k norm (Qwen3 style)
        (8, 8, 128, 128, False, (4, 2)),  # MHA (OLMoE's head count scaled down), several head blocks each
        (4, 1, 192, 128, True, (2, 1)),  # a head dim that is not a power of two, Dv != D (MLA-like)
    ],
)
def test_qk_norm_rope_cache(Hq, Hkv, D, Dv, with_norm, hpp):
    check_qk(T=6, Hq=Hq, Hkv=Hkv, D=D, Dv=Dv, page=4, num_pages=3, with_norm=with_norm, hpp=hpp, seed=Hq + D)


def test_qk_heads_per_program_heuristic():
    assert fused._qk_heads_per_program(4096, 32, 8, 64, 128) == (16, 8)  # big batch: ~2K-element tiles
    bq, bk = fused._qk_heads_per_program(1, 32, 8, 64, 128)
    assert (bq, bk) == (1, 1)  # one token: one head per program
    assert fused._qk_heads_per_program(64, 32, 8, 64, 128)[0] < 16


# ------------------------------------------------------------------------------------------------ router top-k

def logits_of(weights: list[float]) -> torch.Tensor:
    """Softmax logits whose probabilities are proportional to ``weights`` (one row)."""
    return torch.log(torch.tensor([weights], dtype=torch.float64)).float().to(DEV)


def sigmoid_logits(scores: list[float]) -> torch.Tensor:
    s = torch.tensor([scores], dtype=torch.float64)
    return torch.log(s / (1 - s)).float().to(DEV)


def run_topk(logits: torch.Tensor, k: int, **kw) -> tuple[list[int], torch.Tensor]:
    T = logits.shape[0]
    w = torch.full((T, k), float("nan"), device=DEV)
    ids = torch.full((T, k), -7, device=DEV, dtype=torch.int32)
    fused.topk_softmax(logits, k, out_weights=w, out_ids=ids, **kw)
    rw, rids = fused.topk_softmax_reference(logits, k, **kw)
    assert torch.equal(ids.long().cpu(), rids.cpu()), (ids, rids)  # kernel and reference agree
    assert rel_err(w, rw) < 1e-6
    return ids[0].tolist(), w[0].double().cpu()


@pytest.mark.parametrize("renormalize", [True, False])
def test_topk_softmax_hand_worked(renormalize):
    """Probabilities 1..8 / 36: the top 2 are experts 7 and 6 with 8/36 and 7/36 (8/15 and 7/15 renormalized)."""
    ids, w = run_topk(logits_of([1, 2, 3, 4, 5, 6, 7, 8]), 2, renormalize=renormalize)
    assert ids == [7, 6]
    ref = torch.tensor([8 / 15, 7 / 15] if renormalize else [8 / 36, 7 / 36], dtype=torch.float64)
    assert torch.allclose(w, ref, atol=1e-6)


def test_topk_ties_go_to_lower_id():
    lg = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 0.0, 0.0, 0.0]], device=DEV)
    assert run_topk(lg, 2, renormalize=True)[0] == [1, 2]
    ids, w = run_topk(lg, 3, renormalize=True)
    assert ids == [1, 2, 4] and torch.allclose(w, torch.full((3,), 1 / 3, dtype=torch.float64), atol=1e-6)
    lg = torch.zeros(1, 8, device=DEV)  # all equal
    assert run_topk(lg, 4, renormalize=False)[0] == [0, 1, 2, 3]


def test_topk_sigmoid_correction_bias():
    """Selection by biased score (expert 6: 0.3 + 0.65 beats expert 0's 0.9), weights the unbiased scores."""
    lg = sigmoid_logits([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    bias = torch.tensor([0, 0, 0, 0, 0, 0, 0.65, 0], device=DEV)
    ids, w = run_topk(lg, 2, renormalize=False, scoring="sigmoid", correction_bias=bias)
    assert ids == [6, 0] and torch.allclose(w, torch.tensor([0.3, 0.9], dtype=torch.float64), atol=1e-6)
    ids, w = run_topk(lg, 2, renormalize=True, scoring="sigmoid", correction_bias=bias)
    assert ids == [6, 0] and torch.allclose(w, torch.tensor([0.25, 0.75], dtype=torch.float64), atol=1e-6)
    assert run_topk(lg, 2, renormalize=True, scoring="sigmoid")[0] == [0, 1]  # no bias: plain order


def test_topk_grouped_softmax_max_rule():
    """DeepSeek-V2 style: 4 groups of 2 scored by their best expert (9, 8, 8.5, 1); groups 0 and 2 kept, so
    the third pick is expert 1 (tied with expert 5, lower id) where the global top 3 takes expert 2."""
    lg = logits_of([9, 1, 8, 7.5, 8.5, 1, 1, 1])
    assert run_topk(lg, 3, renormalize=False)[0] == [0, 4, 2]
    ids, w = run_topk(lg, 3, renormalize=False, num_groups=4, topk_groups=2)
    assert ids == [0, 4, 1]
    assert torch.allclose(w, torch.tensor([9, 8.5, 1], dtype=torch.float64) / 37, atol=1e-6)
    ids, w = run_topk(lg, 3, renormalize=True, num_groups=4, topk_groups=2)
    assert torch.allclose(w, torch.tensor([9, 8.5, 1], dtype=torch.float64) / 18.5, atol=1e-6)


def test_topk_grouped_sigmoid_top2_rule():
    """DeepSeek-V3 style: groups scored by the sum of their two best (1.0, 1.6, 1.4, 0.2) keep groups 1 and 2,
    so the lone best expert 0 is dropped; the max rule would keep groups 0 and 1 (ids [0, 2])."""
    lg = sigmoid_logits([0.95, 0.05, 0.8, 0.8, 0.7, 0.7, 0.1, 0.1])
    assert run_topk(lg, 2, renormalize=True, scoring="sigmoid")[0] == [0, 2]
    ids, w = run_topk(lg, 2, renormalize=False, scoring="sigmoid", num_groups=4, topk_groups=2)
    assert ids == [2, 3] and torch.allclose(w, torch.tensor([0.8, 0.8], dtype=torch.float64), atol=1e-6)
    bias = torch.zeros(8, device=DEV)
    bias[0] = bias[1] = 0.5  # group 0 now sums 1.45 + 0.55 = 2.0: groups 0 and 1 kept, expert 0 first
    ids, w = run_topk(lg, 2, renormalize=False, scoring="sigmoid", num_groups=4, topk_groups=2,
                      correction_bias=bias)
    assert ids == [0, 2] and torch.allclose(w, torch.tensor([0.95, 0.8], dtype=torch.float64), atol=1e-6)


@pytest.mark.parametrize(
    "E,k,kw",
    [
        (64, 6, dict(renormalize=False)),  # Qwen/OLMoE style
        (60, 4, dict(renormalize=True)),  # expert count not a power of two (padded lanes)
        (160, 6, dict(renormalize=False, num_groups=8, topk_groups=3)),  # DeepSeek-V2: 8 groups of 20
        (64, 8, dict(renormalize=True, scoring="sigmoid", num_groups=8, topk_groups=4, bias=True)),  # V3 scaled
        (32, 4, dict(renormalize=True, scoring="sigmoid", bias=True)),
    ],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_topk_softmax_random(E, k, kw, dtype):
    gen = torch.Generator().manual_seed(E + k)
    T = 7
    logits = randn(T, E, gen=gen, dtype=dtype, scale=2.0)
    kw = dict(kw)
    if kw.pop("bias", False):
        kw["correction_bias"] = (torch.rand(E, generator=gen) * 0.2).to(DEV)
    w = torch.full((T, k), float("nan"), device=DEV)
    ids = torch.full((T, k), -7, device=DEV, dtype=torch.int32)
    fused.topk_softmax(logits, k, out_weights=w, out_ids=ids, **kw)
    rw, rids = fused.topk_softmax_reference(logits, k, **kw)
    assert torch.equal(ids.long().cpu(), rids.cpu())
    assert rel_err(w, rw) < 1e-5
    assert (ids.sort(-1).values.diff(dim=-1) > 0).all()  # distinct within a row


def test_topk_rejects_bad_groups():
    lg = torch.zeros(2, 12, device=DEV)
    for kw in (dict(num_groups=5), dict(num_groups=4, topk_groups=5), dict(num_groups=4, topk_groups=1, top_k=4),
               dict(scoring="cosine")):
        k = kw.pop("top_k", 2)
        with pytest.raises(ValueError):
            fused.topk_softmax(lg, k, renormalize=True, **kw)


# ------------------------------------------------------------------------------------------------ launch count

@cpu_only
def test_one_launch_per_op(monkeypatch):
    """Each wrapper launches exactly one Triton kernel (counted at the kernel objects)."""
    from lynxsim.calib.kernels import _fused_triton as kern

    launches: list[str] = []

    class Counting:
        def __init__(self, name, fn):
            self.name, self.fn = name, fn

        def __getitem__(self, grid):
            launches.append(self.name)
            return self.fn[grid]

    for name in ("_rms_norm_kernel", "_qk_norm_rope_cache_kernel", "_topk_softmax_kernel", "_silu_and_mul_kernel"):
        monkeypatch.setattr(kern, name, Counting(name, getattr(kern, name)))
    gen = torch.Generator().manual_seed(9)
    x = randn(2, 64, gen=gen)
    w = torch.ones(64, device=DEV)
    qkv, pos, slots, (qn, kn), kc, vc, cs, _ = qk_case(2, 2, 1, 16, 16, 4, 2, seed=9)
    ops = {
        "add_rms_norm": lambda: fused.add_rms_norm(x, x, w),
        "add_rms_norm_first": lambda: fused.add_rms_norm(x, None, w),
        "rms_norm": lambda: fused.rms_norm(x, w),
        "qk_norm_rope_cache": lambda: fused.qk_norm_rope_cache(
            qkv, num_heads=2, num_kv_heads=1, head_dim=16, q_norm=qn, k_norm=kn, cos_sin_cache=cs, positions=pos,
            k_cache=kc, v_cache=vc, slot_mapping=slots),
        "topk_softmax": lambda: fused.topk_softmax(x, 2, renormalize=True, num_groups=4, topk_groups=2),
        "silu_and_mul": lambda: fused.silu_and_mul(x),
    }
    for name, op in ops.items():
        launches.clear()
        op()
        assert len(launches) == 1, (name, launches)


# ------------------------------------------------------------------------------------------------ GPU

def _graph_replays(fn, refresh, check):
    """Capture ``fn`` (static inputs/outputs) in a CUDA graph, then twice: ``refresh()`` new inputs in place,
    replay, ``check()`` the outputs against the reference of the new inputs."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(2):
        refresh()
        graph.replay()
        torch.cuda.synchronize()
        check()


def _cuda_kernels(fn) -> list[str]:
    """Names of the device activities (kernels, memcpys, memsets) that one call of ``fn`` starts."""
    import warnings

    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Profiler clears events at the end of each cycle"
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@gpu
@needs_cuda
def test_fused_ops_gpu_model_sizes():
    """T=64 tokens, H=4096, Hq=32, Hkv=8, D=128, E=128 top-8: each op against its reference, one device
    activity per call (profiler), and each captured in a CUDA graph and replayed on fresh inputs."""
    T, H, Hq, Hkv, D, E, k, Fd = 64, 4096, 32, 8, 128, 128, 8, 1536
    gen = torch.Generator().manual_seed(0)

    def fill(t: torch.Tensor, scale: float = 1.0) -> None:
        t.copy_(torch.randn(t.shape, generator=gen) * scale)

    # add_rms_norm / rms_norm
    x, r = randn(T, H, gen=gen), randn(T, H, gen=gen, scale=4.0)
    w = (torch.rand(H, generator=gen) + 0.5).to(DEV, torch.bfloat16)
    out, r_out = nan_like(x), nan_like(x)
    n_out = nan_like(x)

    def check_norm():
        ref, ref_r = fused.add_rms_norm_reference(x, r, w)
        assert torch.equal(r_out, ref_r)
        assert rel_err(out, ref) < BF16_BOUND
        assert rel_err(n_out, fused.rms_norm_reference(x, w)) < BF16_BOUND

    fused.add_rms_norm(x, r, w, out=out, residual_out=r_out)
    fused.rms_norm(x, w, out=n_out)
    check_norm()
    assert len(_cuda_kernels(lambda: fused.add_rms_norm(x, r, w, out=out, residual_out=r_out))) == 1
    assert len(_cuda_kernels(lambda: fused.rms_norm(x, w, out=n_out))) == 1
    _graph_replays(lambda: (fused.add_rms_norm(x, r, w, out=out, residual_out=r_out), fused.rms_norm(x, w, out=n_out)),
                   lambda: (fill(x), fill(r, 4.0), out.fill_(float("nan")), n_out.fill_(float("nan"))), check_norm)

    # qk_norm_rope_cache, with the q/k norms, 4 tokens of padding (slot -1)
    page, num_pages = 16, 64
    W = (Hq + 2 * Hkv) * D
    qkv = randn(T, W, gen=gen)
    pos = torch.randint(0, 4096, (T,), generator=gen).to(DEV)
    slots = torch.randperm(num_pages * page, generator=gen)[:T].to(DEV)
    slots[-4:] = -1
    qn, kn = [(torch.rand(D, generator=gen) + 0.5).to(DEV, torch.bfloat16) for _ in range(2)]
    cs = fused.rope_cos_sin_cache(D, 4096, 1e6, DEV)
    kc = torch.full((num_pages, page, Hkv, D), 123.0, device=DEV, dtype=torch.bfloat16)
    vc = torch.full_like(kc, 123.0)
    q_out = torch.full((T, Hq, D), float("nan"), device=DEV, dtype=torch.bfloat16)
    args = dict(num_heads=Hq, num_kv_heads=Hkv, head_dim=D, q_norm=qn, k_norm=kn, cos_sin_cache=cs, positions=pos)

    def qk():
        fused.qk_norm_rope_cache(qkv, **args, k_cache=kc, v_cache=vc, slot_mapping=slots, q_out=q_out)

    def check_qk():
        rq, rk, rv = fused.qk_norm_rope_reference(qkv, **args)
        assert rel_err(q_out, rq) < BF16_BOUND
        live = slots >= 0
        s = slots[live].long()
        assert rel_err(kc[s // page, s % page], rk[live]) < BF16_BOUND
        assert torch.equal(vc[s // page, s % page], rv[live].bfloat16())
        untouched = torch.ones(num_pages * page, dtype=torch.bool, device=DEV)
        untouched[s] = False
        assert (kc.view(-1, Hkv, D)[untouched] == 123.0).all()

    qk()
    check_qk()
    assert len(_cuda_kernels(qk)) == 1
    _graph_replays(qk, lambda: (fill(qkv), kc.fill_(123.0), vc.fill_(123.0), q_out.fill_(float("nan"))), check_qk)

    # topk_softmax: Qwen-style softmax and DeepSeek-V3-style sigmoid + bias + groups
    logits = randn(T, E, gen=gen, dtype=torch.float32, scale=2.0)
    bias = (torch.rand(E, generator=gen) * 0.1).to(DEV)
    for kw in (dict(renormalize=True), dict(renormalize=True, scoring="sigmoid", correction_bias=bias,
                                            num_groups=8, topk_groups=4)):
        tw = torch.full((T, k), float("nan"), device=DEV)
        tid = torch.full((T, k), -7, device=DEV, dtype=torch.int32)

        def topk(kw=kw, tw=tw, tid=tid):
            fused.topk_softmax(logits, k, out_weights=tw, out_ids=tid, **kw)

        def check_topk(kw=kw, tw=tw, tid=tid):
            rw, rids = fused.topk_softmax_reference(logits, k, **kw)
            assert torch.equal(tid.long(), rids)
            assert rel_err(tw, rw) < 1e-5

        def refresh_topk(tw=tw, tid=tid):
            return fill(logits, 2.0), tw.fill_(float("nan")), tid.fill_(-7)

        topk()
        check_topk()
        assert len(_cuda_kernels(topk)) == 1
        _graph_replays(topk, refresh_topk, check_topk)

    # silu_and_mul (a shared expert's width)
    h = randn(T, 2 * Fd, gen=gen)
    a = torch.full((T, Fd), float("nan"), device=DEV, dtype=torch.bfloat16)
    fused.silu_and_mul(h, out=a)
    assert rel_err(a, fused.silu_and_mul_reference(h)) < BF16_BOUND
    assert len(_cuda_kernels(lambda: fused.silu_and_mul(h, out=a))) == 1
    _graph_replays(lambda: fused.silu_and_mul(h, out=a), lambda: (fill(h), a.fill_(float("nan"))),
                   lambda: rel_err(a, fused.silu_and_mul_reference(h)) < BF16_BOUND or pytest.fail("silu_and_mul"))


@gpu
@needs_cuda
@pytest.mark.parametrize("T", [1, 2048])
@pytest.mark.parametrize("H", [7168, 8192, 16384])
def test_rms_norm_gpu_wide_rows(T, H):
    """DeepSeek-V3's and Llama-70B's hidden sizes in one pass; 16384 takes the two-pass path."""
    gen = torch.Generator().manual_seed(H + T)
    x, r = randn(T, H, gen=gen), randn(T, H, gen=gen)
    w = (torch.rand(H, generator=gen) + 0.5).to(DEV, torch.bfloat16)
    out, r_out = nan_like(x), nan_like(x)
    fused.add_rms_norm(x, r, w, out=out, residual_out=r_out)
    ref, ref_r = fused.add_rms_norm_reference(x, r, w)
    assert torch.equal(r_out, ref_r)
    assert rel_err(out, ref) < BF16_BOUND


@gpu
@needs_cuda
@pytest.mark.parametrize("T", [1, 7, 2048])
def test_qk_and_topk_gpu_shapes(T):
    """Grid heuristics across batch sizes: Qwen3-like q/k (Hq=64, Hkv=4, D=128), MLA-like D=192/Dv=128,
    DeepSeek-V3's router (256 experts, 8 groups, sigmoid + bias) and V2's (160 experts, softmax groups)."""
    for Hq, Hkv, D, Dv, with_norm in ((64, 4, 128, 128, True), (16, 1, 192, 128, False), (32, 8, 64, 64, False)):
        check_qk(T=T, Hq=Hq, Hkv=Hkv, D=D, Dv=Dv, page=16, num_pages=max(1, -(-T // 16)) + 2, with_norm=with_norm,
                 hpp=None, seed=T + D)
    gen = torch.Generator().manual_seed(T)
    for E, k, kw in ((256, 8, dict(renormalize=True, scoring="sigmoid", num_groups=8, topk_groups=4)),
                     (160, 6, dict(renormalize=False, num_groups=8, topk_groups=3)), (8, 2, dict(renormalize=True))):
        logits = randn(T, E, gen=gen, dtype=torch.bfloat16, scale=2.0)
        if kw.get("scoring") == "sigmoid":
            kw = dict(kw, correction_bias=(torch.rand(E, generator=gen) * 0.1).to(DEV))
        w, ids = fused.topk_softmax(logits, k, **kw)
        rw, rids = fused.topk_softmax_reference(logits, k, **kw)
        assert torch.equal(ids.long(), rids)
        assert rel_err(w, rw) < 1e-5
