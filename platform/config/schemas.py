"""Input checked by a JSON Schema, in one style for every document that defines input:
the websocket frames (docs/asyncapi.yaml) and the OpenAI-compatible API's request body
(docs/openai.yaml).

    check = SchemaCheck(schema, document=doc)     # compiled once
    problem = check.problem(value)                # None: valid
    problem.param, problem.message, problem.code  # the field at fault, a sentence, a code

A valid value costs one call into the compiled validator (jsonschema-rs). For an invalid
one, the first error is explained from the schema itself:

- `x-error`: the sentence for a failing field, or one per keyword (`*`: the others);
  `{param}` is the field's name and `{value}` the value refused. The nearest one above
  the failing keyword counts (a keyword's entry only on the value it failed on). A
  missing field takes its own `x-error` (a string, or the `required` entry), else the
  object's `required` entry, else "'<field>' is required.".
- `x-code`: the error's code where it is not `invalid_value` (a string, or per keyword).
- `x-param-up`: name the enclosing field (1: the parent) instead; `x-param`: this name.
  An unexpected field of the whole value is named; one of a field, that field.

Without an `x-error` the sentence is made from the failing keyword ("'top_p' must be a
number.", "'seed' must be an integer from 0 to 9.", ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jsonschema_rs

INVALID_VALUE = "invalid_value"
BASE = "urn:parley:schema"

# Keywords of a path through a schema that go down into a subschema: those followed by a
# name or an index, and whether the step also goes down into the value.
_NAMED = {
    "properties": True,
    "patternProperties": True,
    "prefixItems": True,
    "dependentSchemas": False,
    "dependencies": False,
    "allOf": False,
    "anyOf": False,
    "oneOf": False,
    "definitions": False,
    "$defs": False,
}
_PLAIN = {
    "items": True,
    "additionalItems": True,
    "additionalProperties": True,
    "unevaluatedProperties": True,
    "unevaluatedItems": True,
    "contains": True,
    "propertyNames": False,
    "not": False,
    "if": False,
    "then": False,
    "else": False,
}
_KINDS = {
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "string": "a string",
    "object": "an object",
    "array": "a list",
    "null": "null",
}


@dataclass(frozen=True)
class SchemaProblem:
    """Why a value failed its schema: the field at fault (`messages[0].role`; None for
    the whole value), a sentence, and a code (`invalid_value` unless the schema says)."""

    param: str | None
    message: str
    code: str = INVALID_VALUE


def param_name(path: list[str | int] | tuple[str | int, ...]) -> str | None:
    """`["messages", 0, "role"]` -> `messages[0].role`."""
    name = ""
    for part in path:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or None


class SchemaCheck:
    """One schema, compiled: `problem(value)` is None for a valid value, else what is wrong.

    `schema` may be a `$ref` into `document` (its `#/...` references resolve there);
    `draft` is 7 for AsyncAPI 2/3 payloads, 2020-12 (OpenAPI 3.1) otherwise."""

    def __init__(
        self, schema: dict[str, Any], *, document: dict[str, Any] | None = None, draft: int = 2020
    ) -> None:
        self.document = document if document is not None else schema
        make = jsonschema_rs.Draft7Validator if draft == 7 else jsonschema_rs.Draft202012Validator
        if document is None:
            self.schema = schema
            self.validator = make(schema)
        else:
            self.schema = {"$ref": f"{BASE}#{schema['$ref'].split('#', 1)[1]}"}
            registry = jsonschema_rs.Registry([(BASE, document)])
            self.validator = make(self.schema, registry=registry)

    def problem(self, value: Any) -> SchemaProblem | None:
        if self.validator.is_valid(value):
            return None
        error = next(iter(self.validator.iter_errors(value)))
        return self._explain(error)

    # --- the explanation of one error, from the schema ---

    def _resolve(self, ref: str) -> dict[str, Any]:
        node: Any = self.document
        pointer = ref.split("#", 1)[1] if "#" in ref else ""
        for part in filter(None, pointer.split("/")):
            part = part.replace("~1", "/").replace("~0", "~")
            node = node[int(part)] if isinstance(node, list) else node[part]
        resolved: dict[str, Any] = node
        return resolved

    def _walk(self, steps: list[str | int]) -> list[tuple[dict[str, Any], int]]:
        """The subschemas an error's evaluation path goes through (with how deep into the
        value each is), from the root to the one whose keyword failed."""
        node = self.schema
        depth = 0
        nodes = [(node, depth)]
        index = 0
        while index < len(steps) - 1:  # the last step is the failing keyword
            step = steps[index]
            if step == "$ref":
                node = self._resolve(node["$ref"])
                index += 1
            elif step in _NAMED:
                node = node[step][steps[index + 1]]
                depth += _NAMED[step]
                index += 2
            elif step in _PLAIN:
                node = node[step]
                depth += _PLAIN[step]
                index += 1
            else:  # a keyword this walk does not know: stop at what it has
                break
            if isinstance(node, dict):
                nodes.append((node, depth))
            else:
                break
        return nodes

    def _explain(self, error: Any) -> SchemaProblem:
        steps = list(error.evaluation_path)
        keyword = str(steps[-1]) if steps else ""
        path = list(error.instance_path)
        value = error.instance
        nodes = self._walk(steps)
        node = nodes[-1][0]
        kind = error.kind.name
        if keyword == "required":
            missing = error.kind.value  # the field's name
            if isinstance(missing, list):
                missing = missing[0]
            missing = str(missing)
            return self._missing(nodes, path, missing)
        if kind == "additionalProperties" and error.kind.value and not path:
            path = [str(error.kind.value[0])]  # an unknown parameter: name it
        if kind == "propertyNames":
            value = error.kind.error.instance  # the name refused
        param = self._param(nodes, path)
        message: str | None = None
        code: str | None = None
        depth = nodes[-1][1]
        for candidate, at in reversed(nodes):
            # A keyword's entry speaks of the value it sits on; `*` and a sentence of
            # everything under it as well.
            texts = candidate.get("x-error")
            if at != depth and isinstance(texts, dict):
                texts = texts.get("*")
            text = _entry(texts, keyword)
            if text is not None:
                message = text
                code = _entry(candidate.get("x-code"), keyword, star=False)
                break
        if code is None:
            code = _entry(node.get("x-code"), keyword, star=False, string=False)
        if message is None:
            message = _sentence(node, keyword, error)
        return SchemaProblem(param, _fill(message, param, value), code or INVALID_VALUE)

    def _missing(
        self, nodes: list[tuple[dict[str, Any], int]], path: list[Any], missing: str
    ) -> SchemaProblem:
        """A required field that is absent: its own schema says what it takes."""
        node = nodes[-1][0]
        field: dict[str, Any] = {}
        for candidate, _ in reversed(nodes):  # `required` may sit in an `if`/`then`
            properties = candidate.get("properties")
            if isinstance(properties, dict) and isinstance(properties.get(missing), dict):
                field = properties[missing]
                break
        up = field.get("x-param-up", 0)
        full = [*path, missing]
        param = field.get("x-param") or param_name(full[: len(full) - up] if up else full)
        message = (
            _entry(field.get("x-error"), "required", star=False)
            or _entry(node.get("x-error"), "required", star=False, string=False)
            or "'{param}' is required."
        )
        code = (
            _entry(field.get("x-code"), "required", star=False)
            or _entry(node.get("x-code"), "required", star=False, string=False)
            or INVALID_VALUE
        )
        return SchemaProblem(param, _fill(message, param or missing, None), code)

    def _param(self, nodes: list[tuple[dict[str, Any], int]], path: list[Any]) -> str | None:
        """The field at fault: the value's path, or what the nearest `x-param` /
        `x-param-up` on the way makes of it."""
        for candidate, depth in reversed(nodes):
            if "x-param" in candidate:
                return str(candidate["x-param"])
            if "x-param-up" in candidate:
                keep = max(0, depth - int(candidate["x-param-up"]))
                return param_name(path[:keep])
        return param_name(path)


def _entry(texts: Any, keyword: str, *, star: bool = True, string: bool = True) -> str | None:
    """An `x-error`/`x-code` for one keyword: the string itself (unless not `string`),
    or the keyword's entry of a map (else its `*` entry when `star`)."""
    if isinstance(texts, str):
        return texts if string else None
    if isinstance(texts, dict):
        found = texts.get(keyword, texts.get("*") if star else None)
        return str(found) if found is not None else None
    return None


