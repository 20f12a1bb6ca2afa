"""The two kernel sets of ``lynxsim.calib.units`` compute the same decoder layer.

``production`` (fused ops, the residual stream carried as ``(delta, residual)``) and ``reference`` (unfused torch
ops) are two implementations of one model's math: on the same weights and inputs, one layer's output stream
must agree to bf16 rounding, and the production set must write the same K/V into the paged cache. MLA models
are checked in production against the float64 unabsorbed references of ``lynxsim.calib.kernels.mla`` (the
reference set approximates MLA, so it is no oracle there). On the CPU the production set's Triton kernels run
under the interpreter where ``TRITON_INTERPRET=1`` is set, else through their torch references.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from kernel_checks import rel_err  # noqa: E402  (switches the interpreter on before the kernels are imported)
from lynxsim.calib import units  # noqa: E402
from lynxsim.calib.kernels.weights import LayerShape, build_layer  # noqa: E402
from lynxsim.models.spec import AttentionSpec, ModelSpec  # noqa: E402

GQA = ModelSpec(
    name="tiny-gqa", source="test", num_layers=1, hidden_size=64, vocab_size=256,
    attention=AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=16),
    num_experts=8, top_k=2, expert_ffn_size=32, num_shared_experts=1, shared_expert_ffn_size=16, renormalize=True,
)
MLA = ModelSpec(
    name="tiny-mla", source="test", num_layers=1, hidden_size=64, vocab_size=256,
    attention=AttentionSpec(num_heads=4, num_kv_heads=4, head_dim=48, q_lora_rank=32, kv_lora_rank=32,
                            qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32),
    num_experts=8, top_k=2, expert_ffn_size=32, renormalize=False, router="softmax", num_expert_groups=4,
    topk_groups=2,
)


def _inputs(shape: LayerShape, kernels: units.LayerKernels, decode_lens: list[int], seed: int):
    gen = torch.Generator().manual_seed(seed)
    B = len(decode_lens)
    x = torch.randn(B, shape.hidden, generator=gen).bfloat16()
    pages = units.pages_for(decode_lens) + 2
    pool = kernels.new_pool((pages, units.PAGE_SIZE), torch.device("cpu"), gen)
    table, lens = units.block_table(decode_lens, pages, torch.device("cpu"), seed=seed)
    slots = torch.tensor([units.token_slots(table, b, n - 1, 1)[0] for b, n in enumerate(decode_lens)])
    positions = torch.tensor([n - 1 for n in decode_lens])
    return x, pool, units.DecodeCache(table, lens, max(decode_lens)), slots, positions


def _one_layer(kernels: units.LayerKernels, lw, x: torch.Tensor, pool: units.KVPool, cache: units.DecodeCache,
               slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One MoE layer over decode rows with the router's own top-k; returns the stream after it."""
    hidden = units.Hidden(x)
    pos = kernels.positions(positions)
    hidden, q = kernels.attention_in(hidden, lw, pos, pool, slots)
    heads, dv = kernels.attention_heads()
    attn = torch.empty(x.shape[0], heads, dv, dtype=torch.bfloat16)
    kernels.decode_attention(q, slice(0, x.shape[0]), lw, pool, cache, attn)
    hidden, h, weights, ids, shared = kernels.attention_out(hidden, attn, lw)
    hidden = kernels.moe(hidden, h, lw, weights, ids, shared)
    return hidden.x if hidden.residual is None else hidden.x.double() + hidden.residual.double()


def test_production_and_reference_sets_compute_the_same_gqa_layer() -> None:
    shape = LayerShape.from_spec(GQA)
    lw = build_layer(shape, moe=True, seed=3)
    lens = [5, 17, 33]
    outs, pools = [], []
    for name in ("production", "reference"):
        kernels = units.make_kernels(name, shape, torch.device("cpu"))
        x, pool, cache, slots, positions = _inputs(shape, kernels, lens, seed=7)
        outs.append(_one_layer(kernels, lw, x, pool, cache, slots, positions))
        pools.append(pool)
    assert rel_err(outs[0], outs[1]) < 2e-2
    # the new tokens' K/V landed in the same slots with the same values (rotary in both sets)
    assert rel_err(pools[0].k.float(), pools[1].k.float()) < 1e-2
    assert rel_err(pools[0].v.float(), pools[1].v.float()) < 1e-2


