#!/usr/bin/env python3
"""Check the package's shape: no import cycles between its modules, no over-long functions.

    python3 tools/archcheck.py [--src src] [--package gradcomp] [--max-lines 60] [--graph]

An import anywhere in a module counts, inside a function too: a cycle hidden by a deferred
import is still a cycle in the design. Importing one's own parent package does not count
(Python runs the parent's __init__ first anyway, and re-exporting a submodule from it is normal).
Generated code (`_proto`) is left out. `make test` runs this; exit status 1 on any finding.
Only the standard library is used, so it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator
from pathlib import Path

SKIP_PARTS = {"_proto", "__pycache__"}


def find_modules(src: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of `package` under `src`."""
    found: dict[str, Path] = {}
    for path in sorted((src / package).rglob("*.py")):
        rel = path.relative_to(src).with_suffix("")
        if SKIP_PARTS.intersection(rel.parts):
            continue
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        found[".".join(parts)] = path
    return found


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> Iterator[str]:
    """Every dotted name an import statement in `tree` may load (`from a import b` may load a.b)."""
    here = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: climb level - 1 packages up from this module's package
                anchor = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def _owning_module(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of `name` that is one of our modules (None for third-party names)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the modules of the package it imports (its own ancestors excluded)."""
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        targets = {_owning_module(n, modules) for n in _imported_names(tree, module, path.name == "__init__.py")}
        graph[module] = {t for t in targets if t is not None and t != module and not module.startswith(t + ".")}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        order[v] = low[v] = len(order)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in order:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], order[w])
        if low[v] == order[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in order:
            visit(v)
    return sorted(components)


def long_functions(modules: dict[str, Path], max_lines: int) -> list[tuple[Path, int, str, int]]:
    """(file, line, name, length) of every function or method longer than `max_lines` lines."""
    out = []
    for path in modules.values():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > max_lines:
                    out.append((path, node.lineno, node.name, length))
    return sorted(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=Path("src"), help="the directory that holds the package")
    parser.add_argument("--package", default="gradcomp")
    parser.add_argument("--max-lines", type=int, default=60, help="longest function allowed (def line to end)")
    parser.add_argument("--graph", action="store_true", help="also print each module's imports of the package")
    args = parser.parse_args(argv)
    modules = find_modules(args.src, args.package)
    if not modules:
        print(f"archcheck: no modules of {args.package!r} under {args.src}", file=sys.stderr)
        return 2
    graph = import_graph(modules)
    if args.graph:
        for module in sorted(graph):
            print(f"{module} -> {', '.join(sorted(graph[module])) or '-'}")
    cycles = import_cycles(graph)
    longs = long_functions(modules, args.max_lines)
    for cycle in cycles:
        print("import cycle: " + " <-> ".join(cycle))
    for path, line, name, length in longs:
        print(f"long function: {path}:{line} {name} ({length} lines > {args.max_lines})")
    edges = sum(len(targets) for targets in graph.values())
    print(
        f"archcheck: {len(modules)} modules, {edges} internal imports: "
        f"{len(cycles)} import cycle(s), {len(longs)} function(s) over {args.max_lines} lines"
    )
    return 1 if cycles or longs else 0


if __name__ == "__main__":
    sys.exit(main())
