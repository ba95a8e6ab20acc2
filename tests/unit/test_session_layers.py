"""The session package imports one way (structure, not behaviour): each module only imports the
modules below it, so none reaches back into the one that drives it (issue 15)."""

from __future__ import annotations

import ast
from pathlib import Path

import trio_gateway.session

PACKAGE = Path(trio_gateway.session.__file__).parent

# Top to bottom. The parts share the lowest layer and import nothing of the package.
LAYERS: dict[str, int] = {
    "manager": 4,
    "connection": 3,
    "session": 2,
    "replicas": 1,
    "interfaces": 1,
    "transport": 0,
    "outbound": 0,
    "replay": 0,
    "turn_queue": 0,
    "detached": 0,
    "approvals": 0,
}


def package_imports(module: str) -> set[str]:
    """Modules of the package that ``module`` imports, TYPE_CHECKING imports included."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module is None:
                found.update(alias.name for alias in node.names)
            else:
                found.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            prefix = "trio_gateway.session."
            if node.module.startswith(prefix):
                found.add(node.module[len(prefix) :].split(".")[0])
    return found


def test_every_module_of_the_package_has_a_layer() -> None:
    modules = {path.stem for path in PACKAGE.glob("*.py")} - {"__init__"}
    assert modules == set(LAYERS)


def test_modules_import_only_layers_below_them() -> None:
    upward = {
        (module, imported)
        for module, layer in LAYERS.items()
        for imported in package_imports(module)
        if LAYERS.get(imported, layer) >= layer
    }
    assert upward == set()
