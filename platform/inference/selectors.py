"""Reads of the pool: the models it serves, its default model, a tenant's limits."""

from __future__ import annotations

from typing import Any

from django.conf import settings

from inference.backends import backend_rows
from inference.models import Backend
from inference.router import ROUTABLE_STATES
from inference.types import InferenceError, ModelInfo
from tenants.models import Tenant
from tenants.quotas import Limits, limits_for
from tenants.rls import tenant_scope


def models_available(rows: list[Backend] | None = None) -> list[ModelInfo]:
    """Every model a routable backend serves, once each (the context length and
    `created` of the first backend serving it), in the order of the rows."""
    seen: dict[str, ModelInfo] = {}
    for row in backend_rows() if rows is None else rows:
        if row.state in ROUTABLE_STATES:
            for model in row.served_models:
                if model not in seen:
                    created = int(row.created_at.timestamp()) if row.created_at else 0
                    seen[model] = ModelInfo(model, row.max_model_len, created)
    return list(seen.values())


def default_model(rows: list[Backend] | None = None) -> str:
    """PARLEY_DEFAULT_MODEL, else the first model the pool serves."""
    if settings.PARLEY_DEFAULT_MODEL:
        return str(settings.PARLEY_DEFAULT_MODEL)
    models = models_available(rows)
    if not models:
        raise InferenceError("no_backend", "No healthy inference backend is available.")
    return models[0].id


def tenant_limits(tenant_id: Any) -> Limits:
    """The limits of a tenant's plan; `tenant_not_found` for a tenant that is gone."""
    with tenant_scope(tenant_id=tenant_id):
        tenant = Tenant.objects.select_related("plan").filter(id=tenant_id).first()
    if tenant is None:
        raise InferenceError("tenant_not_found", "The call's tenant does not exist.")
    return limits_for(tenant)
