"""The predicted decode step at batch 16 of the paper's deployments, under top-k and Lynx, from whatever kernel
tables the H200 profile holds: the number that moves when the tables change (issue "production-grade kernels").

Each deployment is simulated as a disaggregated decode instance (``max_num_seqs`` 16, synthetic routing, enough
load that the batch stays full); the step latency is the mean over pure-decode iterations of exactly 16
sequences, split into attention, dense (non-expert), MoE, communication and overhead. Run it before and after a
recalibration and keep both outputs (``--json``).

    python benchmarks/decode_step.py [--json OUT.json] [--requests 120]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lynxsim.config import ExperimentConfig
from lynxsim.runner import run_experiment

DEPLOYMENTS = (
    ("qwen3-30b-a3b", 1),
    ("mixtral-8x7b", 2),
    ("qwen2-57b-a14b", 2),
    ("deepseek-coder-v2", 4),
)
BATCH = 16
PARTS = ("attention_s", "dense_s", "moe_s", "communication_s", "overhead_s")


def decode_step(model: str, tensor_parallel: int, requests: int) -> dict[str, object]:
    """Mean latency and its parts of the batch-16 pure-decode iterations of one deployment, per policy."""
    config = ExperimentConfig.model_validate({
        "name": f"decode-step-{model}",
        "model": model,
        "hardware": "h200",
        "workload": {
            "arrival": {"kind": "poisson", "rate_per_s": 50.0},
            "prompt_tokens": {"kind": "fixed", "tokens": 512},
            "output_tokens": {"kind": "fixed", "tokens": 256},
        },
        "serving": {"max_num_seqs": BATCH, "max_num_batched_tokens": 2048, "chunked_prefill": True},
        "deployment": {"mode": "disaggregated", "prefill_instances": 1, "decode_instances": 1,
                       "parallelism": {"tensor_parallel": tensor_parallel}},
        "policies": [{"name": "topk"}, {"name": "lynx"}],
        "simulation": {"seed": 0, "num_requests": requests},
        "output": {"figures": False},
    })
    result = run_experiment(config)
    row: dict[str, object] = {"model": model, "tensor_parallel": tensor_parallel,
                              "cost_model": result.setup.cost_model.source}
    for run in result.runs:
        it = run.iterations
        full = it[(it["pure_decode"]) & (it["decode_tokens"] == BATCH)]
        row[run.label] = {part: float(full[part].mean()) for part in ("latency_s", *PARTS)}
        row[run.label]["iterations"] = int(len(full))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--requests", type=int, default=120)
    args = parser.parse_args()
    rows = [decode_step(model, tp, args.requests) for model, tp in DEPLOYMENTS]
    print(f"{'deployment':<24} {'policy':<5} {'step ms':>8} " + " ".join(f"{p[:-2]:>9}" for p in PARTS)
          + "  cost model")
    for row in rows:
        for policy in ("topk", "lynx"):
            parts = row[policy]
            assert isinstance(parts, dict)
            print(f"{row['model']} TP{row['tensor_parallel']:<8} {policy:<5} {parts['latency_s'] * 1e3:8.2f} "
                  + " ".join(f"{parts[p] * 1e3:9.2f}" for p in PARTS) + f"  {row['cost_model']}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
