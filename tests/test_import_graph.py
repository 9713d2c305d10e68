"""The package's import graph: no cycles between its modules (imports inside functions included) and MLflow
imported by few modules (the rest reach it through them)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "llm_caption"
MAX_MLFLOW_MODULES = 7


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every module named by an import statement of ``path``, relative imports resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)  # ``from . import module``
    return found


def package_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module -> package modules it imports, module -> every import)."""
    files = {module_name(p): p for p in (SRC / PACKAGE).rglob("*.py")}
    raw = {name: imports_of(path) for name, path in files.items()}
    graph = {name: {m for m in targets if m in files and m != name} for name, targets in raw.items()}
    return graph, raw


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles_between_package_modules():
    graph, _ = package_graph()
    assert "llm_caption.llm.generation" in graph and "llm_caption.settings" in graph
    # a package __init__ importing its own submodules is not a cycle worth flagging; there are none today
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("pair", [("llm_caption.llm.generation", "llm_caption.llm.models"),
                                  ("llm_caption.tracking", "llm_caption.settings")])
def test_the_named_cycles_are_gone(pair):
    graph, _ = package_graph()
    a, b = pair
    assert not (b in graph[a] and a in graph[b])


def test_few_modules_import_mlflow():
    _, raw = package_graph()
    users = sorted(name for name, targets in raw.items() if any(t == "mlflow" or t.startswith("mlflow.") for t in targets))
    assert len(users) <= MAX_MLFLOW_MODULES, users
