"""Calibration sweeps: time every unit of one model over its grid and return the tables. Imports torch.

Each grid point builds its inputs once (random values, never zeros), then ``timing.time_callable`` runs the
unit ``n`` times in one CUDA graph, invocation ``i`` on weight copy ``i % copies`` (and on its own KV pages),
and returns the median replay time over ``n``. ``n`` is chosen so that a graph runs about 1.5 ms
(``invocations_for``), which spreads the graph's own launch over many invocations, as a whole iteration's graph
does over its layers. The units are those of ``lynxsim.calib.units``, the same code validation executes.

Copies: a unit's weights (and KV cache) are rotated among enough copies that 4x the L2 (60 MB on the H200) is
read between two uses of the same bytes (``copies_to_defeat_l2``); all units of a model share one set of
full-layer copies. Very small KV working sets (a few pages) stay partly L2-resident at 64 copies; such
kernels are latency-bound, so it changes little.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from lynxsim.calib import units
from lynxsim.calib.kernels.weights import (
    LayerShape,
    build_layer,
    build_model_weights,
    copies_to_defeat_l2,
)
from lynxsim.calib.plan import (
    MOE_ROUTINGS,
    ROUTING_DRAWS,
    TablePlan,
    even_assignment,
    feasible_tokens,
    random_assignment,
    table_from_values,
)
from lynxsim.calib.timing import environment, invocations_for, time_callable
from lynxsim.cost import UnitRooflines
from lynxsim.hardware import CalibrationMetadata, KernelTable, load_hardware
from lynxsim.models.spec import ModelSpec

MAX_COPIES = 64


class _Budget:
    """Soft time limit of one model's sweep: past it, the remaining points are timed with 3 repeats."""

    def __init__(self, budget_s: float, repeats: int, log: Callable[[str], None]) -> None:
        self.started = time.perf_counter()
        self.budget_s = budget_s
        self.repeats = repeats
        self.log = log
        self.warned = False

    def current_repeats(self) -> int:
        if time.perf_counter() - self.started > self.budget_s:
            if not self.warned:
                self.log(f"  sweep past its {self.budget_s:.0f} s budget: 3 repeats from here on")
                self.warned = True
            return min(3, self.repeats)
        return self.repeats


def _randn(shape: tuple[int, ...], device: torch.device, gen: torch.Generator, dtype: torch.dtype = torch.bfloat16,
           std: float = 1.0) -> torch.Tensor:
    t = torch.empty(shape, device=device, dtype=torch.float32)
    t.normal_(0.0, std, generator=gen)
    return t.to(dtype)


