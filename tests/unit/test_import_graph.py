"""The import graph of src/canaryml (every `import`, also the lazy ones inside functions): no
cycle between modules or between packages, and no library package importing the task layer
(`canaryml.tasks` composes the library; the library never reaches up into it)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2] / "src" / "canaryml"
ENTRY = ("canaryml.tasks", "canaryml.cli", "canaryml.__main__")  # the composition layer


def _modules() -> dict[str, Path]:
    out = {}
    for f in ROOT.rglob("*.py"):
        parts = f.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join([*base, *([node.module] if node.module else [])])
            else:
                mod = node.module or ""
            found.add(mod)
            found |= {f"{mod}.{a.name}" for a in node.names}
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    mods = _modules()
    return {n: _imports(n, p, set(mods)) for n, p in mods.items()}


def _package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_between_modules() -> None:
    g = graph()
    # a package's __init__ importing its own submodules is not a cycle worth failing on
    g = {n: {d for d in deps if not d.startswith(n + ".")} for n, deps in g.items()}
    assert _cycles(g) == []


def test_no_import_cycle_between_packages() -> None:
    g: dict[str, set[str]] = {}
    for n, deps in graph().items():
        if n == "canaryml":
            continue  # the root package: version and re-exports only
        g.setdefault(_package(n), set()).update(
            _package(d) for d in deps if _package(d) != _package(n) and d != "canaryml")
    assert _cycles(g) == []


def test_no_library_module_imports_the_task_layer() -> None:
    upward = sorted(f"{n} -> {d}" for n, deps in graph().items()
                    if not n.startswith(ENTRY) for d in deps if d.startswith("canaryml.tasks"))
    assert upward == []


def test_the_checker_sees_a_cycle_and_an_upward_import() -> None:
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    g = graph()
    assert "canaryml.control.controller" in g["canaryml.serving.loop"]  # lazy imports count too
    assert any(d.startswith("canaryml.serving") for d in g["canaryml.tasks.serve"])
