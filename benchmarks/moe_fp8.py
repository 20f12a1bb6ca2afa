"""FP8 (W8A8) against bf16 routed experts on one GPU: correctness, time and weight bandwidth, and the K tile.

Runs on the device machine (CUDA, torch, triton; no pydantic needed):

    python3 benchmarks/moe_fp8.py [--models mixtral-8x7b,qwen3-30b-a3b] [--reps 10]

For each model shape and batch T, tokens are routed at random (top-k of random logits, so the active experts
are what a router gives at that batch), and three implementations run on the same routing:

* ``bf16``: ``moe_fused`` (the production bf16 kernel, default tiles);
* ``fp8``: ``moe_fused_fp8`` with its default tiles (the bf16 heuristic's, K tiles twice as wide: the same bytes
  per pipeline stage);
* ``fp8_bf16_tiles``: ``moe_fused_fp8`` with exactly the bf16 tiles (the alternative the default was chosen over).

Correctness first (fresh inputs, output poisoned with NaN): relative Frobenius error against ``moe_reference``
with the FP8 weights dequantized and the activations rounded through e4m3 as the kernel rounds them (the same
function, so only float32 summation order and rare e4m3 rounding ties differ), and against the bf16 weights'
reference (the quantization error itself). Then time: calls rotating among weight copies (>= 4x the 60 MB L2 read
between two uses of one copy) captured in one CUDA graph, the median of ``--reps`` replays per call; bandwidth =
active experts x expert bytes / time. Prints one row per (model, T, implementation).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lynxsim.calib.kernels.moe import (  # noqa: E402
    default_moe_config,
    moe_fused,
    moe_fused_fp8,
    moe_reference,
    quantize_weights_fp8,
)
from lynxsim.calib.kernels.weights import copies_to_defeat_l2  # noqa: E402
from lynxsim.calib.timing import invocations_for, time_callable  # noqa: E402

# (hidden, expert FFN width, experts, top-k) from the catalog (lynxsim/models/catalog/*.yaml)
MODELS = {"mixtral-8x7b": (4096, 14336, 8, 2), "qwen3-30b-a3b": (2048, 768, 128, 8)}
BATCHES = (1, 8, 64, 256, 1024)


def routing(T: int, E: int, k: int, gen: torch.Generator, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.randn(T, E, generator=gen, device=device)
    weights, ids = torch.topk(torch.softmax(logits, -1), k)
    return (weights / weights.sum(-1, keepdim=True)).float(), ids.to(torch.int32)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out - ref).norm() / ref.norm()).item()


def run_model(name: str, device: torch.device, reps: int) -> None:
    H, F, E, k = MODELS[name]
    gen = torch.Generator(device=device).manual_seed(5)
    expert_bf16 = 3 * H * F * 2
    copies = min(16, max(2, copies_to_defeat_l2(k * expert_bf16 / 2)))
    w13s, w2s, q13s, q2s = [], [], [], []
    for _ in range(copies):
        w13 = (torch.randn(E, 2 * F, H, generator=gen, device=device) * 0.02).bfloat16()
        w2 = (torch.randn(E, H, F, generator=gen, device=device) * 0.02).bfloat16()
        w13s.append(w13)
        w2s.append(w2)
        q13s.append(quantize_weights_fp8(w13))
        q2s.append(quantize_weights_fp8(w2))
    for T in BATCHES:
        x = torch.randn(T, H, generator=gen, device=device).bfloat16()
        w, ids = routing(T, E, k, gen, device)
        active = int(torch.unique(ids).numel())
        cfg_bf16 = default_moe_config(T * k, E, H, F)
        impls = {
            "bf16": lambda i, x=x, w=w, ids=ids: moe_fused(x, w13s[i % copies], w2s[i % copies], w, ids),
            "fp8": lambda i, x=x, w=w, ids=ids: moe_fused_fp8(x, *q13s[i % copies], *q2s[i % copies], w, ids),
            "fp8_bf16_tiles": lambda i, x=x, w=w, ids=ids, c=cfg_bf16: moe_fused_fp8(
                x, *q13s[i % copies], *q2s[i % copies], w, ids, config=c),
        }
        (q13, s13), (q2, s2) = q13s[0], q2s[0]
        ref_fp8 = moe_reference(x, q13, q2, w, ids, torch.float64, w13_scale=s13, w2_scale=s2)
        ref_bf16 = moe_reference(x, w13s[0], w2s[0], w, ids, torch.float64)
        for impl, fn in impls.items():
            out = torch.full((T, H), float("nan"), dtype=torch.bfloat16, device=device)
            out.copy_(fn(0))
            err_mirror = rel_err(out, ref_fp8) if impl != "bf16" else rel_err(out, ref_bf16)
            err_bf16 = rel_err(out, ref_bf16)
            wbytes = active * (expert_bf16 if impl == "bf16" else expert_bf16 // 2)
            n = invocations_for(wbytes / 4.0e12, copies)
            timing = time_callable(fn, invocations=n, device=device, repeats=reps)
            print(f"{name:14s} T={T:5d} active={active:3d} {impl:15s} {timing.median_s * 1e6:9.1f} us "
                  f"{wbytes / timing.median_s / 1e12:5.2f} TB/s  err(own ref) {err_mirror:.2e}  "
                  f"err(bf16 ref) {err_bf16:.2e}  spread {timing.spread:.1%}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    device = torch.device("cuda")
    print(f"GPU: {torch.cuda.get_device_name(device)}, torch {torch.__version__}", flush=True)
    for name in args.models.split(","):
        run_model(name, device, args.reps)
        torch.cuda.empty_cache()  # the model's weight copies are gone with run_model's frame


if __name__ == "__main__":
    main()
