"""A backend, read from an event loop: a small HTTP/1.1 client on asyncio streams.

The OpenAI-compatible API relays hundreds of streams from one event loop, so per token
it does the least it can: one chunk read from a buffered stream, one `json.loads` of
its event (inference.wire reads it as the thread client does). Connections are kept
alive per backend and event loop (a stack of idle ones, O(1) per request, instead of
httpcore's pool scans); chunked decoding is done by hand; the first-token and idle
timeouts are one timer per stream (`_Deadline`), not a cancel scope per read.
"""

from __future__ import annotations

import asyncio
import json
import math
import ssl
import weakref
from collections.abc import AsyncGenerator
from urllib.parse import urlsplit

from django.conf import settings

from inference.types import ChatRequest, InferenceError, StreamEvent, StreamStarted
from inference.wire import (
    CompletionReader,
    error_message,
    request_body,
    silence_error,
    status_error,
)

__all__ = ["Connection", "backend_stream", "connections_for"]


class _Deadline:
    """A stream's read deadline, checked by one timer per stream (not one per read):
    when it passes while the stream waits for the backend, the connection is aborted
    and the pending read fails. `pause` stops the clock while the consumer has the
    event (its time is its own); `resume` restarts it with the time that was left."""

    __slots__ = ("_handle", "_loop", "_transport", "at", "fired", "left")

    def __init__(self, loop: asyncio.AbstractEventLoop, at: float) -> None:
        self._loop = loop
        self._transport: asyncio.WriteTransport | None = None
        self.at = at
        self.left = 0.0
        self.fired = False
        self._handle = loop.call_at(at, self._check)

    def watch(self, transport: asyncio.WriteTransport) -> None:
        self._transport = transport
        if self.fired:  # it passed while connecting
            transport.abort()

    def _check(self) -> None:
        now = self._loop.time()
        if self.at == math.inf:  # paused: look again later
            self._handle = self._loop.call_at(now + 1.0, self._check)
        elif now >= self.at:
            self.fired = True
            if self._transport is not None:
                self._transport.abort()
        else:
            self._handle = self._loop.call_at(self.at, self._check)

    def pause(self) -> None:
        self.left, self.at = self.at - self._loop.time(), math.inf

    def resume(self) -> None:
        self.at = self._loop.time() + self.left

    def cancel(self) -> None:
        self._handle.cancel()


class _Origin:
    """A backend's address, parsed once."""

    __slots__ = ("host", "host_header", "path", "port", "ssl")

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InferenceError("backend_error", f"{base_url}: not an http(s) URL")
        self.ssl = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.ssl else 80)
        self.host_header = parts.netloc.rpartition("@")[2]
        self.path = parts.path.rstrip("/")


class Connection:
    __slots__ = ("idle_since", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since = 0.0


class Connections:
    """Kept-alive HTTP/1.1 connections to one backend, for one event loop: a stack of
    idle ones (the most recent first), taken and put back in O(1)."""

    def __init__(self, origin: _Origin) -> None:
        self.origin = origin
        self.idle: list[Connection] = []
        self._ssl: ssl.SSLContext | None = ssl.create_default_context() if origin.ssl else None

    def take_idle(self, now: float) -> Connection | None:
        while self.idle:
            conn = self.idle.pop()
            if (
                now - conn.idle_since < KEEPALIVE_S
                and not conn.reader.at_eof()
                and not conn.writer.is_closing()
            ):
                return conn
            conn.writer.close()
        return None

    async def connect(self, timeout_s: float) -> Connection:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(
                self.origin.host,
                self.origin.port,
                ssl=self._ssl,
                limit=MAX_LINE_BYTES,
            )
        return Connection(reader, writer)

    def put(self, conn: Connection, now: float) -> None:
        # The least recently used connection is the first: drop it once it has aged
        # out (the backend will have closed it), one per call.
        if self.idle and now - self.idle[0].idle_since >= KEEPALIVE_S:
            self.idle.pop(0).writer.close()
        if len(self.idle) >= MAX_IDLE:
            conn.writer.close()
            return
        conn.idle_since = now
        self.idle.append(conn)


KEEPALIVE_S = 30.0
MAX_IDLE = 512  # kept-alive connections per backend and event loop
MAX_LINE_BYTES = 1 << 20  # a response head, or one chunk-size line
_connections: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, Connections]] = (
    weakref.WeakKeyDictionary()
)


def connections_for(base_url: str) -> Connections:
    loop = asyncio.get_running_loop()
    by_url = _connections.get(loop)
    if by_url is None:
        by_url = _connections[loop] = {}
    found = by_url.get(base_url)
    if found is None:
        found = by_url[base_url] = Connections(_Origin(base_url))
    return found


