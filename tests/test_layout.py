"""The package's house: imports point one way (commands -> runtime/artifact -> core), with no cycles.

Read from the source (every `import`, function-local ones included), not from what happens to be
imported at run time, so a lazy import that closes a cycle is caught too.
"""
import ast
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO
from theseus_deploy.deps import PACKAGES

PKG = REPO / "theseus_deploy"
# rooms: a top-level module or subpackage of theseus_deploy
CORE = {"errors", "deps", "dist", "config", "registry", "io", "arch", "hf", "data", "metrics", "modeling", "optim", "schedulers",
        "distill", "loyalty", "cpu"}
MIDDLE = {"artifact", "runtime"}
COMMANDS = {"export", "bench", "sweep", "serve", "recipes", "cli", "__main__"}
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


# recipes/: each recipe file stands alone over the shared modules (docs/design.md)
RECIPES = {"finetune": {"common", "loop"}, "compress": {"common", "loop"}, "evaluate": {"common"},
           "loop": {"common"}, "common": set()}


def test_a_recipe_imports_only_the_shared_recipe_modules():
    graph = _graph()
    found = {m.rpartition(".")[2] for m in graph if _room(m) == "recipes" and m != "theseus_deploy.recipes"}
    assert found == set(RECIPES), f"recipes/ modules without a rule in this test: {sorted(found ^ set(RECIPES))}"
    wrong = []
    for name, allowed in RECIPES.items():
        mod = f"theseus_deploy.recipes.{name}"
        inside = {d.rpartition(".")[2] for d in graph[mod] if _room(d) == "recipes" and d != "theseus_deploy.recipes"}
        wrong += [f"{mod} -> recipes.{d}" for d in sorted(inside - allowed)]
    assert not wrong, "a recipe imports another recipe (only common / loop are shared):\n" + "\n".join(wrong)


def test_recipes_sit_below_the_other_commands():
    """recipes/ imports no other command (nor cli); only cli and sweep import it."""
    graph = _graph()
    up = [f"{m} -> {d}" for m, deps in graph.items() if _room(m) == "recipes" for d in deps
          if _room(d) in COMMANDS - {"recipes"}]
    users = {_room(m) for m, deps in graph.items() if _room(m) != "recipes" and any(_room(d) == "recipes" for d in deps)}
    assert not up, "recipes/ imports another command:\n" + "\n".join(up)
    assert users == {"cli", "sweep"}, users


def test_the_readme_path_of_text_classifier_still_works():
    import theseus_deploy.export.runtime as old
    import theseus_deploy.runtime as new

    assert old.TextClassifier is new.TextClassifier and old.load_runner is new.load_runner


# ------------------------------------------------------------------ imports at the top
# Third-party modules a function may import on use: heavy ones (seconds of import, or GPU-only) and the
# optional ones (theseus_deploy.deps.PACKAGES: the serving extra, named by `require` in one error line
# when missing). Everything else (the standard library, click, numpy, tqdm, the project's own light
# modules) is imported at the top of the module.
HEAVY = {"torch", "transformers", "accelerate", "datasets", "onnx", "onnxruntime", "onnxscript", "tensorrt", "openvino",
         "matplotlib", "scipy", "sklearn"}
# What the lazy-command pattern keeps off the CLI's start-up path (`theseus-deploy --help`): a function-local
# import of a project module is allowed when that module's import brings one of these and the importing
# module's own import does not (cli.py and */command.py importing their api lazily, a light module
# deferring the module that pulls in onnxruntime).
START_UP_HEAVY = HEAVY | {"numpy"}


def _optional() -> set:
    return HEAVY | set(PACKAGES)


def _scoped_imports(tree):
    """(node, inside a function) for every import statement."""
    def walk(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, in_function
            yield from walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))
    yield from walk(tree, False)


