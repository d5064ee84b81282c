"""The package's import graph: no cycle, and no arrow that runs up the floors of docs/architecture.md.

Every import counts, module-level or inside a function (a deferred import is how a cycle hides).
Each module of src/longtail must be placed on a floor below; a new module that is not placed fails
the test, so whoever adds it decides where it stands.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "longtail"

# Floors from the ground up (docs/architecture.md); a module may import its own floor and lower ones.
FLOORS: list[tuple[str, tuple[str, ...]]] = [
    ("ground", ("errors", "registry", "config", "io", "dist", "log", "rundir", "runlock", "outputs")),
    ("data", ("data",)),
    ("models", ("models",)),
    ("losses", ("losses", "similarity.windows", "similarity.projection")),
    ("optim", ("optim",)),
    ("eval", ("eval", "logit_adjust")),
    ("methods", ("methods",)),
    ("engine", ("engine", "callbacks")),  # callbacks: the protocol the loop calls, TensorBoard
    ("runs", ("runmodel", "features", "runs")),
    ("tools", ("inference", "preprocess", "predict_files", "export", "report", "bench", "doctor", "similarity",
               "dlsa", "studies", "analysis", "demo", "runs_list")),
    ("cli", ("cli", "__main__", "__init__")),  # the package face re-exports the public API
]


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def floor_of(module: str) -> int:
    """The floor of a module: the most specific prefix that names it."""
    best, best_len = None, -1
    for level, (_, prefixes) in enumerate(FLOORS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = level, len(prefix)
    if best is None:
        raise AssertionError(f"module longtail.{module} stands on no floor: place it in tests/test_architecture.py "
                             "FLOORS and docs/architecture.md")
    return best


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Project modules that `path` imports (relative and absolute, anywhere in the file)."""
    here = module_name(path)
    package = here.split(".") if path.name == "__init__.py" else here.split(".")[:-1]
    if here == "__init__":
        package = []
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            elif node.module and node.module.startswith("longtail"):
                target = node.module[len("longtail."):] if node.module != "longtail" else ""
            else:
                continue
            for alias in node.names:
                full = f"{target}.{alias.name}" if target else alias.name
                if full in modules:
                    out.add(full)
                elif target in modules:
                    out.add(target)
                elif target == "" and alias.name in modules:
                    out.add(alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("longtail."):
                    name = alias.name[len("longtail."):]
                    while name and name not in modules:
                        name = name.rpartition(".")[0]
                    if name:
                        out.add(name)
    out.discard(here)
    return out


def graph() -> dict[str, set[str]]:
    files = sorted(SRC.rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): imports_of(f, modules) for f in files}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_floor_rule_catches_an_upward_arrow():
    assert floor_of("engine.loop") > floor_of("methods.swrm")
    assert floor_of("similarity.command") > floor_of("methods") > floor_of("similarity.projection")


def test_import_graph_has_no_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_runs_up_a_floor():
    upward = []
    for module, targets in graph().items():
        for target in targets:
            if floor_of(target) > floor_of(module):
                upward.append(f"{module} ({FLOORS[floor_of(module)][0]}) -> {target} ({FLOORS[floor_of(target)][0]})")
    assert not upward, "imports that run up:\n" + "\n".join(sorted(upward))
