"""Websocket protocol v1: checking client frames and shaping server frames.

Client frames: the frame table FRAMES (type -> the consumer's handler, the typed value
it gets, the fields naming a tenant's object); each is checked by its schema in
docs/asyncapi.yaml (chat.asyncapi). Server frames: SERVER_TYPES. Every frame of a run
after `run.started` carries the run id and the event's sequence number.

A new client frame type: its message in docs/asyncapi.yaml, one FRAMES entry and the
handler it names; the TypeScript types are generated from the document
(tests/gen_types.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from chat import asyncapi
from chat.eventlog import cursor_parse
from config import inputs

# Error codes sent in `error` frames.
INVALID_JSON = "invalid_json"
INVALID_FRAME = "invalid_frame"
UNKNOWN_TYPE = "unknown_type"
FRAME_TOO_LARGE = "frame_too_large"
NOT_FOUND = "not_found"
MODEL_NOT_FOUND = "model_not_found"
INTERNAL_ERROR = "internal_error"
UNAVAILABLE = "unavailable"

RATE_LIMITED = "rate_limited"

# The events that end a run's log: exactly one, always its last.
TERMINAL_EVENTS = ("run.done", "run.error")

# Frames the server sends (each is described in docs/asyncapi.yaml).
SERVER_TYPES = (
    "run.started",
    "token",
    "tool.start",
    "tool.end",
    "progress",
    "run.done",
    "run.error",
    "run.cancelling",
    "conversation.updated",
    "document.updated",
    "error",
    "pong",
)


class FrameError(Exception):
    def __init__(self, code: str, message: str, client_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.client_id = client_id


def error_frame(code: str, message: str, client_id: str | None = None) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if client_id:
        frame["client_id"] = client_id
    return frame


def run_started_frame(run: Any, *, client_id: str | None = None) -> dict[str, Any]:
    """`run.started` of a queued run (a chat.models.Run): to the socket that sent the
    frame, with its `client_id`, and to the member's other sockets, without."""
    frame: dict[str, Any] = {
        "type": "run.started",
        "run_id": str(run.id),
        "conversation_id": str(run.conversation_id),
        "user_message_id": str(run.user_message_id),
    }
    if client_id:
        frame["client_id"] = client_id
    return frame


def parse(raw: str | bytes | None, *, max_bytes: int) -> dict[str, Any]:
    """Decode one client frame into a dict with a known `type`, or raise FrameError."""
    if raw is None:
        raise FrameError(INVALID_FRAME, "Empty frame.")
    # (A websocket text frame is valid UTF-8; a str from elsewhere may not be.)
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    if len(data) > max_bytes:
        raise FrameError(
            FRAME_TOO_LARGE, f"The frame is {len(data)} bytes; the limit is {max_bytes}."
        )
    if inputs.json_depth_exceeds(data):
        raise FrameError(
            INVALID_JSON, f"The frame nests deeper than {inputs.MAX_JSON_DEPTH} levels."
        )
    try:
        # NUL and lone surrogates refused (config.inputs): whatever reads the frame
        # later gets text that a database and a client can take.
        frame = inputs.json_loads(data)
    except inputs.InvalidInput as exc:
        if exc.code == inputs.INVALID_JSON:
            raise FrameError(INVALID_JSON, "The frame is not valid JSON.") from None
        raise FrameError(INVALID_FRAME, exc.message, _client_id_text(data)) from None
    if not isinstance(frame, dict):
        raise FrameError(INVALID_FRAME, "A frame must be a JSON object with a 'type'.")
    client_id = frame.get("client_id") if isinstance(frame.get("client_id"), str) else None
    kind = frame.get("type")
    if not isinstance(kind, str) or not kind:
        raise FrameError(INVALID_FRAME, "The frame has no 'type'.", client_id)
    if kind not in FRAMES:
        raise FrameError(
            UNKNOWN_TYPE,
            f"Unknown frame type {kind[:64]!r}; expected one of {', '.join(FRAMES)}.",
            client_id,
        )
    if "client_id" in frame and (client_id is None or not 0 < len(client_id) <= 100):
        raise FrameError(INVALID_FRAME, "'client_id' must be a string of 1 to 100 characters.")
    return frame


def _client_id_text(data: bytes) -> str | None:
    """The client id of a frame refused for the text in it (JSON, not too deep), when
    the id itself is text: so the client can tell which frame it was."""
    frame = json.loads(data)
    value = frame.get("client_id") if isinstance(frame, dict) else None
    if not isinstance(value, str) or not 0 < len(value) <= 100:
        return None
    try:
        return inputs.text_check(value)
    except inputs.InvalidInput:
        return None


