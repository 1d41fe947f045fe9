"""Validating websocket frames against the protocol's AsyncAPI document (docs/asyncapi.yaml).

Every frame a test socket receives is checked (tests.conftest.Socket), so a frame the
server sends that the document does not describe fails the test that saw it.
"""

from __future__ import annotations

from typing import Any

from chat.asyncapi import CLIENT, DOCUMENT, SERVER, document, message_names, validator


def client_types() -> set[str]:
    return set(message_names(CLIENT))


def server_types() -> set[str]:
    return set(message_names(SERVER))


def client_fields() -> dict[str, list[str]]:
    """Client frame type -> the names of its fields (`type` included)."""
    messages = document()["components"]["messages"]
    return {
        kind: sorted(messages[component]["payload"]["properties"])
        for kind, component in message_names(CLIENT).items()
    }


def errors(frame: Any, *, sent_by: str) -> list[str]:
    """Why `frame` does not match the document ([] when it does); `sent_by` is
    "server" or "client"."""
    operation = SERVER if sent_by == "server" else CLIENT
    kind = frame.get("type") if isinstance(frame, dict) else None
    check = validator(operation, kind) if isinstance(kind, str) else None
    if check is None:
        return [f"no {sent_by} frame of type {kind!r} in {DOCUMENT.name}"]
    problem = check.problem(frame)
    return [] if problem is None else [f"{problem.param or '(frame)'}: {problem.message}"]


def check_server_frame(frame: dict[str, Any]) -> None:
    problems = errors(frame, sent_by="server")
    assert not problems, f"server frame not in the protocol document: {frame}: {problems}"
