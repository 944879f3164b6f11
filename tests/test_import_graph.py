"""The import graph of `perpo_jax` has no circle, function-local imports included.

The graph is read from the source with `ast` (nothing is imported), so an
`import` inside a function, which Python resolves only when it runs and which
hides a back-arrow, counts like one at the top of a module. Two levels are
checked: modules (`perpo_jax.data.pope`) and rooms (a subpackage such as
`perpo_jax.data`, or a top-level module such as `perpo_jax.config`), since two
rooms that each reach into the other are one room in all but name.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "perpo_jax"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules `path` imports anywhere in its body (relative ones resolved)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # `from pkg import mod` names a module; `from mod import fn` names the module
            targets = [f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in known else prefix
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a name inside a.b
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    known = set(files)
    graph = {name: imported_modules(path, name, known) for name, path in files.items()}
    for name in graph:  # a package's __init__ is not an edge its own modules take
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    return graph


def room_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


def room_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    rooms: dict[str, set[str]] = {}
    for module, targets in graph.items():
        room = room_of(module)
        rooms.setdefault(room, set()).update(
            room_of(t) for t in targets if room_of(t) != room and room_of(t) != "perpo_jax")
    return rooms


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def describe(graph: dict[str, set[str]], component: list[str]) -> str:
    members = set(component)
    arrows = [f"{a} -> {b}" for a in component for b in sorted(graph[a]) if b in members]
    return "; ".join(arrows)


def test_the_walk_sees_function_local_and_relative_imports(tmp_path):
    root = tmp_path / "pkg"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "sub" / "__init__.py").write_text("")
    (root / "a.py").write_text("from pkg.sub import b\n")
    (root / "sub" / "b.py").write_text("def f():\n    from ..a import thing\n    return thing\n")
    (root / "sub" / "c.py").write_text("from . import b\nimport pkg.a as alias\n")
    graph = import_graph(root)
    assert graph["pkg.a"] == {"pkg.sub.b"}
    assert graph["pkg.sub.b"] == {"pkg.a"}
    assert graph["pkg.sub.c"] == {"pkg.sub.b", "pkg.a"}
    assert cycles(graph) == [["pkg.a", "pkg.sub.b"]]
    assert cycles(room_graph(graph)) == [["pkg.a", "pkg.sub"]]


def test_no_module_imports_itself_round_a_circle():
    graph = import_graph()
    assert "perpo_jax.train.step" in graph and graph["perpo_jax.train.step"]  # the walk is real
    found = cycles(graph)
    assert not found, "import circles:\n" + "\n".join(describe(graph, c) for c in found)


def test_no_two_rooms_reach_into_each_other():
    rooms = room_graph(import_graph())
    found = cycles(rooms)
    assert not found, "room circles:\n" + "\n".join(describe(rooms, c) for c in found)
