"""The project's layout (issue 17): modules in floors, no import cycle, every source file readable
in one sitting."""

import ast
import glob
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LINES = 500
MAX_README_LINES = 300  # README is the front door; the manual lives in docs/


def read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def sources() -> dict[str, str]:
    """Module name -> path of every source file (tests excluded): the top level's, then the tooling
    package's as `tools.<name>` (its __init__.py holds only a docstring)."""
    top = {
        f[:-3]: os.path.join(REPO, f)
        for f in sorted(os.listdir(REPO))
        if f.endswith(".py") and not f.startswith("test_")
    }
    tools = {
        f"tools.{f[:-3]}": os.path.join(REPO, "tools", f)
        for f in sorted(os.listdir(os.path.join(REPO, "tools")))
        if f.endswith(".py") and f != "__init__.py"
    }
    return {**top, **tools}


def imported_modules(tree: ast.AST) -> set[str]:
    """The modules a file's imports name, anywhere in it: `import a.b` and `from a.b import c` name
    `a`; a module of the tools package is named whole, `tools.b`, however it is imported."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "tools":
            names |= {f"tools.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    modules = set()
    for name in names:
        parts = name.split(".")
        if parts[0] == "tools" and len(parts) > 1:
            modules.add(f"tools.{parts[1]}")
        else:
            modules.add(parts[0])
    return modules


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its file, inside functions included."""
    mods = sources()
    graph = {}
    for name, path in mods.items():
        deps = imported_modules(ast.parse(read(path), path))
        graph[name] = (deps & set(mods)) - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state = {}
    stack = []

    def visit(u):
        state[u] = "open"
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == "open":
                return stack[stack.index(v) :] + [v]
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


def test_imported_modules_names_the_tools_package_by_module():
    tree = ast.parse(
        "import a.b\nfrom c import d\nfrom tools import e, f\nfrom tools.g import h\n"
        "import tools.i\nfrom . import j\ndef k():\n    import m\n"
    )
    expected = {"a", "c", "tools.e", "tools.f", "tools.g", "tools.i", "m"}
    assert imported_modules(tree) == expected


def test_no_import_cycle():
    graph = import_graph()
    assert {"grpo", "sample", "decode", "llama", "scorer", "whisper_worker", "data"} <= set(graph)
    assert {"tools.bench", "tools.gpu_check", "tools.memory"} <= set(graph)
    # the graph sees real imports
    assert "decode" in graph["sample"]
    assert "scorer" in graph["whisper_worker"]
    assert "tools.bench_common" in graph["tools.bench"]
    assert "lora" in graph["tools.memory"]
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_every_source_file_under_500_lines():
    lengths = {name: len(read(path).splitlines()) for name, path in sources().items()}
    long = {name: n for name, n in lengths.items() if n >= MAX_LINES}
    assert not long, f"over {MAX_LINES} lines: {long}"


def test_floor_list_names_every_module_in_import_order():
    """docs/layout.md's floor list names every source file once, each after what it imports."""
    text = " ".join(read(os.path.join(REPO, "docs", "layout.md")).split())
    # the list ends at a period and a space: the modules' own dots (tools.bench) stay in their names
    listed = text.split("imports inside functions counted): ", 1)[1].split(". ", 1)[0].split(", ")
    graph = import_graph()
    assert sorted(listed) == sorted(graph), set(listed) ^ set(graph)
    floor = {name: i for i, name in enumerate(listed)}
    late = [(m, d) for m in graph for d in graph[m] if floor[d] > floor[m]]
    assert not late, f"docs/layout.md lists these modules below what they import: {late}"


def markdown_links(path: str) -> list[str]:
    """The relative link targets of a markdown file, code blocks left out (`[text](target)`)."""
    text = re.sub(r"```.*?```", "", read(path), flags=re.DOTALL)
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in t]


def anchors(path: str) -> set[str]:
    """GitHub's anchors of a markdown file's headings: lowercased, punctuation dropped,
    spaces to '-'."""
    heads = re.findall(r"^#+ (.+)$", read(path), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def broken_links(path: str) -> list[str]:
    """The links of a markdown file to a file, or to a markdown heading, that does not exist."""
    bad = []
    for target in markdown_links(path):
        file, _, anchor = target.partition("#")
        if file:
            where = os.path.normpath(os.path.join(os.path.dirname(path), file))
        else:
            where = path  # an anchor in the file itself
        if not os.path.exists(where):
            bad.append(target)
            continue
        if anchor and where.endswith(".md") and anchor not in anchors(where):
            bad.append(target)
    return bad


def test_anchors_and_broken_links_find_what_is_wrong(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other\n\n## Peer recipes: GSPO, `--tis-cap`\n")
    page.write_text(
        "# Page\n[a](other.md) [b](other.md#peer-recipes-gspo---tis-cap) [c](#page)\n"
        "[d](missing.md#x) [e](other.md#nowhere) [f](https://example.com/x.md)\n"
        "```\n[g](in-code.md)\n```\n"
    )
    assert broken_links(str(page)) == ["missing.md#x", "other.md#nowhere"]


def test_readme_is_a_front_door_and_every_docs_page_is_linked():
    """README has at most MAX_README_LINES lines; every docs/*.md page is linked from README; no
    link of README or of a docs page points at a file or heading that does not exist."""
    readme = os.path.join(REPO, "README.md")
    n = len(read(readme).splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; move the manual's part to docs/"
    pages = sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))
    linked = {os.path.join(REPO, t.partition("#")[0]) for t in markdown_links(readme)}
    unlinked = set(pages) - {os.path.normpath(path) for path in linked}
    assert pages
    assert not unlinked, f"docs pages README does not link: {unlinked}"
    broken = {}
    for path in [readme] + pages:
        if broken_links(path):
            broken[os.path.relpath(path, REPO)] = broken_links(path)
    assert not broken, f"links to nothing: {broken}"
