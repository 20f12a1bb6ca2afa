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
import datetime as dt
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from lynxsim.calib import units
from lynxsim.calib.kernels.weights import (
    LayerShape,
    LayerWeights,
    ModelWeights,
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


def _layer_copies(build: Callable[[int], LayerWeights], bytes_read: Callable[[LayerWeights], float]
                  ) -> list[LayerWeights]:
    """``build(0)``, then as many more copies (``build(i)``) as keep ``copies_to_defeat_l2`` of the bytes one
    timed call reads from a copy (``bytes_read`` of the first), between 2 and ``MAX_COPIES``."""
    first = build(0)
    copies = min(MAX_COPIES, max(2, copies_to_defeat_l2(bytes_read(first))))
    return [first, *(build(i) for i in range(1, copies))]


class ModelSweep:
    """The weights and helpers shared by the sweeps of one model (or of one expert-parallel rank's experts:
    ``expert_parallel`` > 1 builds only ``E / expert_parallel`` whole experts, no attention)."""

    def __init__(self, key: str, model: ModelSpec, device: torch.device, repeats: int, budget: _Budget,
                 log: Callable[[str], None], moe_routing: str = "random", kernels: str = "production",
                 expert_parallel: int = 1) -> None:
        if moe_routing not in MOE_ROUTINGS:
            raise ValueError(f"moe_routing must be one of {MOE_ROUTINGS}")
        self.moe_routing = moe_routing
        self.key = key
        self.model = model
        self.device = device
        self.expert_parallel = expert_parallel
        shape = LayerShape.from_spec(model)
        if expert_parallel > 1:
            shape = dataclasses.replace(shape, num_experts=shape.num_experts // expert_parallel)
        self.shape = shape
        self.kernels = units.make_kernels(kernels, shape, device)
        self.repeats = repeats
        self.budget = budget
        self.log = log
        self.roof = UnitRooflines(model, load_hardware("h200"))
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(1234)
        s = self.shape
        moe_bytes = s.top_k * s.expert_bytes
        if expert_parallel > 1:  # one EP rank's experts only
            self.copies = min(MAX_COPIES, max(2, copies_to_defeat_l2(moe_bytes)))
            self.weights = build_model_weights(s, num_copies=self.copies, moe=True, device=device, lm_head=False,
                                               attention=False, kernels=kernels)
        else:
            # the dense part's bytes read from the first copy (MLA's differ by kernel set), the rest built after
            def dense_bytes(lw: LayerWeights) -> float:
                assert lw.w13 is not None and lw.w2 is not None
                return min(lw.nbytes() - (lw.w13.numel() + lw.w2.numel()) * lw.w13.element_size(), moe_bytes)

            layers = _layer_copies(
                lambda i: build_layer(s, moe=True, device=device, seed=1000 * i, kernels=kernels), dense_bytes)
            self.copies = len(layers)
            self.weights = ModelWeights(s, layers, None, torch.ones(s.hidden, device=device, dtype=torch.bfloat16))
        self.dense_weights: list | None = None

    def dense_copies(self) -> list:
        """Copies of a dense (FFN) layer, built on first use (models with dense layers only)."""
        if self.dense_weights is None:
            s, name = self.shape, self.kernels.name
            self.dense_weights = _layer_copies(
                lambda i: build_layer(s, moe=False, device=self.device, seed=77 + i, kernels=name),
                lambda lw: lw.nbytes())
        return self.dense_weights

    def _time(self, run: Callable[[int], object], estimate_s: float, copies: int) -> float:
        n = invocations_for(estimate_s, copies) if self.device.type == "cuda" else 2  # CPU: smoke runs only
        return time_callable(run, invocations=n, device=self.device, repeats=self.budget.current_repeats()).median_s

    def _hidden(self, tokens: int) -> units.Hidden:
        """A stream of ``tokens`` rows as the kernel set carries it between sub-layers (random values)."""
        x = _randn((tokens, self.shape.hidden), self.device, self.gen)
        production = self.kernels.name == "production"
        residual = _randn((tokens, self.shape.hidden), self.device, self.gen) if production else None
        return units.Hidden(x, residual)

    # ----- units -----

    def moe(self, tokens: int, distinct: int) -> float:
        """Routed experts at ``tokens * top_k`` token-expert assignments over exactly ``distinct`` experts. For an
        expert-parallel rank (``E / ep`` experts) a token holds at most ``min(top_k, distinct)`` of the rank's
        experts, so the same assignments are spread over more token rows (the kernel's work follows the
        assignments and the experts; ``ParallelCostModel`` looks a rank up at its assignments over top-k)."""
        s = self.shape
        k_local = min(s.top_k, distinct)
        t = math.ceil(feasible_tokens(tokens, distinct, s.top_k) * s.top_k / k_local)
        if self.moe_routing == "even":
            draws = [np.asarray(even_assignment(t, distinct, k_local), dtype=np.int32)]
        else:
            rng = np.random.default_rng([t, distinct, 17])
            draws = [random_assignment(t, distinct, k_local, rng) for _ in range(ROUTING_DRAWS)]
        ids = [torch.from_numpy(d).to(self.device) for d in draws]
        w = _routing_weights(t, k_local, self.device, self.gen)
        hidden = self._hidden(t)
        h = _randn((t, s.hidden), self.device, self.gen)
        shared = _randn((t, s.hidden), self.device, self.gen) if s.num_shared_experts else None
        layers = self.weights.layers
        k = self.kernels

        def run(i: int) -> object:
            return k.moe(hidden, h, layers[i % len(layers)], w, ids[i % len(ids)], shared)

        rotation = max(len(layers), len(ids))
        return self._time(run, float(self.roof.unit_roofline("moe")(t, distinct)), rotation)

    def _query(self, tokens: int) -> units.Query:
        """Random queries in the kernel set's layout (MLA: the un-absorbed q_nope and the roped q_pe)."""
        s = self.shape
        if self.kernels.name == "production" and s.mla is not None:
            m = s.mla
            return (_randn((tokens, m.num_heads, m.qk_nope_head_dim), self.device, self.gen),
                    _randn((tokens, m.num_heads, m.qk_rope_head_dim), self.device, self.gen))
        return _randn((tokens, s.num_heads, s.head_dim), self.device, self.gen)

    def _attention_out(self, tokens: int) -> torch.Tensor:
        heads, dv = self.kernels.attention_heads()
        return torch.empty(tokens, heads, dv, dtype=torch.bfloat16, device=self.device)

    def attention_decode(self, batch: int, context: int, pool: units.KVPool) -> float:
        k = self.kernels
        kv_bytes = batch * context * k.kv_bytes_per_token()
        copies = min(MAX_COPIES, max(2, copies_to_defeat_l2(kv_bytes)))
        per_copy = units.pages_for([context] * batch)
        copies = min(copies, pool.k.shape[0] // per_copy)
        caches = []
        perm = torch.randperm(pool.k.shape[0], generator=torch.Generator().manual_seed(batch * 7919 + context))
        need = math.ceil(context / units.PAGE_SIZE)
        for c in range(copies):
            pages = perm[c * per_copy:(c + 1) * per_copy].view(batch, need).to(torch.int32).to(self.device)
            lens = torch.full((batch,), context, dtype=torch.int32, device=self.device)
            caches.append(units.DecodeCache(pages, lens, context))
        q = self._query(batch)
        out = self._attention_out(batch)
        layers = self.weights.layers
        rows = slice(0, batch)

        def run(i: int) -> None:
            k.decode_attention(q, rows, layers[i % len(layers)], pool, caches[i % copies], out)

        estimate = float(self.roof.unit_roofline("attention_decode")(batch, context))
        return self._time(run, estimate, max(copies, len(layers)))

    def attention_prefill(self, chunk: int, context: int) -> float:
        k = self.kernels
        kv_bytes = (context + chunk) * k.kv_bytes_per_token()
        copies = min(MAX_COPIES, max(2, copies_to_defeat_l2(kv_bytes)))
        buffers = [k.new_pool((context + chunk,), self.device, self.gen) for _ in range(copies)]
        pages = units.pages_for([chunk])
        pool = k.new_pool((pages, units.PAGE_SIZE), self.device, self.gen)
        chunk_slots = torch.arange(chunk, device=self.device)
        q = self._query(chunk)
        out = self._attention_out(chunk)
        layers = self.weights.layers
        rows = slice(0, chunk)

        def run(i: int) -> None:
            k.prefill_attention(q, rows, layers[i % len(layers)], pool, chunk_slots, buffers[i % copies], out)

        estimate = float(self.roof.unit_roofline("attention_prefill")(chunk, context))
        return self._time(run, estimate, max(copies, len(layers)))

    def _layer_inputs(self, tokens: int, copies: int) -> tuple:
        """A stream, an attention output, positions, and a KV pool with each copy's own slots for the tokens."""
        hidden = self._hidden(tokens)
        attn = self._attention_out(tokens).normal_(generator=self.gen)
        positions = torch.randint(0, 4096, (tokens,), device=self.device, generator=self.gen)
        pos = self.kernels.positions(positions)
        pages_per_copy = math.ceil(tokens / units.PAGE_SIZE)
        pool = self.kernels.new_pool((pages_per_copy * copies, units.PAGE_SIZE), self.device, self.gen)
        rows = torch.arange(tokens, device=self.device)
        slots = [c * pages_per_copy * units.PAGE_SIZE + rows for c in range(copies)]
        return hidden, attn, pos, pool, slots

    def dense_layer(self, tokens: int) -> float:
        k = self.kernels
        return self._decoder_layer_rest(self.weights.layers, tokens, "dense_layer",
                                        lambda hidden, attn, lw: k.attention_out(hidden, attn, lw))

    def dense_ffn_layer(self, tokens: int) -> float:
        return self._decoder_layer_rest(self.dense_copies(), tokens, "dense_ffn_layer", self.kernels.ffn_out)

    def _decoder_layer_rest(
        self, layers: Sequence[Any], tokens: int, unit: str, finish: Callable[[Any, Any, Any], object]
    ) -> float:
        """Time everything of one decoder layer but attention itself: norm, QKV with rotary and the KV-cache
        write, then ``finish`` (the MoE layer's output GEMM, norm, router and shared experts, or a dense
        layer's FFN)."""
        copies = len(layers)
        hidden, attn, pos, pool, slots = self._layer_inputs(tokens, copies)
        k = self.kernels

        def run(i: int) -> object:
            lw = layers[i % copies]
            after, _ = k.attention_in(hidden, lw, pos, pool, slots[i % copies])
            return finish(after, attn, lw)

        return self._time(run, float(self.roof.unit_roofline(unit)(tokens)), copies)

    def dense_layer_gemms(self, tokens: int) -> float:
        """The GEMMs of ``dense_layer`` alone, timed the same way (a diagnostic: the floor the fused path is
        compared with in docs/kernel_efficiency.md; the cost model never reads it)."""
        layers = self.weights.layers
        h = _randn((tokens, self.shape.hidden), self.device, self.gen)
        attn = self._attention_out(tokens).normal_(generator=self.gen)
        k = self.kernels

        def run(i: int) -> object:
            return k.gemms(h, attn, layers[i % len(layers)])

        return self._time(run, float(self.roof.unit_roofline("dense_layer_gemms")(tokens)), len(layers))

    def embedding(self, tokens: int, table: torch.Tensor) -> float:
        ids = torch.randint(0, table.shape[0], (tokens,), device=self.device, generator=self.gen)
        positions = torch.randint(0, 4096, (tokens,), device=self.device, generator=self.gen)
        k = self.kernels

        def run(i: int) -> object:
            return k.embed(ids, positions, table)

        return self._time(run, float(self.roof.unit_roofline("embedding")(tokens)), 1)

    def lm_head(self, sequences: int, heads: list[torch.Tensor]) -> float:
        hidden = self._hidden(sequences)
        rows = torch.arange(sequences, device=self.device)
        norm = self.weights.final_norm
        k = self.kernels

        def run(i: int) -> object:
            return k.head(hidden, rows, heads[i % len(heads)], norm)

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
        config = default_moe_config(tokens * shape.top_k, shape.num_experts, shape.hidden, shape.expert_ffn,
                                    fp8=shape.expert_dtype == "fp8")
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
    kernels: str = "production",
    expert_parallel: int = 1,
) -> tuple[CalibrationMetadata, dict[str, KernelTable]]:
    """Time every planned table of one model (with ``expert_parallel`` > 1: one EP rank's ``moe`` table) with the
    kernel set ``kernels``; returns this run's metadata and the tables. The MoE token axis is refined at the
    fused kernel's configuration changes (``refine_moe_plan``) on a GPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(dev)
    budget = _Budget(budget_s, repeats, log)
    sweep = ModelSweep(key, model, dev, repeats, budget, log, moe_routing, kernels, expert_parallel)
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
            extra["pool"] = sweep.kernels.new_pool((pages, units.PAGE_SIZE), dev, sweep.gen)
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
    scope = f"one EP{expert_parallel} rank's {s.num_experts} experts; " if expert_parallel > 1 else ""
    dtype = f" --expert-dtype {s.expert_dtype}" if s.expert_dtype != "bf16" else ""
    notes = (f"lynxsim calibrate --kernels {kernels}{dtype}: {scope}{sweep.copies} weight copies rotated within "
             f"each CUDA graph; MoE: {routing}; "
             f"median of {repeats} replays; units {', '.join(p.unit for p in plans)}; "
             f"sweep {time.perf_counter() - budget.started:.0f} s")
    metadata = CalibrationMetadata(**env, date=dt.date.today(), notes=notes)
    del sweep
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return metadata, tables
