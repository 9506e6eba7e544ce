"""The layout, checked on the source: no import cycle between the project's modules, every command line in bundle/
(docs/design.md, "Layout"). Files are split by concern, not by a line cap (the former 600-line test only caused
sideways splits and was dropped)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in ("scripts", "bundle"):
        for p in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(p.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = p
    return out


def _imports(path: Path, name: str, modules: dict) -> set[str]:
    """Project modules ``name`` imports anywhere in its body (function-level imports included)."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:  # `import scripts.data.phantom.noise` -> that module
                t = t.rpartition(".")[0]
            if t and t != name and not name.startswith(t + "."):  # a package's own submodules import it
                found.add(t)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state, stack = [], {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                cycles.append(stack[stack.index(m) :] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    return cycles


def test_no_import_cycle():
    modules = _modules()
    graph = {n: _imports(p, n, modules) for n, p in modules.items()}
    # the package __init__ files re-export their submodules: an edge package -> submodule is not a cycle
    for n in graph:
        graph[n] = {m for m in graph[n] if not m.startswith(n + ".")}
    assert _cycles(graph) == []
    # the data package is self-contained: nothing in it imports the method (engines, losses, networks, handlers)
    data = {n: g for n, g in graph.items() if n.startswith("scripts.data")}
    method = {"scripts.trainer", "scripts.losses", "scripts.networks", "scripts.handlers", "scripts.inference"}
    assert {n: sorted(g & method) for n, g in data.items() if g & method} == {}


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
