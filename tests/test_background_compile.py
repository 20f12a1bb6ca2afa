"""A child process compiles a numba function into the on-disk cache, which this process then loads instead of
compiling it (``lynxsim.engine.compiled.background_compile``: how a cold start compiles the routing beside the loop).

Each case runs in a fresh interpreter with an empty cache folder of its own (numba reads ``NUMBA_CACHE_DIR`` on
import), on a small cached formula (``cost_formulas.roofline_s``) rather than the routing, which takes 10 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import json, sys
from numba import types
from lynxsim import cost_formulas
from lynxsim.engine.compiled.background_compile import is_cached, start
args = (types.float64,) * 5
name = sys.argv[1]
before = is_cached(cost_formulas.roofline_s, args)
child = start("lynxsim.cost_formulas", name, args)
code = child.wait() if child is not None else None
after = is_cached(cost_formulas.roofline_s, args)
cost_formulas.roofline_s.compile(args)
print(json.dumps({"before": before, "code": code, "after": after,
                  "loaded": cost_formulas.roofline_s._cache_hits[args],
                  "value": cost_formulas.roofline_s(100.0, 10.0, 50.0, 10.0, 0.5)}))
"""


def _run(tmp_path: Path, name: str) -> dict[str, object]:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("LYNXSIM_NO_NUMBA", None)
    done = subprocess.run([sys.executable, "-c", SCRIPT, name], env=env, capture_output=True, text=True, check=True)
    result: dict[str, object] = json.loads(done.stdout.splitlines()[-1])
    return result


def test_a_child_compiles_into_the_cache_and_this_process_loads_it(tmp_path: Path) -> None:
    result = _run(tmp_path, "roofline_s")
    assert result["before"] is False and result["code"] == 0 and result["after"] is True
    assert result["loaded"] == 1  # from the cache the child wrote, not compiled here
    assert result["value"] == max(100.0 / 50.0, 10.0 / 10.0) + 0.5  # the roofline: max(bytes/bw, flops/peak) + launch


def test_a_failing_child_leaves_the_compilation_to_this_process(tmp_path: Path) -> None:
    result = _run(tmp_path, "no_such_function")
    assert result["code"] != 0 and result["after"] is False
    assert result["loaded"] == 0  # compiled here, as without a child
    assert result["value"] == 2.5


def test_what_numba_does_not_compile_counts_as_cached() -> None:
    from lynxsim.engine.compiled.background_compile import is_cached

    assert is_cached(len, ())  # no numba cache to ask: no child is started for it


def test_the_pointer_waits_for_the_child_it_started(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pointer to a compiled function (the loop's to the routing) starts a child where the function is not
    cached, waits for it before it loads the function, and points where numba's own first-class function would
    (on a small formula: the routing takes 10 s to compile)."""
    numba = pytest.importorskip("numba")
    from numba.experimental.function_type import _get_wrapper_address

    from lynxsim import cost_formulas
    from lynxsim.engine.compiled import background_compile

    signature = numba.types.float64(*(numba.types.float64,) * 5)
    events: list[str] = []

    class Child:
        def wait(self) -> int:
            events.append("waited")
            return 0

    def start(module: str, name: str, args: tuple[object, ...]) -> Child:
        events.append(f"started {module}.{name}")
        assert args == signature.args
        return Child()

    monkeypatch.setattr(background_compile, "start", start)
    monkeypatch.setattr(background_compile, "is_cached", lambda dispatcher, args: True)
    background_compile.FunctionPointer("lynxsim.cost_formulas", "roofline_s", signature)
    assert events == []  # cached: nothing to start
    monkeypatch.setattr(background_compile, "is_cached", lambda dispatcher, args: False)
    pointer = background_compile.FunctionPointer("lynxsim.cost_formulas", "roofline_s", signature)
    assert events == ["started lynxsim.cost_formulas.roofline_s"]
    assert pointer.signature() == signature
    address = pointer.__wrapper_address__()
    assert events[-1] == "waited"
    assert address == _get_wrapper_address(cost_formulas.roofline_s, signature)
    assert pointer.__wrapper_address__() == address and events.count("waited") == 1


def test_a_run_starts_compiling_the_routing_its_loop_will_call() -> None:
    """``compile_ahead`` (a run's first step) makes the pointer of the placeholder's types, which is the one an
    instance routing in the loop then takes: the child started at the run's start compiles the routing the loop
    calls, not another signature."""
    pytest.importorskip("numba")

    from lynxsim.config import validate_experiment
    from lynxsim.engine.compiled import routing
    from lynxsim.engine.compiled.instance import CompiledInstance
    from lynxsim.runner import build_scheduler, prepare, routing_step

    setup = prepare(validate_experiment({
        "name": "ahead", "model": "mixtral-8x7b", "hardware": "h200",
        "workload": {"arrival": {"kind": "poisson", "rate_per_s": 4.0},
                     "prompt_tokens": {"kind": "fixed", "tokens": 64}, "output_tokens": {"kind": "fixed", "tokens": 8}},
        "policies": [{"name": "lynx"}], "simulation": {"num_requests": 4},
    }))
    label, entry, policy = setup.policies[0]
    instance = CompiledInstance(build_scheduler(setup), setup.cost_model, routing_step(setup, entry, policy),
                                setup.model.num_moe_layers, 4)
    assert instance.fused.enabled  # synthetic routing, Lynx, one GPU: routed in the loop
    assert routing.compile_ahead() is instance.route_function
