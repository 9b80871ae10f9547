#!/usr/bin/env python3
"""llmsql's import graph: its layers, the checks tests/test_architecture.py runs, and the
Mermaid drawing in docs/architecture.md.

Every ``import`` of an llmsql module counts, wherever it is written (module level, inside a
function, under ``TYPE_CHECKING``): a lazy import is still a dependency. A module may import
modules of its own layer or of lower ones, never of a higher one; the graph has no cycles.

Usage: python scripts/import_graph.py [--check] [--mermaid]
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "llmsql"

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("foundations", ("llmsql.errors", "llmsql.arrays", "llmsql.convert", "llmsql.version",
                     "llmsql.files", "llmsql.progress_notebook")),
    ("language", ("llmsql.dialect", "llmsql.parse", "llmsql.udfs")),
    ("plan", ("llmsql.plan", "llmsql.planner", "llmsql.adapters", "llmsql.placement")),
    ("engine", ("llmsql.models", "llmsql.moe", "llmsql.engine")),
    ("backends", ("llmsql.backends", "llmsql.tokens")),
    ("services", ("llmsql.stats", "llmsql.cache", "llmsql.budget", "llmsql.progress",
                  "llmsql.config")),
    ("optimizer", ("llmsql.optimizer",)),
    ("step", ("llmsql.step",)),
    ("executors", ("llmsql.executors",)),
    ("explain", ("llmsql.explain",)),
    ("session", ("llmsql.session", "llmsql.result", "llmsql.explain_html")),
    ("interfaces", ("llmsql.frames", "llmsql.dataframe", "llmsql.jupyter",
                    "llmsql.spark_columns", "llmsql.server", "llmsql.cli", "llmsql")),
)
"""Lowest first. A module's layer is that of the longest name here that is it or its
package (``llmsql`` itself, the public API, is the top)."""


def module_name(path: Path) -> str:
    """``llmsql/step/__init__.py`` -> ``llmsql.step``."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    """Every module of the package, by dotted name."""
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(node: ast.ImportFrom, here: str, is_pkg: bool) -> str:
    if not node.level:
        return node.module or ""
    base = here.split(".") if is_pkg else here.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(tree: ast.AST, here: str, is_pkg: bool, known: set[str]) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node, here, is_pkg)
            subs = {f"{base}.{a.name}" for a in node.names} & known
            out.update(subs or {base})
            if subs and len(subs) < len(node.names):
                out.add(base)
    return {t for t in out if t in known and t != here}


def graph() -> dict[str, set[str]]:
    """Module -> the llmsql modules it imports."""
    mods = modules()
    known = set(mods)
    return {name: _targets(ast.parse(path.read_text()), name, path.name == "__init__.py",
                           known) for name, path in mods.items()}


def layer_of(module: str) -> int:
    """The index in :data:`LAYERS` of ``module``'s layer."""
    best, best_len = -1, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    if best < 0:
        msg = f"{module} is in no layer of scripts/import_graph.py's LAYERS; add it there"
        raise KeyError(msg)
    return best


def upward_imports(g: dict[str, set[str]]) -> list[str]:
    """Imports from a lower layer to a higher one, as readable lines."""
    bad = []
    for mod, deps in sorted(g.items()):
        for dep in sorted(deps):
            if layer_of(dep) > layer_of(mod):
                bad.append(f"{mod} ({LAYERS[layer_of(mod)][0]}) imports {dep} "
                           f"({LAYERS[layer_of(dep)][0]})")
    return bad


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The graph's strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
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

    sys.setrecursionlimit(10_000)
    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def group(module: str) -> str:
    """The box a module is drawn in: its subpackage, or the module for top-level ones."""
    parts = module.split(".")
    return ".".join(parts[:3]) if parts[1:2] == ["executors"] and len(parts) > 2 else (
        ".".join(parts[:2]))


def mermaid(g: dict[str, set[str]]) -> str:
    """The graph collapsed to packages (and top-level modules), as a Mermaid flowchart."""
    edges: dict[str, set[str]] = defaultdict(set)
    nodes: set[str] = set()
    for mod, deps in g.items():
        a = group(mod)
        nodes.add(a)
        for dep in deps:
            b = group(dep)
            if a != b and b != "llmsql":
                edges[a].add(b)
    edges = _reduced(edges)
    lines = ["flowchart BT"]
    for i, (name, _) in enumerate(LAYERS):
        members = sorted(n for n in nodes if layer_of(n) == i)
        if members:
            lines.append(f"  subgraph L{i}[{i}. {name}]")
            lines += [f"    {_id(n)}[{n}]" for n in members]
            lines.append("  end")
    for a in sorted(edges):
        lines += [f"  {_id(a)} --> {_id(b)}" for b in sorted(edges[a])]
    return "\n".join(lines)


def _reduced(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    """The edges less those implied by a longer path (a drawing, not a check)."""

    def reach(a: str, seen: set[str]) -> set[str]:
        for b in edges.get(a, ()):
            if b not in seen:
                seen.add(b)
                reach(b, seen)
        return seen

    out: dict[str, set[str]] = {}
    for a, bs in edges.items():
        implied = set().union(*(reach(b, set()) for b in bs)) if bs else set()
        out[a] = {b for b in bs if b not in implied}
    return out


def _id(name: str) -> str:
    return name.replace(".", "_")


def main() -> int:
    """Print the problems (``--check``, exit 1 if any) and/or the Mermaid graph."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--mermaid", action="store_true")
    args = ap.parse_args()
    g = graph()
    problems = upward_imports(g) + [" <-> ".join(c) for c in cycles(g)]
    if args.mermaid:
        print(mermaid(g))
    if args.check or not args.mermaid:
        print("\n".join(problems) or "no upward imports, no cycles")
    return 1 if problems and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
