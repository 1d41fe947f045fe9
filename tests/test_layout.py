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
    "sandbox": ROOT / "platform" / "sandbox",
    "console": ROOT / "platform" / "console",
    "agents": ROOT / "agents",
    "plugins": ROOT / "plugins",
}
# What each layer must never import (DESIGN section 2).
FORBIDDEN = {
    "tenants": {"inference", "documents", "chat", "console", "agents", "plugins", "sandbox"},
    "inference": {"chat", "documents", "console", "agents", "plugins", "sandbox"},
    "documents": {"chat", "console", "agents", "plugins"},
    "sandbox": {"chat", "console", "agents", "plugins", "documents"},
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


# --- one of each (DESIGN section 9) ----------------------------------------------

SOURCE_ROOTS = (ROOT / "platform", ROOT)  # where top-level packages live
OUR_PACKAGES = {path.name for path in SOURCES.values()} | {"config"}


def module_name(file: Path, root: Path) -> str:
    parts = list(file.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_file(name: str) -> Path | None:
    """The source file of one of our modules, or None (not ours, or not a module)."""
    if name.split(".")[0] not in OUR_PACKAGES:
        return None
    for root in SOURCE_ROOTS:
        path = root.joinpath(*name.split("."))
        for candidate in (path.with_suffix(".py"), path / "__init__.py"):
            if candidate.is_file():
                return candidate
    return None


def imports_of(tree: ast.AST) -> set[str]:
    """The modules a module imports, wherever the import statement stands: at module
    level, inside a function, under `if TYPE_CHECKING`. `from a import b` counts as
    importing `a.b` when b is a module, else as importing `a`."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if module_file(submodule) else node.module)
    return found


def import_graph(package: str) -> dict[str, set[str]]:
    """Module → the modules of the same package it imports (migrations left out: they
    import nothing of the app but what Django generates)."""
    base = module_file(package)
    assert base is not None, package
    root = base.parents[1]
    modules = {
        module_name(file, root): file
        for file in base.parent.rglob("*.py")
        if "migrations" not in file.parts
    }
    return {
        name: {
            other
            for other in imports_of(ast.parse(file.read_text(), filename=str(file)))
            if other in modules and other != name
        }
        for name, file in modules.items()
    }


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle a depth-first walk meets, closed (first == last); none when the
    graph has no cycle."""
    cycles: list[list[str]] = []
    state: dict[str, str] = {}  # "open" while on the walk's path, then "done"

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        path.append(node)
        for following in sorted(graph.get(node, ())):
            if state.get(following) == "open":
                cycles.append([*path[path.index(following) :], following])
            elif following not in state:
                visit(following, path)
        path.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return cycles


def test_the_cycle_finder_finds_cycles_through_any_module():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e2"}, "e2": {"e"}}
    assert sorted(map(tuple, import_cycles(graph))) == [("a", "b", "c", "a"), ("e", "e2", "e")]
    assert import_cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_chat_has_no_import_cycle():
    """No module of chat imports, directly or through others, a module that imports it.
    Imports inside functions count like module-level ones: a deferred import hides a
    circle from Python, not from the reader, and the next refactoring that moves it to
    the top of the file breaks at import time."""
    cycles = import_cycles(import_graph("chat"))
    assert not cycles, "chat's modules import in circles:\n" + "\n".join(
        " -> ".join(cycle) for cycle in cycles
    )


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def underscore_imports(file: Path, own: str) -> set[tuple[str, str]]:
    """(module, name) for each underscore name of another of our modules that `file`
    (module `own`) imports (`from m import _x`) or reads from an imported module
    (`m._x`, `a.m._x`), wherever the import stands."""
    tree = ast.parse(file.read_text(), filename=str(file))
    modules: dict[str, str] = {}  # a name bound by an import → the module it is
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                bound = alias.asname or alias.name.split(".")[0]
                modules[bound] = alias.name if alias.asname else bound
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                if _private(alias.name) and module_file(node.module) and node.module != own:
                    found.add((node.module, alias.name))
                if module_file(f"{node.module}.{alias.name}"):
                    modules[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and _private(node.attr)):
            continue
        chain, value = [], node.value
        while isinstance(value, ast.Attribute):
            chain.insert(0, value.attr)
            value = value.value
        if isinstance(value, ast.Name) and value.id in modules:
            module = ".".join([modules[value.id], *chain])
            if module_file(module) and module != own:
                found.add((module, node.attr))
    return found


def test_the_underscore_finder_sees_imports_and_attribute_reads(tmp_path):
    file = tmp_path / "example.py"
    file.write_text(
        "import chat.services.runs\n"
        "from chat import selectors as s\n"
        "from chat.models import Run\n"
        "def f():\n"
        "    from chat.execution import _deleted\n"
        "    return s._hidden, chat.services.runs._gone, Run._meta, _deleted\n"
    )
    assert underscore_imports(file, "example") == {
        ("chat.execution", "_deleted"),
        ("chat.selectors", "_hidden"),
        ("chat.services.runs", "_gone"),
    }
    assert underscore_imports(file, "chat.selectors") == {
        ("chat.execution", "_deleted"),
        ("chat.services.runs", "_gone"),
    }


def test_no_module_imports_another_modules_underscore_names():
    """DESIGN section 9: what a module shares is public; its underscore names are its own."""
    found = set()
    for root, trees in ((ROOT / "platform", ["platform"]), (ROOT, ["agents", "plugins"])):
        for tree in trees:
            for file in (ROOT / tree).rglob("*.py"):
                own = module_name(file, root)
                for module, name in underscore_imports(file, own):
                    found.add((str(file.relative_to(ROOT)), module, name))
    assert not found, sorted(found)
