"""The package's shape, read from its source: imports point down the layers (no cycle, no upward import, call-time
imports included), and the server's functions stay short."""

import ast
from pathlib import Path

import lamina

ROOT = Path(lamina.__file__).parent

# Lower first. A module may import its own unit (package) and the units of lower rank; units of the same rank do not
# see each other (the model never imports the tokenizer, nor the tokenizer the model).
RANKS = {
    "errors": 0,
    "kernels": 1,
    "model": 1,
    "tokenizer": 1,
    "quant": 2,
    "weights": 3,
    "parallel": 3,
    "engine": 4,
    "llama": 5,
    "loader": 6,
    "": 6.5,  # the package itself: the public API (lamina/__init__.py)
    "serve": 7,
    "cli": 8,
    "__main__": 9,
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(("lamina",) + parts).removesuffix(".__init__")
        out[name] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The lamina modules `name` imports anywhere in its source (module level or inside functions)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found.update(t for t in targets if t == "lamina" or t.startswith("lamina."))
    return found


def _unit(module: str) -> str:
    return module.split(".")[1] if module != "lamina" else ""


def test_imports_point_down_and_have_no_cycle():
    modules = _modules()
    graph = {name: _imports(name, path, set(modules)) for name, path in modules.items()}
    upward = []
    for name, targets in graph.items():
        for target in targets:
            mine, theirs = _unit(name), _unit(target)
            if mine == theirs or (name == "lamina" and RANKS[theirs] < RANKS[""]):
                continue
            if RANKS[theirs] >= RANKS[mine]:
                upward.append(f"{name} imports {target}")
    assert not upward, "imports that do not point down:\n" + "\n".join(sorted(upward))

    # No cycle among modules (a call-time import counts as an import).
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(nxt) :] + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_the_layers_exist_as_named():
    assert {_unit(m) for m in _modules()} <= set(RANKS)


def test_server_functions_are_short():
    long = []
    for path in (ROOT / "serve").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 80:
                    long.append(f"{path.name}:{node.name} has {length} lines")
    assert not long, long
