"""The layout and layering of DESIGN section 2, checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {
    "tenants": ROOT / "platform" / "tenants",
    "inference": ROOT / "platform" / "inference",
    "documents": ROOT / "platform" / "documents",
    "chat": ROOT / "platform" / "chat",
    "console": ROOT / "platform" / "console",
    "agents": ROOT / "agents",
    "plugins": ROOT / "plugins",
}
# What each layer must never import (DESIGN section 2).
FORBIDDEN = {
    "tenants": {"inference", "documents", "chat", "console", "agents", "plugins"},
    "inference": {"chat", "documents", "console", "agents", "plugins"},
    "documents": {"chat", "console", "agents", "plugins"},
    "agents": {"console", "chat", "plugins"},
    "plugins": {"console", "chat"},
}


def imported_packages(path: Path) -> set[str]:
    found = set()
    for file in path.rglob("*.py"):
        tree = ast.parse(file.read_text(), filename=str(file))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return found


def test_top_level_layout():
    for name in ("platform", "agents", "plugins", "frontend", "deploy", "tests", "docs"):
        assert (ROOT / name).is_dir(), name
    for name in ("manage.py", "pyproject.toml", "README.md", "Makefile", ".ci/run"):
        assert (ROOT / name).is_file(), name
    # `platform` belongs to the standard library: the source root is never a package.
    assert not (ROOT / "platform" / "__init__.py").exists()


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_only_downwards(layer):
    if not SOURCES[layer].exists():
        pytest.skip(f"{layer} has no code yet")
    wrong = imported_packages(SOURCES[layer]) & FORBIDDEN[layer]
    assert not wrong, f"{layer} imports {sorted(wrong)}"


def test_nothing_imports_platform_as_a_package():
    for file in list((ROOT / "platform").rglob("*.py")) + list((ROOT / "tests").rglob("*.py")):
        tree = ast.parse(file.read_text(), filename=str(file))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                assert not node.module.startswith("platform."), f"{file}: from {node.module}"
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("platform."), f"{file}: import {alias.name}"