def _routing_weights(tokens: int, k: int, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    w = torch.rand(tokens, k, device=device, generator=gen, dtype=torch.float32) + 0.1
    return w / w.sum(-1, keepdim=True)


class ModelSweep:
    """The weights and helpers shared by the sweeps of one model."""

    def __init__(self, key: str, model: ModelSpec, device: torch.device, repeats: int, budget: _Budget,
                 log: Callable[[str], None], moe_routing: str = "random") -> None:
        if moe_routing not in MOE_ROUTINGS:
            raise ValueError(f"moe_routing must be one of {MOE_ROUTINGS}")
        self.moe_routing = moe_routing
        self.key = key
        self.model = model
        self.device = device
        self.shape = LayerShape.from_spec(model)
        self.repeats = repeats
        self.budget = budget
        self.log = log
        self.roof = UnitRooflines(model, load_hardware("h200"))
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(1234)
        s = self.shape
        dense_bytes = 2 * (s.qkv_size * s.hidden + s.hidden * s.num_heads * s.v_head_dim + s.num_experts * s.hidden
                           + 3 * s.hidden * s.num_shared_experts * s.shared_ffn)
        moe_bytes = s.top_k * s.expert_bytes
        self.copies = min(MAX_COPIES, max(2, copies_to_defeat_l2(min(dense_bytes, moe_bytes))))
        self.weights = build_model_weights(s, num_copies=self.copies, moe=True, device=device, lm_head=False)
        self.dense_weights = None
        self.rope = units.Rope.build(s.head_dim, device)

    def dense_copies(self) -> list:
        """Copies of a dense (FFN) layer, built on first use (models with dense layers only)."""
        if self.dense_weights is None:
            s = self.shape
            dense_bytes = 2 * (s.qkv_size * s.hidden + 3 * s.hidden * s.dense_ffn)
            copies = min(MAX_COPIES, max(2, copies_to_defeat_l2(dense_bytes)))
            self.dense_weights = [build_layer(s, moe=False, device=self.device, seed=77 + i) for i in range(copies)]
        return self.dense_weights

    def _time(self, run: Callable[[int], object], estimate_s: float, copies: int) -> float:
        n = invocations_for(estimate_s, copies) if self.device.type == "cuda" else 2  # CPU: smoke runs only
        return time_callable(run, invocations=n, device=self.device, repeats=self.budget.current_repeats()).median_s

    # ----- units -----

    def moe(self, tokens: int, distinct: int) -> float:
        s = self.shape
        t = feasible_tokens(tokens, distinct, s.top_k)
        if self.moe_routing == "even":
            draws = [np.asarray(even_assignment(t, distinct, s.top_k), dtype=np.int32)]
        else:
            rng = np.random.default_rng([t, distinct, 17])
            draws = [random_assignment(t, distinct, s.top_k, rng) for _ in range(ROUTING_DRAWS)]
        ids = [torch.from_numpy(d).to(self.device) for d in draws]
        w = _routing_weights(t, s.top_k, self.device, self.gen)
        x = _randn((t, s.hidden), self.device, self.gen)
        h = _randn((t, s.hidden), self.device, self.gen)
        layers = self.weights.layers

        def run(i: int) -> object:
            return units.moe(x, h, layers[i % len(layers)], w, ids[i % len(ids)])

        rotation = max(len(layers), len(ids))
        return self._time(run, float(self.roof.unit_roofline("moe")(t, distinct)), rotation)

    def attention_decode(self, batch: int, context: int, pools: tuple[torch.Tensor, torch.Tensor]) -> float:
        s = self.shape
        k_pool, v_pool = pools
        kv_bytes = batch * context * s.kv_bytes_per_token
        copies = min(MAX_COPIES, max(2, copies_to_defeat_l2(kv_bytes)))
        per_copy = units.pages_for([context] * batch)
        copies = min(copies, k_pool.shape[0] // per_copy)
        caches = []
        perm = torch.randperm(k_pool.shape[0], generator=torch.Generator().manual_seed(batch * 7919 + context))
        need = math.ceil(context / units.PAGE_SIZE)
        for c in range(copies):
            pages = perm[c * per_copy:(c + 1) * per_copy].view(batch, need).to(torch.int32).to(self.device)
            lens = torch.full((batch,), context, dtype=torch.int32, device=self.device)
            caches.append(units.paged_cache(k_pool, v_pool, pages, lens, context))
        q = _randn((batch, s.num_heads, s.head_dim), self.device, self.gen)
        out = torch.empty(batch, s.num_heads, s.v_head_dim, dtype=torch.bfloat16, device=self.device)

        def run(i: int) -> object:
            return units.decode_attention(q, caches[i % copies], out)

        return self._time(run, float(self.roof.unit_roofline("attention_decode")(batch, context)), copies)

    def attention_prefill(self, chunk: int, context: int) -> float:
        s = self.shape
        kv_bytes = (context + chunk) * s.kv_bytes_per_token
        copies = min(MAX_COPIES, max(2, copies_to_defeat_l2(kv_bytes)))
        ks = [_randn((context + chunk, s.num_kv_heads, s.head_dim), self.device, self.gen) for _ in range(copies)]
        vs = [_randn((context + chunk, s.num_kv_heads, s.v_head_dim), self.device, self.gen) for _ in range(copies)]
        q = _randn((chunk, s.num_heads, s.head_dim), self.device, self.gen)
        k_new = _randn((chunk, s.num_kv_heads, s.head_dim), self.device, self.gen)
        v_new = _randn((chunk, s.num_kv_heads, s.v_head_dim), self.device, self.gen)
        out = torch.empty(chunk, s.num_heads, s.v_head_dim, dtype=torch.bfloat16, device=self.device)

        def run(i: int) -> object:
            return units.prefill_attention(q, k_new, v_new, ks[i % copies], vs[i % copies], out)

        return self._time(run, float(self.roof.unit_roofline("attention_prefill")(chunk, context)), copies)

    def _dense_inputs(self, tokens: int, copies: int) -> tuple:
        s = self.shape
        x = _randn((tokens, s.hidden), self.device, self.gen)
        attn = _randn((tokens, s.num_heads, s.v_head_dim), self.device, self.gen)
        positions = torch.randint(0, 4096, (tokens,), device=self.device, generator=self.gen)
        cos, sin = units.rope_tables(self.rope, positions)
        pages_per_copy = math.ceil(tokens / units.PAGE_SIZE)
        k_pool, v_pool = units.random_pool(pages_per_copy * copies, s, self.device, self.gen)
        rows = torch.arange(tokens, device=self.device)
        slots = [(c * pages_per_copy + rows // units.PAGE_SIZE, rows % units.PAGE_SIZE) for c in range(copies)]
        return x, attn, cos, sin, k_pool, v_pool, slots

    def dense_layer(self, tokens: int) -> float:
        shape = self.shape
        return self._decoder_layer_rest(
            self.weights.layers, tokens, "dense_layer", lambda x, attn, lw: units.attention_out(x, attn, lw, shape)
        )

    def dense_ffn_layer(self, tokens: int) -> float:
        return self._decoder_layer_rest(self.dense_copies(), tokens, "dense_ffn_layer", units.ffn_out)

    def _decoder_layer_rest(
        self, layers: Sequence[Any], tokens: int, unit: str, finish: Callable[[Any, Any, Any], object]
    ) -> float:
        """Time everything of one decoder layer but attention itself: QKV with rotary and the KV-cache write,
        then ``finish`` (the MoE layer's output GEMM, norm and router, or a dense layer's FFN)."""
        copies = len(layers)
        x, attn, cos, sin, k_pool, v_pool, slots = self._dense_inputs(tokens, copies)
        s = self.shape

        def run(i: int) -> object:
            lw = layers[i % copies]
            _, k, v = units.attention_in(x, lw, s, cos, sin)
            units.write_kv_paged(k, v, k_pool, v_pool, *slots[i % copies])
            return finish(x, attn, lw)

        return self._time(run, float(self.roof.unit_roofline(unit)(tokens)), copies)

    def embedding(self, tokens: int, table: torch.Tensor) -> float:
        ids = torch.randint(0, table.shape[0], (tokens,), device=self.device, generator=self.gen)
        positions = torch.randint(0, 4096, (tokens,), device=self.device, generator=self.gen)

        def run(i: int) -> object:
            return units.embed(ids, positions, table, self.rope)

        return self._time(run, float(self.roof.unit_roofline("embedding")(tokens)), 1)

    def lm_head(self, sequences: int, heads: list[torch.Tensor]) -> float:
        s = self.shape
        x = _randn((sequences, s.hidden), self.device, self.gen)
        rows = torch.arange(sequences, device=self.device)
        norm = self.weights.final_norm

        def run(i: int) -> object:
            return units.head(x, rows, heads[i % len(heads)], norm)

        return self._time(run, float(self.roof.unit_roofline("lm_head")(sequences)), len(heads))

    def graph_launch(self) -> float:
        """One replay of a graph holding one one-element kernel: the fixed cost of launching an iteration."""
        x = torch.zeros(1, device=self.device)

        def run(i: int) -> object:
            return x.add_(1.0)

        return time_callable(run, invocations=1, device=self.device, repeats=max(self.repeats, 20)).median_s


def moe_config_boundaries(shape: LayerShape, max_tokens: int) -> list[int]:
    """Token counts at which the fused MoE kernel's default tile configuration changes (the first count of each
    new configuration), and the switch to the grouped GEMM: the MoE time jumps there."""
    from lynxsim.calib.kernels.moe import default_moe_config
    from lynxsim.calib.plan import grouped_gemm_min_tokens

    changes, previous = [], None
    for tokens in range(1, max_tokens + 1):
        config = default_moe_config(tokens * shape.top_k, shape.num_experts, shape.hidden, shape.expert_ffn)
        if previous is not None and config != previous:
            changes.append(tokens)
        previous = config
    switch = grouped_gemm_min_tokens(shape.num_experts, shape.top_k)
    return sorted(set(changes) | ({switch} if switch <= max_tokens else set()))


def refine_moe_plan(plan: TablePlan, shape: LayerShape) -> TablePlan:
    """The MoE plan with both sides of every configuration change on its token axis."""
    tokens = plan.axis_values[0]
    extra = set()
    for boundary in moe_config_boundaries(shape, tokens[-1]):
        extra |= {boundary - 1, boundary} - {0}
    axis = tuple(sorted(set(tokens) | extra))
    return dataclasses.replace(plan, axis_values=(axis, *plan.axis_values[1:]))


def calibrate_model(
    key: str,
    model: ModelSpec,
    plans: list[TablePlan],
    *,
    device: str = "cuda",
    repeats: int = 10,
    budget_s: float = 540.0,
    log: Callable[[str], None] = print,
    moe_routing: str = "random",
) -> tuple[CalibrationMetadata, dict[str, KernelTable]]:
    """Time every planned table of one model; returns this run's metadata and the tables. The MoE token axis is
    refined at the fused kernel's configuration changes (``refine_moe_plan``) on a GPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(dev)
    budget = _Budget(budget_s, repeats, log)
    sweep = ModelSweep(key, model, dev, repeats, budget, log, moe_routing)
    if dev.type == "cuda":
        plans = [refine_moe_plan(p, sweep.shape) if p.unit == "moe" else p for p in plans]
    log(f"  {key}: {sweep.copies} layer copies of {sweep.weights.layers[0].nbytes() / 1e9:.2f} GB")
    tables: dict[str, KernelTable] = {}
    s = sweep.shape
    for plan in plans:
        started = time.perf_counter()
        values: list[float] = []
        extra: dict[str, object] = {}
        if plan.unit == "attention_decode":
            most = max(b * c for b in plan.axis_values[0] for c in plan.axis_values[1])
            pages = 2 * units.pages_for([most]) + 2 * plan.axis_values[0][-1]
            extra["pools"] = units.random_pool(pages, s, dev, sweep.gen)
        elif plan.unit == "embedding":
            extra["table"] = _randn((s.vocab, s.hidden), dev, sweep.gen, std=0.02)
        elif plan.unit == "lm_head":
            extra["heads"] = [_randn((s.vocab, s.hidden), dev, sweep.gen, std=0.02) for _ in range(2)]
        for point in plan.points():
            if plan.unit == "graph_launch":
                values.append(sweep.graph_launch())
            else:
                values.append(getattr(sweep, plan.unit)(*point, **extra))
        extra.clear()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        table = table_from_values(plan, values)
        if plan.unit == "moe":
            how = "tokens split evenly over" if moe_routing == "even" else f"{ROUTING_DRAWS} random routings over"
            table = table.model_copy(update={"description": f"{plan.description.split(', tokens')[0]}, {how} "
                                                            "the distinct experts"})
        tables[plan.name] = table
        log(f"  {plan.name}: {plan.num_points} points in {time.perf_counter() - started:.1f} s "
            f"(min {min(values) * 1e6:.1f} us, max {max(values) * 1e6:.1f} us)")
    env = environment(dev)
    routing = ("tokens split evenly over the distinct experts" if moe_routing == "even"
               else f"{ROUTING_DRAWS} random routings over the distinct experts rotated")
    notes = (f"lynxsim calibrate: {sweep.copies} weight copies rotated within each CUDA graph; MoE: {routing}; "
             f"median of {repeats} replays; units {', '.join(p.unit for p in plans)}; "
             f"sweep {time.perf_counter() - budget.started:.0f} s")
    metadata = CalibrationMetadata(**env, date=time.strftime("%Y-%m-%d"), notes=notes)
    del sweep
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return metadata, tables
