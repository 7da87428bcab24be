"""The package's shape: commands at the root, layers below them, no circles, no shims.

Every ``import`` statement of ``progsr_jax`` (module level and inside
functions) is read with ``ast``, and the checks are on that graph:

* the root holds the commands a user types (``python -m progsr_jax.X``) and a
  few plumbing modules, nothing else;
* the layers, from the bottom: plumbing (``errors``, ``progress``,
  ``xla_flags``) -> ``data``, ``interop`` -> ``nets`` -> ``inference`` ->
  ``evaluation``, ``photo`` (``video`` above ``photo``) -> ``training`` ->
  the commands and ``cli``.  No module imports a layer above its own;
* no circle of modules, and no circle of packages (each subpackage taken as
  one unit);
* no shims: no module-level ``__getattr__``, no ``importlib`` imports of
  modules, no ``noqa: F401`` re-exports; imports inside functions only for
  optional or heavy third-party packages, each with a comment saying so;
* ``pyproject.toml`` lists exactly the packages of the tree.
"""

from __future__ import annotations

import ast
import pathlib
import re

import pytest
import tomllib

REPO = pathlib.Path(__file__).resolve().parent.parent
ROOT = REPO / "progsr_jax"

#: What the root may hold: the commands, then the plumbing.
COMMANDS = {"main", "distill", "evaluate", "evaluate_landmarks", "infer", "export", "bench"}
ROOT_PLUMBING = {"cli", "errors", "progress", "xla_flags"}

#: Layer of each unit (a top-level module or a subpackage), bottom = 0.
LAYERS = {
    "progsr_jax": 0, "progsr_jax.errors": 0, "progsr_jax.progress": 0,
    "progsr_jax.xla_flags": 0,
    "progsr_jax.data": 1, "progsr_jax.interop": 1,
    "progsr_jax.nets": 2,
    "progsr_jax.inference": 3,
    "progsr_jax.evaluation": 4, "progsr_jax.photo": 4,
    "progsr_jax.video": 5,
    "progsr_jax.training": 6,
    "progsr_jax.cli": 7, "progsr_jax.benchmarks": 7,
    **{f"progsr_jax.{c}": 7 for c in COMMANDS},
}

