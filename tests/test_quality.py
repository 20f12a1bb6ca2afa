"""lynxsim quality end to end on a CPU: train a tiny model for a few steps, export its trace, run every policy
inside its forward pass, write the report; and the pieces the numbers rest on (policy weights inside the model
equal the model's own top-k, per-layer parameters are cut to the routed layer, training is reproducible)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")

from lynxsim.cli import main as cli_main
from lynxsim.datatypes import DROPPED, Selection
from lynxsim.policies import Lynx, Prune, Skip, TopK
from lynxsim.quality.corpus import load_corpus
from lynxsim.quality.evaluate import EvalSettings, evaluate_policies
from lynxsim.quality.model import MoELanguageModel, topk_weights
from lynxsim.quality.points import default_points, lynx_sweep
from lynxsim.quality.routing_adapter import PolicyRouting, dense_weights, layer_policy
from lynxsim.quality.shapes import SHAPES, TrainConfig, tiny
from lynxsim.quality.traces import calibration_tokens, export_trace, router_log_probs
from lynxsim.quality.train import train_model
from lynxsim.routing.trace_format import load_trace

CODE_ROOT = Path(__file__).resolve().parents[1] / "lynxsim" / "policies"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prose file of seeded pseudo-words (enough for every held-out window the tests take)."""
    rng = np.random.default_rng(0)
    words = ["the", "king", "shall", "not", "speak", "of", "love", "and", "war", "my", "lord", "thou", "art"]
    lines = [" ".join(rng.choice(words, size=8)).capitalize() + "." for _ in range(1500)]
    path = tmp_path_factory.mktemp("corpus") / "prose.txt"
    path.write_text("\n".join(lines))
    return path


@pytest.fixture(scope="module")
def trained(corpus_files: Path) -> tuple:
    torch.set_num_threads(1)
    corpus = load_corpus(corpus_files, CODE_ROOT)
    shape = replace(tiny(SHAPES["mixtral-like"]), max_seq_len=64)
    config = TrainConfig(steps=4, batch_sequences=4, seq_len=32, seed=3)
    return corpus, config, train_model(shape, config, corpus, CPU, log=lambda _: None)


def test_training_is_reproducible_from_its_seed(trained: tuple) -> None:
    corpus, config, first = trained
    second = train_model(first.model.shape, config, corpus, CPU, log=lambda _: None)
    for name, tensor in first.model.state_dict().items():
        assert torch.equal(tensor, second.model.state_dict()[name]), name
    assert first.record["held_out_loss_nats"] == second.record["held_out_loss_nats"]


def test_policy_routing_of_topk_is_the_models_own_top_k() -> None:
    torch.manual_seed(0)
    for key in SHAPES:
        shape = replace(tiny(SHAPES[key]), max_seq_len=16)
        model = MoELanguageModel(shape).eval()
        tokens = torch.randint(0, 256, (4, 12))
        routing = PolicyRouting(TopK(), shape.top_k, shape.renormalize, prefill_tokens=5, batch_size=2)
        with torch.no_grad():
            own, policy = model(tokens).logits, model(tokens, routing).logits
        torch.testing.assert_close(policy, own, rtol=1e-5, atol=1e-5)
        assert routing.means()["retained_mass"] == 1.0


def test_dense_weights_leave_dropped_slots_out() -> None:
    ids = np.array([[[2, DROPPED], [0, 1]]])
    weights = np.array([[[1.0, 0.0], [0.25, 0.75]]])
    assert dense_weights(Selection(ids, weights), 3).tolist() == [[[0.0, 0.0, 1.0], [0.25, 0.75, 0.0]]]
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    assert topk_weights(logits, 2, renormalize=True).sum().item() == pytest.approx(1.0)


def test_layer_policy_takes_each_layers_own_parameters() -> None:
    assert layer_policy(Skip(beta=(0.1, 0.2)), 1) == Skip(beta=0.2)
    assert layer_policy(Lynx(alpha=(1.0, 3.0), beta=2), 1) == Lynx(alpha=3.0, beta=2)
    assert layer_policy(Prune(keep=1, kept_experts=((0,), (3,))), 0) == Prune(keep=1, kept_experts=(0,))
    shared = Prune(keep=2, kept_experts=(0, 3))
    assert layer_policy(shared, 1) is shared


def test_trace_and_evaluation_of_a_trained_model(trained: tuple, tmp_path: Path) -> None:
    corpus, _, checkpoint = trained
    shape = checkpoint.model.shape
    trace = load_trace(export_trace(checkpoint, corpus, tmp_path / "t.npz", sequences=4, length=16, device=CPU))
    assert trace.logits.shape == (shape.num_layers, 64, shape.num_experts)
    np.testing.assert_allclose(np.log(np.exp(trace.logits.astype(np.float64)).sum(-1)), 0.0, atol=1e-2)

    calibration = router_log_probs(checkpoint, calibration_tokens(corpus, 4, 16), CPU)
    points = default_points(shape) + lynx_sweep(shape, alphas=(1.0,), betas=(2,))
    settings = EvalSettings(batch_sizes=(1, 4), sequences=4, prefill_tokens=6, decode_tokens=6)
    rows = evaluate_policies(checkpoint, corpus, points, settings, calibration, CPU, log=lambda _: None)
    assert len(rows) == 2 * len(points)
    by = {(r.label, r.batch_size): r for r in rows}
    for b in (1, 4):
        assert by[("topk", b)].delta_loss_nats == 0.0 and by[("topk", b)].kl_nats == 0.0
    # A one-token batch is top-k itself for the batch-aware policies.
    assert by[("lynx(a=0.7,b=1)", 1)].delta_loss_nats == 0.0
    assert by[("vote(budget=4)", 1)].retained_mass == 1.0
    assert by[("topk", 4)].distinct_experts >= by[("topk", 1)].distinct_experts == shape.top_k


def test_command_line_end_to_end(corpus_files: Path, tmp_path: Path) -> None:
    """train -> trace -> evaluate -> report through ``lynxsim quality``, as the GPU run does it."""
    data = ["--text", str(corpus_files), "--code-root", str(CODE_ROOT), "--device", "cpu"]
    ckpt, results, docs = tmp_path / "m.pt", tmp_path / "results", tmp_path / "docs"
    train = ["--model", "qwen2moe-like", "--tiny", "--steps", "2", "--batch-sequences", "5", "--seq-len", "16"]
    assert cli_main(["quality", "train", *train, "--out", str(ckpt), *data]) == 0
    assert cli_main(["quality", "trace", str(ckpt), "--out", str(tmp_path / "t.npz"), "--sequences", "2",
                     "--length", "8", *data]) == 0
    assert cli_main(["quality", "evaluate", str(ckpt), "--out", str(results), "--batch-sizes", "1", "2",
                     "--sequences", "2", "--prefill-tokens", "4", "--decode-tokens", "4",
                     "--calibration-sequences", "2", "--no-sweep", *data]) == 0
    assert cli_main(["quality", "report", str(results), "--out", str(docs)]) == 0
    text = (docs / "quality.md").read_text()
    assert "qwen2moe-like" in text and "Recommendation" in text
    assert len(pd.read_csv(docs / "quality.csv")) == 2 * len(default_points(SHAPES["qwen2moe-like"]))


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["quality", "evaluate", str(tmp_path / "missing.pt"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lynxsim: error: ") and "missing.pt" in err and "\n" not in err
    assert cli_main(["quality", "report", str(tmp_path), "--out", str(tmp_path)]) == 2