def test_production_layer_differs_from_reference_where_qk_norm_applies() -> None:
    """A model with q/k norm gets it in production only (the reference set never ran it): the written keys
    then differ, so the test above cannot pass by both sets ignoring the norm."""
    spec = GQA.model_copy(update={"attention": GQA.attention.model_copy(update={"qk_norm": True})})
    shape = LayerShape.from_spec(spec)
    lw = build_layer(shape, moe=True, seed=3)
    lw.k_norm = torch.full_like(lw.k_norm, 3.0)
    keys = []
    for name in ("production", "reference"):
        kernels = units.make_kernels(name, shape, torch.device("cpu"))
        x, pool, cache, slots, positions = _inputs(shape, kernels, [9], seed=1)
        _one_layer(kernels, lw, x, pool, cache, slots, positions)
        keys.append(pool.k.view(-1, *pool.k.shape[2:])[slots].float())
    assert rel_err(keys[0], keys[1]) > 0.5


def test_production_mla_layer_matches_the_unabsorbed_reference() -> None:
    """Project (latent cache write) then absorbed decode equals decompress-then-attend in float64."""
    from lynxsim.calib.kernels import mla

    shape = LayerShape.from_spec(MLA)
    assert shape.mla is not None and shape.num_expert_groups == 4
    lw = build_layer(shape, moe=True, seed=5)
    assert lw.mla is not None and lw.w_qkv is None
    kernels = units.make_kernels("production", shape, torch.device("cpu"))
    lens = [3, 20]
    x, pool, cache, slots, positions = _inputs(shape, kernels, lens, seed=2)
    hidden, q = kernels.attention_in(units.Hidden(x), lw, kernels.positions(positions), pool, slots)
    assert isinstance(q, tuple)
    out = torch.empty(2, 4, 32, dtype=torch.bfloat16)
    kernels.decode_attention(q, slice(0, 2), lw, pool, cache, out)
    ref = mla.mla_decode_reference(q[0], q[1], lw.mla, shape.mla, kv_cache=pool.k, block_table=cache.block_table,
                                   seq_lens=cache.seq_lens)
    assert rel_err(out, ref) < 1e-2
    # the production set's MoE layer runs end to end with group-limited routing
    _, h, weights, ids, shared = kernels.attention_out(hidden, out, lw)
    # renormalize is off for this model: each token's weights are its chosen experts' softmax mass, in (0, 1]
    assert ids.shape == (2, 2) and (weights > 0).all() and (weights.sum(-1) <= 1 + 1e-6).all()
    groups = (ids // 2).tolist()  # 8 experts in 4 groups of 2: each token's experts lie in <= 2 groups
    assert all(len(set(g)) <= 2 for g in groups)


@pytest.mark.parametrize("kernels", ["production", "reference"])
def test_the_diagnostic_gemms_run_for_both_attention_kinds(kernels: str) -> None:
    for spec in (GQA, MLA):
        shape = LayerShape.from_spec(spec)
        lw = build_layer(shape, moe=True, kernels=kernels)
        k = units.make_kernels(kernels, shape, torch.device("cpu"))
        heads, dv = k.attention_heads()
        outs = k.gemms(torch.randn(3, 64).bfloat16(), torch.randn(3, heads, dv).bfloat16(), lw)
        assert all(o.shape[0] == 3 for o in outs)


def test_unknown_kernel_set() -> None:
    with pytest.raises(ValueError, match="unknown kernel set"):
        units.make_kernels("fast", LayerShape.from_spec(GQA), torch.device("cpu"))
