"""The inference pool for async callers: `chat_stream` as an async generator.

The web process's OpenAI-compatible API relays hundreds of streams from one event
loop; a thread per stream (the sync `inference.pool.chat_stream` behind
`sync_to_async`) would cost a thread, a blocking socket and a GIL hand-off per token.
This is the same call, step for step, with the same decisions made by the same code
(backend rows and health, the routing policy and its prefix index, the circuit
breakers, the shared load store, the tenant's limits, fair admission, the ledger):

1. the tenant's plan allows the model; the call is held under its limits (tenant,
   user, key) with its estimated tokens reserved (`inference.limits.call_guard`);
2. it takes a slot of the pool, waiting its turn (VTC) while the pool is saturated;
3. the router picks a backend, the call streams from it; a failure before the first
   token moves it to another backend (backoff with jitter, circuit breaker, the
   backend marked degraded); a failure after it ends the call with the error;
4. afterwards the usage is committed to the ledger (a partial stream counts what it
   produced) and charged to the tenant's fairness counter, and every lease is given
   back, also when the consumer stops early (a client that disconnects).

What differs is only how it waits. The backend is read with a small HTTP/1.1 client
on asyncio streams (kept-alive connections per backend and event loop); the
first-token and idle timeouts are one deadline per stream, paused while the consumer
has an event; the wait for admission is an async BLPOP on the ticket's wake key. The
blocking bookkeeping (backend rows, the plan, the Redis scripts of limits and
admission, the ledger row) runs on a small thread pool in three steps per call, never
per token: `blocking` is that pool, for other async callers too.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import json
import logging
import math
import random
import ssl
import threading
import time
import uuid
import weakref
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, aclosing
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar
from urllib.parse import urlsplit

from django.conf import settings
from django.db import close_old_connections

from config.redis_clients import async_redis
from inference import pool
from inference.admission import (
    ADMITTED,
    GONE,
    WAITING,
    Admission,
    AdmissionTimeout,
    RedisAdmission,
    Slot,
    admission,
)
from inference.backends import backend_rows, backend_views
from inference.client import chunk_events, request_body
from inference.limits import CallGuard, CallIdentity, call_guard, estimate_tokens, renewer
from inference.load import LEASE_S, LoadStore, load_store
from inference.models import Backend
from inference.router import BackendView, RouteRequest, candidates
from inference.router import prefix_blocks as _prefix_blocks
from inference.types import (
    ChatRequest,
    InferenceError,
    StreamEvent,
    StreamFinished,
    StreamStarted,
    Usage,
)
from tenants.quotas import Limits

logger = logging.getLogger(__name__)

__all__ = ["blocking", "chat_stream"]

T = TypeVar("T")

# Threads for the blocking steps of async callers. Each keeps its own database
# connection (CONN_MAX_AGE), so this also bounds the web process's connections.
BLOCKING_THREADS = 16

_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def _blocking_executor() -> ThreadPoolExecutor:
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(
                max_workers=BLOCKING_THREADS, thread_name_prefix="parley-blocking"
            )
        return _executor


def _with_connections(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    # As channels' database_sync_to_async: drop connections that are broken or past
    # CONN_MAX_AGE before and after, since no request cycle does it for these threads.
    close_old_connections()
    try:
        return fn(*args, **kwargs)
    finally:
        close_old_connections()


async def blocking(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Run blocking code (ORM, Redis scripts) on the bookkeeping threads, in a copy of
    the caller's context. A cancelled caller stops waiting; the work still completes."""
    loop = asyncio.get_running_loop()
    context = contextvars.copy_context()
    call = functools.partial(context.run, _with_connections, fn, *args, **kwargs)
    return await loop.run_in_executor(_blocking_executor(), call)


