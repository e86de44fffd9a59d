"""The package's import graph: its cycles, and the imports its layers forbid.

    python tools/import_graph.py            # stagewise_pl and callbacks/ (installed as stagewise_pl.callbacks)

Reads the source with ``ast`` (nothing is imported). Every import counts, the ones inside functions too: a lazy
import hides an edge from the interpreter's start-up, not from the design. Prints each cycle (a strongly connected
group of modules), each forbidden import (``LAYERS``: the leaves -- models, data, ... -- never import the phase
kinds), and the most coupled modules. Exits 1 on a cycle or a forbidden import; tests/test_architecture.py runs it
in every clone.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"stagewise_pl": ROOT / "stagewise_pl", "stagewise_pl.callbacks": ROOT / "callbacks"}
# (importer prefix, imported prefix): a module under the first may not import one under the second
LAYERS = [(leaf, "stagewise_pl.phases") for leaf in ("stagewise_pl.models", "stagewise_pl.data",
                                                     "stagewise_pl.rollout", "stagewise_pl.verify",
                                                     "stagewise_pl.kernels", "stagewise_pl.tasks")]


def modules() -> dict[str, Path]:
    """Module name -> file, for every module of the packages (a package is its ``__init__``)."""
    out = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


def _resolve(name: str, known: set[str]) -> str | None:
    """The longest known module that ``name`` is or lies in (``a.b.c`` -> ``a.b`` when ``c`` is a name in it)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (itself left out)."""
    files = modules()
    known = set(files)
    edges: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, up level - 1
                    anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in node.names] or [base]
            for name in names:
                target = _resolve(name, known)
                if target is not None and target != module:
                    edges[module].add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], 0
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    out.append(sorted(group))
    return out


def forbidden(edges: dict[str, set[str]]) -> list[str]:
    """``importer -> imported`` for every import a layer rule forbids."""
    def under(module: str, prefix: str) -> bool:
        return module == prefix or module.startswith(prefix + ".")

    return [f"{a} -> {b}" for a in sorted(edges) for b in sorted(edges[a])
            for low, high in LAYERS if under(a, low) and under(b, high)]


def main() -> int:
    edges = graph()
    found, bad = cycles(edges), forbidden(edges)
    for group in found:
        print("cycle: " + " <-> ".join(group))
    for line in bad:
        print("forbidden: " + line)
    importers: dict[str, int] = {}
    for targets in edges.values():
        for t in targets:
            importers[t] = importers.get(t, 0) + 1
    top = sorted(importers.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
    print("most imported: " + ", ".join(f"{m} ({n})" for m, n in top))
    top = sorted(edges.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:5]
    print("most importing: " + ", ".join(f"{m} ({len(t)})" for m, t in top))
    print(f"{len(edges)} modules, {sum(map(len, edges.values()))} imports, {len(found)} cycle(s), "
          f"{len(bad)} forbidden import(s)")
    return 1 if found or bad else 0


if __name__ == "__main__":
    sys.exit(main())
