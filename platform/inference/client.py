"""One backend, spoken to as vLLM's OpenAI-compatible server.

`/v1/chat/completions` with `stream: true` and `stream_options.include_usage` (and the
request's `tools`, whose calls stream back as `delta.tool_calls` fragments), `/v1/models`
(with vLLM's `max_model_len`), `/health`.
"""

from __future__ import annotations

import contextlib
import json
import math
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from inference.types import (
    MAX_TOKEN_COUNT,
    ChatRequest,
    InferenceError,
    StreamEvent,
    StreamFinished,
    StreamStarted,
    TextDelta,
    ToolCallDelta,
    Usage,
)


@dataclass(frozen=True)
class ModelInfo:
    id: str
    max_model_len: int | None


@dataclass(frozen=True)
class Timeouts:
    connect_s: float = 5.0
    first_token_s: float = 120.0
    idle_s: float = 60.0


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(body.get("detail"), str):
            return body["detail"]
    return json.dumps(body)[:500]


def request_body(request: ChatRequest, *, model: str) -> dict[str, Any]:
    """The JSON body of a streamed `/v1/chat/completions` request (the async pool's too)."""
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
    """What one decoded SSE chunk of a streamed completion says, for both clients (this
    one and inference.apool): its text and tool-call fragments in order, its finish
    reason ("" if none) and its usage (None if none). An error chunk raises, retryable
    while nothing has been `started`."""
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
            prompt_tokens=_token_count(raw.get("prompt_tokens")),
            completion_tokens=_token_count(raw.get("completion_tokens")),
        )
        if raw
        else None
    )
    return events, finish_reason, usage


def _token_count(value: Any) -> int:
    """A count of the backend's usage, as a number the ledger and the limits can hold:
    0 for a missing or unreadable one (not a finite number), clamped to
    [0, MAX_TOKEN_COUNT]."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    if isinstance(value, float) and not math.isfinite(value):
        return 0
    return min(max(0, int(value)), MAX_TOKEN_COUNT)


class BackendClient:
    def __init__(self, base_url: str, *, api_key: str = "", timeouts: Timeouts | None = None):
        self.base_url = base_url.rstrip("/")
        self.timeouts = timeouts or Timeouts()
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._headers = headers

    def _client(self, read_timeout: float) -> httpx.Client:
        timeout = httpx.Timeout(
            connect=self.timeouts.connect_s, read=read_timeout, write=30.0, pool=30.0
        )
        return httpx.Client(base_url=self.base_url, timeout=timeout, headers=self._headers)

    def health(self) -> bool:
        try:
            with self._client(self.timeouts.connect_s) as client:
                return client.get("/health").status_code == 200
        except httpx.HTTPError:
            return False

    def metrics_text(self) -> str:
        """vLLM's Prometheus metrics, as text."""
        try:
            with self._client(self.timeouts.connect_s) as client:
                response = client.get("/metrics")
        except httpx.HTTPError as exc:
            raise InferenceError("backend_unreachable", str(exc), retryable=True) from exc
        if response.status_code != 200:
            raise InferenceError("backend_error", f"/metrics answered {response.status_code}")
        return response.text

    def models(self) -> list[ModelInfo]:
        try:
            with self._client(self.timeouts.connect_s) as client:
                response = client.get("/v1/models")
        except httpx.HTTPError as exc:
            raise InferenceError("backend_unreachable", str(exc), retryable=True) from exc
        if response.status_code != 200:
            raise InferenceError(
                "backend_error",
                _error_message(response),
                retryable=True,
                status=response.status_code,
            )
        return [
            ModelInfo(id=item["id"], max_model_len=item.get("max_model_len"))
            for item in response.json().get("data", [])
        ]

    def chat_stream(self, request: ChatRequest, *, model: str) -> Iterator[StreamEvent]:
        """Stream one chat completion: StreamStarted, TextDelta and ToolCallDelta as they
        come, StreamFinished. Errors before the first token (or tool-call fragment) are
        `retryable`."""
        body = request_body(request, model=model)

        # httpx's read timeout is a backstop; the watchdog enforces the two real ones:
        # the first token within first_token_s, then no gap longer than idle_s.
        read_timeout = max(self.timeouts.first_token_s, self.timeouts.idle_s) + 5.0
        watch: _Watch | None = None
        started = False
        finish_reason = ""
        usage: Usage | None = None
        try:
            with (
                self._client(read_timeout) as client,
                client.stream("POST", "/v1/chat/completions", json=body) as response,
            ):
                if response.status_code != 200:
                    response.read()
                    status = response.status_code
                    raise InferenceError(
                        "backend_rejected" if 400 <= status < 500 else "backend_error",
                        _error_message(response),
                        retryable=status >= 500 or status == 429,
                        status=status,
                    )
                watch = _watchdog().watch(response, self.timeouts.first_token_s)
                yield StreamStarted(backend=self.base_url, model=model)
                for line in response.iter_lines():
                    if started:
                        watch.extend(self.timeouts.idle_s)
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    events, finish, chunk_usage = chunk_events(json.loads(data), started=started)
                    for event in events:
                        started = True
                        yield event
                    finish_reason = finish or finish_reason
                    usage = chunk_usage or usage
        except json.JSONDecodeError as exc:
            raise InferenceError(
                "backend_error", f"malformed stream chunk: {exc}", retryable=not started
            ) from exc
        except (httpx.HTTPError, OSError) as exc:
            if watch is not None and watch.fired:
                code = "stream_timeout" if started else "first_token_timeout"
                limit = self.timeouts.idle_s if started else self.timeouts.first_token_s
                raise InferenceError(
                    code, f"{self.base_url}: no token for {limit:g}s", retryable=not started
                ) from exc
            raise _as_inference_error(exc, self.base_url, started) from exc
        finally:
            if watch is not None:
                watch.done()
        if not finish_reason:
            raise InferenceError(
                "stream_interrupted",
                "the stream ended without a finish reason",
                retryable=not started,
            )
        yield StreamFinished(finish_reason=finish_reason, usage=usage or Usage())


