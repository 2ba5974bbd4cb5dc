"""The package's layering, read from its import statements: a lower layer never imports a higher one, and no
module outgrows one idea (the README's package map draws the same picture)."""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "gemma_scope"
MAX_LINES = 400

# Each subpackage and the parts of gemma_scope it must never import ("*" is everything but the listed exceptions).
FORBIDDEN = {
    "sae": ("*", {"sae", "sites"}),  # the maths only
    "model": ({"sae", "training", "activations", "attribution"}, None),
    "data": ({"sae", "training", "activations", "attribution"}, None),
    "activations": ({"training", "evaluation", "release", "attribution"}, None),
    "release": ({"training", "activations", "attribution"}, None),
    # the replacement model and its graph: the model and the dictionaries' maths, no files of other layouts
    "attribution": ({"training", "activations", "data", "evaluation", "release"}, None),
}


def _modules() -> list[pathlib.Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _imported(path: pathlib.Path) -> set[str]:
    """The top-level parts of gemma_scope (``sae``, ``training``, ``sites``, ...) that a module imports."""
    parts = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] if node.module != "gemma_scope" else [f"gemma_scope.{a.name}" for a in node.names]
        else:
            continue
        parts |= {name.split(".")[1] for name in names if name.startswith("gemma_scope.")}
    return parts


def test_no_relative_imports_hide_from_the_check():
    relative = [str(p.relative_to(PACKAGE)) for p in _modules()
                if any(isinstance(n, ast.ImportFrom) and n.level for n in ast.walk(ast.parse(p.read_text())))]
    assert relative == []


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_lower_layers_never_import_higher_ones(layer):
    forbidden, allowed = FORBIDDEN[layer]
    violations = {}
    for path in (PACKAGE / layer).rglob("*.py"):
        bad = _imported(path) - allowed if forbidden == "*" else _imported(path) & forbidden
        if bad:
            violations[str(path.relative_to(PACKAGE))] = sorted(bad)
    assert violations == {}


def test_no_module_over_the_size_bar():
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in _modules()}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


def test_the_check_sees_imports():  # guards the reader itself: a known import must be found
    assert "sae" in _imported(PACKAGE / "training" / "step.py")
    assert "release" in _imported(PACKAGE / "evaluate.py")
