"""The import graph of src/semantic_server: its cycles, its arrows up, its largest modules.

    .venv/bin/python scripts/import_graph.py [--top N]

Reads the package with ``ast`` (nothing is imported) and prints

* **cycles**: strongly connected components of more than one module, once over the
  imports that run and once counting those under ``if TYPE_CHECKING:`` too;
* **arrows up**: imports against the layer order below, the same two ways;
* the largest modules by lines.

An import inside a function still counts (it runs, only later) and is marked ``(lazy)``.
Relative imports are not read (the package has none). It is a report, not a check: it
always exits 0.

The layers, top to bottom; a module may import its own layer and any layer below it:

    top      app, cli, __main__: the process and its wiring
    api      api/: HTTP only
    server   server_context (the parts as the routes see them), snapshot (one typed
             snapshot of the whole server) and observability (Prometheus over that
             snapshot, JSON logs): they read every layer below and nothing below reads them
    swap     swap/
    engine   engine/
    cache    cache/
    models   models/
    ground   what every layer shares and that depends on nothing above: settings,
             error types, the OpenBLAS preload, agent-id hashing, the Observer protocol
             and the plain-data results it receives
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

PACKAGE = "semantic_server"
SOURCE = Path(__file__).resolve().parent.parent / "src" / PACKAGE
# (layer, the module names or package prefixes in it), top first
LAYERS = (
    ("top", ("app", "cli", "__main__")),
    ("api", ("api",)),
    ("server", ("server_context", "snapshot", "observability")),
    ("swap", ("swap",)),
    ("engine", ("engine",)),
    ("cache", ("cache",)),
    ("models", ("models",)),
    ("ground", ("", "config", "errors", "blas", "agent_ids", "observer", "request_outcome",
                "swap_result")),
)


def module_name(path: Path) -> str:
    """``api/tools.py`` -> ``api.tools``; the package's own ``__init__`` is ``""``."""
    parts = path.relative_to(SOURCE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int | None:
    """The index of ``module``'s layer in LAYERS (0 is the top), None if unplaced."""
    for index, (_, names) in enumerate(LAYERS):
        if any(module == name or (name and module.startswith(name + ".")) for name in names):
            return index
    return None


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(tree: ast.Module, modules: set[str], here: str) -> list[tuple[str, str]]:
    """(imported module, kind) for each import of the package in ``tree``; kind is
    ``runtime``, ``lazy`` (inside a function) or ``type`` (under TYPE_CHECKING)."""
    found: list[tuple[str, str]] = []

    def target(name: str) -> str | None:
        """The package module ``name`` (dotted, absolute) is, or the nearest package."""
        if name != PACKAGE and not name.startswith(PACKAGE + "."):
            return None
        name = name.removeprefix(PACKAGE).removeprefix(".")
        while name not in modules and name:
            name = name.rpartition(".")[0]
        return name

    def visit(node: ast.AST, kind: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for item in child.body:
                    visit_one(item, "type")
                for item in child.orelse:
                    visit_one(item, kind)
            else:
                visit_one(child, kind)

    def visit_one(node: ast.AST, kind: str) -> None:
        if isinstance(node, ast.Import):
            found.extend((t, kind) for alias in node.names
                         if (t := target(alias.name)) is not None)
        elif isinstance(node, ast.ImportFrom) and node.module:  # absolute: the package's way
            # `from pkg import module` imports the module; `from module import name`, the module
            found.extend((t, kind) for alias in node.names
                         if (t := target(f"{node.module}.{alias.name}")) is not None)
        else:
            inner = "lazy" if kind == "runtime" and isinstance(
                node, ast.FunctionDef | ast.AsyncFunctionDef) else kind
            visit(node, inner)

    visit(tree, "runtime")
    return [(t, k) for t, k in found if t != here]


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the components of more than one module, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                connect(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return sorted(components)


def show(module: str) -> str:
    return module or PACKAGE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=12, help="how many large modules to list")
    args = parser.parse_args()

    paths = {module_name(p): p for p in sorted(SOURCE.rglob("*.py"))}
    lines = {m: len(p.read_text().splitlines()) for m, p in paths.items()}
    strength = ("type", "lazy", "runtime")  # an edge imported two ways counts as the later
    edges: dict[tuple[str, str], str] = {}  # (importer, imported) -> its strongest kind
    for module, path in paths.items():
        for imported, kind in imports(ast.parse(path.read_text()), set(paths), module):
            edges[(module, imported)] = max(kind, edges.get((module, imported), kind),
                                            key=strength.index)

    def label(edge: tuple[str, str]) -> str:
        kind = edges[edge]
        return f"{show(edge[0])} -> {show(edge[1])}" + (" (lazy)" if kind == "lazy" else "")

    type_only = sum(kind == "type" for kind in edges.values())
    print(f"import graph of src/{PACKAGE}: {len(paths)} modules, {len(edges)} imports "
          f"between them ({type_only} only under TYPE_CHECKING)")

    counts = {}
    print("\ncycles (strongly connected components of more than one module):")
    for name, kinds in (("runtime", {"runtime", "lazy"}),
                        ("with TYPE_CHECKING", {"runtime", "lazy", "type"})):
        graph: dict[str, set[str]] = {m: set() for m in paths}
        for (a, b), kind in edges.items():
            if kind in kinds:
                graph[a].add(b)
        components = strongly_connected(graph)
        counts[f"cycles {name}"] = len(components)
        print(f"  {name}: {len(components)}")
        for component in components:
            inside = sorted(e for e in edges if e[0] in component and e[1] in component
                            and edges[e] in kinds)
            print(f"    {{{', '.join(show(m) for m in component)}}}")
            for edge in inside:
                print(f"      {label(edge)}" + (" (TYPE_CHECKING)" if edges[edge] == "type"
                                                else ""))

    order = " > ".join(name for name, _ in LAYERS)
    print(f"\narrows up (against the layer order {order}):")
    for name, kinds in (("runtime", {"runtime", "lazy"}), ("TYPE_CHECKING", {"type"})):
        up = sorted(e for e, kind in edges.items() if kind in kinds
                    and None not in (layer_of(e[0]), layer_of(e[1]))
                    and layer_of(e[1]) < layer_of(e[0]))
        counts[f"arrows up {name}"] = len(up)
        print(f"  {name}: {len(up)}")
        for a, b in up:
            print(f"    {label((a, b))}   [{LAYERS[layer_of(a)][0]} -> {LAYERS[layer_of(b)][0]}]")
    unplaced = sorted(show(m) for m in paths if layer_of(m) is None)
    if unplaced:
        print(f"  modules in no layer (place them in LAYERS): {', '.join(unplaced)}")

    print(f"\nlargest modules (lines), of {sum(lines.values())} in all:")
    for module, count in sorted(lines.items(), key=lambda item: -item[1])[:args.top]:
        print(f"  {count:6d}  {show(module)}")

    print("\nsummary: " + "; ".join(f"{k} {v}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
