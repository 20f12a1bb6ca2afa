"""Weight-read bandwidth of the routed-expert kernels on a GPU: fused Triton MoE vs torch grouped GEMM.

Runs on the device machine (CUDA, torch, triton; no pydantic needed: shapes are plain numbers here):

    python3 benchmarks/moe_bandwidth.py [--out DIR] [--models mixtral-8x7b,...] [--tune] [--attention]

For each model (Mixtral-8x7B, Qwen3-30B-A3B, OLMoE-1B-7B), decode batch T in {1, 16, 64, 256} and number of
active experts A (Mixtral 2/4/8; 128- and 64-expert models 8 ... E), it builds a routing in which exactly A
experts are used (token t takes experts S[(t*k + j) % A], j < k, of a random A-subset S, so the load is even;
infeasible when T*k < A), and for each implementation:

1. correctness: fresh random inputs, output poisoned with NaN, result vs the float32 ``moe_reference``
   (relative Frobenius error; must be finite and < 2e-2, the bf16 intermediate being the main term);
2. time: R calls rotating among weight copies (enough copies that >= 4x the 60 MB L2 is read between two uses
   of one copy) captured in one CUDA graph, warmed up, replayed ``--reps`` times between CUDA events; the
   per-call time is the median replay time / R (eager timing if capture fails; the ``mode`` column says);
3. bandwidth = A * expert_bytes / time, against the 4.2 TB/s device-to-device copy bandwidth (also measured
   here, ``copy_tbps`` row), as TB/s and percent.

``--tune`` also times each fused kernel alone over a grid of tiles (and split-K for the down GEMM) per
BLOCK_M, and reports the best combination as ``fused_best`` (with its config), next to ``fused`` (the
default: ``moe.TUNED`` where it has the shape, else the heuristic, given the routing hints). Writes ``moe_bandwidth.csv``
(and ``attention_decode.csv`` with ``--attention``) to ``--out`` (default ``$OUT`` or the current folder).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lynxsim.calib.kernels.moe import (  # noqa: E402
    MoeConfig,
    default_moe_config,
    fused_align,
    fused_down,
    fused_gate_up,
    moe_fused,
    moe_grouped_gemm,
    moe_reference,
)
from lynxsim.calib.kernels.weights import copies_to_defeat_l2  # noqa: E402

COPY_BW_REF_TBPS = 4.2  # H200 device-to-device copy, bytes read + written (KINDS.md, measured 4.3 TB/s)

# (hidden, expert ffn, experts, top-k, active-expert settings); source: lynxsim/models/catalog/*.yaml
MODELS = {
    "mixtral-8x7b": (4096, 14336, 8, 2, (2, 4, 8)),
    "qwen3-30b-a3b": (2048, 768, 128, 8, (8, 32, 64, 128)),
    "olmoe-1b-7b": (2048, 1024, 64, 8, (8, 16, 32, 64)),
}
BATCHES = (1, 16, 64, 256)
FIELDS = ["model", "hidden", "ffn", "experts", "top_k", "batch", "active_experts", "impl", "config", "time_us",
          "weight_bytes", "tbps", "pct_of_4p2", "rel_err", "mode", "error"]


def routing(T: int, k: int, E: int, A: int, gen: torch.Generator, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    subset = torch.randperm(E, generator=gen)[:A]
    j = torch.arange(T)[:, None] * k + torch.arange(k)[None, :]
    ids = subset[j % A].to(torch.int32)
    # shuffle each token's k choices so slot order is not tied to the expert order
    perm = torch.argsort(torch.rand(T, k, generator=gen), dim=1)
    ids = torch.gather(ids, 1, perm)
    w = torch.softmax(torch.randn(T, k, generator=gen), dim=-1)
    return w.to(device), ids.to(device)


def measure_copy_tbps(device: torch.device) -> float:
    n = 1 << 30  # 1 GiB source, 1 GiB destination
    src = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del src, dst
    return 2 * n / statistics.median(times) / 1e12


def time_calls(fn, R: int, reps: int) -> tuple[float, str]:
    """Median seconds per call of fn(i), i = 0..R-1, captured in one CUDA graph (eager if capture fails)."""
    if not torch.cuda.is_available():  # --dry-run on a CPU: one wall-clock pass, for checking the script
        t0 = time.perf_counter()
        for i in range(R):
            fn(i)
        return (time.perf_counter() - t0) / R, "cpu-dry-run"
    for i in range(R):
        fn(i)
    torch.cuda.synchronize()
    graph = None
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(R):
                fn(i)
        graph.replay()
        torch.cuda.synchronize()
        mode = "graph"
    except Exception:  # noqa: BLE001 - fall back to eager timing, reported in the table
        graph = None
        torch.cuda.synchronize()
        mode = "eager"

    def once():
        if graph is not None:
            graph.replay()
        else:
            for i in range(R):
                fn(i)

    for _ in range(2):
        once()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        once()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / R)
    return statistics.median(times), mode


def block_ms(m_e: int) -> list[int]:
    """BLOCK_M candidates for m_e tokens per active expert."""
    if m_e <= 16:
        return [16]
    if m_e <= 64:
        return [32, 64]
    return [64, 128]


def gate_up_tiles(bm: int) -> list[tuple[int, int, int, int]]:
    """(BLOCK_N, BLOCK_K, warps, stages) for the gate-up GEMM; shared memory per stage is
    BM*BK*2 + 2*BK*BN*2 bytes, kept under ~200 KB in all."""
    if bm == 16:
        tiles = [(32, 128, 4, 4), (32, 256, 4, 3), (64, 128, 4, 4), (64, 128, 4, 5), (64, 256, 4, 3),
                 (128, 128, 4, 3), (64, 64, 4, 5), (32, 128, 4, 6), (64, 256, 8, 3), (128, 128, 8, 3)]
    else:
        tiles = [(64, 128, 4, 3), (128, 64, 8, 4), (64, 64, 4, 4), (128, 128, 8, 3)]
    return [t for t in tiles if t[3] * (bm * t[1] * 2 + 2 * t[1] * t[0] * 2) <= 200_000]


def down_tiles(bm: int) -> list[tuple[int, int, int, int]]:
    if bm == 16:
        tiles = [(32, 128, 4, 4), (64, 128, 4, 4), (32, 256, 4, 3), (64, 256, 4, 3), (128, 128, 4, 3),
                 (64, 128, 4, 5), (16, 256, 4, 4), (128, 64, 4, 5), (128, 128, 8, 3), (64, 256, 8, 3)]
    else:
        tiles = [(64, 128, 4, 3), (128, 64, 8, 4), (64, 64, 4, 4), (128, 128, 8, 3)]
    return [t for t in tiles if t[3] * (bm * t[1] * 2 + t[1] * t[0] * 2) <= 200_000]


def tune_fused(xs, routes, w13s, w2s, copies, E, F, A, m_e, reps, log) -> MoeConfig | None:
    """Per-kernel search: for each BLOCK_M, the fastest gate-up tile and the fastest down tile x split-K,
    each timed alone (CUDA graph of R calls over the weight copies); returns the best combination."""
    H = xs[0].shape[1]
    R = len(xs)
    best = None
    for bm in block_ms(m_e):
        plans = [fused_align(xs[i], routes[i][0], routes[i][1], E, F, bm) for i in range(R)]
        base = MoeConfig(block_m=bm)
        gu_best = None
        for n, kk, w, st in gate_up_tiles(bm):
            cfg = replace(base, block_n1=n, block_k1=kk, warps1=w, stages1=st)
            try:
                t, _ = time_calls(lambda i, plans=plans, cfg=cfg: fused_gate_up(plans[i], xs[i], w13s[i % copies], cfg), R, reps)
            except Exception as exc:  # noqa: BLE001
                log(f"    gate_up m{bm} n{n} k{kk} w{w} s{st}: {type(exc).__name__}")
                continue
            log(f"    gate_up m{bm} n{n} k{kk} w{w} s{st}: {t * 1e6:8.1f} us {A * 2 * F * H * 2 / t / 1e12:6.3f} TB/s")
            if gu_best is None or t < gu_best[0]:
                gu_best = (t, (n, kk, w, st))
        dn_best = None
        for n, kk, w, st in down_tiles(bm):
            for split in (1, 2, 4, 8):
                if F // split < 2 * kk:
                    continue
                cfg = replace(base, block_n2=n, block_k2=kk, warps2=w, stages2=st, split_k=split)
                try:
                    t, _ = time_calls(lambda i, plans=plans, cfg=cfg: fused_down(plans[i], w2s[i % copies], cfg), R, reps)
                except Exception as exc:  # noqa: BLE001
                    log(f"    down m{bm} n{n} k{kk} w{w} s{st} x{split}: {type(exc).__name__}")
                    break
                log(f"    down m{bm} n{n} k{kk} w{w} s{st} x{split}: {t * 1e6:8.1f} us "
                    f"{A * F * H * 2 / t / 1e12:6.3f} TB/s")
                if dn_best is None or t < dn_best[0]:
                    dn_best = (t, (n, kk, w, st, split))
        if gu_best and dn_best:
            (n1, k1, w1, s1), (n2, k2, w2, s2, sp) = gu_best[1], dn_best[1]
            cfg = MoeConfig(block_m=bm, block_n1=n1, block_k1=k1, warps1=w1, stages1=s1, block_n2=n2,
                            block_k2=k2, warps2=w2, stages2=s2, split_k=sp)
            total = gu_best[0] + dn_best[0]
            if best is None or total < best[0]:
                best = (total, cfg)
    return best[1] if best else None


def run_model(name: str, device: torch.device, args, writer, rows: list[dict], csv_file=None) -> None:
    H, F, E, k, actives = MODELS[name]
    expert_bytes = 3 * H * F * 2
    min_a = min(actives)
    copies = max(2, copies_to_defeat_l2(min_a * expert_bytes))
    if device.type != "cuda":
        copies = 2  # --dry-run
    gen_w = torch.Generator(device=device)
    gen_w.manual_seed(1)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    w13s, w2s = [], []
    for _ in range(copies):
        w13 = torch.empty(E, 2 * F, H, device=device).normal_(0, 0.02, generator=gen_w).to(torch.bfloat16)
        w2 = torch.empty(E, H, F, device=device).normal_(0, 0.02, generator=gen_w).to(torch.bfloat16)
        w13s.append(w13)
        w2s.append(w2)
        sync()
    print(f"# {name}: H={H} F={F} E={E} k={k} expert={expert_bytes / 1e6:.1f} MB copies={copies}", flush=True)
    gen = torch.Generator()
    gen.manual_seed(2)
    for T in BATCHES:
        for A in actives:
            if not (k <= A <= min(E, T * k)):
                continue
            P = T * k
            R = max(copies, 4)
            xs = [torch.randn(T, H, generator=gen).to(device, torch.bfloat16) for _ in range(R)]
            routes = [routing(T, k, E, A, gen, device) for _ in range(R)]
            outs = [torch.empty(T, H, device=device, dtype=torch.bfloat16) for _ in range(R)]
            m_e = math.ceil(P / A)
            default_cfg = default_moe_config(P, E, H, F, active_experts=A, max_tokens_per_expert=m_e)
            impls: list[tuple[str, object]] = [("grouped_gemm", None), ("fused", default_cfg)]
            if args.tune and (not args.tune_models or name in args.tune_models.split(",")):
                tuned = None
                try:
                    tuned = tune_fused(xs, routes, w13s, w2s, copies, E, F, A, m_e, args.reps,
                                       (lambda m: print(m, flush=True)) if args.verbose else (lambda m: None))
                except Exception:  # noqa: BLE001
                    traceback.print_exc()
                if tuned is not None:
                    impls.append(("fused_best", tuned))
            for label, cfg in impls:
                def call(i: int, cfg=cfg, label=label, xs=xs, routes=routes, outs=outs):
                    c = i % copies
                    w, ids = routes[i]
                    if label == "grouped_gemm":
                        return moe_grouped_gemm(xs[i], w13s[c], w2s[c], w, ids, out=outs[i])
                    return moe_fused(xs[i], w13s[c], w2s[c], w, ids, config=cfg, out=outs[i])

                cfg_used = cfg
                row = dict(model=name, hidden=H, ffn=F, experts=E, top_k=k, batch=T, active_experts=A, impl=label,
                           config=cfg_used.short() if cfg_used else "", time_us="", weight_bytes=A * expert_bytes,
                           tbps="", pct_of_4p2="", rel_err="", mode="", error="")
                try:
                    # correctness on fresh inputs with a poisoned output
                    x_chk = torch.randn(T, H, generator=gen).to(device, torch.bfloat16)
                    w_chk, ids_chk = routing(T, k, E, A, gen, device)
                    o_chk = torch.full((T, H), float("nan"), device=device, dtype=torch.bfloat16)
                    if label == "grouped_gemm":
                        moe_grouped_gemm(x_chk, w13s[0], w2s[0], w_chk, ids_chk, out=o_chk)
                    else:
                        moe_fused(x_chk, w13s[0], w2s[0], w_chk, ids_chk, config=cfg, out=o_chk)
                    ref = moe_reference(x_chk, w13s[0], w2s[0], w_chk, ids_chk)
                    finite = bool(torch.isfinite(o_chk).all())
                    err = ((o_chk.float() - ref).norm() / ref.norm()).item() if finite else float("nan")
                    row["rel_err"] = f"{err:.2e}"
                    if not finite or not err < 2e-2:
                        row["error"] = "WRONG" if finite else "NONFINITE"
                    t, mode = time_calls(call, R, args.reps)
                    row["time_us"] = f"{t * 1e6:.1f}"
                    bw = A * expert_bytes / t / 1e12
                    row["tbps"] = f"{bw:.3f}"
                    row["pct_of_4p2"] = f"{100 * bw / COPY_BW_REF_TBPS:.1f}"
                    row["mode"] = mode
                except Exception as exc:  # noqa: BLE001 - recorded in the table, the sweep goes on
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                    traceback.print_exc()
                    sync()
                writer.writerow(row)
                csv_file.flush()
                rows.append(row)
                print_row(row)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def print_row(r: dict) -> None:
    print(f"{r['model']:>14} T={r['batch']:>4} A={r['active_experts']:>3} {r['impl']:>12} {r['time_us']:>9} us "
          f"{r['tbps']:>6} TB/s {r['pct_of_4p2']:>5}% err={r['rel_err']} {r['mode']} {r['config']} {r['error']}",
          flush=True)


def run_attention(device: torch.device, out_dir: Path) -> None:
    """Decode attention (Triton paged split-KV) for Mixtral's shape: correctness and KV-read bandwidth."""
    from lynxsim.calib.kernels.attention import attention_decode, attention_decode_reference, make_paged_kv_cache

    Hq, Hkv, D = 32, 8, 128
    gen = torch.Generator()
    gen.manual_seed(3)
    rows = []
    for B in (1, 16, 64, 256):
        for L in (512, 4096):
            lens = torch.randint(max(1, L // 2), L + 1, (B,), generator=gen).tolist()
            caches = [make_paged_kv_cache(lens, Hkv, D, device=device, seed=s) for s in range(2)]
            q = torch.randn(B, Hq, D, generator=gen).to(device, torch.bfloat16)
            c0 = caches[0]
            sub = type(c0)(c0.k_cache, c0.v_cache, c0.block_table[:4], c0.seq_lens[:4], c0.max_seq_len)
            ref = attention_decode_reference(q[:4], sub, dtype=torch.float32)
            o = torch.full((B, Hq, D), float("nan"), device=device, dtype=torch.bfloat16)
            attention_decode(q, caches[0], out=o)
            err = ((o[:4].float() - ref).norm() / ref.norm()).item()
            t, mode = time_calls(lambda i, q=q, caches=caches: attention_decode(q, caches[i % 2]), 4, 20)
            kvb = caches[0].kv_bytes(lens)
            r = dict(batch=B, max_len=L, mean_len=sum(lens) / B, kv_bytes=kvb, time_us=f"{t * 1e6:.1f}",
                     tbps=f"{kvb / t / 1e12:.3f}", rel_err=f"{err:.2e}", mode=mode)
            rows.append(r)
            print(f"attention decode B={B:>4} L<={L:>5} {t * 1e6:8.1f} us {kvb / t / 1e12:6.3f} TB/s err={err:.2e}",
                  flush=True)
    with open(out_dir / "attention_decode.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def run_model_dry(args) -> None:
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    with open(out_dir / "moe_bandwidth_dry.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for name in list(MODELS):
            run_model(name, torch.device("cpu"), args, writer, rows, f)
    bad = [r for r in rows if r["error"]]
    print(f"dry run: {len(rows)} rows, {len(bad)} with errors")
    if bad:
        sys.exit(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--tune", action="store_true", help="per-kernel tile search; adds fused_best rows")
    ap.add_argument("--tune-models", default="", help="tune only these models (comma-separated; default all)")
    ap.add_argument("--attention", action="store_true")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET=1): checks the script")
    args = ap.parse_args()
    if args.dry_run:
        global BATCHES
        MODELS.clear()
        MODELS.update({"tiny-8": (256, 512, 4, 2, (2,))} if args.tune else
                      {"tiny-8": (64, 128, 8, 2, (2, 4)), "tiny-16": (32, 64, 16, 4, (4, 16))})
        BATCHES = (1,) if args.tune else (1, 8)
        args.reps = 1
        run_model_dry(args)
        return
    if not torch.cuda.is_available():
        sys.exit("moe_bandwidth: needs a CUDA GPU")
    device = torch.device("cuda")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    props = torch.cuda.get_device_properties(device)
    import triton

    print(f"# {props.name} SMs={props.multi_processor_count} torch={torch.__version__} triton={triton.__version__} "
          f"grouped_mm={hasattr(torch, '_grouped_mm')}", flush=True)
    copy_tbps = measure_copy_tbps(device)
    print(f"# device-to-device copy: {copy_tbps:.3f} TB/s (read + write)", flush=True)
    t0 = time.time()
    rows: list[dict] = []
    with open(out_dir / "moe_bandwidth.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerow(dict(model="copy_tbps", tbps=f"{copy_tbps:.3f}", impl="torch_copy",
                             pct_of_4p2=f"{100 * copy_tbps / COPY_BW_REF_TBPS:.1f}"))
        for j, name in enumerate(args.models.split(",")):
            run_model(name, device, args, writer, rows, f)
            print(f"# {name} done at {time.time() - t0:.0f} s", flush=True)
            if j == 0 and args.attention:  # early, so a time limit on the sweep cuts the less important rows
                try:
                    run_attention(device, out_dir)
                except Exception:  # noqa: BLE001
                    traceback.print_exc()
    # final table: Mixtral first, one line per (T, A) with each implementation side by side
    print("\nmodel          T    A   grouped_gemm us (TB/s, %)   fused us (TB/s, %)   fused_best us (TB/s, %)")
    key = {}
    for r in rows:
        key.setdefault((r["model"], r["batch"], r["active_experts"]), {})[r["impl"]] = r
    for (m, T, A), d in key.items():
        cells = []
        for impl in ("grouped_gemm", "fused", "fused_best"):
            r = d.get(impl)
            cells.append(f"{r['time_us']:>8} ({r['tbps']:>5}, {r['pct_of_4p2']:>5}%)" + ("!" if r["error"] else "")
                         if r else " " * 24)
        print(f"{m:<14}{T:>4} {A:>4}  " + "  ".join(cells))


if __name__ == "__main__":
    main()
