"""One backend, spoken to as vLLM's OpenAI-compatible server.

`/v1/chat/completions` with `stream: true` and `stream_options.include_usage` (and the
request's `tools`, whose calls stream back as `delta.tool_calls` fragments), `/v1/models`
(with vLLM's `max_model_len`), `/health`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx

from config.singleton import process_singleton
from inference.types import ChatRequest, InferenceError, ModelInfo, StreamEvent, StreamStarted
from inference.wire import (
    CompletionReader,
    error_message,
    request_body,
    silence_error,
    status_error,
)


@dataclass(frozen=True)
class Timeouts:
    connect_s: float = 5.0
    first_token_s: float = 120.0
    idle_s: float = 60.0


class BackendClient:
    """One backend, over this process's kept-alive connections to it (`http_client`)."""

    def __init__(self, base_url: str, *, api_key: str = "", timeouts: Timeouts | None = None):
        self.base_url = base_url.rstrip("/")
        self.timeouts = timeouts or Timeouts()
        self._http = http_client(self.base_url, api_key)

    def _timeout(self, read_s: float) -> httpx.Timeout:
        return httpx.Timeout(connect=self.timeouts.connect_s, read=read_s, write=30.0, pool=30.0)

    def _get(self, path: str) -> httpx.Response:
        return self._http.get(path, timeout=self._timeout(self.timeouts.connect_s))

    def health(self) -> bool:
        try:
            return self._get("/health").status_code == 200
        except httpx.HTTPError:
            return False

    def metrics_text(self) -> str:
        """vLLM's Prometheus metrics, as text."""
        try:
            response = self._get("/metrics")
        except httpx.HTTPError as exc:
            raise InferenceError("backend_unreachable", str(exc), retryable=True) from exc
        if response.status_code != 200:
            raise InferenceError("backend_error", f"/metrics answered {response.status_code}")
        return response.text

    def models(self) -> list[ModelInfo]:
        try:
            response = self._get("/v1/models")
        except httpx.HTTPError as exc:
            raise InferenceError("backend_unreachable", str(exc), retryable=True) from exc
        if response.status_code != 200:
            message = error_message(response.status_code, response.content, response.reason_phrase)
            raise InferenceError(
                "backend_error", message, retryable=True, status=response.status_code
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
        reader = CompletionReader()
        try:
            with self._http.stream(
                "POST", "/v1/chat/completions", json=body, timeout=self._timeout(read_timeout)
            ) as response:
                if response.status_code != 200:
                    response.read()
                    status = response.status_code
                    raise status_error(
                        status, error_message(status, response.content, response.reason_phrase)
                    )
                watch = _watchdog().watch(response, self.timeouts.first_token_s)
                yield StreamStarted(backend=self.base_url, model=model)
                for data in response.iter_bytes():
                    if reader.started:
                        watch.extend(self.timeouts.idle_s)
                    for event in reader.feed(data):
                        yield event
                        watch.extend(self.timeouts.idle_s)  # from when the caller is back
        except (httpx.HTTPError, OSError) as exc:
            if watch is not None and watch.fired:
                limit_s = self.timeouts.idle_s if reader.started else self.timeouts.first_token_s
                raise silence_error(self.base_url, started=reader.started, limit_s=limit_s) from exc
            raise _as_inference_error(exc, self.base_url, reader.started) from exc
        finally:
            if watch is not None:
                watch.done()
        yield reader.finished()


# Kept-alive connections to each backend, per process (a forked child opens its own).
KEEPALIVE = httpx.Limits(max_connections=None, max_keepalive_connections=32, keepalive_expiry=30.0)
_http_clients: dict[tuple[int, str, str], httpx.Client] = {}
_http_lock = threading.Lock()


def http_client(base_url: str, api_key: str = "") -> httpx.Client:
    """This process's `httpx.Client` for one backend (and API key): its pool of
    kept-alive connections, shared by every thread that calls the backend."""
    key = (os.getpid(), base_url, api_key)
    client = _http_clients.get(key)
    if client is None:
        with _http_lock:
            client = _http_clients.get(key)
            if client is None:
                headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
                client = httpx.Client(base_url=base_url, headers=headers, limits=KEEPALIVE)
                _http_clients[key] = client
    return client


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


@process_singleton
def _watchdog() -> _Watchdog:
    return _Watchdog()
