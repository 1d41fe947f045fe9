"""The audit log, for tenant admins (their tenant) and operators (any tenant)."""

from __future__ import annotations

from datetime import datetime

from django.http import HttpRequest
from ninja import Query, Router, Schema

from config.inputs import Timestamp
from tenants.api.auth import actor_of
from tenants.selectors_audit import AuditFilter, audit_list

router = Router(tags=["audit"])


class AuditOut(Schema):
    id: int
    created_at: datetime
    actor: str
    action: str
    target_type: str
    target_id: str
    target: str
    data: dict

    @staticmethod
    def resolve_actor(event) -> str:
        return event.actor_label

    @staticmethod
    def resolve_target(event) -> str:
        return event.target_label


class AuditQuery(Schema):
    action: str | None = None
    actor: str | None = None
    target_type: str | None = None
    target_id: str | None = None
    since: Timestamp | None = None
    until: Timestamp | None = None
    before_id: int | None = None
    limit: int = 50


@router.get("", response=list[AuditOut], url_name="audit")
def audit(request: HttpRequest, filters: Query[AuditQuery]):
    return audit_list(actor=actor_of(request), filters=AuditFilter(**filters.dict()))
