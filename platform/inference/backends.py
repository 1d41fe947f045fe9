"""The pool's backends: rows, their health and models, and the router's view of them.

Rows come from PARLEY_BACKENDS (kept in step with it) and from operators. A refresh
(Celery beat in production, a thread of `manage.py serve` in embedded mode, or
inline when a row's check is older than PARLEY_HEALTH_TTL_S) asks each backend for
`/health` and `/v1/models` (models and vLLM's `max_model_len`) and scrapes `/metrics`
into the shared load store. States: healthy; degraded after one failed check; down
after PARLEY_BACKEND_DOWN_AFTER consecutive failures; draining (or down) when an
operator pins it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import connection
from django.utils import timezone

from inference.blocking import blocking, single_flight
from inference.client import BackendClient, Timeouts
from inference.load import Metrics, load_store, parse_vllm_metrics
from inference.models import Backend
from inference.router import BackendView
from inference.types import InferenceError

logger = logging.getLogger(__name__)

_cache_lock = threading.Lock()
_cache: dict[str, Any] = {"rows": None, "at": 0.0, "config": None}
_refresh_lock = threading.Lock()  # one read of the rows at a time (backend_rows)


def client_for(url: str) -> BackendClient:
    return BackendClient(
        url,
        api_key=settings.PARLEY_BACKEND_API_KEY,
        timeouts=Timeouts(
            connect_s=settings.PARLEY_CONNECT_TIMEOUT_S,
            first_token_s=settings.PARLEY_FIRST_TOKEN_TIMEOUT_S,
            idle_s=settings.PARLEY_STREAM_IDLE_TIMEOUT_S,
        ),
    )


def forget_cache() -> None:
    with _cache_lock:
        _cache.update(rows=None, at=0.0, config=None)


def backends_sync_from_settings() -> None:
    """Rows for PARLEY_BACKENDS exist; config rows dropped from it are removed."""
    configured = [url.rstrip("/") for url in settings.PARLEY_BACKENDS]
    for url in configured:
        Backend.objects.get_or_create(
            base_url=url, defaults={"from_config": True, "name": url.split("//", 1)[-1]}
        )
    Backend.objects.filter(from_config=True).exclude(base_url__in=configured).delete()


def cached_backend_rows(*, max_age_s: float | None = None) -> list[Backend] | None:
    """The backend rows this process read less than `max_age_s` ago (default
    PARLEY_HEALTH_TTL_S) for the current PARLEY_BACKENDS, without any I/O; None when
    `backend_rows` must read them again."""
    ttl = settings.PARLEY_HEALTH_TTL_S if max_age_s is None else max_age_s
    with _cache_lock:
        rows = _cache["rows"]
        if (
            rows is not None
            and _cache["config"] == tuple(settings.PARLEY_BACKENDS)
            and time.monotonic() - _cache["at"] < ttl
        ):
            return list(rows)
    return None


def backend_rows(*, max_age_s: float | None = None) -> list[Backend]:
    """The backend rows, cached briefly in this process; refreshed (health, models)
    inline when their last check is older than PARLEY_HEALTH_TTL_S. One thread reads
    them at a time: the others that found the cache stale wait for its rows."""
    ttl = settings.PARLEY_HEALTH_TTL_S if max_age_s is None else max_age_s
    rows = cached_backend_rows(max_age_s=ttl)
    if rows is not None:
        return rows
    started = time.monotonic()
    with _refresh_lock:
        with _cache_lock:
            if (
                _cache["rows"] is not None
                and _cache["at"] >= started
                and _cache["config"] == tuple(settings.PARLEY_BACKENDS)
            ):
                return list(_cache["rows"])  # read by the thread we waited for
        config = tuple(settings.PARLEY_BACKENDS)
        if _cache["config"] != config:
            backends_sync_from_settings()
        rows = list(Backend.objects.all())
        stale = [
            row
            for row in rows
            if row.last_checked_at is None
            or (timezone.now() - row.last_checked_at).total_seconds() >= ttl
        ]
        if stale:
            backends_refresh(stale)
            rows = list(Backend.objects.all())
        with _cache_lock:
            _cache.update(rows=rows, at=time.monotonic(), config=config)
        return list(rows)


async def abackend_rows() -> list[Backend]:
    """`backend_rows` for an event loop: this process's copy when fresh, else read on a
    bookkeeping thread, once for all the callers that found it stale meanwhile."""
    rows = cached_backend_rows()
    if rows is None:
        rows = await single_flight("backend rows", lambda: blocking(backend_rows))
    return rows


def backend_check(row: Backend) -> Backend:
    """Ask one backend for its health, models and load; record the outcome."""
    client = client_for(row.base_url)
    error = ""
    served: list[Any] = []
    if client.health():
        try:
            served = client.models()
        except InferenceError as exc:
            error = exc.message
    else:
        error = "health check failed"
    if not error:
        # A backend without /metrics still serves; the router then uses its own counts.
        with contextlib.suppress(InferenceError):
            load_store().put_metrics(row.base_url, parse_vllm_metrics(client.metrics_text()))
    first_check = row.last_checked_at is None
    row.last_checked_at = timezone.now()
    if error:
        row.consecutive_failures += 1
        row.last_error = error[:500]
        if not row.state_pinned:
            # A backend never seen healthy is down at once; a healthy one degrades first.
            down = first_check or row.consecutive_failures >= settings.PARLEY_BACKEND_DOWN_AFTER
            row.state = Backend.State.DOWN if down else Backend.State.DEGRADED
    else:
        row.consecutive_failures, row.last_error = 0, ""
        row.served_models = [m.id for m in served]
        lengths = [m.max_model_len for m in served if m.max_model_len]
        row.max_model_len = min(lengths) if lengths else None
        if not row.state_pinned:
            row.state = Backend.State.HEALTHY
    Backend.objects.filter(id=row.id).update(
        last_checked_at=row.last_checked_at,
        consecutive_failures=row.consecutive_failures,
        last_error=row.last_error,
        state=row.state,
        served_models=row.served_models,
        max_model_len=row.max_model_len,
    )
    return row


def backends_refresh(rows: list[Backend] | None = None) -> list[Backend]:
    """Check every backend (in parallel); the periodic task and `serve` call this."""
    rows = list(Backend.objects.all()) if rows is None else rows
    if not rows:
        return []
    if len(rows) == 1 or connection.in_atomic_block:
        # Inside a transaction, other threads could not see uncommitted rows.
        checked = [backend_check(row) for row in rows]
    else:
        with ThreadPoolExecutor(max_workers=min(16, len(rows))) as executor:
            checked = list(executor.map(_check_closing, rows))
    forget_cache()
    return checked


def _check_closing(row: Backend) -> Backend:
    from django.db import connections

    try:
        return backend_check(row)
    finally:
        connections.close_all()  # this thread's connection


def backend_set_state(*, backend_id: Any, state: str | None) -> Backend:
    """An operator pins a state (draining, down, healthy) or unpins (None)."""
    row = Backend.objects.get(id=backend_id)
    if state is None:
        row.state_pinned = False
    elif state in Backend.State.values:
        row.state, row.state_pinned = state, True
    else:
        raise ValidationError(f"Unknown state {state!r}: one of {', '.join(Backend.State.values)}.")
    row.save(update_fields=["state", "state_pinned"])
    forget_cache()
    return row


def backend_views(
    rows: list[Backend],
    *,
    breaker: Any = None,
    inflight: dict[str, int] | None = None,
    metrics: dict[str, Metrics] | None = None,
) -> list[BackendView]:
    """The router's view of `rows`: their state and models, the circuit breaker's
    verdict, and their load (`inflight` and `metrics` when given, else read from the
    shared load store)."""
    urls = [row.base_url for row in rows]
    if inflight is None or metrics is None:
        store = load_store()
        inflight, metrics = store.inflight(urls), store.metrics(urls)
    views = []
    for row in rows:
        m = metrics.get(row.base_url)
        views.append(
            BackendView(
                id=row.base_url,
                state=row.state,
                weight=row.weight,
                models=frozenset(row.served_models),
                max_model_len=row.max_model_len,
                inflight=inflight.get(row.base_url, 0),
                running=m.running if m else 0.0,
                waiting=m.waiting if m else 0.0,
                kv_usage=m.kv_usage if m else 0.0,
                circuit_open=bool(breaker and breaker.is_open(row.base_url)),
            )
        )
    return views


def backend_mark_degraded(url: str, exc: InferenceError) -> None:
    """A call failed on `url` before its first token: evidence that it is unwell. Used
    less (degraded) until the next health check says otherwise."""
    Backend.objects.filter(base_url=url, state=Backend.State.HEALTHY, state_pinned=False).update(
        state=Backend.State.DEGRADED, last_error=str(exc)[:500]
    )
    forget_cache()
