"""The package's shape, as issue 13 asked for it: no import cycle between its modules, no module over about
600 lines, and no comparison on a method's name outside `ubsmoe.methods` (a method is one module)."""

from __future__ import annotations

import ast
from pathlib import Path

from ubsmoe.methods.registry import BUILTIN_METHODS

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted((SRC / "ubsmoe").rglob("*.py")):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    return modules


def _import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package modules it imports when it is imported (module-level statements, not the
    ones under `if TYPE_CHECKING:` nor inside functions, which run later)."""

    def owner(name: str) -> str:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ubsmoe"):
                targets = [
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                    for a in node.names
                ]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("ubsmoe")]
            else:
                continue
            graph[name] |= {owner(t) for t in targets} - {name, ""}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path of module names, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, [*path, nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_the_package_has_no_import_cycle():
    graph = _import_graph(_modules())
    assert "ubsmoe.fl.rounds" in graph["ubsmoe.fl.simulation"]  # the graph sees real imports
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_is_over_600_lines():
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these modules: {long}"


def _method_name_comparisons(path: Path) -> list[str]:
    """`x == "hetlora"`, `x in ("flora", "florist")` and the like: a method's name compared."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Compare):
            continue
        for operand in [node.left, *node.comparators]:
            values = operand.elts if isinstance(operand, ast.Tuple | ast.List | ast.Set) else [operand]
            names = [v.value for v in values if isinstance(v, ast.Constant) and v.value in BUILTIN_METHODS]
            if names:
                found.append(f"{path.name}:{node.lineno} compares with {names}")
    return found


def test_no_method_name_is_compared_outside_the_methods():
    modules = _modules()
    found = [
        hit
        for name, path in modules.items()
        if not name.startswith("ubsmoe.methods")
        for hit in _method_name_comparisons(path)
    ]
    assert not found, found


def test_the_comparison_finder_finds_one(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text('if method == "hetlora" or name in ("flora", "x"):\n    pass\n')
    assert len(_method_name_comparisons(sample)) == 2
