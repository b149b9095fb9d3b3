"""The package's stages stack one way: a module imports only its own stage and earlier ones.

The order is the one ``docs/architecture.md`` draws. Imports are read with ``ast``,
those inside functions included, so a lazy import cannot reach back up unseen.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "nucleiseg"

# Top-level modules below every stage, then the stages in order, then the entry points on top.
FLOOR = ("atomic", "cli", "locks")
STAGES = (
    "data",
    "competition",
    "postprocessing",
    "models",
    "inference",
    "evaluation",
    "training",
)
ROOF = ("api",)
LEVEL = {name: 0 for name in FLOOR}
LEVEL.update({name: i + 1 for i, name in enumerate(STAGES)})
LEVEL.update({name: len(STAGES) + 1 for name in ROOF})


def _modules() -> list[Path]:
    return sorted(
        p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE
    )


def _unit(path: Path) -> str:
    """The stage (subpackage) or top-level module a file belongs to."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def _imported_units(path: Path) -> set[str]:
    units = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] != "nucleiseg":
                continue
            if len(parts) > 1:
                units.add(parts[1])
            else:
                units.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "nucleiseg" and len(parts) > 1:
                    units.add(parts[1])
    return units


def test_every_module_belongs_to_a_known_place():
    top_level = {p.stem for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
    assert top_level <= set(FLOOR) | set(ROOF), f"unplaced top-level modules: {top_level}"
    subpackages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert subpackages == set(STAGES)
    for stage in STAGES:
        init = PACKAGE / stage / "__init__.py"
        assert ast.get_docstring(ast.parse(init.read_text())), f"{stage}/__init__.py: no docstring"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_a_later_stage(path):
    own = _unit(path)
    upward = sorted(u for u in _imported_units(path) if LEVEL[u] > LEVEL[own])
    assert not upward, f"{path.relative_to(PACKAGE)} ({own}) imports later stage(s) {upward}"
