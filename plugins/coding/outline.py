"""A source file's symbol outline (classes, functions, methods, types), from its syntax
tree: tree-sitter, with the grammars of `tree-sitter-language-pack`.

`outline(path, text)` answers the file's symbols in the order they start, each with
its kind, name, first and last line (from 1) and depth (0 at the top, 1 for a method
in a class, ...). The language comes from the file's extension (`language_for`);
a file of another language raises `UnsupportedLanguage`, whose message lists the
extensions that have an outline. A file with syntax errors still has an outline of
what its parser recovered.

The 0.x releases of the language pack are used: they ship the grammars compiled in
the wheel. From 1.0 it downloads each grammar the first time it is asked for, which a
worker that reaches no outside host (or a sandbox) cannot do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

EXTENSIONS = {
    "py": "python",
    "pyi": "python",
    "js": "javascript",
    "mjs": "javascript",
    "cjs": "javascript",
    "jsx": "javascript",
    "ts": "typescript",
    "mts": "typescript",
    "cts": "typescript",
    "tsx": "tsx",
    "go": "go",
    "rs": "rust",
    "java": "java",
    "c": "c",
    "h": "c",
    "cc": "cpp",
    "cpp": "cpp",
    "cxx": "cpp",
    "hh": "cpp",
    "hpp": "cpp",
    "hxx": "cpp",
}


class UnsupportedLanguage(ValueError):
    """No outline for this file's language; the message says which files have one."""


@dataclass(frozen=True)
class Symbol:
    kind: str  # class, function, method, struct, interface, enum, trait, impl, type, ...
    name: str
    line: int  # its first line, from 1
    end_line: int  # its last line
    depth: int  # how many symbols it is nested in


def language_for(path: str) -> str | None:
    """The outline language of a file, from its extension; None when there is none."""
    name = path.rsplit("/", 1)[-1]
    if "." not in name:
        return None
    return EXTENSIONS.get(name.rsplit(".", 1)[1].lower())


def supported() -> str:
    return ", ".join(f".{ext}" for ext in EXTENSIONS)


@cache
def _parser(language: str) -> Any:
    from tree_sitter_language_pack import get_parser

    return get_parser(language)  # type: ignore[arg-type]  # one of EXTENSIONS' values


def outline(path: str, text: str) -> list[Symbol]:
    """The symbols of the file at `path` whose text is `text` (see the docstring)."""
    language = language_for(path)
    if language is None:
        raise UnsupportedLanguage(
            f"There is no outline for {path.rsplit('/', 1)[-1]!r}: outlines are made for "
            f"source files ending {supported()}."
        )
    tree = _parser(language).parse(text.encode("utf-8"))
    namer = _NAMERS[language]
    symbols: list[Symbol] = []
    # Depth first, without recursion (a deeply nested expression must not overflow).
    stack: list[tuple[Any, int, str]] = [(tree.root_node, 0, "")]
    while stack:
        node, depth, parent = stack.pop()
        found = namer(node, parent) if node.is_named else None
        inner_depth, inner_parent = depth, parent
        if found is not None:
            kind, name = found
            symbols.append(
                Symbol(
                    kind=kind,
                    name=name,
                    line=node.start_point[0] + 1,
                    end_line=node.end_point[0] + 1,
                    depth=depth,
                )
            )
            inner_depth, inner_parent = depth + 1, kind
        for child in reversed(node.named_children):
            stack.append((child, inner_depth, inner_parent))
    return symbols


def _text(node: Any) -> str:
    if node is None:
        return ""
    return " ".join(node.text.decode("utf-8", "replace").split())


def _name(node: Any) -> str:
    return _text(node.child_by_field_name("name"))


Namer = Callable[[Any, str], tuple[str, str] | None]


def _python(node: Any, parent: str) -> tuple[str, str] | None:
    if node.type == "class_definition":
        return "class", _name(node)
    if node.type == "function_definition":
        return ("method" if parent == "class" else "function"), _name(node)
    return None


