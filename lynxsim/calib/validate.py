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

Tensor parallelism (``tensor_parallel`` = G > 1): G processes, one per GPU, join an NCCL group; each holds the
TP shard of the model (``lynxsim.parallel.shard_model``: 1/G of the heads, KV heads, FFN and expert widths and
vocabulary) and executes the same iterations in the same order, with an all-reduce of the attention output and
of the FFN/experts output of every layer (``lynxsim.calib.units``) captured into the graph. Rank 0's timings are
the measurement (the collectives keep the ranks in step; rank 1's medians are logged beside them).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lynxsim.calib import units
from lynxsim.calib.iterations import ValidationIteration, expert_assignment
from lynxsim.calib.kernels.weights import LayerShape, build_layer
from lynxsim.calib.timing import environment, time_callable
from lynxsim.models.spec import ModelSpec


class ModelOnDevice:
    """All layers of one model with random weights, an embedding table, the LM head and per-layer KV pools,
    run by one kernel set (``lynxsim.calib.units``)."""

    def __init__(
        self, model: ModelSpec, device: torch.device, pool_pages: int, reduce: units.Reduce = units.no_reduce,
        kernels: str = "production",
    ) -> None:
        self.model = model
        self.reduce = reduce
        self.device = device
        self.shape = s = LayerShape.from_spec(model)
        self.kernels = units.make_kernels(kernels, s, device)
        dense = set(model.dense_layers)
        self.layers = [build_layer(s, moe=i not in dense, device=device, seed=i, kernels=kernels)
                       for i in range(model.num_layers)]
        self.is_moe = [i not in dense for i in range(model.num_layers)]
        gen = torch.Generator(device=device)
        gen.manual_seed(99)
        self.gen = gen
        self.embedding = self._randn((s.vocab, s.hidden), 0.02)
        self.lm_head = self._randn((s.vocab, s.hidden), 0.02)
        self.final_norm = torch.ones(s.hidden, device=device, dtype=torch.bfloat16)
        self.pool_pages = pool_pages
        self.pools = [
            self.kernels.new_pool((pool_pages, units.PAGE_SIZE), device, gen) for _ in range(model.num_layers)
        ]

    def _randn(self, shape: tuple[int, ...], std: float = 1.0) -> torch.Tensor:
        t = torch.empty(shape, device=self.device, dtype=torch.float32)
        t.normal_(0.0, std, generator=self.gen)
        return t.to(torch.bfloat16)

    def build(self, it: ValidationIteration, seed: int) -> Callable[[int], Any]:
        """The iteration as a function (no host synchronisation inside, so it can be captured)."""
        s, dev, model, k = self.shape, self.device, self.model, self.kernels
        shape = it.shape
        decode = shape.decode_context_tokens.tolist()
        chunks = shape.prefill_chunk_tokens.tolist()
        contexts = shape.prefill_context_tokens.tolist()
        B = len(decode)
        T = shape.num_tokens
        positions = [n - 1 for n in decode]
        offsets: list[int] = []
        for chunk, context in zip(chunks, contexts, strict=True):
            offsets.append(B + sum(chunks[: len(offsets)]))
            positions.extend(range(context, context + chunk))
        last_rows = list(range(B)) + [off + c - 1 for off, c in zip(offsets, chunks, strict=True)]
        pos = torch.tensor(positions, dtype=torch.int64, device=dev) % units.MAX_POSITIONS
        rows = torch.tensor(last_rows, dtype=torch.int64, device=dev)
        token_ids = torch.randint(0, s.vocab, (T,), device=dev, generator=self.gen)
        # one block table over every sequence (decode rows, then prefill sequences up to their chunk's end):
        # every new token's K/V goes to its paged slot, as a server writes it; decode rows read their pages
        lengths = decode + [c + n for n, c in zip(chunks, contexts, strict=True)]
        table, lens = units.block_table(lengths, self.pool_pages, dev, seed=seed)
        table_cpu = table.cpu()
        slots: list[int] = []
        for row, (first, n) in enumerate([(d - 1, 1) for d in decode] + list(zip(contexts, chunks, strict=True))):
            slots.extend(units.token_slots(table_cpu, row, first, n))
        write = torch.tensor(slots, dtype=torch.int64, device=dev)
        chunk_slots = [write[off:off + n] for off, n in zip(offsets, chunks, strict=True)]
        cache = units.DecodeCache(table[:B], lens[:B], max(decode)) if B else None
        buffers = [[k.new_pool((c + n,), dev, self.gen) for n, c in zip(chunks, contexts, strict=True)]
                   for _ in range(model.num_layers)]
        moe_layer = [i for i, m in enumerate(self.is_moe) if m]
        counts = it.expert_token_counts
        ids = {
            layer: torch.from_numpy(expert_assignment(counts[j], T, s.top_k)).to(dev)
            for j, layer in enumerate(moe_layer)
        }
        heads, dv = k.attention_heads()
        attn = torch.empty(T, heads, dv, dtype=torch.bfloat16, device=dev)
        reduce = self.reduce

        def run(_: int) -> Any:
            hidden, positions_ = k.embed(token_ids, pos, self.embedding)
            for layer, lw in enumerate(self.layers):
                pool = self.pools[layer]
                hidden, q = k.attention_in(hidden, lw, positions_, pool, write)
                if cache is not None:
                    k.decode_attention(q, slice(0, B), lw, pool, cache, attn[:B])
                for context, off, n, slots_ in zip(buffers[layer], offsets, chunks, chunk_slots, strict=True):
                    k.prefill_attention(q, slice(off, off + n), lw, pool, slots_, context, attn[off:off + n])
                if self.is_moe[layer]:
                    hidden, h, weights, _ids, shared = k.attention_out(hidden, attn, lw, reduce)
                    hidden = k.moe(hidden, h, lw, weights, ids[layer], shared, reduce)
                else:
                    hidden = k.ffn_out(hidden, attn, lw, reduce)
            return k.head(hidden, rows, self.lm_head, self.final_norm)

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
    tensor_parallel: int = 1,
    kernels: str = "production",
) -> tuple[dict[tuple[str, str, int], float], dict[str, str]]:
    """Measured seconds of every iteration, keyed by (model, policy, iteration index), and the environment.
    With ``tensor_parallel`` > 1, ``models`` holds the TP shards and the work runs on that many GPUs."""
    if tensor_parallel > 1:
        return _execute_tensor_parallel(iterations, models, tensor_parallel, device, repeats=repeats, log=log,
                                        kernels=kernels)
    dev = torch.device(device)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(dev)
    return _execute_on(dev, iterations, models, repeats=repeats, log=log, kernels=kernels), environment(dev)


