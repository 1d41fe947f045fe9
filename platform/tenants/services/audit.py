"""The audit log: who did what, appended by the services that do it."""

from __future__ import annotations

from typing import Any

from django.db import models

from tenants.access import Actor
from tenants.models import AuditEvent, Tenant


def audit_record(
    *,
    actor: Actor | None,
    action: str,
    target: models.Model | None = None,
    target_label: str = "",
    data: dict[str, Any] | None = None,
    tenant: Tenant | None = None,
    ip: str | None = None,
) -> AuditEvent:
    """Append one event. `action` is `<thing>.<verb>` (`member.role_changed`); the
    tenant is the actor's unless given (operators act on other tenants)."""
    tenant = tenant if tenant is not None else (actor.tenant if actor else None)
    return AuditEvent.objects.create(
        tenant=tenant,
        actor_user=actor.user if actor else None,
        actor_key=actor.api_key if actor else None,
        actor_label=actor.label if actor else "system",
        action=action,
        target_type=(target._meta.model_name or "") if target is not None else "",
        target_id=str(target.pk) if target is not None else "",
        target_label=target_label or (str(target) if target is not None else ""),
        data=data or {},
        ip=ip,
    )