def _javascript(node: Any, parent: str) -> tuple[str, str] | None:
    kinds = {
        "class_declaration": "class",
        "abstract_class_declaration": "class",
        "class": "class",
        "interface_declaration": "interface",
        "enum_declaration": "enum",
        "type_alias_declaration": "type",
        "internal_module": "namespace",
        "function_declaration": "function",
        "generator_function_declaration": "function",
        "method_definition": "method",
        "abstract_method_signature": "method",
    }
    kind = kinds.get(node.type)
    if kind is not None:
        name = _name(node)
        return (kind, name) if name else None
    # const handler = () => ...; / = function () ...
    if node.type == "variable_declarator":
        value = node.child_by_field_name("value")
        if value is not None and value.type in (
            "arrow_function",
            "function_expression",
            "function",
            "generator_function",
        ):
            return "function", _name(node)
    return None


def _go(node: Any, parent: str) -> tuple[str, str] | None:
    if node.type == "function_declaration":
        return "function", _name(node)
    if node.type == "method_declaration":
        receiver = node.child_by_field_name("receiver")
        owner = ""
        if receiver is not None:
            for parameter in receiver.named_children:
                owner = _text(parameter.child_by_field_name("type")).lstrip("*")
        return "method", f"{owner}.{_name(node)}" if owner else _name(node)
    if node.type == "type_spec":
        body = node.child_by_field_name("type")
        kind = {"struct_type": "struct", "interface_type": "interface"}.get(
            body.type if body is not None else "", "type"
        )
        return kind, _name(node)
    return None


def _rust(node: Any, parent: str) -> tuple[str, str] | None:
    kinds = {
        "struct_item": "struct",
        "enum_item": "enum",
        "union_item": "struct",
        "trait_item": "trait",
        "mod_item": "module",
        "type_item": "type",
        "macro_definition": "macro",
    }
    if node.type in kinds:
        return kinds[node.type], _name(node)
    if node.type in ("function_item", "function_signature_item"):
        return ("method" if parent in ("impl", "trait") else "function"), _name(node)
    if node.type == "impl_item":
        trait = node.child_by_field_name("trait")
        kind = _text(node.child_by_field_name("type"))
        return "impl", f"{_text(trait)} for {kind}" if trait is not None else kind
    return None


def _java(node: Any, parent: str) -> tuple[str, str] | None:
    kinds = {
        "class_declaration": "class",
        "interface_declaration": "interface",
        "enum_declaration": "enum",
        "record_declaration": "class",
        "annotation_type_declaration": "interface",
        "method_declaration": "method",
        "constructor_declaration": "constructor",
    }
    kind = kinds.get(node.type)
    return (kind, _name(node)) if kind is not None else None


_DECLARATOR_NAMES = (
    "identifier",
    "field_identifier",
    "qualified_identifier",
    "destructor_name",
    "operator_name",
    "type_identifier",
)


def _declarator_name(node: Any) -> str:
    """The name inside a C declarator (`*f(int)`, `ns::Cls::m() const`, ...)."""
    while node is not None and node.type not in _DECLARATOR_NAMES:
        node = node.child_by_field_name("declarator")
    return _text(node)


def _c(node: Any, parent: str) -> tuple[str, str] | None:
    if node.type == "function_definition":
        name = _declarator_name(node.child_by_field_name("declarator"))
        kind = "method" if parent in ("class", "struct") or "::" in name else "function"
        return (kind, name) if name else None
    kinds = {
        "struct_specifier": "struct",
        "union_specifier": "struct",
        "enum_specifier": "enum",
        "class_specifier": "class",
    }
    if node.type in kinds and node.child_by_field_name("body") is not None:
        name = _name(node)
        return (kinds[node.type], name) if name else None
    if node.type == "namespace_definition":
        return "namespace", _name(node) or "(anonymous)"
    if node.type == "type_definition":
        return "type", _declarator_name(node.child_by_field_name("declarator"))
    return None


_NAMERS: dict[str, Namer] = {
    "python": _python,
    "javascript": _javascript,
    "typescript": _javascript,
    "tsx": _javascript,
    "go": _go,
    "rust": _rust,
    "java": _java,
    "c": _c,
    "cpp": _c,
}


def outline_text(symbols: list[Symbol]) -> str:
    """The outline as lines a model reads: indented by depth, with the lines."""
    return "\n".join(
        f"{'  ' * s.depth}{s.kind} {s.name} (lines {s.line}-{s.end_line})" for s in symbols
    )
