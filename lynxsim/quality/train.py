"""Training one model from a seed: the same seed, corpus, recipe and software give the same weights.

Determinism: every random draw comes from generators seeded from ``TrainConfig.seed`` (weights: the global
torch generator seeded before the model is built; batches: a CPU generator of their own), and
``torch.use_deterministic_algorithms`` is on, with cuBLAS given a fixed workspace
(``CUBLAS_WORKSPACE_CONFIG=:4096:8``, which it needs for reproducible results). Mixed precision is bf16
autocast on a GPU, float32 on a CPU; the router always runs in float32.

Each step's batch holds ``TrainConfig.text_sequences`` windows of prose and the rest of code, at
uniformly drawn offsets of each source's training part, so both sources are seen in a fixed proportion
whatever their sizes.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F

from lynxsim.quality.checkpoint import Checkpoint
from lynxsim.quality.corpus import Corpus
from lynxsim.quality.model import MoELanguageModel
from lynxsim.quality.shapes import MoEShape, TrainConfig

LOG_EVERY_STEPS = 100
HELD_OUT_EVERY_STEPS = 200  # the held-out loss in the log shows when the model starts to memorize the 1 MB of prose
HELD_OUT_WINDOWS = 64  # per source, for the held-out loss the checkpoint records


def make_deterministic() -> None:
    """Settings under which a training run is bit-reproducible on the same hardware and software."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)  # also what makes cuDNN's attention backward deterministic
    torch.backends.cudnn.benchmark = False


def autocast(device: torch.device) -> AbstractContextManager[Any]:
    """bf16 autocast on a GPU; plain float32 elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warm-up to ``peak_lr`` (over ``warmup_steps``, at most a fifth of the run), then cosine decay to
    ``final_lr_fraction * peak_lr`` at the last step."""
    warmup = min(config.warmup_steps, max(1, config.steps // 5))
    if step < warmup:
        return config.peak_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, config.steps - warmup)
    floor = config.final_lr_fraction
    return config.peak_lr * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def sample_batch(corpus: Corpus, config: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """int64 ``[batch_sequences, seq_len + 1]`` windows (inputs and shifted targets), prose rows first."""
    rows = []
    for name, count in (("text", config.text_sequences), ("code", config.batch_sequences - config.text_sequences)):
        data = torch.from_numpy(corpus.source(name).train)
        starts = torch.randint(0, data.numel() - config.seq_len - 1, (count,), generator=generator)
        rows.append(torch.stack([data[s : s + config.seq_len + 1] for s in starts.tolist()]))
    return torch.cat(rows).long()


def train_model(
    shape: MoEShape,
    config: TrainConfig,
    corpus: Corpus,
    device: torch.device,
    log: Callable[[str], None] = print,
) -> Checkpoint:
    """Train ``shape`` on ``corpus`` with ``config``; the checkpoint's record holds the losses and timings."""
    make_deterministic()
    torch.manual_seed(config.seed)
    model = MoELanguageModel(shape).to(device)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.peak_lr,
        betas=(0.9, 0.95),
        fused=device.type == "cuda",
    )
    batches = torch.Generator().manual_seed(config.seed)
    log(f"{shape.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {config.steps} steps "
        f"of {config.batch_sequences} x {config.seq_len} tokens on {device}")
    start_s = time.perf_counter()
    loss_value = aux_value = float("nan")
    curve: list[dict[str, float]] = []
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        batch = sample_batch(corpus, config, batches).to(device, non_blocking=True)
        with autocast(device):
            out = model(batch[:, :-1])
            loss = F.cross_entropy(out.logits.float().flatten(0, 1), batch[:, 1:].flatten())
        total = loss + config.aux_loss_coef * out.aux_loss
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        if step % LOG_EVERY_STEPS == 0 or step == config.steps - 1:
            loss_value, aux_value = loss.item(), out.aux_loss.item()
            log(f"step {step:5d}  loss {loss_value:.4f}  aux {aux_value:.4f}  lr {learning_rate(step, config):.2e}  "
                f"{time.perf_counter() - start_s:7.1f} s")
        if (step + 1) % HELD_OUT_EVERY_STEPS == 0 and step + 1 < config.steps:
            curve.append({"step": step + 1, **held_out_loss(model, corpus, config.seq_len, device)})
            log(f"step {step + 1:5d}  held-out loss text {curve[-1]['text']:.4f}  code {curve[-1]['code']:.4f}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_s = time.perf_counter() - start_s
    model.eval()
    held_out = held_out_loss(model, corpus, config.seq_len, device)
    curve.append({"step": config.steps, **held_out})
    log(f"trained in {train_s:.1f} s; held-out loss (evaluation part, top-k routing): "
        + ", ".join(f"{k} {v:.4f}" for k, v in held_out.items()))
    record = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_s": train_s,
        "final_train_loss": loss_value,
        "final_aux_loss": aux_value,
        "held_out_loss_nats": held_out,
        "held_out_curve": curve,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": str(torch.__version__),
        "python": sys.version.split()[0],
        "corpus_origin": {name: corpus.source(name).origin for name in ("text", "code")},
    }
    return Checkpoint(model, config, corpus.fingerprint(), record)


@torch.no_grad()
def held_out_loss(model: MoELanguageModel, corpus: Corpus, seq_len: int, device: torch.device) -> dict[str, float]:
    """Mean next-token loss (nats) under top-k routing on the first windows of each source's evaluation part."""
    losses = {}
    for name in ("text", "code"):
        data = torch.from_numpy(corpus.source(name).evaluation)
        count = min(HELD_OUT_WINDOWS, (data.numel() - 1) // seq_len)
        rows = torch.stack([data[i * seq_len : i * seq_len + seq_len + 1] for i in range(count)]).long().to(device)
        with autocast(device):
            logits = model(rows[:, :-1]).logits.float()
        losses[name] = float(F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten()))
    return losses
