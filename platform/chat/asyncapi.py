"""The websocket protocol's AsyncAPI document (docs/asyncapi.yaml), read once: the
schema of every frame. The server checks client frames with it (chat.protocol, in the
style of every schema-checked input: config.schemas); the tests check every server
frame with it."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import yaml

from config.schemas import SchemaCheck

DOCUMENT = Path(__file__).resolve().parents[2] / "docs" / "asyncapi.yaml"
CLIENT = "receiveClientFrames"  # the operation of the frames a client sends
SERVER = "sendServerFrames"  # the operation of the frames the server sends


@cache
def document() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(DOCUMENT.read_text())
    return loaded


@cache
def message_names(operation: str) -> dict[str, str]:
    """Frame type -> component message name, for the messages of one operation."""
    doc = document()
    names = {}
    for ref in doc["operations"][operation]["messages"]:
        channel_message = ref["$ref"].rsplit("/", 1)[1]
        component = doc["channels"]["chat"]["messages"][channel_message]["$ref"].rsplit("/", 1)[1]
        names[doc["components"]["messages"][component]["name"]] = component
    return names


def payload(operation: str, kind: str) -> dict[str, Any]:
    """The JSON Schema of one frame type (KeyError for a type the operation lacks)."""
    component = message_names(operation)[kind]
    schema: dict[str, Any] = document()["components"]["messages"][component]["payload"]
    return schema


@cache
def validator(operation: str, kind: str) -> SchemaCheck | None:
    """The check of one frame type (config.schemas); None for a type the operation lacks."""
    component = message_names(operation).get(kind)
    if component is None:
        return None
    return SchemaCheck(
        {"$ref": f"#/components/messages/{component}/payload"}, document=document(), draft=7
    )