def _fill(message: str, param: str | None, value: Any) -> str:
    try:
        return message.format(param=param or "", value=value)
    except (KeyError, IndexError, ValueError):
        return message


def _bounds(node: dict[str, Any]) -> str:
    """'at least 0 and at most 1' (or 'more than 0 ...') from a node's range."""
    low = node.get("exclusiveMinimum", node.get("minimum"))
    high = node.get("exclusiveMaximum", node.get("maximum"))
    parts = []
    if low is not None:
        parts.append(f"{'more than' if 'exclusiveMinimum' in node else 'at least'} {low:g}")
    if high is not None:
        parts.append(f"{'less than' if 'exclusiveMaximum' in node else 'at most'} {high:g}")
    return " and ".join(parts)


def _sentence(node: dict[str, Any], keyword: str, error: Any) -> str:
    """A sentence for a failing keyword that has no `x-error`."""
    types = node.get("type")
    kinds = [types] if isinstance(types, str) else list(types or [])
    what = " or ".join(_KINDS.get(kind, kind) for kind in kinds)
    if keyword == "type":
        return f"'{{param}}' must be {what}."
    if keyword in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        if kinds == ["integer"] and "minimum" in node and "maximum" in node:
            return f"'{{param}}' must be an integer from {node['minimum']} to {node['maximum']}."
        return f"'{{param}}' must be {_bounds(node)}."
    if keyword in ("minLength", "maxLength"):
        low, high = node.get("minLength"), node.get("maxLength")
        if high is not None:
            least = "non-empty " if low else ""
            return f"'{{param}}' must be a {least}string of at most {high} characters."
        return f"'{{param}}' must be at least {low} characters long."
    if keyword in ("minItems", "maxItems"):
        low, high = node.get("minItems"), node.get("maxItems")
        if high is not None:
            return f"'{{param}}' takes at most {high} items."
        return f"'{{param}}' needs at least {low} items."
    if keyword == "maxProperties":
        return f"'{{param}}' takes at most {node['maxProperties']} entries."
    if keyword == "enum":
        return "'{param}' must be one of " + ", ".join(map(repr, node["enum"])) + "."
    if keyword == "const":
        return f"'{{param}}' must be {node['const']!r}."
    if keyword == "pattern":
        return "'{param}' is not in the expected form."
    if keyword in ("additionalProperties", "unevaluatedProperties"):
        names = error.kind.value if isinstance(error.kind.value, list) else []
        if list(error.instance_path) or not names:  # a field of a field
            return "'{param}' takes no field" + (f" {names[0]!r}." if names else " of that name.")
        return "'{param}' is not a known field."
    message: str = error.message
    return message.replace("{", "{{").replace("}", "}}")
