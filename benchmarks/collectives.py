"""Time NCCL all-reduce and all-to-all between the GPUs of one host, for the cost model's interconnect figures.

Tensor parallelism all-reduces each layer's activations (tokens x hidden x 2 bytes) twice per layer; expert
parallelism moves tokens with all-to-alls. This measures both at the message sizes decode and prefill produce and
fits ``time = latency + bytes_on_the_wire / bandwidth`` (a ring all-reduce puts ``2 (g-1)/g`` of the buffer on
each GPU's link, an all-to-all ``(g-1)/g``), which is the form ``lynxsim/parallel.py`` prices them with.

    torchrun --nproc_per_node=2 benchmarks/collectives.py --out collectives.csv

CUDA events around 50 back-to-back collectives after 10 warm-ups, median of 7 such runs, bf16 buffers of random
data. Leaves NCCL's environment as the machine sets it (NVLink multicast stays off). With ``--graph`` the 50
collectives are captured in one CUDA graph and the graph is replayed (a served decode iteration is a graph: no
per-call CPU launch), which is the latency tensor parallelism pays inside an iteration.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics

import torch
import torch.distributed as dist

SIZES_BYTES = [2**p for p in range(13, 29)]  # 8 KiB .. 256 MiB
CALLS = 50
RUNS = 7


def time_collective(op: str, numel: int, world: int, graph: bool) -> float:
    """Median seconds of one collective on a bf16 buffer of ``numel`` elements (launched one by one, or
    replayed from a CUDA graph of ``CALLS`` of them)."""
    data = torch.randn(numel, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(data)

    def once() -> None:
        if op == "all_reduce":
            dist.all_reduce(data)
        else:
            dist.all_to_all_single(out, data)

    for _ in range(10):
        once()
    torch.cuda.synchronize()
    captured = None
    if graph:
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            for _ in range(CALLS):
                once()
        captured.replay()
        torch.cuda.synchronize()
    samples = []
    for _ in range(RUNS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        dist.barrier()
        torch.cuda.synchronize()
        start.record()
        if captured is not None:
            captured.replay()
        else:
            for _ in range(CALLS):
                once()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / CALLS)
    return statistics.median(samples)


def fit(rows: list[dict[str, float]], op: str, world: int) -> tuple[float, float]:
    """Least-squares (latency_s, bandwidth_bytes_per_s) of time = latency + wire_bytes / bandwidth."""
    factor = 2 * (world - 1) / world if op == "all_reduce" else (world - 1) / world
    xs = [r["bytes"] * factor for r in rows if r["op"] == op]
    ys = [r["time_s"] for r in rows if r["op"] == op]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    return mean_y - slope * mean_x, 1.0 / slope


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="collectives.csv")
    parser.add_argument("--graph", action="store_true", help="replay the collectives from one CUDA graph")
    args = parser.parse_args()
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    rows = []
    for op in ("all_reduce", "all_to_all"):
        for size in SIZES_BYTES:
            seconds = time_collective(op, size // 2, world, args.graph)
            rows.append({"op": op, "gpus": world, "bytes": size, "time_s": seconds, "graph": args.graph})
            if rank == 0:
                print(f"{op:10} {size:>10} B  {seconds * 1e6:9.1f} us  {size / seconds / 1e9:7.1f} GB/s", flush=True)
    if rank == 0:
        with open(args.out, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["op", "gpus", "bytes", "time_s", "graph"])
            writer.writeheader()
            writer.writerows(rows)
        for op in ("all_reduce", "all_to_all"):
            small = [r for r in rows if r["op"] == op and r["bytes"] <= 2**16]
            latency_small = min(r["time_s"] for r in small)
            latency, bandwidth = fit([r for r in rows if r["bytes"] >= 2**20], op, world)
            print(f"{op}: smallest-message time {latency_small * 1e6:.1f} us; fit over >= 1 MiB: latency "
                  f"{latency * 1e6:.1f} us, bandwidth {bandwidth / 1e9:.1f} GB/s per GPU and direction", flush=True)
        print(torch.cuda.get_device_name(0), torch.__version__, torch.version.cuda, flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
