"""The package's import graph has no cycle: every module can be read after the ones it uses;
the README's Layout section names every module, and only modules that exist."""

import ast
import re
from pathlib import Path

import draftopd

ROOT = Path(draftopd.__file__).parent
README = Path(__file__).resolve().parents[1] / "README.md"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> draftopd modules it imports anywhere in its body (lazy imports included)."""
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("draftopd"):
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("draftopd"))
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def layer(module: str) -> str:
    """The layer a module belongs to: its subpackage (draftopd.training), or itself at the top."""
    return ".".join(module.split(".")[:2])


def test_no_import_cycle_between_modules():
    graph = import_graph()
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_no_import_cycle_between_layers():
    """model, decoding, data, training, evaluation, cli: each uses only the ones below it."""
    layers: dict[str, set[str]] = {}
    for module, deps in import_graph().items():
        if module == "draftopd":  # the lazy front door re-exports from every layer
            continue
        layers.setdefault(layer(module), set()).update(layer(d) for d in deps if layer(d) != layer(module))
    for deps in layers.values():
        deps.discard("draftopd")
    assert find_cycle(layers) is None, " -> ".join(find_cycle(layers))


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def package_modules() -> set[str]:
    """Module files under src/draftopd, relative to it; the shipped drafters' copies are data."""
    return {p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*.py")
            if p.name != "__init__.py" and p.relative_to(ROOT).parts[0] != "drafters"}


def layout_entries(readme: str) -> tuple[set[str], set[str]]:
    """(module files, folders) that the README's Layout block names under `src/draftopd/`.

    A line indented two spaces opens an entry: a folder (`model/ ...`) whose files follow on it
    and on its deeper-indented continuation lines, or top-level files (`io.py ... hub.py`).
    """
    block = readme.split("\n## Layout\n", 1)[1].split("```")[1].splitlines()
    lines = block[block.index("src/draftopd/") + 1:]
    files, folders, folder = set(), set(), ""
    for line in lines:
        indent = len(line) - len(line.lstrip())
        if not line.strip():
            continue
        if indent == 0:  # benchmarks/, configs/: outside the package
            break
        if indent == 2:
            head = line.split()[0]
            folder = head if head.endswith("/") else ""
            if folder:
                folders.add(folder)
        files.update(folder + name for name in re.findall(r"(?<![\w/*.-])\w+\.py\b", line))
    return files, folders


def test_readme_layout_names_every_module_and_nothing_stale():
    named, folders = layout_entries(README.read_text())
    modules = package_modules()
    assert not modules - named, f"README Layout misses {sorted(modules - named)}"
    assert not named - modules, f"README Layout names files that do not exist: {sorted(named - modules)}"
    assert all((ROOT / f).is_dir() for f in folders), sorted(f for f in folders if not (ROOT / f).is_dir())