def _targets(node, module: str, is_package: bool, modules) -> list:
    """("project", module name) or ("third", top-level name) for each module an import statement loads."""
    if isinstance(node, ast.Import):
        return [("project", a.name) if a.name.split(".")[0] == "theseus_deploy" else ("third", a.name.split(".")[0])
                for a in node.names]
    if node.level:
        base = (module if is_package else module.rpartition(".")[0]).split(".")
        name = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
    else:
        name = node.module or ""
    if name.split(".")[0] != "theseus_deploy":
        return [("third", name.split(".")[0])]
    return [("project", f"{name}.{a.name}" if f"{name}.{a.name}" in modules else name) for a in node.names]


def _function_local_imports():
    """[(path, line, statement, importing module, targets)] and each module's import-time third-party closure."""
    files = {_module(p): p for p in PKG.rglob("*.py") if "triton_models" not in p.parts}
    trees = {m: ast.parse(p.read_text(), str(p)) for m, p in files.items()}
    at_import = {m: [t for node, local in _scoped_imports(tree) if not local
                     for t in _targets(node, m, files[m].name == "__init__.py", files)] for m, tree in trees.items()}

    def third_party(m):  # what importing `m` imports, transitively (parent packages included)
        seen, todo, out = set(), [m], set()
        while todo:
            x = todo.pop()
            if x in seen or x not in files:
                continue
            seen.add(x)
            todo += [".".join(x.split(".")[:i]) for i in range(1, x.count(".") + 1)]
            for kind, name in at_import[x]:
                (out.add if kind == "third" else todo.append)(name)
        return out

    local = [(str(files[m].relative_to(REPO)), node.lineno, ast.unparse(node), m,
              _targets(node, m, files[m].name == "__init__.py", files))
             for m, tree in trees.items() for node, is_local in _scoped_imports(tree) if is_local]
    return local, third_party


def test_imports_are_at_the_top_except_heavy_optional_and_lazy_commands():
    optional = _optional()
    local, third_party = _function_local_imports()
    wrong = []
    for path, line, stmt, module, targets in local:
        for kind, name in targets:
            if kind == "third":
                ok = name in optional
            else:  # deferred only if it keeps something heavy off this module's import
                ok = bool((third_party(name) - third_party(module)) & START_UP_HEAVY)
            if not ok:
                wrong.append(f"{path}:{line}: {stmt}")
    assert not wrong, "function-local imports that belong at the top of their module:\n" + "\n".join(wrong)


def test_the_rule_tells_a_lazy_command_from_a_misplaced_import():
    """The rule itself, on imports it must allow and refuse (so the test above cannot pass vacuously)."""
    _, third_party = _function_local_imports()
    # export/command.py -> export.api: the api brings numpy, the command module (start-up path) does not
    assert (third_party("theseus_deploy.export.api") - third_party("theseus_deploy.export.command")) & START_UP_HEAVY
    # cli.py -> recipes.compress: torch
    assert "torch" in third_party("theseus_deploy.recipes.compress") - third_party("theseus_deploy.cli")
    # a light module deferring another light one: nothing kept off, refused
    assert not (third_party("theseus_deploy.cpu") - third_party("theseus_deploy.bench.env")) & START_UP_HEAVY
    assert "numpy" not in _optional() and "psutil" in _optional() and "torch" in _optional()


HELP_PROBE = """
import sys
from theseus_deploy.cli import cli
for argv in [["--help"]] + [[c, "--help"] for c in sys.argv[1:]]:
    cli.main(argv, prog_name="theseus-deploy", standalone_mode=False)
print("LOADED", *sorted({m.split(".")[0] for m in sys.modules}))
"""


def test_help_imports_no_heavy_library():
    """`theseus-deploy --help` and every `COMMAND --help` stay instant: no torch, transformers, numpy, onnx(runtime)."""
    commands = ["finetune", "compress", "evaluate", "export", "bench", "sweep", "serve", "loadtest"]
    r = subprocess.run([sys.executable, "-c", HELP_PROBE, *commands], capture_output=True, text=True, timeout=120,
                       cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-2000:]
    for c in commands:
        assert f"Usage: theseus-deploy {c}" in r.stdout, c
    loaded = set(r.stdout.rsplit("LOADED", 1)[1].split())
    assert not loaded & START_UP_HEAVY, sorted(loaded & START_UP_HEAVY)
