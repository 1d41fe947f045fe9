"""The inference pool on an event loop: `chat_stream` as an async generator, for the
OpenAI-compatible API, which relays hundreds of streams from one loop (a thread per
stream would cost a thread, a blocking socket and a GIL hand-off per token).

The call takes inference.plan's steps in inference.pool's order, with the same
decisions; only the I/O differs, and none of it blocks the loop: the backend is read
by inference.aclient, the store's steps are its async twins, and the database (the
backend rows when this process's copy is stale, the tenant's plan when the caller has
not passed it, a backend marked degraded) is read on the bookkeeping threads of
inference.blocking. A consumer that stops early (a client that disconnects) ends the
call as any failure does: what it produced is booked, every lease given back.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from contextlib import aclosing

from django.conf import settings

from inference.aclient import backend_stream
from inference.backends import abackend_rows, backend_mark_degraded
from inference.blocking import blocking
from inference.plan import CallPlan
from inference.router import BackendView
from inference.selectors import tenant_limits
from inference.store import CallStore, Ticket, call_store
from inference.types import ChatRequest, InferenceError, StreamEvent
from tenants.quotas import Limits

__all__ = ["chat_stream"]


async def chat_stream(
    request: ChatRequest, *, limits: Limits | None = None
) -> AsyncGenerator[StreamEvent, None]:
    """Stream a chat completion: the events and errors of `inference.pool.chat_stream`
    (StreamStarted, again if a retry moves the call; TextDelta... and ToolCallDelta...;
    StreamFinished; InferenceError, LimitExceeded, AdmissionTimeout), from an event
    loop. `limits`: the tenant's limits when the caller holds them (else they are read)."""
    rows = await abackend_rows()
    if request.tenant_id and limits is None:
        limits = await blocking(tenant_limits, request.tenant_id)
    plan = CallPlan(request, rows=rows, limits=limits)
    store = call_store()
    await store.arefresh_load(plan.rows)
    first = plan.pick()
    ticket = await store.astart(plan, first.id if first else None)
    try:
        async with aclosing(_attempts(request, plan, store, ticket, first)) as events:
            async for event in events:
                yield event
    finally:
        # (It completes even if this task is cancelled again meanwhile.)
        await store.aend(ticket, *plan.settle(admitted=ticket.admitted))


async def _attempts(
    request: ChatRequest,
    plan: CallPlan,
    store: CallStore,
    ticket: Ticket,
    chosen: BackendView | None,
) -> AsyncGenerator[StreamEvent, None]:
    """The call's turn (when the pool was saturated), then its attempts: a backend
    leased and streamed from, another after a failure before the first token."""
    if not ticket.admitted:
        await store.await_admitted(ticket, settings.PARLEY_ADMISSION_TIMEOUT_S)
        await store.arefresh_load(plan.rows)
        chosen = plan.pick()
    while chosen is not None:
        backend = chosen.id
        backoff_s = plan.attempt(backend)
        if backoff_s:
            await asyncio.sleep(backoff_s)
        await store.alease(ticket, backend)
        try:
            async with aclosing(backend_stream(backend, request, model=plan.model)) as events:
                async for event in events:
                    yield plan.observe(event)
            return
        except InferenceError as exc:
            plan.failed(exc)
            await blocking(backend_mark_degraded, backend, exc)
        chosen = plan.pick()
    raise plan.exhausted()
