"""The statistical mode's tables are cached under their policy's code as well as its name and parameters (issue
18): a policy edited under an unchanged name and parameters got its old table back (5.25 experts per layer
reported where the new code picks 3.88). ``code_digest`` names the code; these tests edit a policy every way a
user does (a class redefined, a module rewritten and reloaded, a helper module beside it edited) and check that
the digest, and so the cache key, follows the code and nothing else."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from lynxsim.config import validate_experiment
from lynxsim.policies import Lynx, TopK
from lynxsim.routing import statistical
from lynxsim.routing.statistical import _module_sources, code_digest
from lynxsim.runner import build_statistical_table, prepare

POLICY_SOURCE = '''
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from lynxsim.datatypes import DROPPED, Selection
from lynxsim.policies import TopK


@dataclass(frozen=True)
class Pick:
    """The router's top-k, its slots from ``keep`` on dropped."""

    keep: int = 2
    name: ClassVar[str] = "pick"

    def select(self, logits: np.ndarray, top_k: int, *, renormalize: bool = True) -> Selection:
        chosen = TopK().select(logits, top_k, renormalize=renormalize)
        ids, weights = chosen.expert_ids.copy(), chosen.weights.copy()
        ids[..., {first_dropped}:] = DROPPED
        weights[..., {first_dropped}:] = 0.0
        return Selection(ids, weights)
'''
KEEPS_TOP_K = POLICY_SOURCE.replace("{first_dropped}", "self.keep")
"""Keeps ``keep`` slots (Mixtral's top-2: every slot)."""
KEEPS_ONE = POLICY_SOURCE.replace("{first_dropped}", "1")
"""The same class, name and parameter, edited to keep the first slot only: fewer experts per layer."""

CONFIG = {
    "name": "code-key",
    "model": "mixtral-8x7b",
    "hardware": "h200",
    "workload": {
        "arrival": {"kind": "poisson", "rate_per_s": 4.0},
        "prompt_tokens": {"kind": "fixed", "tokens": 32},
        "output_tokens": {"kind": "fixed", "tokens": 4},
    },
    "serving": {"max_num_seqs": 16, "max_num_batched_tokens": 64},
    "policies": [{"name": "topk"}],
    "simulation": {"seed": 1, "num_requests": 2, "routing_mode": "statistical", "statistical_samples": 4},
}


def unfiled_class(source: str) -> type:
    """``Pick`` executed from ``source`` into a module of its own, with no file behind it (as a notebook's cell):
    two such classes share their module, qualified name, parameters and ``repr``, and differ only in their code."""
    module = types.ModuleType("user_policies")
    exec(compile(source, "<cell>", "exec", dont_inherit=True), module.__dict__)
    return module.Pick


@pytest.fixture
def policy_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, str]]:
    """A folder on ``sys.path`` and a module name of the test's own, bytecode files off (a rewrite of one size
    within one clock tick must not be read back from a stale ``.pyc``); the module is forgotten afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    name = f"user_policy_{tmp_path.name.replace('-', '_')}"
    yield tmp_path, name
    for module in [m for m in sys.modules if m == name or m.startswith(f"{name}.")]:
        del sys.modules[module]


def test_a_class_redefined_with_another_body_has_another_digest() -> None:
    first, edited = unfiled_class(KEEPS_TOP_K), unfiled_class(KEEPS_ONE)
    assert repr(first()) == repr(edited()) and first.__qualname__ == edited.__qualname__
    assert code_digest(first()) != code_digest(edited())
    assert code_digest(first()) == code_digest(unfiled_class(KEEPS_TOP_K)(keep=1))  # parameters are not code


def test_a_module_rewritten_and_reloaded_has_another_digest(policy_module: tuple[Path, str]) -> None:
    folder, name = policy_module
    path = folder / f"{name}.py"
    path.write_text(KEEPS_TOP_K)
    module = importlib.import_module(name)
    original = code_digest(module.Pick())
    path.write_text(KEEPS_ONE)
    stale = code_digest(module.Pick())  # the file edited, the old class still loaded
    module = importlib.reload(module)
    edited = code_digest(module.Pick())
    assert len({original, stale, edited}) == 3  # the old code's table is never filed under the new code's key
    path.write_text(KEEPS_TOP_K)
    module = importlib.reload(module)
    assert code_digest(module.Pick()) == original  # the same code, the same key


def test_a_helper_module_beside_the_policy_is_part_of_its_code(policy_module: tuple[Path, str]) -> None:
    folder, name = policy_module
    package = folder / name
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "helpers.py").write_text("FIRST_DROPPED = 2\n")
    (package / "policy.py").write_text(
        f"from {name}.helpers import FIRST_DROPPED\n" + KEEPS_TOP_K.replace("self.keep", "FIRST_DROPPED")
    )
    policy = importlib.import_module(f"{name}.policy").Pick()
    before = code_digest(policy)
    (package / "helpers.py").write_text("FIRST_DROPPED = 1\n")
    assert code_digest(policy) != before


def test_built_in_policies_are_keyed_by_their_code_and_lynxsim_version(monkeypatch: pytest.MonkeyPatch) -> None:
    digests = {code_digest(TopK()), code_digest(Lynx(alpha=1.0, beta=2)), code_digest(unfiled_class(KEEPS_ONE)())}
    assert len(digests) == 3
    assert code_digest(Lynx(alpha=1.0, beta=2)) == code_digest(Lynx(alpha=3.0, beta=1))
    # the numba kernels that tabulate Lynx and top-k live beside them: their source is the policies' code too
    beside_lynx = set(_module_sources("lynxsim.policies.lynx"))
    assert {"lynxsim.policies.column_kernels", "lynxsim.policies.kernels"} <= beside_lynx
    before = code_digest(TopK())
    monkeypatch.setattr(statistical, "__version__", "0.0.0-other")
    assert code_digest(TopK()) != before


def test_the_digest_is_the_same_in_another_process() -> None:
    """Nothing of one process (string hashing's seed, addresses) enters the digest: another run finds the table."""
    script = textwrap.dedent(f"""
        from lynxsim.policies import Lynx, TopK
        from lynxsim.routing.statistical import code_digest
        import types
        module = types.ModuleType("user_policies")
        exec(compile({KEEPS_ONE!r}, "<cell>", "exec"), module.__dict__)
        print(code_digest(TopK()), code_digest(Lynx(alpha=1.0, beta=2)), code_digest(module.Pick()))
    """)
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    other = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    assert other.stdout.split() == [
        code_digest(TopK()), code_digest(Lynx(alpha=1.0, beta=2)), code_digest(unfiled_class(KEEPS_ONE)())
    ]


def test_a_table_cached_for_one_code_is_not_read_for_another(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner's table cache: the edited policy (same name, parameters and ``repr``) builds its own table,
    which reads fewer experts per layer; each code then reads its own table back."""
    monkeypatch.setenv("LYNXSIM_CACHE_DIR", str(tmp_path))
    setup = prepare(validate_experiment(CONFIG))
    original, edited = unfiled_class(KEEPS_TOP_K)(), unfiled_class(KEEPS_ONE)()
    first = build_statistical_table(setup, original, with_prefill=False)
    second = build_statistical_table(setup, edited, with_prefill=False)
    assert not first.from_cache and not second.from_cache
    assert second.distinct.mean() < first.distinct.mean()
    again = build_statistical_table(setup, edited, with_prefill=False)
    assert again.from_cache and np.array_equal(again.distinct, second.distinct)
    assert build_statistical_table(setup, original, with_prefill=False).from_cache
