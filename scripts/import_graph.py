"""The import graph of clpt's packages, from the source (AST), with its cycles.

    python scripts/import_graph.py            # summary: modules, edges, in-function imports, cycles
    python scripts/import_graph.py --edges    # every edge, marked (f) where the import is inside a function

An edge A -> B means module A imports module B, at module level or inside a
function (an import placed inside a function still couples A to B). A cycle is
a strongly connected component of more than one module. `tests/test_layering.py`
asserts there is none.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"clpt": ROOT / "clpt", "clpt_kernels": ROOT / "kernels", "clpt_cli": ROOT / "cli"}


def modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = path
    return out


def _resolve(name: str, known: set[str]) -> str | None:
    """The longest known module that `name` (a dotted import target) lies in."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def edges() -> dict[tuple[str, str], bool]:
    """(importer, imported) -> True if every such import sits inside a function."""
    mods = modules()
    known = set(mods)
    out: dict[tuple[str, str], bool] = {}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        is_pkg = path.name == "__init__.py"

        def visit(node: ast.AST, in_fn: bool, mod: str = mod, is_pkg: bool = is_pkg) -> None:
            for child in ast.iter_child_nodes(node):
                fn = in_fn or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
                targets: list[str] = []
                if isinstance(child, ast.Import):
                    targets = [_resolve(a.name, known) or "" for a in child.names]
                elif isinstance(child, ast.ImportFrom):
                    base = child.module or ""
                    if child.level:
                        pkg = mod if is_pkg else mod.rpartition(".")[0]
                        for _ in range(child.level - 1):
                            pkg = pkg.rpartition(".")[0]
                        base = f"{pkg}.{base}" if base else pkg
                    # `from a import b`: the module a.b where b is one, else a
                    targets = [
                        f"{base}.{a.name}" if f"{base}.{a.name}" in known else (_resolve(base, known) or "")
                        for a in child.names
                    ]
                for dst in targets:
                    if dst and dst != mod:
                        key = (mod, dst)
                        out[key] = out.get(key, True) and fn
                visit(child, fn)

        visit(tree, False)
    return out


def cycles(graph: dict[tuple[str, str], bool]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    succ: dict[str, list[str]] = {}
    for a, b in graph:
        succ.setdefault(a, []).append(b)
        succ.setdefault(b, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    sys.setrecursionlimit(10000)

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in succ[v]:
            if w not in index:
                strong(w)
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

    for v in sorted(succ):
        if v not in index:
            strong(v)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edges", action="store_true", help="print every edge")
    args = ap.parse_args()
    graph = edges()
    in_fn = sum(1 for f in graph.values() if f)
    found = cycles(graph)
    mod_level = cycles({k: v for k, v in graph.items() if not v})
    if args.edges:
        for (a, b), f in sorted(graph.items()):
            print(f"{a} -> {b}{' (f)' if f else ''}")
    print(f"{len(modules())} modules, {len(graph)} import edges, {in_fn} of them only inside functions")
    print(f"cycles (all imports): {len(found)}; module-level imports alone: {len(mod_level)}")
    for comp in found:
        print(f"  cycle of {len(comp)}: {', '.join(comp)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
