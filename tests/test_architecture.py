"""The package's import graph has no cycle: every module can be read after the ones it uses."""

import ast
from pathlib import Path

import draftopd

ROOT = Path(draftopd.__file__).parent


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
