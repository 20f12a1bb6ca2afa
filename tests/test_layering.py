"""The package's layering (docs/architecture.md): every import of a lynxsim module, at module level or inside a
function, goes to a module of the same or a lower layer, and no set of modules imports itself round in a circle.

Imports under ``if TYPE_CHECKING:`` are annotations only and are not counted. The graph is read from the source
with ``ast`` (nothing is imported), so the test also holds for the torch-only packages.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lynxsim"

LAYERS: tuple[tuple[str, ...], ...] = (
    ("lynxsim", "errors", "yaml_input", "jit", "interconnect", "plugins", "datatypes"),
    ("models", "hardware", "workload", "policies", "sections"),
    ("cost", "cost_formulas"),
    ("parallel", "metrics", "records", "routing", "instance_cost", "summary_columns"),
    ("config", "quality", "preflight"),
    ("engine",),
    ("runner",),
    ("capacity", "calib", "plots", "sweep", "timeline"),
    ("report", "html_report"),
    ("cli", "__main__"),
)
"""Top-level parts of the package (a subpackage or a module of ``lynxsim/``) from the bottom layer up; the same
list, with what each layer holds, is docs/architecture.md's."""


def _module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


MODULES = _module_names()


def _owner(name: str) -> str:
    """The module a dotted name lies in (``lynxsim.cost.BatchShape`` -> ``lynxsim.cost``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name


class _Imports(ast.NodeVisitor):
    """The lynxsim modules one module imports, anywhere but under ``if TYPE_CHECKING``."""

    def __init__(self, module: str) -> None:
        self.module = module
        self.found: set[str] = set()

    def visit_If(self, node: ast.If) -> None:
        if "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        self.found |= {_owner(alias.name) for alias in node.names if alias.name.startswith("lynxsim")}

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            is_package = MODULES[self.module].name == "__init__.py"
            base = self.module if is_package else self.module.rpartition(".")[0]
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            source = f"{base}.{node.module}" if node.module else base
        else:
            source = node.module or ""
        if not source.startswith("lynxsim"):
            return
        for alias in node.names:
            full = f"{source}.{alias.name}"
            self.found.add(full if full in MODULES else _owner(source))


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        visitor = _Imports(module)
        visitor.visit(ast.parse(path.read_text(encoding="utf-8")))
        graph[module] = visitor.found - {module, ""}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            advanced = False
            for target in edges:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(graph.get(target, ())))))
                    advanced = True
                    break
                if target in on_stack:
                    low[node] = min(low[node], index[target])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _part(module: str) -> str:
    """The top-level part a module belongs to (``lynxsim.engine.compiled.kernel`` -> ``engine``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "lynxsim"


LAYER_OF = {part: level for level, parts in enumerate(LAYERS) for part in parts}


def test_every_part_of_the_package_has_a_layer() -> None:
    assert {_part(m) for m in MODULES} - set(LAYER_OF) == set()


def test_no_module_imports_itself_round_a_cycle() -> None:
    assert cycles(import_graph()) == []


def test_imports_go_down_the_layers() -> None:
    upward = sorted(
        f"{module} -> {target} (layer {LAYER_OF[_part(module)]} -> {LAYER_OF[_part(target)]})"
        for module, targets in import_graph().items()
        for target in targets
        if LAYER_OF[_part(target)] > LAYER_OF[_part(module)]
    )
    assert upward == []


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"a"}, "c": {"a"}}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"d"}}, [["a", "b", "c"]]),
    ],
)
def test_the_cycle_finder_on_small_graphs(graph: dict[str, set[str]], expected: list[list[str]]) -> None:
    assert cycles(graph) == expected
