"""Reading the audit log, filtered. Admins and owners see their tenant's events."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.core.exceptions import ValidationError

from tenants.access import Actor, require_role
from tenants.models import AuditEvent, Role

MAX_PAGE = 200


@dataclass(frozen=True)
class AuditFilter:
    action: str | None = None  # exact, or a prefix ending in "." ("member.")
    actor: str | None = None  # the actor's label: a username or key:<name>
    target_type: str | None = None
    target_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    before_id: int | None = None  # paging: events older than this id
    limit: int = 50


def audit_list(*, actor: Actor, filters: AuditFilter) -> list[AuditEvent]:
    """The actor's tenant's events; admins and owners only."""
    require_role(actor, Role.ADMIN)
    return audit_events(tenant_id=actor.tenant_id, filters=filters)


def audit_events(*, tenant_id: Any, filters: AuditFilter) -> list[AuditEvent]:
    """One tenant's events, newest first. Callers check who may read them."""
    if not 1 <= filters.limit <= MAX_PAGE:
        raise ValidationError(f"limit must be between 1 and {MAX_PAGE}.")
    events = AuditEvent.objects.filter(tenant_id=tenant_id)
    if filters.action:
        events = (
            events.filter(action__startswith=filters.action)
            if filters.action.endswith(".")
            else events.filter(action=filters.action)
        )
    if filters.actor:
        events = events.filter(actor_label=filters.actor)
    if filters.target_type:
        events = events.filter(target_type=filters.target_type)
    if filters.target_id:
        events = events.filter(target_id=filters.target_id)
    if filters.since:
        events = events.filter(created_at__gte=filters.since)
    if filters.until:
        events = events.filter(created_at__lt=filters.until)
    if filters.before_id:
        events = events.filter(id__lt=filters.before_id)
    return list(events.order_by("-id")[: filters.limit])