async def _acquire(fn: Callable[..., T], undo: Callable[[T], object], /, *args: Any) -> T:
    """`blocking` for a step that takes something (leases, a slot): when the caller is
    cancelled while the step runs, `undo` gives back what it took once it has."""
    loop = asyncio.get_running_loop()
    context = contextvars.copy_context()
    call = functools.partial(context.run, _with_connections, fn, *args)
    future = loop.run_in_executor(_blocking_executor(), call)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:

        def undo_when_done(done: asyncio.Future[T]) -> None:
            if not done.cancelled() and done.exception() is None:
                _blocking_executor().submit(_with_connections, undo, done.result())

        future.add_done_callback(undo_when_done)
        raise


# --- one Redis client per event loop -----------------------------

_redis_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = (
    weakref.WeakKeyDictionary()
)


def _redis_client(url: str) -> Any:
    loop = asyncio.get_running_loop()
    client = _redis_clients.get(loop)
    if client is None:
        client = async_redis(url)
        _redis_clients[loop] = client
    return client


# --- the call ---------------------------------------------------------------------------


@dataclass
class _Call:
    """What `_open` found and holds: the rows and model, and for a tenant's call its
    limits (the guard), its admission ticket and, when admitted at once, the backend
    picked for the first attempt."""

    rows: list[Backend]
    model: str
    route: RouteRequest
    stack: ExitStack = field(default_factory=ExitStack)
    guard: CallGuard | None = None
    admission: Admission | None = None
    ticket: str = ""
    tenant: str = ""
    weight: float = 1.0
    capacity: int = 0
    admitted: bool = False
    slot: Slot | None = None
    picked_first: bool = False
    first: tuple[BackendView, str] | None = None  # (backend, load-store call id)


def _route_request(request: ChatRequest, model: str) -> RouteRequest:
    return RouteRequest(
        model=model,
        prefix_blocks=_prefix_blocks(request.messages, salt=request.tenant_id),
        tenant_id=request.tenant_id,
        prompt_tokens=pool._estimate_tokens(request),
    )


def _pick(
    rows: list[Backend], route: RouteRequest, tried: set[str]
) -> tuple[BackendView, str] | None:
    """The router's choice among the backends not tried yet, and its in-flight lease."""
    views = backend_views(rows, breaker=pool.breaker())
    attempt_route = replace(route, exclude=frozenset(tried))
    if not candidates(attempt_route, views):
        return None
    chosen = pool._policy().choose(attempt_route, views)
    if chosen is None:
        return None
    return chosen, load_store().begin(chosen.id)


def _open(request: ChatRequest, limits: Limits | None = None) -> _Call:
    """Blocking: everything before the first backend request (pool.chat_stream's
    opening, and admission's `enter`); for a call admitted at once, the first pick.
    `limits`: the tenant's, when the caller has them already."""
    if not settings.PARLEY_BACKENDS and not Backend.objects.exists():
        raise InferenceError(
            "no_backend", "No inference backend is configured (set PARLEY_BACKENDS)."
        )
    rows = backend_rows()
    model = request.model or pool.default_model()
    call = _Call(rows=rows, model=model, route=_route_request(request, model))
    if not request.tenant_id:
        call.admitted = True
        call.first, call.picked_first = _pick(rows, call.route, set()), True
        return call

    tenant_limits = limits or pool._tenant_limits(request.tenant_id)
    if not tenant_limits.allows_model(model):
        raise InferenceError(
            "model_not_allowed", f"Your plan does not include the model {model!r}."
        )
    identity = CallIdentity(
        request.tenant_id, user_id=request.user_id or None, api_key_id=request.api_key_id or None
    )
    estimate = estimate_tokens(
        messages=request.messages, max_tokens=request.max_tokens or 0, tools=request.tools
    )
    call.capacity = max(
        0,
        int(
            settings.PARLEY_BACKEND_MAX_INFLIGHT
            * max(1, round(sum(r.weight for r in rows if r.state in pool.ROUTABLE)))
        ),
    )
    call.guard = call.stack.enter_context(
        call_guard(identity=identity, limits=tenant_limits, estimated_tokens=estimate)
    )
    try:
        call.admission = admission()
        call.tenant = str(uuid.UUID(str(request.tenant_id)))
        call.weight = tenant_limits.fairness_weight
        call.ticket = uuid.uuid4().hex
        try:
            call.admitted = call.admission.enter(
                tenant_id=call.tenant, ticket=call.ticket, capacity=call.capacity
            )
        except BaseException:
            call.admission.leave(ticket=call.ticket, capacity=call.capacity)
            raise
        if call.admitted:
            _hold_slot(call)
            call.first, call.picked_first = _pick(rows, call.route, set()), True
    except BaseException:
        call.stack.close()
        raise
    return call