#: Third-party packages a function may import where it needs them (optional extras
#: or heavy and rarely used), with a comment on the line or the one above.
LAZY_OK = ("torch", "onnxruntime", "onnx", "jax2onnx", "tensorflow_datasets", "tensorflow",
           "numpy._core", "numpy.core", "av", "grain", "tensorboardX",
           "progsr_jax.interop.pytorch", "progsr_jax.video")


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, pathlib.Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def parse(path: pathlib.Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def imports_of(name: str, path: pathlib.Path, modules: dict) -> set[str]:
    """The progsr_jax modules ``path`` imports (``from a import b`` counts ``a.b`` when it is a
    module, else ``a``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "progsr_jax")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")
                up = up[:len(up) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            if base.split(".")[0] != "progsr_jax":
                continue
            for a in node.names:
                full = f"{base}.{a.name}"
                out.add(full if full in modules else base)
    out.discard(name)
    return {m for m in out if m in modules}


def graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def unit(module: str) -> str:
    """``progsr_jax.data.cache`` -> ``progsr_jax.data``; top-level modules are their own unit."""
    parts = module.split(".")
    if len(parts) >= 2 and (ROOT / parts[1]).is_dir():
        return ".".join(parts[:2])
    return module


def test_the_import_graph_is_read():
    g = graph()
    assert "progsr_jax.training.sr.trainer" in g["progsr_jax.main"]
    assert "progsr_jax.inference.checkpoints" in g["progsr_jax.inference"]
    assert "progsr_jax.data.images" in g["progsr_jax.inference.batching"]


def test_the_root_holds_the_commands_and_a_little_plumbing():
    top = {p.stem for p in ROOT.glob("*.py")} - {"__init__"}
    assert top == COMMANDS | ROOT_PLUMBING
    for command in COMMANDS:  # each is a command: `python -m progsr_jax.X`
        assert 'if __name__ == "__main__":' in (ROOT / f"{command}.py").read_text(), command


def test_every_unit_has_a_layer():
    assert {unit(m) for m in all_modules()} <= set(LAYERS)


def test_no_module_imports_a_layer_above_its_own():
    offenders = sorted((m, d) for m, deps in graph().items() for d in deps
                       if LAYERS[unit(d)] > LAYERS[unit(m)])
    assert offenders == []


def test_no_module_import_circle():
    edges = {m: {d for d in deps if d != "progsr_jax"} for m, deps in graph().items()}
    assert cycles(edges) == []


def test_no_package_imports_a_package_that_imports_it():
    units: dict[str, set[str]] = {}
    for m, deps in graph().items():
        u = unit(m)
        units.setdefault(u, set()).update(unit(d) for d in deps if unit(d) not in (u, "progsr_jax"))
    units.pop("progsr_jax", None)  # the package's __init__ (xla_flags only)
    assert cycles(units) == []


def test_the_checker_sees_a_circle_and_an_upward_import():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert LAYERS[unit("progsr_jax.training.sr.trainer")] > LAYERS[unit("progsr_jax.nets.gan")]


def _shims(path: pathlib.Path) -> list[str]:
    text = path.read_text()
    found = []
    tree = parse(path)
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
            found.append("module-level __getattr__")
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.startswith("importlib") and
                                                a.name != "importlib.metadata"
                                                for a in node.names):
            found.append(f"line {node.lineno}: imports importlib")
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("importlib") \
                and node.module != "importlib.metadata":
            found.append(f"line {node.lineno}: imports from importlib")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id == "__import__":
            found.append(f"line {node.lineno}: __import__")
    found += [f"line {i}: a re-export" for i, line in enumerate(text.splitlines(), 1)
              if re.search(r"noqa:\s*F401", line) and "import" in line]
    return found


@pytest.mark.parametrize("name", sorted(all_modules()))
def test_no_shims(name):
    assert _shims(all_modules()[name]) == []


def test_the_shim_checker_finds_shims(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import importlib\nfrom progsr_jax.nets import gan  # noqa: F401\n\n"
                   "def __getattr__(name):\n    return importlib.import_module(name)\n")
    assert len(_shims(bad)) == 3


def _lazy_imports(path: pathlib.Path) -> list[str]:
    """Imports inside functions that are not an optional/heavy package with a comment."""
    lines = path.read_text().splitlines()
    out = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if in_function and isinstance(child, (ast.Import, ast.ImportFrom)):
                names = ([a.name for a in child.names] if isinstance(child, ast.Import)
                         else [child.module or ""])
                optional = all(any(n == k or n.startswith(k + ".") for k in LAZY_OK)
                               for n in names)
                above = child.lineno - 2  # the comment may head a block of such imports
                while lines[above].strip().startswith(("import ", "from ")) and \
                        "#" not in lines[above]:
                    above -= 1
                said = "#" in lines[child.lineno - 1] or "#" in lines[above]
                if not (optional and said):
                    out.append(f"line {child.lineno}: {lines[child.lineno - 1].strip()}")
            visit(child, inside)

    visit(parse(path), False)
    return out


@pytest.mark.parametrize("name", sorted(all_modules()))
def test_imports_at_module_top(name):
    assert _lazy_imports(all_modules()[name]) == []


def test_pyproject_lists_the_packages_of_the_tree():
    with open(REPO / "pyproject.toml", "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    tree = {module_name(p.parent) for p in ROOT.rglob("__init__.py")}
    assert listed == tree | {"progsr_jax.configs"}


def test_no_two_modules_differ_by_a_suffix():
    names = {}
    for m in all_modules():
        names.setdefault(m.rpartition(".")[0], set()).add(m.rpartition(".")[2])
    # The commands keep their public names (python -m progsr_jax.evaluate_landmarks).
    clashes = sorted((pkg, a, b) for pkg, ns in names.items() for a in ns for b in ns
                     if a != b and b.startswith(a + "_") and b not in COMMANDS)
    assert clashes == []
