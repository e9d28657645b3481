"""The packages' layers point one way, and no module imports itself round a cycle.

Every ``import``/``from ... import`` of a project module counts, including those inside functions
(a lazy import is still a dependency). Layers, top to bottom (docs/architecture.md):

    cli  >  load_tests  >  serve  >  flow  >  deployments  >  state  >  indexing  >  common
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAYERS = ("common", "indexing", "state", "deployments", "flow", "serve", "load_tests", "cli")  # bottom first
RANK = {name: i for i, name in enumerate(LAYERS)}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in LAYERS for p in sorted((REPO / pkg).rglob("*.py"))}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``path`` imports (a ``from pkg import name`` of a submodule counts as it)."""
    me = module_name(path)
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative
                pkg = me.split(".")[: -node.level] if path.name != "__init__.py" else me.split(".")[: len(me.split(".")) - node.level + 1]
                base = ".".join([*pkg, base] if base else pkg)
            names = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules] or [base]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != me:
                out.add(name)
    return out


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {m: imports_of(p, modules) for m, p in modules.items()}


def test_the_scan_sees_imports():
    g = graph()
    # a known edge in each direction the rules allow, so a broken scan cannot pass silently
    assert "flow.pipeline" in g["serve.app"]
    assert "flow.errors" in g["serve.errors"]
    assert "common.config" in g["cli.main"]
    assert len(g) > 40


def test_no_package_imports_a_layer_above_it():
    bad = [
        f"{m} imports {d} ({m.split('.')[0]} is below {d.split('.')[0]})"
        for m, deps in sorted(graph().items()) for d in sorted(deps)
        if RANK[d.split(".")[0]] > RANK[m.split(".")[0]]
    ]
    assert not bad, "\n".join(bad)


def strongly_connected(g: dict[str, set[str]]) -> list[list[str]]:
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


def test_no_import_cycles():
    cycles = strongly_connected(graph())
    assert not cycles, f"import cycles: {cycles}"


def test_cycle_finder_finds_a_cycle():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_ray_internals_sit_in_one_adapter():
    """Ray-internal APIs only in deployments/llm_adapter.py (version-checked)."""
    users = sorted(
        module_name(p) for pkg in LAYERS for p in (REPO / pkg).rglob("*.py")
        if "ray.llm._internal" in p.read_text() and p.name != "llm_adapter.py"
    )
    assert not users, f"ray.llm._internal used outside deployments/llm_adapter.py: {users}"


def test_no_production_code_patches_with_mock():
    users = sorted(module_name(p) for pkg in LAYERS for p in (REPO / pkg).rglob("*.py") if "unittest" in p.read_text())
    assert not users, f"unittest (mock patching) in production code: {users}"