def _hold_slot(call: _Call) -> None:
    """The ticket was admitted: hold its slot (renewed in the background) until the
    stack closes, as Admission.admitted does for the block."""
    adm = call.admission
    assert adm is not None
    slot = Slot(id=call.ticket, tenant_id=call.tenant, weight=call.weight, capacity=call.capacity)
    token = renewer.add(lambda: slot.finished or adm.renew(slot.id), adm.lease_ttl_s / 3)

    def finish() -> None:
        renewer.remove(token)
        slot.finished = True
        adm.finish(slot)

    call.slot = slot
    call.stack.callback(finish)


async def _admission_wait(call: _Call, timeout_s: float) -> None:
    """Admission.admitted's loop, waiting asynchronously between polls."""
    adm = call.admission
    assert adm is not None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    try:
        while not call.admitted:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AdmissionTimeout(
                    f"The inference pool is busy: no capacity within {timeout_s:g} s."
                )
            await _wake_or_timeout(adm, call.ticket, min(remaining, adm.poll_s))
            state = await blocking(adm.poll, ticket=call.ticket, capacity=call.capacity)
            if state == GONE:  # our waiting lease lapsed (a long pause): queue again
                logger.warning("admission ticket %s lapsed; queueing again", call.ticket)
                entered = await blocking(
                    adm.enter, tenant_id=call.tenant, ticket=call.ticket, capacity=call.capacity
                )
                state = ADMITTED if entered else WAITING
            call.admitted = state == ADMITTED
    except BaseException:
        await blocking(adm.leave, ticket=call.ticket, capacity=call.capacity)
        raise
    _hold_slot(call)


async def _wake_or_timeout(adm: Admission, ticket: str, timeout_s: float) -> None:
    if isinstance(adm, RedisAdmission) and settings.REDIS_URL:
        # BLPOP's timeout 0 would block forever.
        await _redis_client(settings.REDIS_URL).blpop(
            [f"{adm.key}:wake:{ticket}"], timeout=max(0.01, timeout_s)
        )
    else:
        # The in-memory queue signals threads only: poll it.
        await asyncio.sleep(min(timeout_s, 0.05))


def _unpick(picked: tuple[BackendView, str] | None) -> None:
    if picked is not None:
        load_store().end(picked[0].id, picked[1])


def _abandon(call: _Call) -> None:
    """An opened call whose caller went away before it could stream: give back its
    first pick, its slot and its limits; no usage."""
    try:
        _unpick(call.first)
    finally:
        call.stack.close()


def _close(
    call: _Call,
    request: ChatRequest,
    *,
    finished: StreamFinished | None,
    deltas: int,
    backend: str,
) -> None:
    """Blocking: charge and commit the usage, then give back the slot and the limits
    (pool.chat_stream's `finally` and the exits of its two context managers)."""
    try:
        if call.guard is None or call.slot is None:
            # Not a tenant's call, or never admitted: as when pool.chat_stream's
            # `admitted` raises, the limits are released with no usage.
            return
        pool.call_settle(
            slot=call.slot,
            guard=call.guard,
            request=request,
            model=call.model,
            backend=backend,
            finished=finished,
            deltas=deltas,
        )
    finally:
        call.stack.close()


