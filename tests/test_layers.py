"""The package layers of DESIGN.md, read from the source: every import of every module of
megatron_ring (imports inside functions included; `if TYPE_CHECKING:` blocks skipped) runs
downward, never to a sibling of the same layer, and neither the packages nor the modules of
megatron_ring.recipe import each other in a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "megatron_ring"

# Bottom to top. Packages of one layer are siblings: they do not import each other.
LAYERS = [
    ["versions"],
    ["platform"],
    ["ops", "models", "data"],
    ["rewards"],
    ["recipe"],
    ["inference"],
    ["rollout"],
    ["train"],
    ["rl", "selection"],
    ["pipeline"],
    ["launch"],
    ["cli"],
]
LEVEL = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}
ALLOWED = set()  # (from package, to package) sibling edges the layer list allows: none today
ROOT_MODULES = {"__init__": "versions"}  # megatron_ring/__init__.py; cli.py and versions.py are their own


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path, module: str, modules: dict[str, Path]):
    """(line, imported megatron_ring module) for every import in the file, at any depth."""
    is_pkg = path.name == "__init__.py"
    here = module if is_pkg else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "megatron_ring":
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "megatron_ring":
                continue
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{target}.{alias.name}"
                yield node.lineno, sub if sub in modules else target


def _package(module: str) -> str:
    """megatron_ring.<package>[...] -> package; the top-level modules by ROOT_MODULES."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ROOT_MODULES["__init__"]


def _edges():
    """(file:line, from module, to module) for every import between megatron_ring modules."""
    modules = _modules()
    out = []
    for module, path in modules.items():
        for line, target in _imports(path, module, modules):
            out.append((f"{path.relative_to(ROOT)}:{line}", module, target))
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_package_has_a_layer():
    unknown = sorted({_package(m) for m in _modules()} - set(LEVEL))
    assert not unknown, f"packages missing from LAYERS in tests/test_layers.py (and DESIGN.md): {unknown}"


def test_imports_run_down_the_layers():
    bad = []
    for where, src, dst in _edges():
        a, b = _package(src), _package(dst)
        if a == b or (a, b) in ALLOWED or a not in LEVEL or b not in LEVEL:
            continue
        if LEVEL[b] > LEVEL[a]:
            bad.append(f"{where}: {a} -> {b} (up: {src} imports {dst})")
        elif LEVEL[b] == LEVEL[a]:
            bad.append(f"{where}: {a} -> {b} (siblings: {src} imports {dst})")
    assert not bad, f"{len(bad)} imports against the layers:\n" + "\n".join(bad)


def test_no_cycle_between_packages():
    graph: dict[str, set[str]] = {}
    where: dict[tuple[str, str], str] = {}
    for w, src, dst in _edges():
        a, b = _package(src), _package(dst)
        if a != b:
            graph.setdefault(a, set()).add(b)
            where.setdefault((a, b), f"{w}: {src} imports {dst}")
    cycles = _cycles(graph)
    lines = [f"cycle {' <-> '.join(c)}:\n" + "\n".join(
        f"  {a} -> {b}: {where[(a, b)]}" for a in c for b in sorted(graph[a]) if b in c) for c in cycles]
    assert not cycles, "\n".join(lines)


def test_no_cycle_between_recipe_modules():
    graph: dict[str, set[str]] = {}
    where: dict[tuple[str, str], str] = {}
    for w, src, dst in _edges():
        if src.startswith("megatron_ring.recipe") and dst.startswith("megatron_ring.recipe") and src != dst:
            graph.setdefault(src, set()).add(dst)
            where.setdefault((src, dst), w)
    cycles = _cycles(graph)
    lines = [f"cycle {' <-> '.join(c)}:\n" + "\n".join(
        f"  {where[(a, b)]}: {a} -> {b}" for a in c for b in sorted(graph[a]) if b in c) for c in cycles]
    assert not cycles, "\n".join(lines)
