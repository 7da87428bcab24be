"""The package's import structure: layers below the commands, no import circles.

Every ``import`` statement of ``progsr_jax`` (module level and inside
functions) is read with ``ast``; the checks are on that graph:

* no module imports itself through other modules (no circle of modules);
* no package imports a package that imports it: the subpackages (``data``,
  ``training``, ...) and the top-level modules, each taken as one unit, form
  no circle either;
* the library layer (``inference``, ``checkpoints``, ``batching``, ``grid``,
  ``evaluation/``, ``photo/``, ``data/``, the models) never imports
  ``training/``.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "progsr_jax"
#: Modules (and packages, with their submodules) that must not import progsr_jax.training.
BELOW_TRAINING = ("progsr_jax.inference", "progsr_jax.checkpoints", "progsr_jax.batching",
                  "progsr_jax.grid", "progsr_jax.evaluation", "progsr_jax.photo",
                  "progsr_jax.video",
                  "progsr_jax.data", "progsr_jax.models", "progsr_jax.fan",
                  "progsr_jax.landmarks", "progsr_jax.losses", "progsr_jax.layers")


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, pathlib.Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports_of(name: str, path: pathlib.Path, modules: dict) -> set[str]:
    """The progsr_jax modules ``path`` imports (``from a import b`` counts ``a.b`` when it is a
    module, else ``a``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
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
    assert "progsr_jax.training.sr" in g["progsr_jax.main"]
    assert "progsr_jax.checkpoints" in g["progsr_jax.inference"]
    assert "progsr_jax.data.images" in g["progsr_jax.batching"]


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


@pytest.mark.parametrize("layer", BELOW_TRAINING)
def test_the_library_layer_does_not_import_training(layer):
    g = graph()
    offenders = {m: sorted(d for d in deps if d.startswith("progsr_jax.training"))
                 for m, deps in g.items() if m == layer or m.startswith(layer + ".")}
    assert any(m == layer or m.startswith(layer + ".") for m in g), layer
    assert {m: d for m, d in offenders.items() if d} == {}
