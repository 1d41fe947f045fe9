"""Operators see the pool and steer it: backends, their state, their load."""

from __future__ import annotations

import uuid
from datetime import datetime

from django.http import HttpRequest
from ninja import Router, Schema

from inference.backends import backend_set_state, backend_views
from inference.models import Backend
from inference.pool import breaker
from tenants.access import NotFound
from tenants.api.operator import OperatorSession, operator_of

router = Router(tags=["operator"], auth=OperatorSession())


class BackendOut(Schema):
    id: uuid.UUID
    name: str
    base_url: str
    weight: float
    state: str
    state_pinned: bool
    served_models: list[str]
    max_model_len: int | None
    last_checked_at: datetime | None
    last_error: str
    inflight: int = 0
    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float = 0.0
    circuit_open: bool = False


class StateIn(Schema):
    state: str | None  # healthy, degraded, down, draining; null: back to health checks


def _out(rows: list[Backend]) -> list[dict]:
    views = {v.id: v for v in backend_views(rows, breaker=breaker())}
    out = []
    for row in rows:
        view = views[row.base_url]
        out.append(
            {
                **{f: getattr(row, f) for f in BackendOut.model_fields if hasattr(row, f)},
                "inflight": view.inflight,
                "running": view.running,
                "waiting": view.waiting,
                "kv_usage": view.kv_usage,
                "circuit_open": view.circuit_open,
            }
        )
    return out


@router.get("/backends", response=list[BackendOut], url_name="operator_backends")
def backends_list(request: HttpRequest):
    operator_of(request)
    return _out(list(Backend.objects.all()))


@router.put("/backends/{backend_id}/state", response=BackendOut, url_name="operator_backend")
def backends_state(request: HttpRequest, backend_id: str, payload: StateIn):
    operator_of(request)
    try:
        row = backend_set_state(backend_id=uuid.UUID(backend_id), state=payload.state)
    except (ValueError, Backend.DoesNotExist):
        raise NotFound from None
    return _out([row])[0]
