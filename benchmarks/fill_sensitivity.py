"""How much the fill-in of unrecorded logits changes Lynx's result, on FLAME-MoE-290M and on a known truth.

The FLAME-MoE trace keeps each token's top-6 of 64 experts; the other 58 logits are filled in by a strategy
(``lynxsim.routing.trace_format``). Top-k never looks at them, Lynx does.

Part 1 draws random decode batches of B distinct recorded tokens (any sequence and position: the trace holds
only 8 sequences, so a batch of 16 or 64 necessarily mixes positions of one sequence) and reports, per fill and
batch size, the mean distinct experts per MoE layer under top-k and under Lynx (alpha=3, beta=2: the published
constants of the 64- and 128-expert Qwen3 models), their ratio, Lynx's quality proxies against top-k of the
same filled logits, and how many experts per layer Lynx keeps that no token of the batch recorded (chosen only
through filled values). Every fill sees the same batches. Then Lynx's distinct experts per layer at B=16.

Part 2 asks which fill is closest to the truth where the truth is known: lynxsim's synthetic router (Gaussian
logits, full softmax over 64 experts) at several confidences spanning FLAME's top-6 mass (0.15-0.57), cut to
its top-6 and filled in again; "full" is Lynx on the complete logits.

    python benchmarks/fill_sensitivity.py [--data ../shared/data] [--batches 200] [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from lynxsim.policies import Policy, make
from lynxsim.policies.activity import distinct_experts
from lynxsim.policies.proxies import quality_proxies
from lynxsim.routing import SyntheticRouting, SyntheticRoutingParams
from lynxsim.routing.flame import read_flame_csv_dir
from lynxsim.routing.trace_format import FILL_STRATEGIES, fill_logits

TOP_K = 6
NUM_EXPERTS = 64
BATCH_SIZES = (16, 64)
SYNTHETIC_CONFIDENCES = (0.4, 0.7, 1.0, 1.4, 2.0)


def lynx_stats(logits: np.ndarray, batches: list[np.ndarray], lynx: Policy) -> dict[str, np.ndarray]:
    """Per-layer means over ``batches`` (token index arrays) of Lynx's distinct experts and quality proxies,
    and of top-k's distinct experts, on ``logits`` ``[layers, tokens, experts]``."""
    topk = make("topk")
    rows: dict[str, list[np.ndarray]] = {k: [] for k in ("topk", "lynx", "retained", "top1", "changed", "new")}
    for tokens in batches:
        x = logits[:, tokens, :]
        reference = topk.select(x, TOP_K).expert_ids
        chosen = lynx.select(x, TOP_K)
        rows["topk"].append(distinct_experts(reference, NUM_EXPERTS))
        rows["lynx"].append(distinct_experts(chosen.expert_ids, NUM_EXPERTS))
        proxies = quality_proxies(x, chosen, TOP_K)
        rows["retained"].append(proxies.retained_mass)
        rows["top1"].append(proxies.top1_kept)
        rows["changed"].append(proxies.assignments_changed)
        recorded = np.zeros((x.shape[0], NUM_EXPERTS), dtype=bool)
        np.put_along_axis(recorded, reference.reshape(x.shape[0], -1), True, axis=-1)
        used = np.zeros_like(recorded)
        np.put_along_axis(used, chosen.expert_ids.reshape(x.shape[0], -1), True, axis=-1)
        rows["new"].append((used & ~recorded).sum(axis=-1))
    return {k: np.mean(v, axis=0) for k, v in rows.items()}


