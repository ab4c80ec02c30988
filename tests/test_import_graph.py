"""The package's import graph is one-way (design.md §2): adapters -> estimators -> solvers -> engines.

torch is imported only in ``nn_adapters`` and in the applications built on it (``experiments``);
CuPy only in ``backends``.

Every ``import`` statement of every module of ``sparsefact`` (also the ones inside functions)
is read with :mod:`ast`; a module may import only from its own layer or the layers below.
A new module must be given a layer here (the test fails for an unknown module).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import sparsefact

PACKAGE = Path(sparsefact.__file__).parent

#: layer of each module (dotted name inside the package, or a subpackage prefix "name.*")
LAYERS: dict[str, int] = {
    # 0: engines and process-wide configuration
    "_config": 0,
    "backends.*": 0,
    # 1: shared helpers below every method
    "_sklearn_compat": 1,
    "_validation": 1,
    "metrics": 1,
    "masks": 1,
    "calibration": 1,
    # 2: solvers
    "admm": 2,
    "dsf": 2,
    "dsf_exact": 2,
    # 3: estimators
    "base": 3,
    "estimators": 3,
    "pruning": 3,
    "lowrank": 3,
    "structured": 3,
    # 4: the registry
    "methods": 4,
    # 5: what is built on the registry, without torch
    "compare": 5,
    "layer_fit": 5,
    "parallel": 5,
    "checkpoint": 5,
    # 6: torch adapters
    "nn_adapters.*": 6,
    # 7: applications built on the adapters, the command line and the package's public face
    "experiments.*": 7,
    "cli": 7,
    "__init__": 7,
}


def _module_names() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        names.append(".".join(parts))
    return names


def _layer(module: str) -> int:
    if module in LAYERS:
        return LAYERS[module]
    for key, layer in LAYERS.items():
        if key.endswith(".*") and (module == key[:-2] or module.startswith(key[:-1])):
            return layer
    raise KeyError(module)


def _imports(module: str) -> list[tuple[str, int]]:
    path = PACKAGE / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = PACKAGE / module.replace(".", "/") / "__init__.py"
    tree = ast.parse(path.read_text())
    package_parts = module.split(".")[:-1] if path.name != "__init__.py" else module.split(".")
    if module == "__init__":
        package_parts = []
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_parts[: len(package_parts) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
                if node.module is None:  # "from . import x"
                    for alias in node.names:
                        found.append((".".join([*base, alias.name]), node.lineno))
                    continue
            elif node.module and node.module.startswith("sparsefact."):
                target = node.module[len("sparsefact."):]
            else:
                continue
            found.append((target, node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("sparsefact."):
                    found.append((alias.name[len("sparsefact."):], node.lineno))
    return found


def _resolve(target: str, known: set[str]) -> str:
    """The known module a dotted import target refers to (longest known prefix)."""
    parts = target.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in known:
            return candidate
    return target


def test_every_module_has_a_layer():
    missing = [m for m in _module_names() if _safe_layer(m) is None]
    assert missing == [], f"give these modules a layer in tests/test_import_graph.py: {missing}"


def _safe_layer(module: str) -> int | None:
    try:
        return _layer(module)
    except KeyError:
        return None


@pytest.mark.parametrize("module", _module_names())
def test_no_module_imports_from_a_layer_above_it(module):
    known = set(_module_names())
    own = _layer(module)
    upward = []
    for target, line in _imports(module):
        resolved = _resolve(target, known)
        layer = _safe_layer(resolved)
        if layer is not None and layer > own:
            upward.append(f"line {line}: {resolved} (layer {layer})")
    assert upward == [], f"{module} (layer {own}) imports from above: {upward}"


def test_torch_and_cupy_are_imported_only_where_allowed():
    offenders = []
    for module in _module_names():
        path = PACKAGE / (module.replace(".", "/") + ".py")
        if not path.exists():
            path = PACKAGE / module.replace(".", "/") / "__init__.py"
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top == "torch" and not module.startswith(("nn_adapters", "experiments")):
                    offenders.append((module, name))
                if top in ("cupy", "cupyx") and not module.startswith("backends"):
                    offenders.append((module, name))
    assert offenders == []


def test_numba_kernels_are_private_to_the_engines():
    offenders = [
        (module, target)
        for module in _module_names()
        if not module.startswith("backends")
        for target, _ in _imports(module)
        if target.startswith("backends._numba_kernels")
    ]
    assert offenders == []
