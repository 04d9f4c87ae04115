"""The package's import graph, read from the source with ``ast``: no circles, data flowing one way.

An import placed inside a function to dodge a circle hides the circle from Python but not from this
graph: every ``import`` statement counts, wherever it stands.

Two graphs: between files, and between the package's *parts* (each top-level module is a part, each
subpackage one part). A circle between parts (``config`` importing ``serialization`` while a file there
imports ``config``) means a folder straddles two floors, even when no two files import each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "fourierft"
#: Imports that may stand inside a function: lazy loading for start-up time, not to break a circle.
LAZY_OK = {("fourierft", "fourierft.integrations.trainer"),  # AdapterTrainer pulls in transformers.Trainer
           ("fourierft", "fourierft.integrations.callbacks")}  # SpectrumLRCallback: transformers' training args


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in (SRC / PACKAGE).rglob("*.py")}


def _base(name: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def imports(name: str, path: Path, known: set[str]) -> list[tuple[str, bool]]:
    """``(imported internal module, inside a function)`` for every import statement of the module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f) if n is not f}
    found = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _base(name, path, node)
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
            # ``from pkg import submodule`` runs pkg/__init__ too, except for the root (already running)
            targets = subs + ([base] if not subs or base != PACKAGE else [])
        for target in targets:
            while target and target not in known:  # ``import a.b.c`` of a name inside a module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.append((target, id(node) in nested))
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: {t for t, _ in imports(name, path, set(mods))} for name, path in mods.items()}


def part(module: str) -> str:
    """The part a module belongs to: ``fourierft.ops.spectral`` -> ``fourierft.ops``; the root is its own part."""
    return ".".join(module.split(".")[:2])


def part_graph(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    """The file graph collapsed onto parts (imports inside one part dropped)."""
    parts: dict[str, set[str]] = {}
    for module, targets in edges.items():
        parts.setdefault(part(module), set()).update(part(t) for t in targets if part(t) != part(module))
    return parts


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in edges.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_graph_is_read():
    edges = graph()
    assert "fourierft.peft_model" in edges["fourierft"]
    assert "fourierft.serialization.state_dict" in edges["fourierft.peft_model"]
    assert "fourierft.ops.spectral" in edges["fourierft.methods.fourierft"]


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_cycle_between_parts():
    cycle = find_cycle(part_graph(graph()))
    assert cycle is None, "import cycle between parts: " + " -> ".join(cycle)


def test_the_part_graph_sees_a_cycle_the_file_graph_does_not():
    files = {"p.config": {"p.serialization.hub"}, "p.serialization.folders": {"p.config"},
             "p.serialization.hub": set()}
    assert find_cycle(files) is None
    assert find_cycle(part_graph(files)) == ["p.config", "p.serialization", "p.config"]


def test_the_checker_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_function_level_imports_inside_the_package():
    mods = modules()
    hidden = sorted((name, target) for name, path in mods.items()
                    for target, inside in imports(name, path, set(mods)) if inside and (name, target) not in LAZY_OK)
    assert not hidden, f"imports inside functions (a circle dodged?): {hidden}"


def test_data_flows_down():
    edges = graph()
    for low in ("fourierft.serialization.folders", "fourierft.serialization.state_dict", "fourierft.tuner",
                "fourierft.layer", "fourierft.config"):
        assert "fourierft.peft_model" not in reachable(edges, low), low
    for op in ("fourierft.ops.spectral", "fourierft.ops.butterfly"):
        assert not {m for m in reachable(edges, op) if not m.startswith("fourierft.ops")}, op
