"""artifacts/ imports one way: the store at the bottom, what builds on it (verified, index, staging)
above it, the backends (local, s3) above those, and artifacts/__init__.py on top wiring them together
(backends, the run index and the staging area's gc register with the store; it imports none of them).

The graph is read from the source (ast), every import counted: at module level or inside a function,
`import artifacts.x`, `from artifacts.x import y`, `from artifacts import x` (the submodule x, or the
package's __init__ for a name), relative ones, and a string constant naming an artifacts module passed
to a call (importlib.import_module("artifacts.s3")), the rule artifacts/code.py follows for closures."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "artifacts"
INIT = "__init__"


def _target(dotted: str, modules: set[str]) -> str | None:
    """The artifacts module that importing `dotted` runs (None: not part of artifacts)."""
    parts = dotted.split(".")
    if parts[0] != "artifacts":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in modules else INIT


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """{module: the artifacts modules it imports} for every artifacts/*.py (by stem; __init__ too)."""
    modules = {p.stem for p in package.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for name in sorted(modules):
        found: set[str | None] = set()
        for node in ast.walk(ast.parse((package / f"{name}.py").read_text())):
            if isinstance(node, ast.Import):
                found |= {_target(a.name, modules) for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = "artifacts" if node.level else node.module or ""
                if node.level and node.module:
                    base = f"artifacts.{node.module}"
                if base == "artifacts":  # from artifacts import verified: the submodule, else a name of __init__
                    found |= {a.name if a.name in modules else INIT for a in node.names}
                else:
                    found.add(_target(base, modules))
            elif isinstance(node, ast.Call):
                found |= {_target(a.value, modules) for a in node.args
                          if isinstance(a, ast.Constant) and isinstance(a.value, str) and a.value.startswith("artifacts.")}
        graph[name] = {m for m in found if m is not None and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, grey = on the current path)."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "grey"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "grey":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "black"
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_artifacts_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "artifacts/ imports in a circle: " + " -> ".join(f"{m}.py" for m in cycle)


def test_the_store_imports_nothing_built_on_it():
    graph = import_graph()
    above = {"local", "s3", "staging", "index", "verified", INIT}
    assert not graph["store"] & above, f"artifacts/store.py imports {sorted(graph['store'] & above)}"
    for name in ("staging", "index", "verified", "local", "s3"):
        assert not graph[name] & {"local", "s3", INIT}, f"artifacts/{name}.py imports {sorted(graph[name])}"


def test_the_graph_sees_every_kind_of_import(tmp_path):
    # the reader itself can fail: each form below closes a circle it must report
    pkg = tmp_path / "artifacts"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from artifacts.a import x\n")
    (pkg / "a.py").write_text("def f():\n    from artifacts import b\n")
    (pkg / "b.py").write_text("import importlib\ndef g():\n    importlib.import_module('artifacts.c')\n")
    (pkg / "c.py").write_text("from . import a\nfrom artifacts import open_store\n")
    graph = import_graph(pkg)
    assert graph == {"__init__": {"a"}, "a": {"b"}, "b": {"c"}, "c": {"a", "__init__"}}
    assert find_cycle(graph) == ["__init__", "a", "b", "c", "__init__"]
