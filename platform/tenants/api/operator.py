"""Platform staff: every tenant, suspension, and any tenant's audit log. Everyone
else gets 404 here, as if these routes did not exist."""

from __future__ import annotations

import uuid
from datetime import datetime

from django.http import HttpRequest
from ninja import Query, Router, Schema, Status
from ninja.security import SessionAuth

from tenants.access import NotFound
from tenants.api.audit import AuditOut, AuditQuery
from tenants.models import User
from tenants.rls import operator_scope
from tenants.selectors import tenants_overview
from tenants.selectors_audit import AuditFilter, audit_events
from tenants.services.audit import audit_record
from tenants.services.tenants import (
    operator_actor,
    tenant_create,
    tenant_resume,
    tenant_set_plan,
    tenant_suspend,
)


class OperatorSession(SessionAuth):
    """A signed-in operator's session (CSRF-checked like every session). Anyone else who
    presents credentials gets 404 before any other check: a member's session, and any
    API key (keys belong to tenants, never to operators). No credentials at all is the
    API's usual 401."""

    def __call__(self, request: HttpRequest) -> User | None:
        user = request.user
        if not (user.is_authenticated and getattr(user, "is_operator", False)):
            if user.is_authenticated or "authorization" in request.headers:
                raise NotFound
            return None
        return super().__call__(request)

    def authenticate(self, request: HttpRequest, key: str | None) -> User | None:
        user = request.user
        return user if user.is_authenticated else None


router = Router(tags=["operator"], auth=OperatorSession())


def operator_of(request: HttpRequest) -> User:
    user = request.auth  # type: ignore[attr-defined]
    if not getattr(user, "is_operator", False):
        raise NotFound
    return user


class TenantRow(Schema):
    id: uuid.UUID
    name: str
    slug: str
    state: str
    suspended_reason: str
    members: int
    created_at: datetime


class SuspendIn(Schema):
    reason: str


class PlanIn(Schema):
    plan: str | None


class TenantIn(Schema):
    name: str
    slug: str | None = None
    owner_username: str
    owner_email: str = ""
    owner_password: str


@router.get("/tenants", response=list[TenantRow], url_name="operator_tenants")
def tenants_list(request: HttpRequest):
    operator_of(request)
    return tenants_overview()


@router.post("/tenants", response={201: TenantRow}, url_name="operator_tenants")
def tenants_create(request: HttpRequest, payload: TenantIn):
    operator = operator_of(request)
    tenant, owner = tenant_create(
        name=payload.name,
        slug=payload.slug,
        owner_username=payload.owner_username,
        owner_password=payload.owner_password,
        owner_email=payload.owner_email,
    )
    with operator_scope():
        audit_record(
            actor=operator_actor(user=operator, tenant=tenant),
            action="tenant.created",
            target=tenant,
            data={"owner": owner.get_username()},
        )
    tenant.members = 1  # type: ignore[attr-defined]
    return Status(201, tenant)


@router.put("/tenants/{tenant_id}/plan", response=TenantRow, url_name="operator_plan")
def tenants_plan(request: HttpRequest, tenant_id: str, payload: PlanIn):
    tenant = tenant_set_plan(
        operator=operator_of(request), tenant_id=tenant_id, plan_name=payload.plan
    )
    tenant.members = 0  # type: ignore[attr-defined]
    return tenant


@router.post("/tenants/{tenant_id}/suspend", response=TenantRow, url_name="operator_suspend")
def tenants_suspend(request: HttpRequest, tenant_id: str, payload: SuspendIn):
    tenant = tenant_suspend(
        operator=operator_of(request), tenant_id=tenant_id, reason=payload.reason
    )
    tenant.members = 0  # type: ignore[attr-defined]
    return tenant


@router.post("/tenants/{tenant_id}/resume", response=TenantRow, url_name="operator_resume")
def tenants_resume(request: HttpRequest, tenant_id: str):
    tenant = tenant_resume(operator=operator_of(request), tenant_id=tenant_id)
    tenant.members = 0  # type: ignore[attr-defined]
    return tenant


@router.get("/tenants/{tenant_id}/audit", response=list[AuditOut], url_name="operator_audit")
def tenants_audit(request: HttpRequest, tenant_id: str, filters: Query[AuditQuery]):
    operator_of(request)
    try:
        tenant_uuid = uuid.UUID(tenant_id)
    except ValueError:
        raise NotFound from None
    with operator_scope():
        return audit_events(tenant_id=tenant_uuid, filters=AuditFilter(**filters.dict()))