def _as_inference_error(exc: Exception, base_url: str, started: bool) -> InferenceError:
    if isinstance(exc, httpx.ConnectError):
        return InferenceError("backend_unreachable", f"{base_url}: {exc}", retryable=True)
    if isinstance(exc, httpx.TimeoutException):
        code = "stream_timeout" if started else "first_token_timeout"
        return InferenceError(code, f"{base_url}: {type(exc).__name__}", retryable=not started)
    return InferenceError("backend_error", f"{base_url}: {exc}", retryable=not started)


class _Watch:
    def __init__(self, response: httpx.Response, deadline: float) -> None:
        self.response = response
        self.deadline = deadline
        self.fired = False
        self.finished = False

    def extend(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def done(self) -> None:
        self.finished = True

    def fire(self) -> None:
        """Unblock the reading thread: shut the socket down (closing alone may not
        wake a blocked recv), then close the response."""
        self.fired = True
        stream = self.response.extensions.get("network_stream")
        sock = stream.get_extra_info("socket") if stream is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(Exception):
            self.response.close()


class _Watchdog:
    """One thread per process ends streams that stay silent past their deadline:
    the first token within `first_token_s`, then no gap over `idle_s`."""

    def __init__(self, period_s: float = 0.2) -> None:
        self.period_s = period_s
        self._watches: set[_Watch] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._run, name="stream-watchdog", daemon=True).start()

    def watch(self, response: httpx.Response, first_token_s: float) -> _Watch:
        watch = _Watch(response, time.monotonic() + first_token_s)
        with self._lock:
            self._watches.add(watch)
        return watch

    def _run(self) -> None:
        while True:
            time.sleep(self.period_s)
            now = time.monotonic()
            with self._lock:
                self._watches = {w for w in self._watches if not w.finished}
                expired = [w for w in self._watches if w.deadline < now]
                self._watches.difference_update(expired)
            for watch in expired:
                watch.fire()


_watchdog_instance: _Watchdog | None = None
_watchdog_lock = threading.Lock()


def _watchdog() -> _Watchdog:
    global _watchdog_instance
    with _watchdog_lock:
        if _watchdog_instance is None:
            _watchdog_instance = _Watchdog()
        return _watchdog_instance
