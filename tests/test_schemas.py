"""config.schemas: input checked by a JSON Schema, explained from the schema itself
(`x-error`, `x-code`, `x-param-up`, `x-param`), for the frames and the /v1 bodies."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from config.schemas import SchemaCheck, SchemaProblem, param_name

ROOT = Path(__file__).resolve().parents[1]

DOCUMENT = {
    "components": {
        "schemas": {
            "Id": {"type": "string", "minLength": 1, "maxLength": 5},
            "Thing": {
                "type": "object",
                "required": ["id", "size"],
                "additionalProperties": False,
                "x-error": {"additionalProperties": "No {param} here."},
                "x-code": {"required": "missing_parameter", "additionalProperties": "unknown"},
                "properties": {
                    "id": {"$ref": "#/components/schemas/Id", "x-error": "'id' is an id."},
                    "size": {"type": "integer", "minimum": 1, "maximum": 9},
                    "ratio": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                    "tags": {
                        "type": "array",
                        "maxItems": 2,
                        "items": {"type": "string", "x-param-up": 1},
                        "x-error": {"maxItems": "Two tags at most.", "*": "Tags are strings."},
                    },
                    "mode": {
                        "enum": ["a", "b"],
                        "allOf": [
                            {
                                "const": "a",
                                "x-error": "Mode {value!r} is not served.",
                                "x-code": "unsupported",
                            }
                        ],
                    },
                    "inner": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {"flag": {"type": "boolean"}},
                        "required": ["flag"],
                    },
                },
            },
        }
    }
}


@pytest.fixture(scope="module")
def check() -> SchemaCheck:
    return SchemaCheck({"$ref": "#/components/schemas/Thing"}, document=DOCUMENT)


def thing(**fields: object) -> dict[str, object]:
    return {"id": "x1", "size": 3, **fields}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (thing(), None),
        # A field's own x-error (through a $ref into the document).
        (thing(id="toolong"), SchemaProblem("id", "'id' is an id.")),
        # Sentences made from the failing keyword.
        (thing(size="3"), SchemaProblem("size", "'size' must be an integer.")),
        (thing(size=10), SchemaProblem("size", "'size' must be an integer from 1 to 9.")),
        (thing(ratio=0), SchemaProblem("ratio", "'ratio' must be more than 0 and at most 1.")),
        (thing(ratio=float("nan")), SchemaProblem("ratio", "'ratio' must be a number.")),
        # A map of keyword -> sentence, `*` for the others; x-param-up names the list.
        (thing(tags=["a", "b", "c"]), SchemaProblem("tags", "Two tags at most.")),
        (thing(tags=["a", 2]), SchemaProblem("tags", "Tags are strings.")),
        # The nearest x-error and its x-code; {value} is the value refused.
        (thing(mode="b"), SchemaProblem("mode", "Mode 'b' is not served.", "unsupported")),
        # A missing field: the object's `required` code, else the field's words.
        (
            {"size": 3},
            SchemaProblem("id", "'id' is an id.", "missing_parameter"),
        ),
        (
            {"id": "x"},
            SchemaProblem("size", "'size' is required.", "missing_parameter"),
        ),
        (thing(inner={}), SchemaProblem("inner.flag", "'inner.flag' is required.")),
        # An unknown field of the whole value is named; one of a field names that field.
        (thing(colour=1), SchemaProblem("colour", "No colour here.", "unknown")),
        (
            thing(inner={"flag": True, "x": 1}),
            SchemaProblem("inner", "'inner' takes no field 'x'."),
        ),
    ],
)
def test_a_problem_is_explained_from_the_schema(check, value, expected):
    assert check.problem(value) == expected


def test_param_names_follow_openai():
    assert param_name(["messages", 0, "content"]) == "messages[0].content"
    assert param_name([]) is None


def test_the_openai_document_and_its_page_name_the_same_parameters():
    """docs/openai.yaml checks the bodies; docs/openai-api.md tells integrators: every
    parameter the schema takes is on the page, and every one on the page is in it."""
    import yaml

    document = yaml.safe_load((ROOT / "docs" / "openai.yaml").read_text())
    schema = document["components"]["schemas"]["ChatCompletionRequest"]
    page = (ROOT / "docs" / "openai-api.md").read_text()
    section = page.split("### `POST /v1/chat/completions`")[1].split("###")[0]
    on_page = set(re.findall(r"`([a-z_]+)[`.]", section))
    refused = {n for n, s in schema["properties"].items() if s.get("not") == {}}
    taken = set(schema["properties"]) - refused
    assert taken <= on_page, taken - on_page
    assert refused <= on_page, refused - on_page
