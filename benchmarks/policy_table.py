"""Every policy at decode batch 16 and 64, on FLAME-MoE-290M's recorded routing and on the generator fitted to it.

Decode batches are drawn as a decode batch is made: B tokens of as many different sequences as the trace has,
at distinct positions (``lynxsim.routing.compare.sample_batches``); the generator side routes exactly the same
(sequence, position) tokens with the shipped profile ``flame-moe-290m``, so the two columns differ only by the
router. Per policy and batch size it prints the mean distinct experts per MoE layer and the token-weighted
retained top-k probability mass (``lynxsim.policies.proxies``). Policies run with their defaults; those without
one get: lynx alpha=3, beta=2 (the published constants of the 64/128-expert Qwen3 models; FLAME-MoE has none),
vote budget=32 and prune keep=32 (half the experts). skip and prune are calibrated on the whole trace (or the
generator's logits of the same tokens).

    python benchmarks/policy_table.py [--data ../shared/data] [--batches 256] [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from lynxsim.policies import calibrate_if_needed, make
from lynxsim.policies.activity import distinct_experts
from lynxsim.policies.proxies import quality_proxies
from lynxsim.routing import SyntheticRouting
from lynxsim.routing.compare import sample_batches
from lynxsim.routing.fit import load_profile
from lynxsim.routing.flame import load_flame_csv_dir
from lynxsim.routing.profiles import profile_path

TOP_K = 6
BATCH_SIZES = (16, 64)
POLICIES: dict[str, dict[str, object]] = {
    "topk": {},
    "lynx": {"alpha": 3.0, "beta": 2},
    "oea": {},
    "skip": {},
    "topp": {},
    "prune": {"keep": 32},
    "capacity": {},
    "vote": {"budget": 32},
}


def policy_row(logits: np.ndarray, batches: np.ndarray, name: str, params: dict[str, object]) -> tuple[float, float]:
    """Mean distinct experts per layer and mean retained mass over ``batches`` of token indices (one stacked
    ``[layers, B, experts]`` call per batch, as the engine makes it)."""
    policy = calibrate_if_needed(make(name, **params), logits, TOP_K)
    experts = logits.shape[-1]
    distinct, mass = [], []
    for batch in batches:
        batch_logits = logits[:, batch, :]
        selection = policy.select(batch_logits, TOP_K)
        distinct.append(distinct_experts(selection.expert_ids, experts).mean())
        mass.append(quality_proxies(batch_logits, selection, TOP_K).retained_mass.mean())
    return float(np.mean(distinct)), float(np.mean(mass))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--batches", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    trace = load_flame_csv_dir(args.data / "routing_traces" / "flame_moe_290m")
    params = load_profile(profile_path("flame-moe-290m"))
    generated = SyntheticRouting(trace.num_layers, trace.num_experts, params, args.seed).logits(
        trace.sequence_ids, trace.positions
    )
    sequence_index = np.unique(trace.sequence_ids, return_inverse=True)[1].reshape(-1)
    rng = np.random.default_rng(args.seed)
    print(f"FLAME-MoE-290M ({trace.num_layers} MoE layers, {trace.num_experts} experts, top-{TOP_K}), "
          f"{args.batches} batches per size; trace vs fitted generator")
    print(f"{'policy':9} {'B':>3} | {'experts trace':>13} {'generator':>9} | {'mass trace':>10} {'generator':>9}")
    for size in BATCH_SIZES:
        batches = sample_batches(sequence_index, size, args.batches, rng)
        for name, policy_params in POLICIES.items():
            trace_row = policy_row(trace.logits, batches, name, policy_params)
            generator_row = policy_row(generated, batches, name, policy_params)
            print(f"{name:9} {size:>3} | {trace_row[0]:13.2f} {generator_row[0]:9.2f} | "
                  f"{trace_row[1]:10.3f} {generator_row[1]:9.3f}")


if __name__ == "__main__":
    main()
