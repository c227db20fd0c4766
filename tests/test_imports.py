"""The project's files import each other downwards only: no cycle, function-level imports included."""
import ast
import sys

from helpers import ROOT


def imports(path) -> set[str]:
    """The top-level package names a file imports anywhere in it (in functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def project_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports, for every file of the project and its scripts."""
    files = {p.stem: p for p in [*ROOT.glob("*.py"), *(ROOT / "scripts").glob("*.py")]}
    return {name: (imports(path) & files.keys()) - {name} for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of graph as [a, b, ..., a], or None."""
    state, path = {}, []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycles_and_the_lowest_files_import_only_torch():
    graph = project_graph()
    assert {"model", "generate", "kernels", "checkpoint", "quantize", "speculative"} <= graph.keys()
    assert find_cycle(graph) is None, find_cycle(graph)
    for low in ("model", "speculative"):  # model.py and speculative.py: torch and the standard library only
        assert imports(ROOT / f"{low}.py") - set(sys.stdlib_module_names) == {"torch"}, low
