"""The inference pool: every LLM call of the platform goes through `chat_stream`.

For each call: the backend rows (health and models refreshed when stale), the shared
load (in-flight calls, scraped vLLM metrics) and the circuit breakers make the
router's view; the routing policy (PARLEY_ROUTING_POLICY, prefix affinity with load
awareness by default) picks a backend; the call streams from it. A failure before the
first token is retried on another backend (up to PARLEY_FAILOVER_ATTEMPTS, with
backoff and jitter) and counts against that backend's circuit breaker; a failure
after it ends the call with the error (the caller keeps the partial text).
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Generator
from dataclasses import dataclass, replace

from django.conf import settings

from inference.admission import Slot, admitted
from inference.backends import backend_rows, backend_views, client_for
from inference.backends import forget_cache as forget_backends
from inference.breaker import CircuitBreaker
from inference.limits import CallGuard, CallIdentity, call_guard, estimate_tokens
from inference.load import LEASE_S, load_store
from inference.models import Backend
from inference.router import Policy, PrefixIndex, RouteRequest, candidates, make_policy
from inference.router import prefix_blocks as _prefix_blocks
from inference.types import (
    ChatRequest,
    InferenceError,
    StreamEvent,
    StreamFinished,
    StreamStarted,
)
from tenants.models import Tenant
from tenants.quotas import Limits, limits_for
from tenants.rls import tenant_scope

logger = logging.getLogger(__name__)

__all__ = ["chat_stream", "client_for", "default_model", "forget_cache", "models_available"]

_lock = threading.Lock()
_state: dict[str, object] = {}


def _policy() -> Policy:
    with _lock:
        name = settings.PARLEY_ROUTING_POLICY
        if _state.get("policy_name") != name:
            _state["index"] = PrefixIndex()
            _state["policy"] = make_policy(name, _state["index"])  # type: ignore[arg-type]
            _state["policy_name"] = name
        return _state["policy"]  # type: ignore[return-value]


def breaker() -> CircuitBreaker:
    with _lock:
        current = _state.get("breaker")
        if current is None:
            current = CircuitBreaker(
                threshold=settings.PARLEY_BREAKER_THRESHOLD,
                cooldown_s=settings.PARLEY_BREAKER_COOLDOWN_S,
            )
            _state["breaker"] = current
        return current  # type: ignore[return-value]


def forget_cache() -> None:
    """Forget what this process learned (rows, affinity, circuits): for tests and
    `serve`, which change the configured backends at run time."""
    forget_backends()
    with _lock:
        _state.clear()


@dataclass(frozen=True)
class ModelInfo:
    id: str
    max_model_len: int | None


def models_available() -> list[ModelInfo]:
    """Every model served by a routable backend, once each."""
    seen: dict[str, ModelInfo] = {}
    for row in backend_rows():
        if row.state in (Backend.State.HEALTHY, Backend.State.DEGRADED):
            for model in row.served_models:
                seen.setdefault(model, ModelInfo(model, row.max_model_len))
    return list(seen.values())


def backend_healthy(url: str) -> bool:
    row = next((r for r in backend_rows() if r.base_url == url.rstrip("/")), None)
    return row is not None and row.state == Backend.State.HEALTHY and not breaker().is_open(url)


def default_model() -> str:
    if settings.PARLEY_DEFAULT_MODEL:
        return settings.PARLEY_DEFAULT_MODEL
    models = models_available()
    if not models:
        raise InferenceError("no_backend", "No healthy inference backend is available.")
    return models[0].id


def _estimate_tokens(request: ChatRequest) -> int:
    chars = sum(
        len(str(m.get("content") or ""))
        + (len(json.dumps(m["tool_calls"])) if m.get("tool_calls") else 0)
        for m in request.messages
    )
    if request.tools:
        chars += len(json.dumps(request.tools))
    return chars // 4 + 8 * len(request.messages)


def _no_route_error(rows: list[Backend], model: str) -> InferenceError:
    routable = [r for r in rows if r.state in (Backend.State.HEALTHY, Backend.State.DEGRADED)]
    if not routable:
        return InferenceError("no_backend", "No healthy inference backend is available.")
    if not any(model in r.served_models for r in routable):
        return InferenceError("model_not_found", f"No backend serves the model {model!r}.")
    return InferenceError("no_backend", f"Every backend serving {model!r} is unavailable.")


def chat_stream(request: ChatRequest) -> Generator[StreamEvent, None, None]:
    """Stream a chat completion. Yields StreamStarted (backend, model) — again if a
    retry moves the call — then TextDelta... and, for a request with `tools`, the
    ToolCallDelta fragments of the calls the model makes (either counts as the first
    token: no failover after it), then StreamFinished (finish_reason "tool_calls" when
    the reply is tool calls). Raises InferenceError
    with a stable code (LimitExceeded: `rate_limited` or `budget_exhausted`, with when
    to retry; `pool_busy` when the saturated pool did not admit the call in time).

    A tenant's call is held under its limits (tenant, user, key) and its estimated
    tokens reserved against the monthly budget; while the pool is saturated it waits
    its turn (VTC across tenants); afterwards its usage is committed to the ledger (a
    partial stream counts what it produced) and charged to the fairness counter."""
    if not settings.PARLEY_BACKENDS and not Backend.objects.exists():
        raise InferenceError(
            "no_backend", "No inference backend is configured (set PARLEY_BACKENDS)."
        )
    rows = backend_rows()
    model = request.model or default_model()
    if not request.tenant_id:
        yield from _route_and_stream(request, rows, model)
        return

    tenant_limits = _tenant_limits(request.tenant_id)
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
    capacity = settings.PARLEY_BACKEND_MAX_INFLIGHT * max(
        1, round(sum(r.weight for r in rows if r.state in ROUTABLE))
    )
    with (
        call_guard(identity=identity, limits=tenant_limits, estimated_tokens=estimate) as guard,
        admitted(
            tenant_id=request.tenant_id,
            weight=tenant_limits.fairness_weight,
            capacity=capacity,
            timeout_s=settings.PARLEY_ADMISSION_TIMEOUT_S,
        ) as slot,
    ):
        backend, deltas, finished = "", 0, None
        try:
            for event in _route_and_stream(request, rows, model):
                if isinstance(event, StreamStarted):
                    backend = event.backend
                elif isinstance(event, StreamFinished):
                    finished = event
                else:
                    deltas += 1
                yield event
        finally:
            call_settle(
                slot=slot,
                guard=guard,
                request=request,
                model=model,
                backend=backend,
                finished=finished,
                deltas=deltas,
            )


def call_settle(
    *,
    slot: Slot,
    guard: CallGuard,
    request: ChatRequest,
    model: str,
    backend: str,
    finished: StreamFinished | None,
    deltas: int,
) -> None:
    """Charge the call's admission slot and commit its usage to the limits and the
    ledger: the backend's usage when it sent it, else the prompt as estimated and a
    token per delta (a partial call), or nothing for a call that streamed nothing."""
    if finished is not None:
        prompt, completion = finished.usage.prompt_tokens, finished.usage.completion_tokens
        outcome = "completed"
    else:
        prompt = (
            estimate_tokens(messages=request.messages, max_tokens=0, tools=request.tools)
            if deltas
            else 0
        )
        completion, outcome = deltas, ("partial" if deltas else "failed")
    slot.charge(prompt_tokens=prompt, completion_tokens=completion)
    guard.commit(
        prompt_tokens=prompt,
        completion_tokens=completion,
        model=model,
        backend=backend,
        outcome=outcome,
        purpose=request.purpose,
        reference=request.reference,
    )


ROUTABLE = (Backend.State.HEALTHY, Backend.State.DEGRADED)


def _tenant_limits(tenant_id: str) -> Limits:
    with tenant_scope(tenant_id=tenant_id):
        tenant = Tenant.objects.select_related("plan").filter(id=tenant_id).first()
    if tenant is None:
        raise InferenceError("tenant_not_found", "The call's tenant does not exist.")
    return limits_for(tenant)


def _route_and_stream(
    request: ChatRequest, rows: list[Backend], model: str
) -> Generator[StreamEvent, None, None]:
    """Pick a backend, stream from it, fail over before the first token."""
    route = RouteRequest(
        model=model,
        prefix_blocks=_prefix_blocks(request.messages, salt=request.tenant_id),
        tenant_id=request.tenant_id,
        prompt_tokens=_estimate_tokens(request),
    )
    policy, circuits, store = _policy(), breaker(), load_store()
    tried: set[str] = set()
    last_error: InferenceError | None = None
    for attempt in range(settings.PARLEY_FAILOVER_ATTEMPTS):
        views = backend_views(rows, breaker=circuits)
        attempt_route = replace(route, exclude=frozenset(tried))
        if not candidates(attempt_route, views):
            break
        chosen = policy.choose(attempt_route, views)
        if chosen is None:
            break
        if attempt:
            # Exponential backoff with full jitter between attempts.
            time.sleep(random.uniform(0, min(1.0, 0.05 * 2**attempt)))  # noqa: S311
        tried.add(chosen.id)
        call = store.begin(chosen.id)
        renewed = time.monotonic()
        produced = False
        try:
            for event in client_for(chosen.id).chat_stream(request, model=model):
                if not isinstance(event, StreamStarted):
                    produced = True
                if time.monotonic() - renewed > LEASE_S / 3:
                    store.renew(chosen.id, call)
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
            _mark_degraded(chosen.id, exc)
            last_error = exc
        finally:
            store.end(chosen.id, call)
    if last_error is not None:
        raise last_error
    raise _no_route_error(rows, model)


def _mark_degraded(url: str, exc: InferenceError) -> None:
    """A failed call is evidence: used less until the next health check says otherwise."""
    Backend.objects.filter(base_url=url, state=Backend.State.HEALTHY, state_pinned=False).update(
        state=Backend.State.DEGRADED, last_error=str(exc)[:500]
    )
    forget_backends()
