"""The package's imports go one way: config < ode, data < cnf, flows, priors < models < evaluation
< method (the protocol) < the method packages < methods (the one table) < training < pipelines
(workflows chaining runs) < cli, with no
cycle between modules. No core module imports a method package.

Every import statement counts, at module level or inside a function, under ``TYPE_CHECKING`` or
not: the files are read with :mod:`ast`, nothing is imported.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import fastcnf

PACKAGE = Path(fastcnf.__file__).parent

#: top-level module or sub-package -> layer (a module may import only from layers <= its own)
LAYERS = {
    "config": 0,
    "ode": 1, "data": 1,
    "cnf": 2, "flows": 2, "priors": 2,
    "models": 3,
    "evaluation": 4,
    "method": 5,
    "flow_matching": 6, "endtime": 6, "tolerances": 6, "conditioning": 6, "parts": 6, "reflow": 6,
    "methods": 7,
    "training": 8,
    "pipelines": 9,
    "cli": 10,
    "__main__": 11,
}

#: the method packages: each may import the core layers and the protocol, never another method
METHOD_PACKAGES = {name for name, layer in LAYERS.items() if layer == 6}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every ``fastcnf...`` module ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    own = _module_name(path)
    package = own if path.name == "__init__.py" else own.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "fastcnf")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "fastcnf":
                continue
            out.add(target)
            for a in node.names:  # `from fastcnf.training import distributed` imports a module
                if (PACKAGE.parent / (target.replace(".", "/") + f"/{a.name}.py")).exists():
                    out.add(f"{target}.{a.name}")
    return out


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_top_level_module_has_a_layer():
    tops = {m.split(".")[1] for m in MODULES if "." in m}
    assert tops <= set(LAYERS), f"give these a layer: {sorted(tops - set(LAYERS))}"


@pytest.mark.parametrize("module", [m for m in MODULES if m != "fastcnf"])
def test_no_import_goes_up_a_layer(module):
    own = _layer(module)
    bad = [t for t in _imports(MODULES[module]) if t != "fastcnf" and (_layer(t) or 0) > own]
    assert not bad, f"{module} (layer {own}) imports from higher layers: {sorted(bad)}"


@pytest.mark.parametrize("module", [m for m in MODULES if m.split(".")[1:2] and m.split(".")[1] in METHOD_PACKAGES])
def test_a_method_package_imports_no_other_method(module):
    own = module.split(".")[1]
    bad = [t for t in _imports(MODULES[module]) if t.split(".")[1:2] and t.split(".")[1] in METHOD_PACKAGES - {own}]
    assert not bad, f"{module} imports another method's package: {sorted(bad)}"


def test_the_top_level_package_imports_nothing_eagerly():
    """``fastcnf/__init__.py`` exports its names lazily, so importing a low layer stays cheap."""
    assert not _imports(PACKAGE / "__init__.py")


def test_modules_form_no_import_cycle():
    graph = {m: {t for t in _imports(p) if t in MODULES and t != m} for m, p in MODULES.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