class _Response:
    """One HTTP/1.1 response being read: its status, headers and body pieces (chunked,
    by Content-Length, or to the end of the connection)."""

    __slots__ = ("_left", "_reader", "chunked", "done", "headers", "reusable", "status")

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self.chunked = False
        self.reusable = False
        self.done = False
        self._left = -1  # bytes left by Content-Length; -1: to the end of the connection

    async def read_head(self) -> None:
        head = await self._reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        self.status = int(rest[:3])
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name:
                self.headers[name.strip().lower()] = value.strip()
        connection = self.headers.get(b"connection", b"").lower()
        self.reusable = version == b"HTTP/1.1" and connection != b"close"
        self.chunked = b"chunked" in self.headers.get(b"transfer-encoding", b"").lower()
        if not self.chunked:
            length = self.headers.get(b"content-length")
            if length is not None:
                self._left = int(length)
            else:
                self.reusable = False
        if self.status in (204, 304) or (not self.chunked and self._left == 0):
            self.done = True

    async def read(self) -> bytes:
        """The next piece of the body; b"" at its end."""
        if self.done:
            return b""
        reader = self._reader
        if self.chunked:
            line = await reader.readuntil(b"\r\n")
            size = int(line.split(b";", 1)[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                    pass
                self.done = True
                return b""
            data = await reader.readexactly(size + 2)
            return data[:-2]
        if self._left < 0:
            data = await reader.read(65536)
            self.done = not data
            return data
        data = await reader.read(min(self._left, 65536))
        if not data:
            raise asyncio.IncompleteReadError(b"", self._left)
        self._left -= len(data)
        self.done = self._left == 0
        return data

    async def read_all(self, limit: int = 1 << 16) -> bytes:
        parts, size = [], 0
        while size < limit:
            data = await self.read()
            if not data:
                break
            parts.append(data)
            size += len(data)
        if not self.done:
            self.reusable = False
        return b"".join(parts)


def _request_head(origin: _Origin, length: int) -> bytes:
    lines = [
        f"POST {origin.path}/v1/chat/completions HTTP/1.1",
        f"Host: {origin.host_header}",
        "Content-Type: application/json",
        "Accept: text/event-stream",
        f"Content-Length: {length}",
    ]
    if settings.PARLEY_BACKEND_API_KEY:
        lines.append(f"Authorization: Bearer {settings.PARLEY_BACKEND_API_KEY}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _send_request(
    connections: Connections, body: bytes, deadline: _Deadline, connect_s: float
) -> tuple[Connection, _Response]:
    """Send the request on a kept-alive connection, or a new one; a kept-alive one that
    the backend closed meanwhile (no byte of an answer) is replaced once."""
    loop = asyncio.get_running_loop()
    payload = _request_head(connections.origin, len(body)) + body
    conn = connections.take_idle(loop.time())
    for reused in (True, False) if conn is not None else (False,):
        if not reused:
            try:
                conn = await connections.connect(connect_s)
            except (OSError, TimeoutError) as exc:
                raise InferenceError(
                    "backend_unreachable",
                    f"{connections.origin.host}:{connections.origin.port}: {exc!r}",
                    retryable=True,
                ) from exc
        assert conn is not None
        deadline.watch(conn.writer.transport)
        response = _Response(conn.reader)
        try:
            conn.writer.write(payload)
            await response.read_head()
        except (ConnectionError, asyncio.IncompleteReadError):
            conn.writer.close()
            if reused and not deadline.fired:
                continue
            raise
        return conn, response
    raise AssertionError("unreachable")  # pragma: no cover


async def backend_stream(
    base_url: str, request: ChatRequest, *, model: str
) -> AsyncGenerator[StreamEvent, None]:
    """One chat completion streamed from one backend: StreamStarted, TextDelta and
    ToolCallDelta as they come, StreamFinished; the events, errors and timeouts of
    inference.client.BackendClient.chat_stream (the first token within
    PARLEY_FIRST_TOKEN_TIMEOUT_S of the response, then no gap over
    PARLEY_STREAM_IDLE_TIMEOUT_S). Errors before the first token are `retryable`."""
    first_token_s = settings.PARLEY_FIRST_TOKEN_TIMEOUT_S
    idle_s = settings.PARLEY_STREAM_IDLE_TIMEOUT_S
    base_url = base_url.rstrip("/")
    loop = asyncio.get_running_loop()
    connections = connections_for(base_url)
    body = json.dumps(request_body(request, model=model)).encode()
    deadline = _Deadline(loop, loop.time() + first_token_s)
    reader = CompletionReader()
    conn: Connection | None = None
    try:
        conn, response = await _send_request(
            connections, body, deadline, settings.PARLEY_CONNECT_TIMEOUT_S
        )
        if response.status != 200:
            raise status_error(
                response.status, error_message(response.status, await response.read_all())
            )
        deadline.at = loop.time() + first_token_s  # from the response, as the sync client
        deadline.pause()
        yield StreamStarted(backend=base_url, model=model)
        deadline.resume()
        while data := await response.read():
            if reader.started:
                deadline.at = loop.time() + idle_s
            # After [DONE], read on to the end of the body: the connection is then reused.
            for event in reader.feed(data):
                deadline.at = loop.time() + idle_s
                deadline.pause()
                yield event
                deadline.resume()
        if response.reusable and response.done:
            connections.put(conn, loop.time())
            conn = None
    except (OSError, EOFError, ValueError, asyncio.LimitOverrunError) as exc:
        if deadline.fired:
            limit_s = idle_s if reader.started else first_token_s
            raise silence_error(base_url, started=reader.started, limit_s=limit_s) from exc
        raise InferenceError(
            "backend_error", f"{base_url}: {exc!r}", retryable=not reader.started
        ) from exc
    finally:
        deadline.cancel()
        if conn is not None:
            conn.writer.close()
    yield reader.finished()
