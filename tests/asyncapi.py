"""Validating websocket frames against the protocol's AsyncAPI document (docs/asyncapi.yaml).

Every frame a test socket receives is checked (tests.conftest.Socket), so a frame the
server sends that the document does not describe fails the test that saw it.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft7Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

DOCUMENT = Path(__file__).resolve().parents[1] / "docs" / "asyncapi.yaml"
BASE = "urn:parley:asyncapi"


@cache
def document() -> dict[str, Any]:
    return yaml.safe_load(DOCUMENT.read_text())


def _message_names(operation: str) -> dict[str, str]:
    """Frame type -> component message name, for the messages of one operation."""
    doc = document()
    names = {}
    for ref in doc["operations"][operation]["messages"]:
        channel_message = ref["$ref"].rsplit("/", 1)[1]
        component = doc["channels"]["chat"]["messages"][channel_message]["$ref"].rsplit("/", 1)[1]
        names[doc["components"]["messages"][component]["name"]] = component
    return names


def client_types() -> set[str]:
    return set(_message_names("receiveClientFrames"))


def server_types() -> set[str]:
    return set(_message_names("sendServerFrames"))


def client_fields() -> dict[str, list[str]]:
    """Client frame type -> the names of its fields (`type` included)."""
    messages = document()["components"]["messages"]
    return {
        kind: sorted(messages[component]["payload"]["properties"])
        for kind, component in _message_names("receiveClientFrames").items()
    }


@cache
def _validator(operation: str, kind: str) -> Draft7Validator | None:
    component = _message_names(operation).get(kind)
    if component is None:
        return None
    registry: Registry[Any] = Registry().with_resource(
        BASE, Resource.from_contents(document(), default_specification=DRAFT7)
    )
    return Draft7Validator(
        {"$ref": f"{BASE}#/components/messages/{component}/payload"}, registry=registry
    )


def errors(frame: Any, *, sent_by: str) -> list[str]:
    """Why `frame` does not match the document ([] when it does); `sent_by` is
    "server" or "client"."""
    operation = "sendServerFrames" if sent_by == "server" else "receiveClientFrames"
    kind = frame.get("type") if isinstance(frame, dict) else None
    validator = _validator(operation, kind) if isinstance(kind, str) else None
    if validator is None:
        return [f"no {sent_by} frame of type {kind!r} in {DOCUMENT.name}"]
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '(frame)'}: {e.message}"
        for e in validator.iter_errors(frame)
    ]


def check_server_frame(frame: dict[str, Any]) -> None:
    problems = errors(frame, sent_by="server")
    assert not problems, f"server frame not in the protocol document: {frame}: {problems}"
