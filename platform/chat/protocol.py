"""Websocket protocol v1: validating client frames and shaping server frames.

Client frames: CLIENT_TYPES; server frames: SERVER_TYPES (docs/asyncapi.yaml describes
each). Every frame of a run after
`run.started` carries the run id and the event's sequence number.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from chat.eventlog import cursor_parse
from config import inputs

# Error codes sent in `error` frames.
INVALID_JSON = "invalid_json"
INVALID_FRAME = "invalid_frame"
UNKNOWN_TYPE = "unknown_type"
FRAME_TOO_LARGE = "frame_too_large"
NOT_FOUND = "not_found"
INTERNAL_ERROR = "internal_error"
UNAVAILABLE = "unavailable"

RATE_LIMITED = "rate_limited"

# The events that end a run's log: exactly one, always its last.
TERMINAL_EVENTS = ("run.done", "run.error")

CLIENT_TYPES = ("chat.send", "chat.regenerate", "run.cancel", "run.attach", "ping")
# The fields of each client frame that name a tenant's object: each is resolved through
# the actor (another tenant's object answers `not_found`) and is tested with an outsider.
ID_FIELDS: dict[str, tuple[str, ...]] = {
    "chat.send": ("conversation_id", "parent_message_id", "document_ids"),
    "chat.regenerate": ("message_id",),
    "run.cancel": ("run_id",),
    "run.attach": ("run_id",),
    "ping": (),
}
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
    if kind not in CLIENT_TYPES:
        raise FrameError(
            UNKNOWN_TYPE,
            f"Unknown frame type {kind[:64]!r}; expected one of {', '.join(CLIENT_TYPES)}.",
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


def _string(frame: dict[str, Any], name: str, *, limit: int = 200) -> str:
    value = frame.get(name)
    if value is None or value == "":
        return ""
    if not isinstance(value, str) or len(value) > limit:
        raise FrameError(
            INVALID_FRAME,
            f"{name!r} must be a string of at most {limit} characters.",
            frame.get("client_id"),
        )
    return value


def _required_id(frame: dict[str, Any], name: str) -> str:
    value = _string(frame, name, limit=100)
    if not value:
        raise FrameError(INVALID_FRAME, f"{name!r} is required.", frame.get("client_id"))
    return value


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


def chat_send(frame: dict[str, Any]) -> ChatSend:
    client_id = frame.get("client_id")
    content = frame.get("content")
    if not isinstance(content, str) or not content.strip():
        raise FrameError(INVALID_FRAME, "'content' must be a non-empty string.", client_id)
    conversation_id = _string(frame, "conversation_id", limit=100) or None
    has_parent = "parent_message_id" in frame
    parent = frame.get("parent_message_id")
    if parent is not None and (not isinstance(parent, str) or not 0 < len(parent) <= 100):
        raise FrameError(
            INVALID_FRAME, "'parent_message_id' must be a message id or null.", client_id
        )
    if has_parent and conversation_id is None:
        raise FrameError(
            INVALID_FRAME, "'parent_message_id' needs the message's 'conversation_id'.", client_id
        )
    documents = frame.get("document_ids", [])
    if not isinstance(documents, list) or not all(
        isinstance(d, str) and 0 < len(d) <= 100 for d in documents
    ):
        raise FrameError(INVALID_FRAME, "'document_ids' must be a list of ids.", client_id)
    if len(documents) > 100:
        raise FrameError(INVALID_FRAME, "At most 100 documents per message.", client_id)
    return ChatSend(
        content=content,
        conversation_id=conversation_id,
        model=_string(frame, "model"),
        client_id=client_id,
        parent_message_id=parent,
        has_parent=has_parent,
        agent=_string(frame, "agent"),
        document_ids=tuple(documents),
    )


@dataclass(frozen=True)
class Regenerate:
    message_id: str
    model: str
    client_id: str | None


def chat_regenerate(frame: dict[str, Any]) -> Regenerate:
    return Regenerate(
        message_id=_required_id(frame, "message_id"),
        model=_string(frame, "model"),
        client_id=frame.get("client_id"),
    )


@dataclass(frozen=True)
class RunRef:
    run_id: str
    after: int
    client_id: str | None
    # `run.attach` only: consecutive token events may share a frame (fast catch-up).
    coalesce: bool = False


def run_ref(frame: dict[str, Any]) -> RunRef:
    """`run.cancel` and `run.attach`: a run id, and for attach a cursor (the last
    sequence number the client has; 0 or absent for everything)."""
    after = frame.get("after", 0)
    try:
        if not isinstance(after, int):  # a JSON integer (a query string's is text)
            raise inputs.InvalidInput("'after' must be an integer.")
        after = cursor_parse(after, name="'after'")  # the one check of a cursor
    except inputs.InvalidInput as exc:
        raise FrameError(INVALID_FRAME, exc.message, frame.get("client_id")) from None
    coalesce = frame.get("coalesce", False)
    if not isinstance(coalesce, bool):
        raise FrameError(INVALID_FRAME, "'coalesce' must be true or false.", frame.get("client_id"))
    return RunRef(
        run_id=_required_id(frame, "run_id"),
        after=after,
        client_id=frame.get("client_id"),
        coalesce=coalesce,
    )


# The validator of each client frame type (after `parse`): FrameError or a typed value.
PARSERS: dict[str, Any] = {
    "chat.send": chat_send,
    "chat.regenerate": chat_regenerate,
    "run.cancel": run_ref,
    "run.attach": run_ref,
    "ping": lambda frame: frame,
}
