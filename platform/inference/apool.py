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

What differs is only how it waits. The backend is read with httpx's async client
(one connection pool per event loop); the first-token and idle timeouts are deadlines
on each read; the wait for admission is an async BLPOP on the ticket's wake key. The
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
import random
import threading
import time
import uuid
import weakref
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, aclosing
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import httpx
from django.conf import settings
from django.db import close_old_connections

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
from inference.client import _as_inference_error, _error_message
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
    TextDelta,
    Usage,
)

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


# --- one HTTP client and one Redis client per event loop -----------------------------

_http_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
    weakref.WeakKeyDictionary()
)
_redis_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = (
    weakref.WeakKeyDictionary()
)


def _http_client() -> httpx.AsyncClient:
    """Connections to the backends are kept alive and shared by the loop's calls."""
    loop = asyncio.get_running_loop()
    client = _http_clients.get(loop)
    if client is None:
        client = httpx.AsyncClient(
            limits=httpx.Limits(
                max_connections=None, max_keepalive_connections=512, keepalive_expiry=30.0
            ),
        )
        _http_clients[loop] = client
    return client


def _redis_client(url: str) -> Any:
    import redis.asyncio

    loop = asyncio.get_running_loop()
    client = _redis_clients.get(loop)
    if client is None:
        client = redis.asyncio.Redis.from_url(url)
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


def _open(request: ChatRequest) -> _Call:
    """Blocking: everything before the first backend request (pool.chat_stream's
    opening, and admission's `enter`); for a call admitted at once, the first pick."""
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

    tenant_limits = pool._tenant_limits(request.tenant_id)
    if not tenant_limits.allows_model(model):
        raise InferenceError(
            "model_not_allowed", f"Your plan does not include the model {model!r}."
        )
    identity = CallIdentity(
        request.tenant_id, user_id=request.user_id or None, api_key_id=request.api_key_id or None
    )
    estimate = estimate_tokens(messages=request.messages, max_tokens=request.max_tokens or 0)
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
        if finished is not None:
            prompt, completion, outcome = (
                finished.usage.prompt_tokens,
                finished.usage.completion_tokens,
                "completed",
            )
        else:
            # No usage chunk: count the prompt as estimated and a token per delta.
            prompt = estimate_tokens(messages=request.messages, max_tokens=0) if deltas else 0
            completion, outcome = deltas, ("partial" if deltas else "failed")
        call.slot.charge(prompt_tokens=prompt, completion_tokens=completion)
        call.guard.commit(
            prompt_tokens=prompt,
            completion_tokens=completion,
            model=call.model,
            backend=backend,
            outcome=outcome,
            purpose=request.purpose,
            reference=request.reference,
        )
    finally:
        call.stack.close()


async def chat_stream(request: ChatRequest) -> AsyncGenerator[StreamEvent, None]:
    """Stream a chat completion: the events and errors of `inference.pool.chat_stream`
    (StreamStarted, again if a retry moves the call; TextDelta...; StreamFinished;
    InferenceError, LimitExceeded, AdmissionTimeout), from an event loop."""
    call = await _acquire(_open, _abandon, request)
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
    if request.tenant_id:
        # vLLM keys its prefix cache with this, so tenants cannot probe each other's.
        body["cache_salt"] = request.tenant_id
    return body


async def _backend_stream(
    base_url: str, request: ChatRequest, *, model: str
) -> AsyncGenerator[StreamEvent, None]:
    """BackendClient.chat_stream, asynchronously: the same events, errors and
    timeouts (the first token within PARLEY_FIRST_TOKEN_TIMEOUT_S of the response,
    then no gap over PARLEY_STREAM_IDLE_TIMEOUT_S). Errors before the first token are
    `retryable`."""
    first_token_s = settings.PARLEY_FIRST_TOKEN_TIMEOUT_S
    idle_s = settings.PARLEY_STREAM_IDLE_TIMEOUT_S
    base_url = base_url.rstrip("/")
    headers = (
        {"Authorization": f"Bearer {settings.PARLEY_BACKEND_API_KEY}"}
        if settings.PARLEY_BACKEND_API_KEY
        else {}
    )
    # httpx's read timeout is a backstop; the deadlines below are the real limits.
    timeout = httpx.Timeout(
        connect=settings.PARLEY_CONNECT_TIMEOUT_S,
        read=max(first_token_s, idle_s) + 5.0,
        write=30.0,
        pool=30.0,
    )
    loop = asyncio.get_running_loop()
    started = False
    finish_reason = ""
    usage: Usage | None = None
    deadline_fired = False
    try:
        async with _http_client().stream(
            "POST",
            f"{base_url}/v1/chat/completions",
            json=_request_body(request, model),
            headers=headers,
            timeout=timeout,
        ) as response:
            if response.status_code != 200:
                await response.aread()
                status = response.status_code
                raise InferenceError(
                    "backend_rejected" if 400 <= status < 500 else "backend_error",
                    _error_message(response),
                    retryable=status >= 500 or status == 429,
                    status=status,
                )
            yield StreamStarted(backend=base_url, model=model)
            chunks = response.aiter_bytes().__aiter__()
            deadline = loop.time() + first_token_s
            extended_at = 0.0
            buffer = b""
            done = False
            while True:
                try:
                    # A deadline per read, never across a yield: the consumer's time is
                    # its own.
                    async with asyncio.timeout_at(deadline):
                        data = await chunks.__anext__()
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    deadline_fired = True
                    raise
                if started:
                    # Extend the idle deadline at most every 0.25 s (the sync client's
                    # watchdog checks every 0.2 s); never earlier than idle_s.
                    now = loop.time()
                    if now - extended_at >= 0.25:
                        deadline, extended_at = now + idle_s + 0.25, now
                buffer += data
                while not done:
                    end = buffer.find(b"\n")
                    if end < 0:
                        break
                    line, buffer = buffer[:end].rstrip(b"\r"), buffer[end + 1 :]
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        # Read on to the end of the body: the connection is then reused.
                        done = True
                        break
                    chunk = json.loads(payload)
                    if "error" in chunk and not chunk.get("choices"):
                        raise InferenceError(
                            "backend_error",
                            str(chunk["error"].get("message", chunk["error"])),
                            retryable=not started,
                        )
                    for choice in chunk.get("choices") or []:
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            if not started:
                                started = True
                                deadline, extended_at = loop.time() + idle_s + 0.25, loop.time()
                            yield TextDelta(text)
                        if choice.get("finish_reason"):
                            finish_reason = choice["finish_reason"]
                    if chunk.get("usage"):
                        usage = Usage(
                            prompt_tokens=int(chunk["usage"].get("prompt_tokens") or 0),
                            completion_tokens=int(chunk["usage"].get("completion_tokens") or 0),
                        )
                if done:
                    buffer = b""
    except json.JSONDecodeError as exc:
        raise InferenceError(
            "backend_error", f"malformed stream chunk: {exc}", retryable=not started
        ) from exc
    except TimeoutError as exc:
        if not deadline_fired:
            raise _as_inference_error(exc, base_url, started) from exc
        code = "stream_timeout" if started else "first_token_timeout"
        limit = idle_s if started else first_token_s
        raise InferenceError(
            code, f"{base_url}: no token for {limit:g}s", retryable=not started
        ) from exc
    except (httpx.HTTPError, OSError) as exc:
        raise _as_inference_error(exc, base_url, started) from exc
    if not finish_reason:
        raise InferenceError(
            "stream_interrupted",
            "the stream ended without a finish reason",
            retryable=not started,
        )
    yield StreamFinished(finish_reason=finish_reason, usage=usage or Usage())