def check(frame: dict[str, Any]) -> Any:
    """A frame from `parse`, checked by its schema (docs/asyncapi.yaml), as the value its
    handler takes; else FrameError `invalid_frame` saying what is wrong (the schema's
    `x-error` of the field, else a sentence naming it: config.schemas)."""
    check = asyncapi.validator(asyncapi.CLIENT, frame["type"])
    assert check is not None  # parse() let through only the table's types
    problem = check.problem(frame)
    if problem is not None:
        raise FrameError(INVALID_FRAME, problem.message, frame.get("client_id"))
    return FRAMES[frame["type"]].value(frame)


@dataclass(frozen=True)
class ChatSend:
    content: str
    conversation_id: str | None
    model: str
    client_id: str | None
    # Absent: answer the conversation's current branch; None: a new root (an edited first
    # message); an id: the new message goes under it (an edit is a sibling of the original).
    parent_message_id: str | None = None
    has_parent: bool = False
    agent: str = ""
    document_ids: tuple[str, ...] = ()

    @classmethod
    def of(cls, frame: dict[str, Any]) -> ChatSend:
        conversation_id = frame.get("conversation_id") or None
        has_parent = "parent_message_id" in frame
        if has_parent and conversation_id is None:  # "" is none too, which no schema says
            raise FrameError(
                INVALID_FRAME,
                "'parent_message_id' needs the message's 'conversation_id'.",
                frame.get("client_id"),
            )
        return cls(
            content=frame["content"],
            conversation_id=conversation_id,
            model=frame.get("model") or "",
            client_id=frame.get("client_id"),
            parent_message_id=frame.get("parent_message_id"),
            has_parent=has_parent,
            agent=frame.get("agent") or "",
            document_ids=tuple(frame.get("document_ids", ())),
        )


@dataclass(frozen=True)
class Regenerate:
    message_id: str
    model: str
    client_id: str | None

    @classmethod
    def of(cls, frame: dict[str, Any]) -> Regenerate:
        return cls(
            message_id=frame["message_id"],
            model=frame.get("model") or "",
            client_id=frame.get("client_id"),
        )


@dataclass(frozen=True)
class RunRef:
    """`run.cancel` and `run.attach`: a run id, and for attach a cursor (the last
    sequence number the client has; 0 or absent for everything)."""

    run_id: str
    after: int
    client_id: str | None
    # `run.attach` only: consecutive token events may share a frame (fast catch-up).
    coalesce: bool = False

    @classmethod
    def of(cls, frame: dict[str, Any]) -> RunRef:
        try:
            # The one check of a cursor (JSON Schema also takes 3.0 for an integer).
            after = cursor_parse(frame.get("after", 0), name="'after'")
        except inputs.InvalidInput as exc:
            raise FrameError(INVALID_FRAME, exc.message, frame.get("client_id")) from None
        return cls(
            run_id=frame["run_id"],
            after=after,
            client_id=frame.get("client_id"),
            coalesce=frame.get("coalesce", False),
        )


@dataclass(frozen=True)
class Ping:
    client_id: str | None

    @classmethod
    def of(cls, frame: dict[str, Any]) -> Ping:
        return cls(client_id=frame.get("client_id"))


@dataclass(frozen=True)
class FrameType:
    """One client frame type. Its schema is its message in docs/asyncapi.yaml."""

    handler: str  # the name of the chat.consumers.ChatConsumer method that answers it
    value: Callable[[dict[str, Any]], Any]  # the checked frame as that method's argument
    # The fields that name a tenant's object: each is resolved through the actor (another
    # tenant's object answers `not_found`) and tested with an outsider
    # (tests/test_isolation_matrix.py).
    ids: tuple[str, ...] = ()


FRAMES: dict[str, FrameType] = {
    "chat.send": FrameType(
        "on_chat_send", ChatSend.of, ids=("conversation_id", "parent_message_id", "document_ids")
    ),
    "chat.regenerate": FrameType("on_regenerate", Regenerate.of, ids=("message_id",)),
    "run.cancel": FrameType("on_cancel", RunRef.of, ids=("run_id",)),
    "run.attach": FrameType("on_attach", RunRef.of, ids=("run_id",)),
    "ping": FrameType("on_ping", Ping.of),
}