async def chat_stream(
    request: ChatRequest, *, limits: Limits | None = None
) -> AsyncGenerator[StreamEvent, None]:
    """Stream a chat completion: the events and errors of `inference.pool.chat_stream`
    (StreamStarted, again if a retry moves the call; TextDelta... and ToolCallDelta...;
    StreamFinished; InferenceError, LimitExceeded, AdmissionTimeout), from an event
    loop. `limits`: the tenant's limits when the caller holds them (else they are read)."""
    call = await _acquire(_open, _abandon, request, limits)
    backend, deltas, finished = "", 0, None
    try:
        if not call.admitted:
            await _admission_wait(call, settings.PARLEY_ADMISSION_TIMEOUT_S)
        async with aclosing(_route_and_stream(request, call)) as events:
            async for event in events:
                if isinstance(event, StreamStarted):
                    backend = event.backend
                elif isinstance(event, StreamFinished):
                    finished = event
                else:
                    deltas += 1
                yield event
    finally:
        # The bookkeeping completes on its thread even if this task is cancelled again.
        await blocking(_close, call, request, finished=finished, deltas=deltas, backend=backend)


async def _route_and_stream(request: ChatRequest, call: _Call) -> AsyncGenerator[StreamEvent, None]:
    """Pick a backend, stream from it, fail over before the first token."""
    circuits, store = pool.breaker(), load_store()
    tried: set[str] = set()
    last_error: InferenceError | None = None
    for attempt in range(settings.PARLEY_FAILOVER_ATTEMPTS):
        if attempt == 0 and call.picked_first:
            picked: tuple[BackendView, str] | None = call.first
        else:
            picked = await _acquire(_pick, _unpick, call.rows, call.route, tried)
        if picked is None:
            break
        chosen, lease = picked
        if attempt:
            # Exponential backoff with full jitter between attempts.
            await asyncio.sleep(random.uniform(0, min(1.0, 0.05 * 2**attempt)))  # noqa: S311
        tried.add(chosen.id)
        renewed = time.monotonic()
        produced = False
        try:
            async with aclosing(_backend_stream(chosen.id, request, model=call.model)) as events:
                async for event in events:
                    if not isinstance(event, StreamStarted):
                        produced = True
                    if time.monotonic() - renewed > LEASE_S / 3:
                        await blocking(store.renew, chosen.id, lease)
                        renewed = time.monotonic()
                    yield event
                    if isinstance(event, StreamFinished):
                        circuits.record_success(chosen.id)
            return
        except InferenceError as exc:
            if produced or not exc.retryable:
                raise
            logger.warning("backend %s failed before the first token: %s", chosen.id, exc)
            circuits.record_failure(chosen.id)
            await blocking(pool._mark_degraded, chosen.id, exc)
            last_error = exc
        finally:
            await blocking(_end_lease, store, chosen.id, lease)
    if last_error is not None:
        raise last_error
    raise pool._no_route_error(call.rows, call.model)


def _end_lease(store: LoadStore, backend: str, lease: str) -> None:
    store.end(backend, lease)


# --- one backend, read asynchronously ---------------------------------------------------


def _request_body(request: ChatRequest, model: str) -> dict[str, Any]:
    """As inference.client.BackendClient.chat_stream sends it."""
    return request_body(request, model=model)


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


class _Connection:
    __slots__ = ("idle_since", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since = 0.0


class _Connections:
    """Kept-alive HTTP/1.1 connections to one backend, for one event loop: a stack of
    idle ones (the most recent first), taken and put back in O(1)."""

    def __init__(self, origin: _Origin) -> None:
        self.origin = origin
        self.idle: list[_Connection] = []
        self._ssl: ssl.SSLContext | None = ssl.create_default_context() if origin.ssl else None

    def take_idle(self, now: float) -> _Connection | None:
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

    async def connect(self, timeout_s: float) -> _Connection:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(
                self.origin.host,
                self.origin.port,
                ssl=self._ssl,
                limit=MAX_LINE_BYTES,
            )
        return _Connection(reader, writer)

    def put(self, conn: _Connection, now: float) -> None:
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
_connections: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, _Connections]] = (
    weakref.WeakKeyDictionary()
)


def _connections_for(base_url: str) -> _Connections:
    loop = asyncio.get_running_loop()
    by_url = _connections.get(loop)
    if by_url is None:
        by_url = _connections[loop] = {}
    found = by_url.get(base_url)
    if found is None:
        found = by_url[base_url] = _Connections(_Origin(base_url))
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


