"""vLLM's OpenAI-compatible dialect, for both backend clients (inference.client for
threads, inference.aclient for event loops): the body of a streamed
`/v1/chat/completions` request, the reading of its server-sent events, and the errors
a backend answers. No sockets, no timeouts: the clients bring the bytes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from inference.types import (
    ChatRequest,
    InferenceError,
    StreamFinished,
    TextDelta,
    ToolCallDelta,
    Usage,
    token_count,
)


def request_body(request: ChatRequest, *, model: str) -> dict[str, Any]:
    """The JSON body of a streamed `/v1/chat/completions` request: with
    `stream_options.include_usage`, and the request's `tools` (whose calls stream back
    as `delta.tool_calls` fragments), sampling parameters and tenant (`cache_salt`)."""
    body: dict[str, Any] = {
        "model": model,
        "messages": request.messages,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if request.max_tokens is not None:
        body["max_tokens"] = request.max_tokens
    if request.temperature is not None:
        body["temperature"] = request.temperature
    if request.tools:
        body["tools"] = request.tools
    if request.tool_choice is not None:
        body["tool_choice"] = request.tool_choice
    if request.sampling:
        body.update(request.sampling)  # only SAMPLING_PARAMETERS: ChatRequest checks
    if request.tenant_id:
        # vLLM keys its prefix cache with this, so tenants cannot probe each other's.
        body["cache_salt"] = request.tenant_id
    return body


def error_message(status: int, body: bytes, reason: str = "") -> str:
    """What a backend's error answer says: its `error.message` (OpenAI's and vLLM's
    shape) or `detail`, else the body's start, else the reason phrase."""
    try:
        data = json.loads(body)
    except ValueError:
        return body[:500].decode(errors="replace") or reason or f"HTTP {status}"
    if isinstance(data, dict):
        error = data.get("error", data)
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(data.get("detail"), str):
            return str(data["detail"])
    return json.dumps(data)[:500]


def status_error(status: int, message: str) -> InferenceError:
    """A backend that answered a completion with `status` (not 200): it refused the
    request (4xx: `backend_rejected`) or failed (`backend_error`); another backend may
    succeed after a 5xx or a 429."""
    return InferenceError(
        "backend_rejected" if 400 <= status < 500 else "backend_error",
        message,
        retryable=status >= 500 or status == 429,
        status=status,
    )


def silence_error(base_url: str, *, started: bool, limit_s: float) -> InferenceError:
    """A stream that stayed silent past its deadline: no first token (retryable), or a
    gap after it."""
    code = "stream_timeout" if started else "first_token_timeout"
    return InferenceError(code, f"{base_url}: no token for {limit_s:g}s", retryable=not started)


def tool_call_deltas(raw: Any, *, started: bool) -> list[ToolCallDelta]:
    """The events of one chunk's `delta.tool_calls`:
    `[{"index", "id", "type": "function", "function": {"name", "arguments"}}]`, where
    every key but `index` may be missing from a fragment after the first."""
    if not isinstance(raw, list):
        raise InferenceError(
            "backend_error",
            "malformed stream chunk: tool_calls is not a list",
            retryable=not started,
        )
    deltas = []
    for item in raw:
        function = item.get("function") if isinstance(item, dict) else None
        index = item.get("index", 0) if isinstance(item, dict) else None
        if not isinstance(index, int) or not isinstance(function or {}, dict):
            raise InferenceError(
                "backend_error",
                f"malformed stream chunk: a tool call fragment {item!r:.200}",
                retryable=not started,
            )
        function = function or {}
        deltas.append(
            ToolCallDelta(
                index=index,
                id=item.get("id") or None,
                name=function.get("name") or None,
                arguments=function.get("arguments") or "",
            )
        )
    return deltas


def chunk_events(
    chunk: dict[str, Any], *, started: bool
) -> tuple[list[TextDelta | ToolCallDelta], str, Usage | None]:
    """What one decoded SSE chunk of a streamed completion says: its text and tool-call
    fragments in order, its finish reason ("" if none) and its usage (None if none).
    An error chunk raises, retryable while nothing has been `started`."""
    if "error" in chunk and not chunk.get("choices"):
        raise InferenceError(
            "backend_error",
            str(chunk["error"].get("message", chunk["error"])),
            retryable=not started,
        )
    events: list[TextDelta | ToolCallDelta] = []
    finish_reason = ""
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta")
        if delta:
            text = delta.get("content")
            if text:
                events.append(TextDelta(text))
            # Parsed only when the chunk has some: text chunks pay one lookup.
            calls = delta.get("tool_calls")
            if calls:
                events += tool_call_deltas(calls, started=started or bool(events))
        if choice.get("finish_reason"):
            finish_reason = choice["finish_reason"]
    raw = chunk.get("usage")
    usage = (
        Usage(
            prompt_tokens=token_count(raw.get("prompt_tokens")),
            completion_tokens=token_count(raw.get("completion_tokens")),
        )
        if raw
        else None
    )
    return events, finish_reason, usage


class CompletionReader:
    """The body of one streamed completion, read as it arrives: `feed` takes the next
    bytes and yields the text and tool-call fragments they complete, in order (the
    first one `started`, after which errors are not retryable); `finished` is the
    StreamFinished of the whole stream, once `done` (`data: [DONE]`) or the body ended."""

    __slots__ = ("_buffer", "done", "finish_reason", "started", "usage")

    def __init__(self) -> None:
        self._buffer = b""
        self.done = False
        self.started = False
        self.finish_reason = ""
        self.usage: Usage | None = None

    def feed(self, data: bytes) -> Iterator[TextDelta | ToolCallDelta]:
        if self.done:
            return
        buffer = self._buffer + data if self._buffer else data
        while True:
            end = buffer.find(b"\n")
            if end < 0:
                break
            line, buffer = buffer[:end], buffer[end + 1 :]
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                self.done, buffer = True, b""
                break
            try:
                chunk = json.loads(payload)
            except json.JSONDecodeError as exc:
                raise InferenceError(
                    "backend_error", f"malformed stream chunk: {exc}", retryable=not self.started
                ) from exc
            events, finish, usage = chunk_events(chunk, started=self.started)
            self.finish_reason = finish or self.finish_reason
            self.usage = usage or self.usage
            for event in events:
                self.started = True
                yield event
        self._buffer = buffer

    def finished(self) -> StreamFinished:
        if not self.finish_reason:
            raise InferenceError(
                "stream_interrupted",
                "the stream ended without a finish reason",
                retryable=not self.started,
            )
        return StreamFinished(finish_reason=self.finish_reason, usage=self.usage or Usage())
