"""The project's layout (issue 17): modules in floors, no import cycle, every source file readable in one sitting."""
import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LINES = 500


def sources() -> dict[str, str]:
    """Module name -> path of every top-level source file (tests excluded)."""
    return {f[:-3]: os.path.join(REPO, f) for f in sorted(os.listdir(REPO))
            if f.endswith(".py") and not f.startswith("test_")}


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its file, inside functions included."""
    mods = sources()
    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
            if isinstance(node, ast.Import):
                deps |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                deps.add(node.module.split(".")[0])
        graph[name] = (deps & set(mods)) - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state, stack = {}, []

    def visit(u):
        state[u] = "open"
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == "open":
                return stack[stack.index(v):] + [v]
            if v not in state and (cycle := visit(v)):
                return cycle
        stack.pop()
        state[u] = "done"
        return None

    for u in sorted(graph):
        if u not in state and (cycle := visit(u)):
            return cycle
    return None


def test_find_cycle_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle():
    graph = import_graph()
    assert {"grpo", "sample", "decode", "llama", "scorer", "whisper_worker", "data"} <= set(graph)
    assert "decode" in graph["sample"] and "scorer" in graph["whisper_worker"]  # the graph sees real imports
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_every_source_file_under_500_lines():
    long = {name: n for name, path in sources().items()
            if (n := len(open(path, encoding="utf-8").read().splitlines())) >= MAX_LINES}
    assert not long, f"over {MAX_LINES} lines: {long}"


def test_readme_floors_list_every_module_in_import_order():
    """README's floor list names every source file once, each after every module it imports."""
    text = " ".join(open(os.path.join(REPO, "README.md"), encoding="utf-8").read().split())
    listed = text.split("imports inside functions counted): ", 1)[1].split(".", 1)[0].split(", ")
    graph = import_graph()
    assert sorted(listed) == sorted(graph), set(listed) ^ set(graph)
    floor = {name: i for i, name in enumerate(listed)}
    late = [(m, d) for m in graph for d in graph[m] if floor[d] > floor[m]]
    assert not late, f"README lists these modules below what they import: {late}"
