"""Websocket protocol v1: validating client frames and shaping server frames.

Client frames: `chat.send`, `ping`. Server frames: `run.started`, `token`,
`run.done`, `run.error`, `error`, `pong`. Every frame of a run after
`run.started` carries the run id and the event's sequence number.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# Error codes sent in `error` frames.
INVALID_JSON = "invalid_json"
INVALID_FRAME = "invalid_frame"
UNKNOWN_TYPE = "unknown_type"
FRAME_TOO_LARGE = "frame_too_large"
NOT_FOUND = "not_found"
INTERNAL_ERROR = "internal_error"
UNAVAILABLE = "unavailable"

CLIENT_TYPES = ("chat.send", "ping")
# The fields of each client frame that name a tenant's object: each is resolved through
# the actor (another tenant's object answers `not_found`) and is tested with an outsider.
ID_FIELDS: dict[str, tuple[str, ...]] = {"chat.send": ("conversation_id",), "ping": ()}


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


def parse(raw: str | bytes | None, *, max_bytes: int) -> dict[str, Any]:
    """Decode one client frame into a dict with a known `type`, or raise FrameError."""
    if raw is None:
        raise FrameError(INVALID_FRAME, "Empty frame.")
    size = len(raw.encode("utf-8")) if isinstance(raw, str) else len(raw)
    if size > max_bytes:
        raise FrameError(FRAME_TOO_LARGE, f"The frame is {size} bytes; the limit is {max_bytes}.")
    try:
        frame = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FrameError(INVALID_JSON, f"The frame is not valid JSON: {exc.args[0]}") from None
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


@dataclass(frozen=True)
class ChatSend:
    content: str
    conversation_id: str | None
    model: str
    client_id: str | None


def chat_send(frame: dict[str, Any]) -> ChatSend:
    client_id = frame.get("client_id")
    content = frame.get("content")
    if not isinstance(content, str) or not content.strip():
        raise FrameError(INVALID_FRAME, "'content' must be a non-empty string.", client_id)
    conversation_id = frame.get("conversation_id")
    if conversation_id is not None and not isinstance(conversation_id, str):
        raise FrameError(INVALID_FRAME, "'conversation_id' must be a string.", client_id)
    model = frame.get("model") or ""
    if not isinstance(model, str) or len(model) > 200:
        raise FrameError(INVALID_FRAME, "'model' must be a model name.", client_id)
    return ChatSend(
        content=content, conversation_id=conversation_id, model=model, client_id=client_id
    )