def _error_message(status: int, body: bytes) -> str:
    """As inference.client's: the backend's error message, else the body's start."""
    try:
        data = json.loads(body)
    except ValueError:
        return body[:500].decode(errors="replace") or f"HTTP {status}"
    if isinstance(data, dict):
        error = data.get("error", data)
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(data.get("detail"), str):
            return str(data["detail"])
    return json.dumps(data)[:500]


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
    connections: _Connections, body: bytes, deadline: _Deadline, connect_s: float
) -> tuple[_Connection, _Response]:
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


async def _backend_stream(
    base_url: str, request: ChatRequest, *, model: str
) -> AsyncGenerator[StreamEvent, None]:
    """BackendClient.chat_stream, asynchronously: the same events, errors and
    timeouts (the first token within PARLEY_FIRST_TOKEN_TIMEOUT_S of the request, then
    no gap over PARLEY_STREAM_IDLE_TIMEOUT_S). Errors before the first token are
    `retryable`.

    The backend is read with a small HTTP/1.1 client on asyncio streams, with a pool of
    kept-alive connections per backend: per token, one chunk read from the buffered
    stream and one `json.loads` of its event."""
    first_token_s = settings.PARLEY_FIRST_TOKEN_TIMEOUT_S
    idle_s = settings.PARLEY_STREAM_IDLE_TIMEOUT_S
    base_url = base_url.rstrip("/")
    loop = asyncio.get_running_loop()
    connections = _connections_for(base_url)
    body = json.dumps(_request_body(request, model)).encode()
    deadline = _Deadline(loop, loop.time() + first_token_s)
    started = False
    finish_reason = ""
    usage: Usage | None = None
    conn: _Connection | None = None
    response: _Response | None = None
    done = False
    try:
        conn, response = await _send_request(
            connections, body, deadline, settings.PARLEY_CONNECT_TIMEOUT_S
        )
        if response.status != 200:
            status = response.status
            message = _error_message(status, await response.read_all())
            raise InferenceError(
                "backend_rejected" if 400 <= status < 500 else "backend_error",
                message,
                retryable=status >= 500 or status == 429,
                status=status,
            )
        deadline.at = loop.time() + first_token_s  # from the response, as the sync client
        deadline.pause()
        yield StreamStarted(backend=base_url, model=model)
        deadline.resume()
        buffer = b""
        while True:
            data = await response.read()
            if not data:
                break
            if started:
                deadline.at = loop.time() + idle_s
            if done:
                continue  # read on to the end of the body: the connection is then reused
            buffer = buffer + data if buffer else data
            while True:
                end = buffer.find(b"\n")
                if end < 0:
                    break
                line, buffer = buffer[:end], buffer[end + 1 :]
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    done = True
                    buffer = b""
                    break
                events, finish, chunk_usage = chunk_events(json.loads(payload), started=started)
                for event in events:
                    if not started:
                        started = True
                        deadline.at = loop.time() + idle_s
                    deadline.pause()
                    yield event
                    deadline.resume()
                finish_reason = finish or finish_reason
                usage = chunk_usage or usage
        if response.reusable and response.done and conn is not None:
            connections.put(conn, loop.time())
            conn = None
    except json.JSONDecodeError as exc:
        raise InferenceError(
            "backend_error", f"malformed stream chunk: {exc}", retryable=not started
        ) from exc
    except (OSError, EOFError, ValueError, asyncio.LimitOverrunError) as exc:
        if deadline.fired:
            code = "stream_timeout" if started else "first_token_timeout"
            limit = idle_s if started else first_token_s
            raise InferenceError(
                code, f"{base_url}: no token for {limit:g}s", retryable=not started
            ) from exc
        raise InferenceError(
            "backend_error", f"{base_url}: {exc!r}", retryable=not started
        ) from exc
    finally:
        deadline.cancel()
        if conn is not None:
            conn.writer.close()
    if not finish_reason:
        raise InferenceError(
            "stream_interrupted",
            "the stream ended without a finish reason",
            retryable=not started,
        )
    yield StreamFinished(finish_reason=finish_reason, usage=usage or Usage())
