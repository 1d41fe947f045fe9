"""The inference pool on threads: every LLM call of the workers goes through
`chat_stream` (the OpenAI-compatible API's go through inference.apool).

The call's decisions are inference.plan's, what it holds inference.store's; this
driver does their I/O with blocking calls: the backend rows and the tenant's plan from
the database, the store's steps (the ledger row among them), the backend's stream
(inference.client).
"""

from __future__ import annotations

import time
from collections.abc import Generator

from django.conf import settings

from inference.backends import backend_mark_degraded, backend_rows, client_for
from inference.plan import CallPlan, breaker
from inference.plan import forget as forget_cache
from inference.router import HEALTHY
from inference.selectors import default_model, models_available, tenant_limits
from inference.store import call_store
from inference.types import ChatRequest, InferenceError, StreamEvent
from tenants.quotas import Limits

__all__ = [
    "backend_healthy",
    "breaker",
    "chat_stream",
    "client_for",
    "default_model",
    "forget_cache",
    "models_available",
]


def chat_stream(request: ChatRequest) -> Generator[StreamEvent, None, None]:
    """Stream a chat completion. Yields StreamStarted (backend, model) — again if a
    retry moves the call — then TextDelta... and, for a request with `tools`, the
    ToolCallDelta fragments of the calls the model makes (either counts as the first
    token: no failover after it), then StreamFinished (finish_reason "tool_calls" when
    the reply is tool calls). Raises InferenceError with a stable code (LimitExceeded:
    `rate_limited` or `budget_exhausted`, with when to retry; `pool_busy` when the
    saturated pool did not admit the call in time).

    A tenant's call is held under its limits (tenant, user, key) and its estimated
    tokens reserved against the monthly budget; while the pool is saturated it waits
    its turn (VTC across tenants); afterwards its usage is committed to the ledger (a
    partial stream counts what it produced) and charged to the fairness counter."""
    plan = plan_open(request)
    rows = plan.rows
    store = call_store()
    store.refresh_load(rows)
    chosen = plan.pick()
    ticket = store.start(plan, chosen.id if chosen else None)
    try:
        if not ticket.admitted:
            store.wait_admitted(ticket, settings.PARLEY_ADMISSION_TIMEOUT_S)
            store.refresh_load(rows)
            chosen = plan.pick()
        while chosen is not None:
            backoff_s = plan.attempt(chosen.id)
            if backoff_s:
                time.sleep(backoff_s)
            store.lease(ticket, chosen.id)
            try:
                for event in client_for(chosen.id).chat_stream(request, model=plan.model):
                    yield plan.observe(event)
                return
            except InferenceError as exc:
                plan.failed(exc)
                backend_mark_degraded(chosen.id, exc)
            chosen = plan.pick()
        raise plan.exhausted()
    finally:
        store.end(ticket, *plan.settle(admitted=ticket.admitted))


def plan_open(request: ChatRequest, limits: Limits | None = None) -> CallPlan:
    """The call's plan (inference.plan's first step) with what it needs read: the
    backend rows and, for a tenant's call, the tenant's limits unless given."""
    rows = backend_rows()
    if request.tenant_id and limits is None:
        limits = tenant_limits(request.tenant_id)
    return CallPlan(request, rows=rows, limits=limits)


def backend_healthy(url: str) -> bool:
    row = next((r for r in backend_rows() if r.base_url == url.rstrip("/")), None)
    return row is not None and row.state == HEALTHY and not breaker().is_open(url)
