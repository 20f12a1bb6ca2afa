"""Fuzzing every entry point with bad and edge inputs: the bad-input contract holds for each (README, "Bad input").

The contract: a command given bad input ends with exit code 2 and exactly one line on stderr, ``lynxsim: error:
<where>: <what>``; given good input it runs. Never a traceback (any exception escaping ``main`` fails the test),
never a hang, never a run directory that looks finished when it is not.

Classes of input, each generated from a table or a hypothesis strategy:

* ``--set`` values on the schema's numeric keys: values every key must refuse (NaN, infinities, booleans, text,
  lists, mappings), and edge values whose outcome depends on the key (0, -1, huge numbers, null, empty text);
* random key paths and values (hypothesis), existing keys and invented ones;
* malformed experiment files (empty, not a mapping, binary, not UTF-8, duplicate keys, broken YAML, deep nesting);
* malformed request traces and Hugging Face model configs, hardware profile files and model overrides holding
  numbers no key takes;
* hostile paths (output under a file, a file as output, /proc, a folder that is not a run directory, a missing or
  folder experiment path, plot of a partial or corrupt run directory) and command-line syntax errors;
* every other command (routing fit/compare/import-flame/evidence, query, report, plot, calibrate, validate,
  quality, sweep, the listings) given missing, empty or corrupt files and folders;
* policy labels that are not folder names (run end to end: distinct folders, records readable).

The fast part runs in every test run (its size is checked: at least 200 inputs); ``LYNXSIM_FUZZ=slow`` adds many
more hypothesis examples and runs every accepted schema edge value end to end.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lynxsim.cli import main
from lynxsim.records import partial_dir, slug

SLOW = os.environ.get("LYNXSIM_FUZZ") == "slow"
EXAMPLES = 400 if SLOW else 40

BASE: dict[str, Any] = {
    "name": "fuzz",
    "model": "mixtral-8x7b",
    "hardware": "h200",
    "workload": {
        "arrival": {"kind": "poisson", "rate_per_s": 4.0},
        "prompt_tokens": {"kind": "fixed", "tokens": 32},
        "output_tokens": {"kind": "fixed", "tokens": 8},
    },
    "routing": {"kind": "synthetic"},
    "policies": [{"name": "lynx"}, {"name": "topk"}],
    "simulation": {"seed": 0, "num_requests": 4},
    "output": {"figures": False},
}

NUMERIC_KEYS = (
    "workload.arrival.rate_per_s",
    "workload.prompt_tokens.tokens",
    "workload.output_tokens.tokens",
    "simulation.num_requests",
    "simulation.duration_s",
    "simulation.warmup_s",
    "simulation.cutoff_s",
    "simulation.seed",
    "simulation.statistical_samples",
    "serving.max_num_seqs",
    "serving.max_num_batched_tokens",
    "serving.block_size_tokens",
    "serving.gpu_memory_utilization",
    "serving.activation_reserve_bytes",
    "slo.ttft_s",
    "slo.tpot_s",
    "slo.attainment",
    "deployment.replicas",
    "deployment.transfer_latency_s",
    "deployment.parallelism.tensor_parallel",
    "policies.0.alpha",
    "policies.0.beta",
    "hardware.overrides.efficiency.iteration_overhead_s",
)
REFUSED_VALUES = (".nan", ".inf", "-.inf", "true", "some text", "[1]", "{a: 1}")
"""No numeric key takes any of these (``--set`` values are YAML)."""
EDGE_VALUES = ("0", "-1", "1.0e30", "1000000000000000000000000000000", "null", "''", "1e8")
"""Values a key may take or refuse, depending on its bounds: only the contract is asserted."""


def experiment(tmp_path: Path, data: dict[str, Any] | None = None, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data if data is not None else BASE))
    return path


def outcome(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run the command; assert the contract; return (exit code, stderr). An exception escaping ``main`` is a
    traceback a user would see, and fails the test by propagating."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own exit (usage errors)
        code = int(exc.code or 0)
    err = capsys.readouterr().err.strip()
    if code == 2:
        lines = err.splitlines()
        assert len(lines) == 1, f"{argv}: {len(lines)} lines on stderr:\n{err}"
        assert lines[0].startswith("lynxsim: error: "), err
        assert "Traceback" not in err
    else:
        assert code == 0, f"{argv}: exit code {code}:\n{err}"
    return code, err


# ----- --set values on the schema's numeric keys -------------------------------------------------------------------

@pytest.mark.parametrize("value", REFUSED_VALUES)
@pytest.mark.parametrize("key", NUMERIC_KEYS)
def test_refused_values_end_in_one_line_naming_the_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str, value: str
) -> None:
    code, err = outcome(["check", str(experiment(tmp_path)), "--set", f"{key}={value}"], capsys)
    assert code == 2
    assert f"--set {key}={value}" in err  # blamed on the --set, not on the line of the file it replaced


@pytest.mark.parametrize("value", EDGE_VALUES)
@pytest.mark.parametrize("key", NUMERIC_KEYS)
def test_edge_values_keep_the_contract(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str, value: str
) -> None:
    code, err = outcome(["check", str(experiment(tmp_path)), "--set", f"{key}={value}"], capsys)
    if code == 2:
        assert key.split(".")[0] in err


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    key=st.sampled_from(NUMERIC_KEYS) | st.lists(st.sampled_from(["simulation", "serving", "x", "0", "policies",
                                                                  "kind", "path", "name"]), min_size=1, max_size=4)
    .map(".".join),
    value=st.one_of(st.floats(), st.integers(), st.booleans(), st.text(max_size=12), st.none(),
                    st.lists(st.integers(), max_size=3)).map(json.dumps),
)
@example(key="name", value=json.dumps("\U00010000"))  # YAML reads the JSON escape as two lone surrogates (CI found it)
def test_random_overrides_keep_the_contract(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str, value: str
) -> None:
    outcome(["check", str(experiment(tmp_path)), "--set", f"{key}={value}"], capsys)


# ----- malformed experiment files ---------------------------------------------------------------------------------

MALFORMED_FILES: dict[str, bytes] = {
    "empty": b"",
    "a list": b"- 1\n- 2\n",
    "a scalar": b"just text\n",
    "binary": bytes(range(256)),
    "not UTF-8": b"name: caf\xe9\n",
    "duplicate key": b"name: a\nname: b\n",
    "duplicate nested key": yaml.safe_dump(BASE).encode() + b"simulation:\n  seed: 1\n",
    "tab indentation": b"name: a\nmodel:\n\tname: x\n",
    "unclosed bracket": b"policies: [{name: lynx}\n",
    "unclosed quote": b"name: 'abc\n",
    "deep nesting": b"a: " + b"[" * 5000 + b"]" * 5000 + b"\n",
    "anchor bomb": b"a: &a [x, x]\nb: &b [*a, *a]\nc: &c [*b, *b]\nd: [*c, *c]\n",
    "python tag": b"name: !!python/object/apply:os.system ['true']\n",
    "unknown top-level key": yaml.safe_dump({**BASE, "polices": []}).encode(),
    "no policies": yaml.safe_dump({**BASE, "policies": []}).encode(),
    "policies not a list": yaml.safe_dump({**BASE, "policies": "lynx"}).encode(),
    "unknown policy": yaml.safe_dump({**BASE, "policies": [{"name": "lnyx"}]}).encode(),
    "unknown model": yaml.safe_dump({**BASE, "model": "mixtral-9x9b"}).encode(),
    "model a number": yaml.safe_dump({**BASE, "model": 5}).encode(),
    "unknown hardware": yaml.safe_dump({**BASE, "hardware": "h900"}).encode(),
    "routing without kind": yaml.safe_dump({**BASE, "routing": {"seed": 3}}).encode(),
    "same label twice": yaml.safe_dump({**BASE, "policies": [{"name": "lynx"}, {"name": "lynx"}]}).encode(),
    "labels equal but for case": yaml.safe_dump(
        {**BASE, "policies": [{"name": "lynx", "label": "A"}, {"name": "topk", "label": "a"}]}).encode(),
    "unknown policy parameter": yaml.safe_dump({**BASE, "policies": [{"name": "lynx", "gamma": 1}]}).encode(),
    "prune keeps more experts than the model has": yaml.safe_dump(
        {**BASE, "policies": [{"name": "prune", "keep": 20}]}).encode(),
    "cutoff before warm-up": yaml.safe_dump({**BASE, "simulation": {"num_requests": 4, "warmup_s": 5,
                                                                       "cutoff_s": 1}}).encode(),
}


@pytest.mark.parametrize("content", MALFORMED_FILES.values(), ids=MALFORMED_FILES.keys())
def test_malformed_experiment_files_end_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes
) -> None:
    path = tmp_path / "exp.yaml"
    path.write_bytes(content)
    code, err = outcome(["check", str(path)], capsys)
    assert code == 2
    assert str(path) in err or "--set" in err


def test_a_duplicate_key_names_both_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "exp.yaml"
    path.write_bytes(MALFORMED_FILES["duplicate key"])
    _, err = outcome(["check", str(path)], capsys)
    assert f"{path}:2:" in err and "duplicate key 'name' (first written on line 1)" in err


# ----- request traces and model configs ---------------------------------------------------------------------------

TRACE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
MALFORMED_TRACES: dict[str, str] = {
    "empty file": "",
    "header only": TRACE_HEADER,
    "missing column": "TIMESTAMP,ContextTokens\n2023-11-16 18:15:46.6805900,374\n",
    "text length": TRACE_HEADER + "2023-11-16 18:15:46.6805900,many,44\n",
    "negative length": TRACE_HEADER + "2023-11-16 18:15:46.6805900,-5,44\n",
    "fractional length": TRACE_HEADER + "2023-11-16 18:15:46.6805900,3.5,44\n",
    "astronomical length": TRACE_HEADER + "2023-11-16 18:15:46.6805900,1e22,44\n",
    "infinite length": TRACE_HEADER + "2023-11-16 18:15:46.6805900,inf,44\n",
    "bad timestamp": TRACE_HEADER + "yesterday,374,44\n",
    "empty cell": TRACE_HEADER + "2023-11-16 18:15:46.6805900,,44\n",
    "ragged row": TRACE_HEADER + "2023-11-16 18:15:46.6805900,374,44,9,9\n",
    "binary": "\x00\x01\x02\x03",
}


@pytest.mark.parametrize("content", MALFORMED_TRACES.values(), ids=MALFORMED_TRACES.keys())
def test_malformed_traces_end_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str
) -> None:
    trace = tmp_path / "trace.csv"
    trace.write_text(content)
    data = {**BASE, "workload": {"arrival": {"kind": "trace", "path": "trace.csv", "format": "azure"}}}
    code, err = outcome(["check", str(experiment(tmp_path, data))], capsys)
    assert code == 2 and "workload.arrival" in err


HF_BASE = {"model_type": "mixtral", "hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 2,
           "num_attention_heads": 8, "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2,
           "vocab_size": 1000, "torch_dtype": "bfloat16"}
MALFORMED_HF_CONFIGS: dict[str, str] = {
    "not JSON": "{model_type: mixtral",
    "a list": "[1, 2]",
    "zero heads": json.dumps({**HF_BASE, "num_attention_heads": 0}),
    "hidden size as text": json.dumps({**HF_BASE, "hidden_size": "2048"}),
    "negative layers": json.dumps({**HF_BASE, "num_hidden_layers": -2}),
    "fractional experts": json.dumps({**HF_BASE, "num_local_experts": 4.5}),
    "boolean size": json.dumps({**HF_BASE, "intermediate_size": True}),
    "unknown model type": json.dumps({**HF_BASE, "model_type": "gpt17"}),
    "missing key": json.dumps({k: v for k, v in HF_BASE.items() if k != "vocab_size"}),
    "unknown dtype": json.dumps({**HF_BASE, "torch_dtype": "float7"}),
}


@pytest.mark.parametrize("content", MALFORMED_HF_CONFIGS.values(), ids=MALFORMED_HF_CONFIGS.keys())
def test_malformed_model_configs_end_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str
) -> None:
    (tmp_path / "config.json").write_text(content)
    data = {**BASE, "model": {"hf_config": "config.json", "overrides": {"lynx_alpha": 1.0, "lynx_beta": 1}}}
    code, err = outcome(["check", str(experiment(tmp_path, data))], capsys)
    assert code == 2 and "config.json" in err


def test_a_valid_model_config_is_accepted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.json").write_text(json.dumps(HF_BASE))
    data = {**BASE, "model": {"hf_config": "config.json", "overrides": {"lynx_alpha": 1.0, "lynx_beta": 1}}}
    assert outcome(["check", str(experiment(tmp_path, data))], capsys)[0] == 0


# ----- paths and command lines ------------------------------------------------------------------------------------

def _out_cases(tmp_path: Path) -> dict[str, Path]:
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me too")
    return {"a file": a_file, "under a file": a_file / "run", "under /proc": Path("/proc/lynxsim-fuzz"),
            "a folder that is not a run directory": foreign}


@pytest.mark.parametrize("case", ["a file", "under a file", "under /proc", "a folder that is not a run directory"])
def test_unusable_output_paths_end_in_one_line_and_delete_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    out = _out_cases(tmp_path)[case]
    code, err = outcome(["run", str(experiment(tmp_path)), "--out", str(out)], capsys)
    assert code == 2 and str(out) in err
    assert (tmp_path / "a_file").read_text() == "keep me"
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "keep me too"


@pytest.mark.parametrize("command", ["run", "check", "capacity", "sweep"])
@pytest.mark.parametrize("target", ["missing.yaml", "."])
def test_missing_or_folder_experiment_paths(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, target: str
) -> None:
    code, _ = outcome([command, str(tmp_path / target)], capsys)
    assert code == 2


@pytest.mark.parametrize("argv", [[], ["run"], ["frob"], ["run", "x.yaml", "--bogus"], ["capacity", "x.yaml",
                                   "--tolerance", "wide"], ["run", "x.yaml", "--set"], ["check", "x.yaml", "--set",
                                   "no_equals_sign"], ["check", "x.yaml", "--set", "=3"]])
def test_command_line_syntax_errors_end_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    if "x.yaml" in argv:
        argv = [str(experiment(tmp_path)) if a == "x.yaml" else a for a in argv]
    assert outcome(argv, capsys)[0] == 2


def test_plot_refuses_partial_and_corrupt_run_directories(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert outcome(["run", str(experiment(tmp_path)), "--out", str(out)], capsys)[0] == 0
    # a run directory whose records are damaged
    (out / "policies" / "topk" / "requests.parquet").write_bytes(b"not parquet")
    code, err = outcome(["plot", str(out)], capsys)
    assert code == 2 and str(out) in err
    # the staging folder an interrupted run leaves has no summary: never read as a run
    partial = partial_dir(out)
    partial.mkdir()
    assert outcome(["plot", str(partial)], capsys)[0] == 2
    assert outcome(["plot", str(tmp_path / "nowhere")], capsys)[0] == 2


# ----- the other commands ---------------------------------------------------------------------------------------

def _other_files(tmp_path: Path) -> None:
    (tmp_path / "bad.npz").write_bytes(b"not an npz file")
    (tmp_path / "empty").mkdir()
    (tmp_path / "flame").mkdir()
    (tmp_path / "flame" / "layer00.csv").write_text("token,expert\nx,y\n")
    (tmp_path / "profile.yaml").write_text("params: {seed: .nan}\n")
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "sweep.duckdb").write_bytes(b"not a database")


OTHER_COMMANDS = (
    ["routing", "fit", "missing.npz", "--out", "p.yaml"],
    ["routing", "fit", "bad.npz", "--out", "p.yaml"],
    ["routing", "fit", "empty", "--out", "p.yaml"],
    ["routing", "fit", "flame", "--out", "p.yaml"],
    ["routing", "fit", "bad.npz", "--out", "p.yaml", "--top-k", "0"],
    ["routing", "compare", "bad.npz", "--profile", "flame-moe-290m"],
    ["routing", "compare", "empty", "--profile", "no-such-profile"],
    ["routing", "compare", "flame", "--profile", "profile.yaml"],
    ["routing", "import-flame", "empty", "out.npz"],
    ["routing", "import-flame", "missing", "out.npz"],
    ["routing", "import-flame", "flame", "out.npz"],
    ["routing", "evidence", "--out", "/proc/lynxsim-fuzz"],
    ["query", "missing", "SELECT 1"],
    ["query", "empty", "SELECT 1"],
    ["query", "store", "SELECT 1"],
    ["query", "empty", ""],
    ["report", "missing", "--out", "report"],
    ["report", "empty", "--out", "report"],
    ["plot", "empty"],
    ["plot", "bad.npz"],
    ["calibrate", "--dry-run", "--models", "no-such-model"],
    ["validate", "--models", "no-such-model", "--record", "r.npz"],
    ["validate", "--measured", "bad.npz"],  # refused before the simulation, not after it
    ["quality", "evaluate", "missing", "--out", "q"],
    ["quality", "trace", "missing", "--out", "q"],
    ["sweep", "missing.yaml"],
    ["models", "--bogus"],
)


@pytest.mark.parametrize("argv", OTHER_COMMANDS, ids=[" ".join(a)[:40] for a in OTHER_COMMANDS])
def test_every_other_command_keeps_the_contract(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, argv: list[str]
) -> None:
    _other_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert outcome(argv, capsys)[0] == 2


@pytest.mark.parametrize("argv", [["models"], ["hardware"], ["plugins"], ["calibrate", "--dry-run", "--models",
                                                                           "mixtral-8x7b", "--units", "lm_head"]])
def test_listing_commands_run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    assert outcome(argv, capsys)[0] == 0


# ----- data files of other kinds: a hardware profile, a model file ----------------------------------------------

@pytest.mark.parametrize("value", [".inf", ".nan", "true", "-1", "text"])
def test_a_hardware_profile_file_refuses_what_no_key_takes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    shipped = Path(__file__).resolve().parents[1] / "lynxsim" / "hw_profiles" / "h100-sxm.yaml"
    text = re.sub(r"^memory_bandwidth_bytes_per_s: .*$", f"memory_bandwidth_bytes_per_s: {value}",
                  shipped.read_text(), count=1, flags=re.M)
    assert value in text
    (tmp_path / "gpu.yaml").write_text(text)
    data = {**BASE, "hardware": {"profile": str(tmp_path / "gpu.yaml"), "measured_tables": False}}
    code, err = outcome(["check", str(experiment(tmp_path, data))], capsys)
    assert code == 2 and "memory_bandwidth_bytes_per_s" in err and str(tmp_path / "gpu.yaml") in err


@pytest.mark.parametrize("value", [".inf", ".nan", "true", "-1", "text"])
def test_model_overrides_refuse_what_no_key_takes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    code, err = outcome(["check", str(experiment(tmp_path)), "--set", f"model.overrides={{hidden_size: {value}}}"],
                        capsys)
    assert code == 2 and "hidden_size" in err and "--set model.overrides=" in err


# ----- labels that are not folder names ---------------------------------------------------------------------------

LABELS = (["α", "β"], ["lynx a", "lynx_a"], ["..", "."], ["a/b", "a\\b"], ["x" * 300, "x" * 299],
          ["con", "CON.txt"], ["~", "-"])


@pytest.mark.parametrize("labels", LABELS, ids=[" | ".join(x)[:20] for x in LABELS])
def test_labels_map_to_distinct_safe_folders(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], labels: list[str]
) -> None:
    data = {**BASE, "policies": [{"name": "topk", "label": labels[0]}, {"name": "lynx", "label": labels[1]}]}
    out = tmp_path / "run"
    assert outcome(["run", str(experiment(tmp_path, data)), "--out", str(out)], capsys)[0] == 0
    folders = sorted(p.name for p in (out / "policies").iterdir())
    assert folders == sorted({slug(label) for label in labels}) and len(folders) == 2
    for folder in folders:
        assert re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.~-]*", folder) and len(folder) <= 100
    summary = json.loads((out / "summary.json").read_text())
    assert summary["policies"] == labels


def test_fuzz_suite_size() -> None:
    """The fast part alone holds at least 200 generated inputs (issue 18), counted from the tests' own
    parametrizations (and the random overrides' examples), so that a table that shrinks fails here."""
    inputs = 0
    for name, test in globals().items():
        if not name.startswith("test_") or name == "test_fuzz_suite_size":
            continue
        cases = 1
        for mark in getattr(test, "pytestmark", []):
            if mark.name == "parametrize":
                cases *= len(mark.args[1])
        if getattr(test, "is_hypothesis_test", False):
            cases *= EXAMPLES
        inputs += cases
    assert inputs >= 200
