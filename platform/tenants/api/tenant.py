"""The current tenant: read, rename, export, delete."""

from __future__ import annotations

import json
import uuid

from django.http import HttpRequest, HttpResponse
from django.utils import timezone
from ninja import Router, Schema, Status

from tenants.api.auth import actor_of
from tenants.models import Tenant
from tenants.quotas import limits_for
from tenants.services.tenants import tenant_delete, tenant_export, tenant_rename

router = Router(tags=["tenant"])


class LimitsOut(Schema):
    plan: str
    max_members: int | None
    monthly_token_budget: int | None
    requests_per_minute: int | None
    tokens_per_minute: int | None
    concurrent_runs: int | None
    max_upload_bytes: int | None
    enabled_models: list[str]


class TenantOut(Schema):
    id: uuid.UUID
    name: str
    slug: str
    state: str
    role: str
    limits: LimitsOut


class RenameIn(Schema):
    name: str


class DeleteIn(Schema):
    confirm: str


def _out(tenant: Tenant, role: str) -> dict:
    limits = limits_for(tenant)
    return {
        "id": tenant.id,
        "name": tenant.name,
        "slug": tenant.slug,
        "state": tenant.state,
        "role": role,
        "limits": limits.as_dict(),
    }


@router.get("", response=TenantOut, url_name="tenant")
def tenant_get(request: HttpRequest):
    actor = actor_of(request)
    return _out(actor.tenant, actor.role)


@router.patch("", response=TenantOut, url_name="tenant")
def tenant_patch(request: HttpRequest, payload: RenameIn):
    actor = actor_of(request)
    return _out(tenant_rename(actor=actor, name=payload.name), actor.role)


@router.get("/export", url_name="tenant_export")
def tenant_export_download(request: HttpRequest):
    actor = actor_of(request)
    archive = tenant_export(actor=actor)
    stamp = timezone.now().strftime("%Y%m%d-%H%M%S")
    response = HttpResponse(json.dumps(archive, indent=1), content_type="application/json")
    response["Content-Disposition"] = (
        f'attachment; filename="parley-{actor.tenant.slug}-{stamp}.json"'
    )
    return response


@router.post("/delete", response={204: None}, url_name="tenant_delete")
def tenant_delete_view(request: HttpRequest, payload: DeleteIn):
    tenant_delete(actor=actor_of(request), confirm=payload.confirm)
    return Status(204, None)