def flame_tables(data: Path, num_batches: int, seed: int, lynx: Policy) -> None:
    recording = read_flame_csv_dir(data / "routing_traces" / "flame_moe_290m")
    num_layers, num_tokens, _ = recording.topk_ids.shape
    rng = np.random.default_rng(seed)
    batches = {b: [rng.choice(num_tokens, size=b, replace=False) for _ in range(num_batches)] for b in BATCH_SIZES}
    print(f"Part 1. FLAME-MoE-290M: {num_layers} MoE layers, {num_tokens} tokens, {num_batches} batches per size; "
          "means over layers and batches")
    header = (f"{'fill':8} {'B':>3} {'topk':>6} {'lynx':>6} {'ratio':>6} {'retained':>9} {'top1':>6} "
              f"{'changed':>8} {'unrecorded kept':>15}")
    print(header)
    print("-" * len(header))
    per_layer = {}
    for fill in FILL_STRATEGIES:
        logits = recording.filled(fill).logits
        for b in BATCH_SIZES:
            s = lynx_stats(logits, batches[b], lynx)
            topk_mean, lynx_mean = s["topk"].mean(), s["lynx"].mean()
            print(f"{fill:8} {b:>3} {topk_mean:>6.2f} {lynx_mean:>6.2f} {lynx_mean / topk_mean:>6.3f} "
                  f"{s['retained'].mean():>9.4f} {s['top1'].mean():>6.3f} {s['changed'].mean():>8.3f} "
                  f"{s['new'].mean():>15.2f}")
            if b == BATCH_SIZES[0]:
                per_layer[fill] = s
    print(f"\nLynx distinct experts per MoE layer at B={BATCH_SIZES[0]} (top-k: "
          f"{' '.join(f'{v:.1f}' for v in per_layer[FILL_STRATEGIES[0]]['topk'])})")
    print(f"{'fill':8} " + " ".join(f"{'L' + str(layer):>5}" for layer in recording.layer_ids))
    for fill, s in per_layer.items():
        print(f"{fill:8} " + " ".join(f"{v:>5.1f}" for v in s["lynx"]))


def synthetic_table(num_batches: int, seed: int, lynx: Policy) -> None:
    print("\nPart 2. Synthetic router (64 experts, 4 layers, 64 requests x 32 positions), cut to top-6 and refilled; "
          f"Lynx distinct experts (retained mass), {num_batches // 2} batches per size")
    fills: tuple[str, ...] = ("full", *FILL_STRATEGIES)
    header = f"{'confidence':>10} {'top6 mass':>9} {'p6/p5':>6} {'B':>3} " + " ".join(f"{f:>15}" for f in fills)
    print(header)
    print("-" * len(header))
    requests = np.repeat(np.arange(64, dtype=np.int64), 32)
    positions = np.tile(np.arange(32, dtype=np.int64), 64)
    for confidence in SYNTHETIC_CONFIDENCES:
        router = SyntheticRouting(4, NUM_EXPERTS, SyntheticRoutingParams(confidence_mean=confidence), seed=seed)
        x = router.logits(requests, positions).astype(np.float64)
        log_p = x - x.max(axis=-1, keepdims=True)
        log_p -= np.log(np.exp(log_p).sum(axis=-1, keepdims=True))
        ids = np.argsort(-log_p, axis=-1, kind="stable")[..., :TOP_K]
        probs = np.exp(np.take_along_axis(log_p, ids, axis=-1))
        variants = {"full": log_p.astype(np.float32)}
        for fill in FILL_STRATEGIES:
            variants[fill] = fill_logits(ids, probs.astype(np.float32), NUM_EXPERTS, fill=fill,
                                         sequence_ids=requests, positions=positions, layer_ids=tuple(range(4)))
        rng = np.random.default_rng(seed)
        for b in BATCH_SIZES:
            batches = [rng.choice(requests.size, size=b, replace=False) for _ in range(num_batches // 2)]
            cells = []
            for variant in fills:
                s = lynx_stats(variants[variant], batches, lynx)
                cells.append(f"{s['lynx'].mean():6.2f} ({s['retained'].mean():.3f})")
            print(f"{confidence:>10.1f} {probs.sum(-1).mean():>9.3f} {np.median(probs[..., 5] / probs[..., 4]):>6.3f} "
                  f"{b:>3} " + " ".join(f"{c:>15}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    lynx = make("lynx", alpha=3.0, beta=2)
    flame_tables(args.data, args.batches, args.seed, lynx)
    synthetic_table(args.batches, args.seed, lynx)


if __name__ == "__main__":
    main()
