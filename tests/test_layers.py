"""Every relative import of the package follows the layers of DESIGN.md."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lightning_hessian"


def design_layers() -> dict[str, int]:
    """Module (dotted, relative to the package) -> its layer's index in DESIGN.md's table."""
    layers: dict[str, int] = {}
    rows = [line for line in (ROOT / "DESIGN.md").read_text().splitlines() if line.startswith("| ")]
    for index, row in enumerate(rows[1:]):  # the first row is the header
        cells = row.split("|")[2]
        for name in re.findall(r"`([\w/]+)\.py`", cells):
            layers[name.replace("/", ".")] = index
    return layers


def relative_imports(path: Path) -> set[str]:
    """Dotted package modules that ``path`` imports with relative imports."""
    here = path.relative_to(PACKAGE).with_suffix("").parts
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom) or not node.level:
            continue
        base = list(here[: len(here) - node.level])
        if node.module:
            imported.add(".".join([*base, *node.module.split(".")]))
        else:
            imported.update(".".join([*base, alias.name]) for alias in node.names)
    return imported


def test_every_module_is_in_a_layer():
    modules = {
        ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        for path in PACKAGE.rglob("*.py")
        if path.name != "__init__.py"
    }
    layers = design_layers()
    assert modules - set(layers) == set(), "modules missing from DESIGN.md's layer table"
    assert set(layers) - modules == set(), "DESIGN.md names modules that do not exist"


def test_modules_import_only_their_own_layer_or_the_layers_before_it():
    layers = design_layers()
    violations = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "__init__.py":
            continue
        module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        for imported in relative_imports(path):
            target = imported if imported in layers else imported.rsplit(".", 1)[0]
            if target == "operator":  # the subpackage's __init__: the Hessian operator layer
                target = "operator.hessian"
            if layers[target] > layers[module]:
                violations.append(f"{module} (layer {layers[module]}) imports {imported} ({layers[target]})")
    assert violations == []
