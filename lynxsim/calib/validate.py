"""Validation executor: run simulated iterations with the real kernels on the GPU and time them. Imports torch.

For one model: every layer gets its own random bf16 weights (the whole model is resident, as in serving), one
KV page pool per layer holds random values, and each iteration is built from its record
(``lynxsim.calib.iterations.ValidationIteration``):

* tokens: the decode rows first, then each prefill chunk's tokens; positions from the recorded contexts;
* KV cache: a block table of random pages for every sequence; each new token's K/V is written to its paged
  slot; decode rows attend over ``seq_lens`` = the recorded context (new token included);
* prefill chunks: a contiguous K/V buffer per layer holding the chunk's cached context, the chunk's own K/V
  copied behind it, then FlashAttention (vLLM reads the context from the paged cache inside its varlen
  kernel; the bytes and FLOPs are the same);
* MoE layer ``l``: the router runs (its GEMM and top-k cost time), but the experts get ids rebuilt from the
  recorded token counts of layer ``l`` (``expert_assignment``), so the layer activates exactly the experts the
  policy chose, with the tokens per expert it chose;
* then the LM head over the last row of every sequence and a greedy argmax.

The iteration (embedding, all layers, head) is captured as one CUDA graph and the median of ``repeats`` replays,
each between two CUDA events, is its measured latency: what the measured cost model predicts as the sum of its
units plus one graph launch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from lynxsim.calib import units
from lynxsim.calib.iterations import ValidationIteration, expert_assignment
from lynxsim.calib.kernels.weights import LayerShape, build_layer
from lynxsim.calib.timing import environment, time_callable
from lynxsim.models.spec import ModelSpec


class ModelOnDevice:
    """All layers of one model with random weights, an embedding table, the LM head and per-layer KV pools."""

    def __init__(self, model: ModelSpec, device: torch.device, pool_pages: int) -> None:
        self.model = model
        self.device = device
        self.shape = s = LayerShape.from_spec(model)
        dense = set(model.dense_layers)
        self.layers = [build_layer(s, moe=i not in dense, device=device, seed=i) for i in range(model.num_layers)]
        self.is_moe = [i not in dense for i in range(model.num_layers)]
        gen = torch.Generator(device=device)
        gen.manual_seed(99)
        self.gen = gen
        self.embedding = self._randn((s.vocab, s.hidden), 0.02)
        self.lm_head = self._randn((s.vocab, s.hidden), 0.02)
        self.final_norm = torch.ones(s.hidden, device=device, dtype=torch.bfloat16)
        self.rope = units.Rope.build(s.head_dim, device)
        self.pool_pages = pool_pages
        self.pools = [units.random_pool(pool_pages, s, device, gen) for _ in range(model.num_layers)]

    def _randn(self, shape: tuple[int, ...], std: float = 1.0) -> torch.Tensor:
        t = torch.empty(shape, device=self.device, dtype=torch.float32)
        t.normal_(0.0, std, generator=self.gen)
        return t.to(torch.bfloat16)

    def build(self, it: ValidationIteration, seed: int) -> Callable[[int], Any]:
        """The iteration as a function (no host synchronisation inside, so it can be captured)."""
        s, dev, model = self.shape, self.device, self.model
        shape = it.shape
        decode = shape.decode_context_tokens.tolist()
        chunks = shape.prefill_chunk_tokens.tolist()
        contexts = shape.prefill_context_tokens.tolist()
        B = len(decode)
        T = shape.num_tokens
        positions = [n - 1 for n in decode]
        offsets = []
        for chunk, context in zip(chunks, contexts):
            offsets.append(B + sum(chunks[: len(offsets)]))
            positions.extend(range(context, context + chunk))
        last_rows = list(range(B)) + [off + c - 1 for off, c in zip(offsets, chunks)]
        pos = torch.tensor(positions, dtype=torch.int64, device=dev) % units.MAX_POSITIONS
        rows = torch.tensor(last_rows, dtype=torch.int64, device=dev)
        token_ids = torch.randint(0, s.vocab, (T,), device=dev, generator=self.gen)
        # one block table over every sequence (decode rows, then prefill sequences up to their chunk's end):
        # every new token's K/V goes to its paged slot, as a server writes it; decode rows read their pages
        lengths = decode + [c + n for n, c in zip(chunks, contexts)]
        table, lens, _ = units.block_table(lengths, self.pool_pages, dev, seed=seed)
        slot_page, slot_offset = [], []
        table_cpu = table.cpu()
        for row, (first, n) in enumerate([(d - 1, 1) for d in decode] + list(zip(contexts, chunks))):
            for p in range(first, first + n):
                slot_page.append(int(table_cpu[row, p // units.PAGE_SIZE]))
                slot_offset.append(p % units.PAGE_SIZE)
        write = (torch.tensor(slot_page, dtype=torch.int64, device=dev),
                 torch.tensor(slot_offset, dtype=torch.int64, device=dev))
        caches = [units.paged_cache(k, v, table[:B], lens[:B], max(decode)) for k, v in self.pools] if B else []
        buffers = [
            [(self._randn((c + n, s.num_kv_heads, s.head_dim)), self._randn((c + n, s.num_kv_heads, s.v_head_dim)))
             for n, c in zip(chunks, contexts)]
            for _ in range(model.num_layers)
        ]
        moe_layer = [i for i, m in enumerate(self.is_moe) if m]
        counts = it.expert_token_counts
        ids = {
            layer: torch.from_numpy(expert_assignment(counts[j], T, s.top_k)).to(dev)
            for j, layer in enumerate(moe_layer)
        }
        attn = torch.empty(T, s.num_heads, s.v_head_dim, dtype=torch.bfloat16, device=dev)

        def run(_: int) -> Any:
            x, cos, sin = units.embed(token_ids, pos, self.embedding, self.rope)
            for layer, lw in enumerate(self.layers):
                q, k, v = units.attention_in(x, lw, s, cos, sin)
                units.write_kv_paged(k, v, *self.pools[layer], *write)
                if B:
                    units.decode_attention(q[:B], caches[layer], attn[:B])
                for (kb, vb), off, n in zip(buffers[layer], offsets, chunks):
                    rows_ = slice(off, off + n)
                    units.prefill_attention(q[rows_], k[rows_], v[rows_], kb, vb, attn[rows_])
                if self.is_moe[layer]:
                    x, h, weights = units.attention_out(x, attn, lw, s)
                    x = units.moe(x, h, lw, weights, ids[layer])
                else:
                    x = units.ffn_out(x, attn, lw)
            return units.head(x, rows, self.lm_head, self.final_norm)

        return run


def _lengths(it: ValidationIteration) -> list[int]:
    shape = it.shape
    return shape.decode_context_tokens.tolist() + (shape.prefill_context_tokens + shape.prefill_chunk_tokens).tolist()


def execute_iterations(
    iterations: list[ValidationIteration],
    models: dict[str, ModelSpec],
    *,
    device: str = "cuda",
    repeats: int = 10,
    log: Callable[[str], None] = print,
) -> tuple[dict[tuple[str, str, int], float], dict[str, str]]:
    """Measured seconds of every iteration, keyed by (model, policy, iteration index), and the environment."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(dev)
    measured: dict[tuple[str, str, int], float] = {}
    for key, model in models.items():
        mine = [it for it in iterations if it.model_key == key]
        if not mine:
            continue
        started = time.perf_counter()
        pages = max(units.pages_for(_lengths(it)) for it in mine)
        on_device = ModelOnDevice(model, dev, pages + 16)
        log(f"{key}: model on device in {time.perf_counter() - started:.1f} s; executing {len(mine)} iterations")
        for n, it in enumerate(mine):
            run = on_device.build(it, seed=n)
            timing = time_callable(run, invocations=1, device=dev, repeats=repeats, warmup=3)
            measured[(key, it.policy, it.index)] = timing.median_s
            log(f"  {key} {it.policy} #{it.index} {it.kind} decode {it.shape.num_decode_tokens} prefill "
                f"{it.shape.num_prefill_tokens}: measured {timing.median_s * 1e3:.3f} ms, predicted "
                f"{it.predicted_gpu_s * 1e3:.3f} ms ({it.predicted_gpu_s / timing.median_s - 1:+.1%}), "
                f"spread {timing.spread:.1%}")
            del run
        del on_device
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        log(f"{key}: validated in {time.perf_counter() - started:.1f} s")
    return measured, environment(dev)