def _execute_on(
    dev: torch.device,
    iterations: list[ValidationIteration],
    models: dict[str, ModelSpec],
    *,
    repeats: int,
    log: Callable[[str], None],
    reduce: units.Reduce = units.no_reduce,
    kernels: str = "production",
) -> dict[tuple[str, str, int], float]:
    measured: dict[tuple[str, str, int], float] = {}
    for key, model in models.items():
        mine = [it for it in iterations if it.model_key == key]
        if not mine:
            continue
        started = time.perf_counter()
        pages = max(units.pages_for(_lengths(it)) for it in mine)
        on_device = ModelOnDevice(model, dev, pages + 16, reduce, kernels)
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
    return measured


def _all_reduce(partial: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(partial)
    return partial


def _tp_worker(
    rank: int, world: int, port: int, device_type: str, iterations: list[ValidationIteration],
    models: dict[str, ModelSpec], repeats: int, out_dir: str, kernels: str,
) -> None:
    """One TP rank: join the group (NCCL on GPU ``rank``; gloo on a CPU, for smoke runs), execute every
    iteration, write its timings as JSON. Rank 0 logs."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device_type == "cuda":
        dev = torch.device("cuda", rank)
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", rank=rank, world_size=world, device_id=dev)
    else:
        dev = torch.device("cpu")
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        warm = torch.ones(1024, device=dev, dtype=torch.bfloat16)
        dist.all_reduce(warm)  # the communicator exists before any graph capture
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

        def log(text: str) -> None:
            if rank == 0:
                print(text, flush=True)

        measured = _execute_on(dev, iterations, models, repeats=repeats, log=log, reduce=_all_reduce, kernels=kernels)
        rows = [[key, policy, index, seconds] for (key, policy, index), seconds in measured.items()]
        payload = {"measured": rows, "environment": environment(dev)}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(payload), encoding="utf-8")
    finally:
        dist.destroy_process_group()


def _execute_tensor_parallel(
    iterations: list[ValidationIteration],
    models: dict[str, ModelSpec],
    world: int,
    device: str,
    *,
    repeats: int,
    log: Callable[[str], None],
    kernels: str,
) -> tuple[dict[tuple[str, str, int], float], dict[str, str]]:
    device_type = torch.device(device).type
    if device_type == "cuda" and torch.cuda.device_count() < world:
        raise RuntimeError(f"tensor_parallel {world} needs {world} GPUs; this host has {torch.cuda.device_count()}")
    port = 29500 + os.getpid() % 1000
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_tp_worker, args=(world, port, device_type, iterations, models, repeats, out_dir, kernels),
                 nprocs=world, join=True)
        results = [json.loads(Path(out_dir, f"rank{r}.json").read_text(encoding="utf-8")) for r in range(world)]
    measured = {(k, p, int(i)): float(t) for k, p, i, t in results[0]["measured"]}
    for r, result in enumerate(results[1:], start=1):
        other = {(k, p, int(i)): float(t) for k, p, i, t in result["measured"]}
        gaps = [abs(other[key] / measured[key] - 1) for key in measured if key in other]
        if gaps:
            log(f"tp rank {r} vs rank 0: median |difference| {sorted(gaps)[len(gaps) // 2]:.2%}, max {max(gaps):.2%}")
    environment_0 = dict(results[0]["environment"])
    backend = "NCCL" if device_type == "cuda" else "gloo"
    environment_0["gpu_name"] = f"{world}x {environment_0['gpu_name']} (tensor parallel, {backend} all-reduce)"
    return measured, environment_0
