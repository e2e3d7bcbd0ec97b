"""The package's house: imports point one way (commands -> runtime/artifact -> core), with no cycles.

Read from the source (every `import`, function-local ones included), not from what happens to be
imported at run time, so a lazy import that closes a cycle is caught too.
"""
import ast
from pathlib import Path

from conftest import REPO

PKG = REPO / "theseus_deploy"
# rooms: a top-level module or subpackage of theseus_deploy
CORE = {"errors", "deps", "dist", "config", "registry", "io", "arch", "hf", "data", "metrics", "modeling", "optim", "schedulers",
        "distill", "loyalty", "cpu"}
MIDDLE = {"artifact", "runtime"}
COMMANDS = {"export", "bench", "sweep", "serve", "train", "cli", "__main__"}
LEVEL = {**{r: 0 for r in CORE}, **{r: 1 for r in MIDDLE}, **{r: 2 for r in COMMANDS}}


def _module(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set:
    """Absolute names of the theseus_deploy modules `path` imports."""
    mod = _module(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("theseus_deploy")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("theseus_deploy"):
                out.add(name)
                out |= {f"{name}.{a.name}" for a in node.names}
    return out


def _graph():
    files = [p for p in PKG.rglob("*.py") if "triton_models" not in p.parts]
    modules = {_module(p): p for p in files}
    graph = {}
    for name, path in modules.items():
        graph[name] = {m for m in _imports(path) if m in modules and m != name}
    return graph


def _room(module: str) -> str:
    return module.split(".")[1] if "." in module else "__init__"


def _cycle(graph):
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_every_room_has_a_level():
    rooms = {_room(m) for m in _graph()} - {"__init__"}
    assert rooms <= set(LEVEL), f"rooms without a level in this test: {sorted(rooms - set(LEVEL))}"


def test_imports_point_from_commands_to_runtime_to_core():
    wrong = []
    for mod, deps in _graph().items():
        room = _room(mod)
        for dep in deps:
            target = _room(dep)
            if target == "__init__" or target == room:
                continue
            if LEVEL[target] > LEVEL[room]:
                wrong.append(f"{mod} -> {dep}")
    assert not wrong, "imports that point up (core -> runtime/commands, runtime -> commands):\n" + "\n".join(wrong)


def test_no_import_cycles_between_modules_or_rooms():
    graph = _graph()
    assert _cycle(graph) is None, f"module import cycle: {' -> '.join(_cycle(graph))}"
    rooms = {}
    for mod, deps in graph.items():
        rooms.setdefault(_room(mod), set()).update(_room(d) for d in deps if _room(d) != _room(mod))
    assert _cycle(rooms) is None, f"room import cycle: {' -> '.join(_cycle(rooms))}"


def test_the_readme_path_of_text_classifier_still_works():
    import theseus_deploy.export.runtime as old
    import theseus_deploy.runtime as new

    assert old.TextClassifier is new.TextClassifier and old.load_runner is new.load_runner
