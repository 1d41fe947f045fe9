"""Creating tenants and their lifecycle: rename, suspend, resume, export, delete."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone
from django.utils.text import slugify

from tenants.access import Actor, NotFound, require_role
from tenants.lifecycle import export_sections, tenant_deleted, tenant_suspended
from tenants.models import (
    ApiKey,
    AuditEvent,
    Invitation,
    Membership,
    Plan,
    Role,
    Tenant,
    User,
)
from tenants.notify import notify_tenant_closed
from tenants.quotas import limits_for
from tenants.rls import operator_scope, tenant_scope
from tenants.services.audit import audit_record


def tenant_create(
    *,
    name: str,
    owner_username: str,
    owner_password: str,
    owner_email: str = "",
    slug: str | None = None,
    validate: bool = True,
) -> tuple[Tenant, User]:
    """Create a tenant and its owner (a new user, or an existing one given the same
    username and matching password)."""
    name = name.strip()
    if not name:
        raise ValidationError({"name": "A tenant needs a name."})
    slug = slugify(slug or name)[:63]
    if not slug:
        raise ValidationError({"slug": "The tenant name must contain letters or digits."})
    with operator_scope():  # slugs are unique across every tenant
        if Tenant.objects.filter(slug=slug).exists():
            raise ValidationError({"slug": f"A tenant with the slug {slug!r} already exists."})
    if not owner_username.strip():
        raise ValidationError({"owner_username": "The owner needs a username."})

    tenant_id = uuid.uuid4()
    with tenant_scope(tenant_id=tenant_id), transaction.atomic():
        tenant = Tenant.objects.create(id=tenant_id, name=name, slug=slug)
        owner = User.objects.filter(username=owner_username).first()
        if owner is None:
            owner = User(username=owner_username, email=owner_email)
            if validate:
                validate_password(owner_password, owner)
            owner.set_password(owner_password)
            owner.save()
        elif not owner.check_password(owner_password):
            raise ValidationError(
                {"owner_username": f"User {owner_username!r} exists; give their password."}
            )
        Membership.objects.create(tenant=tenant, user=owner, role=Role.OWNER)
    return tenant, owner


# --- lifecycle ------------------------------------------------------------------------

EXPORT_FRESHNESS = timedelta(hours=24)


def operator_actor(*, user: User, tenant: Tenant) -> Actor:
    """Platform staff acting on a tenant they need not belong to."""
    if not getattr(user, "is_operator", False):
        raise NotFound
    return Actor(tenant=tenant, user=user, role=Role.OWNER)


def tenant_rename(*, actor: Actor, name: str) -> Tenant:
    require_role(actor, Role.ADMIN)
    name = (name or "").strip()
    if not name or len(name) > 200:
        raise ValidationError("A tenant's name has 1 to 200 characters.")
    tenant = Tenant.objects.select_for_update().get(id=actor.tenant_id)
    old = tenant.name
    if old != name:
        tenant.name = name
        tenant.save(update_fields=["name"])
        audit_record(
            actor=actor, action="tenant.renamed", target=tenant, data={"from": old, "to": name}
        )
    return tenant


def _tenant_for_operator(user: User, tenant_id: Any) -> Tenant:
    if not getattr(user, "is_operator", False):
        raise NotFound
    try:
        return Tenant.objects.select_for_update().get(id=uuid.UUID(str(tenant_id)))
    except (ValueError, Tenant.DoesNotExist):
        raise NotFound from None


def tenant_suspend(*, operator: User, tenant_id: Any, reason: str) -> Tenant:
    """Refuse every member, key and socket of the tenant from now on; cancel its runs."""
    reason = (reason or "").strip()
    if not reason:
        raise ValidationError("Give a reason: members see it.")
    with operator_scope():
        tenant = _tenant_for_operator(operator, tenant_id)
        if tenant.state == Tenant.State.SUSPENDED:
            raise ValidationError(f"{tenant.name} is already suspended.")
        tenant.state, tenant.suspended_at = Tenant.State.SUSPENDED, timezone.now()
        tenant.suspended_reason = reason[:500]
        tenant.save(update_fields=["state", "suspended_at", "suspended_reason"])
        audit_record(
            actor=operator_actor(user=operator, tenant=tenant),
            action="tenant.suspended",
            target=tenant,
            data={"reason": reason},
        )
        tenant_suspended.send(sender=Tenant, tenant=tenant, reason=reason)
        message = f"{tenant.name} is suspended: {reason}"
        transaction.on_commit(
            lambda: notify_tenant_closed(
                tenant_id=tenant.id, code="tenant_suspended", message=message
            )
        )
    return tenant


def tenant_set_plan(*, operator: User, tenant_id: Any, plan_name: str | None) -> Tenant:
    """Put the tenant on a plan (None: no plan, unlimited)."""
    with operator_scope():
        tenant = _tenant_for_operator(operator, tenant_id)
        plan = None
        if plan_name:
            plan = Plan.objects.filter(name=plan_name).first()
            if plan is None:
                raise ValidationError(f"No plan named {plan_name!r}.")
        old = tenant.plan.name if tenant.plan else None
        tenant.plan = plan
        tenant.save(update_fields=["plan"])
        audit_record(
            actor=operator_actor(user=operator, tenant=tenant),
            action="tenant.plan_changed",
            target=tenant,
            data={"from": old, "to": plan.name if plan else None},
        )
    return tenant


def tenant_resume(*, operator: User, tenant_id: Any) -> Tenant:
    with operator_scope():
        tenant = _tenant_for_operator(operator, tenant_id)
        if tenant.state != Tenant.State.SUSPENDED:
            raise ValidationError(f"{tenant.name} is not suspended.")
        tenant.state, tenant.suspended_at, tenant.suspended_reason = Tenant.State.ACTIVE, None, ""
        tenant.save(update_fields=["state", "suspended_at", "suspended_reason"])
        audit_record(
            actor=operator_actor(user=operator, tenant=tenant),
            action="tenant.resumed",
            target=tenant,
        )
    return tenant


def _iso(value: Any) -> str | None:
    return value.isoformat() if value else None


def tenant_export(*, actor: Actor) -> dict[str, Any]:
    """Everything the tenant owns, as one JSON-ready archive (no secrets, no hashes)."""
    require_role(actor, Role.OWNER)
    tenant = Tenant.objects.select_related("plan").get(id=actor.tenant_id)
    limits = limits_for(tenant)
    archive: dict[str, Any] = {
        "format": "parley-tenant-export",
        "version": 1,
        "exported_at": timezone.now().isoformat(),
        "tenant": {
            "id": str(tenant.id),
            "name": tenant.name,
            "slug": tenant.slug,
            "state": tenant.state,
            "created_at": _iso(tenant.created_at),
        },
        "plan": limits.as_dict(),
        "members": [
            {
                "user_id": str(m.user_id),
                "username": m.user.username,
                "email": m.user.email,
                "role": m.role,
                "joined_at": _iso(m.created_at),
            }
            for m in Membership.objects.filter(tenant=tenant).select_related("user")
        ],
        "invitations": [
            {
                "email": i.email,
                "role": i.role,
                "created_at": _iso(i.created_at),
                "expires_at": _iso(i.expires_at),
                "accepted_at": _iso(i.accepted_at),
                "revoked_at": _iso(i.revoked_at),
            }
            for i in Invitation.objects.filter(tenant=tenant)
        ],
        "api_keys": [
            {
                "id": str(k.id),
                "name": k.name,
                "prefix": k.prefix,
                "scopes": k.scopes,
                "created_at": _iso(k.created_at),
                "expires_at": _iso(k.expires_at),
                "last_used_at": _iso(k.last_used_at),
                "revoked_at": _iso(k.revoked_at),
            }
            for k in ApiKey.objects.filter(tenant=tenant)
        ],
        "audit": [
            {
                "at": _iso(e.created_at),
                "actor": e.actor_label,
                "action": e.action,
                "target_type": e.target_type,
                "target_id": e.target_id,
                "target": e.target_label,
                "data": e.data,
            }
            for e in AuditEvent.objects.filter(tenant=tenant).order_by("created_at", "id")
        ],
    }
    for name, section in export_sections().items():
        archive[name] = section(tenant)
    Tenant.objects.filter(id=tenant.id).update(last_exported_at=timezone.now())
    audit_record(actor=actor, action="tenant.exported", target=tenant)
    return archive


def tenant_delete(*, actor: Actor, confirm: str) -> None:
    """Delete the tenant and everything it owns. Needs the owner, the tenant's slug
    typed as confirmation, and an export taken within the last 24 hours. The audit
    log keeps its record."""
    require_role(actor, Role.OWNER)
    tenant = Tenant.objects.select_for_update().get(id=actor.tenant_id)
    if (confirm or "").strip() != tenant.slug:
        raise ValidationError(f"Type the tenant's slug ({tenant.slug}) to confirm deletion.")
    if (
        tenant.last_exported_at is None
        or timezone.now() - tenant.last_exported_at > EXPORT_FRESHNESS
    ):
        raise ValidationError("Export the tenant's data first (within the last 24 hours).")
    audit_record(
        actor=actor,
        action="tenant.deleted",
        target=tenant,
        data={"name": tenant.name, "slug": tenant.slug},
    )
    tenant_id, name = tenant.id, tenant.name
    tenant.delete()
    tenant_deleted.send(sender=Tenant, tenant_id=tenant_id)
    transaction.on_commit(
        lambda: notify_tenant_closed(
            tenant_id=tenant_id, code="tenant_deleted", message=f"{name} was deleted."
        )
    )
