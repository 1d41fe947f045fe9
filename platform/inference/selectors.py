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


def models_allowed(*, tenant_id: Any) -> list[ModelInfo]:
    """The pool's models (`models_available`, in its order) that the tenant's plan
    allows: what its members may choose, in the chat and through `/v1/models`."""
    limits = tenant_limits(tenant_id)
    return [model for model in models_available() if limits.allows_model(model.id)]


def tenant_default_model(*, tenant_id: Any, allowed: list[ModelInfo] | None = None) -> str:
    """The model preselected for the tenant's members: the platform's default
    (PARLEY_DEFAULT_MODEL, else the pool's first model) when the tenant may use it,
    else the first model it may use; "" when it may use none. A tenant's own default
    (the console) slots in here. `allowed`: `models_allowed`, when the caller has it."""
    allowed = models_allowed(tenant_id=tenant_id) if allowed is None else allowed
    if not allowed:
        return ""
    ids = [model.id for model in allowed]
    platform = str(settings.PARLEY_DEFAULT_MODEL) or ids[0]
    return platform if platform in ids else ids[0]


def tenant_limits(tenant_id: Any) -> Limits:
    """The limits of a tenant's plan; `tenant_not_found` for a tenant that is gone."""
    with tenant_scope(tenant_id=tenant_id):
        tenant = Tenant.objects.select_related("plan").filter(id=tenant_id).first()
    if tenant is None:
        raise InferenceError("tenant_not_found", "The call's tenant does not exist.")
    return limits_for(tenant)
