"""Blocking work for async callers: a small pool of bookkeeping threads.

The ORM and the synchronous Redis clients must not run on an event loop. `blocking`
runs such a step on one of BLOCKING_THREADS threads (each keeps its own database
connection, so this also bounds the web process's connections). A step that takes
something (a slot, a lease) is awaited with `taking`, which gives it back when its
caller is gone; a step that gives something back, with `completing`, which finishes it
whatever happens to its caller.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import weakref
from collections.abc import Awaitable, Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from django.db import close_old_connections

from config.singleton import process_singleton

__all__ = ["blocking", "completing", "single_flight", "taking"]

T = TypeVar("T")

BLOCKING_THREADS = 16


@process_singleton
def executor() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=BLOCKING_THREADS, thread_name_prefix="parley-blocking")


def _with_connections(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    # As channels' database_sync_to_async: drop connections that are broken or past
    # CONN_MAX_AGE before and after, since no request cycle does it for these threads.
    close_old_connections()
    try:
        return fn(*args, **kwargs)
    finally:
        close_old_connections()


def _submit(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> asyncio.Future[T]:
    loop = asyncio.get_running_loop()
    context = contextvars.copy_context()
    call = functools.partial(context.run, _with_connections, fn, *args, **kwargs)
    return loop.run_in_executor(executor(), call)


async def blocking(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Run blocking code (ORM, Redis scripts) on the bookkeeping threads, in a copy of
    the caller's context. A cancelled caller stops waiting; the work still completes."""
    return await _submit(fn, *args, **kwargs)


# Steps that outlive a cancelled caller, referenced until they are done.
_running: set[asyncio.Future[Any]] = set()


def _keep(step: Awaitable[T]) -> asyncio.Future[T]:
    task = asyncio.ensure_future(step)
    _running.add(task)
    task.add_done_callback(_running.discard)
    return task


_flights: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Hashable, asyncio.Future[Any]]]
_flights = weakref.WeakKeyDictionary()


async def single_flight(key: Hashable, step: Callable[[], Awaitable[T]]) -> T:
    """Await `step()`, once for all the callers of this event loop that ask with the
    same `key` while it runs (a burst of calls that all found a cache stale: one of
    them reads it again, the others wait for its answer)."""
    flights = _flights.setdefault(asyncio.get_running_loop(), {})
    flight = flights.get(key)
    if flight is None:
        flight = flights[key] = _keep(step())
        flight.add_done_callback(lambda _: flights.pop(key, None))
    return await asyncio.shield(flight)


async def taking(step: Awaitable[T], undo: Callable[[T], Awaitable[object]]) -> T:
    """Await a step that takes something (a slot, leases). When the caller is cancelled
    meanwhile, the step still completes and `undo` gives back what it took."""
    task = _keep(step)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:

        def undo_when_done(done: asyncio.Future[T]) -> None:
            if not done.cancelled() and done.exception() is None:
                _keep(undo(done.result()))

        task.add_done_callback(undo_when_done)
        raise


async def completing(step: Awaitable[T]) -> T:
    """Await a step that must not stop halfway (a lease moved, a call's settlement): a
    caller cancelled meanwhile waits for it to complete, then stops; cancelled again,
    it stops at once and the step still completes."""
    task = _keep(step)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        raise
