"""Integrators' API keys: `prk_<prefix>_<secret>`, shown once, stored as a hash of the
secret, scoped, optionally expiring, revocable (refused at once).

A key acts for the member who created it and never above them: its role is the lower
of its scopes' role (admin with the `admin` scope, else member) and its creator's
role in the tenant *now*. A demoted creator's keys are demoted with them; a creator
who leaves or is removed takes their keys along (revoked, audited, their sockets
closed: `api_keys_revoke_of_member`). A key whose creator no longer belongs to the
tenant, or whose account was deactivated or deleted (`created_by` is then NULL), is
refused: every key is made by a member (`api_key_create`), so a key without one has
nobody whose rights it could carry.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import uuid
from datetime import datetime, timedelta
from typing import Any

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from tenants.access import ROLE_RANK, Actor, NotFound, require_role
from tenants.models import ApiKey, Membership, Role, Tenant
from tenants.rls import operator_scope, tenant_scope
from tenants.services.audit import audit_record

KEY_PATTERN = re.compile(r"^prk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
LAST_USED_RESOLUTION = timedelta(minutes=1)


class ApiKeyRefused(Exception):
    """`forbidden`: the key is genuine but may not be used now (its tenant is
    suspended), as opposed to unknown, revoked or expired."""

    def __init__(self, message: str, *, forbidden: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.forbidden = forbidden


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def api_key_create(
    *, actor: Actor, name: str, scopes: list[str], expires_at: datetime | None = None
) -> tuple[ApiKey, str]:
    """Create a key; returns it and the full secret, which is never shown again."""
    require_role(actor, Role.ADMIN)
    name = (name or "").strip()
    if not name or len(name) > 100:
        raise ValidationError("A key needs a name of 1 to 100 characters.")
    scopes = sorted(set(scopes or []))
    unknown = [s for s in scopes if s not in ApiKey.Scope.values]
    if not scopes or unknown:
        raise ValidationError(
            f"Scopes must be a non-empty subset of {', '.join(ApiKey.Scope.values)}"
            + (f"; unknown: {', '.join(unknown)}." if unknown else ".")
        )
    if ApiKey.Scope.ADMIN in scopes and actor.api_key is not None:
        raise ValidationError("An API key cannot create keys with the admin scope.")
    if expires_at is not None and expires_at <= timezone.now():
        raise ValidationError("The expiry must be in the future.")
    if ApiKey.objects.filter(tenant=actor.tenant, name=name, revoked_at__isnull=True).exists():
        raise ValidationError(f"A key named {name!r} already exists.")
    prefix, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    try:
        with transaction.atomic():
            key = ApiKey.objects.create(
                tenant=actor.tenant,
                name=name,
                prefix=prefix,
                secret_hash=_hash(secret),
                scopes=scopes,
                created_by=actor.user,
                expires_at=expires_at,
            )
    except IntegrityError:
        raise ValidationError(f"A key named {name!r} already exists.") from None
    audit_record(
        actor=actor,
        action="api_key.created",
        target=key,
        data={"scopes": scopes, "expires_at": expires_at.isoformat() if expires_at else None},
    )
    return key, f"prk_{prefix}_{secret}"


def api_key_list(*, actor: Actor) -> list[ApiKey]:
    require_role(actor, Role.ADMIN)
    return list(ApiKey.objects.filter(tenant=actor.tenant).select_related("created_by"))


def api_key_get(*, actor: Actor, key_id: Any) -> ApiKey:
    require_role(actor, Role.ADMIN)
    try:
        return ApiKey.objects.get(tenant=actor.tenant, id=uuid.UUID(str(key_id)))
    except (ValueError, ApiKey.DoesNotExist):
        raise NotFound from None


def api_key_revoke(*, actor: Actor, key_id: Any) -> ApiKey:
    key = api_key_get(actor=actor, key_id=key_id)
    if key.revoked_at is None:
        _revoke(actor, key, reason=None)
    return key


def api_keys_revoke_of_member(*, actor: Actor, user_id: Any, reason: str) -> list[ApiKey]:
    """Revoke the live keys `user_id` created in the actor's tenant (their membership
    is ending: `reason` says how, in each audit event). For tenants.services.members,
    which checks who may end a membership: a member who leaves revokes their own."""
    keys = list(
        ApiKey.objects.select_for_update().filter(
            tenant_id=actor.tenant_id, created_by_id=user_id, revoked_at__isnull=True
        )
    )
    for key in keys:
        _revoke(actor, key, reason=reason)
    return keys


def _revoke(actor: Actor, key: ApiKey, *, reason: str | None) -> None:
    key.revoked_at = timezone.now()
    key.save(update_fields=["revoked_at"])
    audit_record(
        actor=actor,
        action="api_key.revoked",
        target=key,
        data={"reason": reason} if reason else None,
    )
    transaction.on_commit(lambda: _disconnect(key))


def _disconnect(key: ApiKey) -> None:
    from tenants.notify import notify_api_key_revoked

    notify_api_key_revoked(key_id=key.id)


def api_key_authenticate(raw: str) -> Actor:
    """The actor a presented key stands for, or ApiKeyRefused saying why."""
    match = KEY_PATTERN.match(raw or "")
    if not match:
        raise ApiKeyRefused("Malformed API key: expected prk_<12 hex>_<43 characters>.")
    prefix, secret = match.groups()
    # Finding a key precedes knowing its tenant: a narrow lookup by the unique prefix.
    with operator_scope():
        key = ApiKey.objects.select_related("tenant", "created_by").filter(prefix=prefix).first()
    if key is None or not hmac.compare_digest(key.secret_hash, _hash(secret)):
        raise ApiKeyRefused("Invalid API key.")
    return api_key_actor(key)


def api_key_actor(key: ApiKey) -> Actor:
    """The actor of a key found by its secret (or named by a websocket ticket), with
    the rights its scopes and its creator's current role allow together; ApiKeyRefused
    when it was revoked, expired, its tenant suspended or its creator is no longer a
    member."""
    now = timezone.now()
    if key.revoked_at is not None:
        raise ApiKeyRefused("This API key was revoked.")
    if key.expires_at is not None and key.expires_at <= now:
        raise ApiKeyRefused("This API key has expired.")
    tenant: Tenant = key.tenant
    if not tenant.is_active:
        raise ApiKeyRefused(f"{tenant.name} is suspended on this platform.", forbidden=True)
    creator = key.created_by
    with tenant_scope(tenant_id=tenant.id):
        creator_role = (
            Membership.objects.filter(tenant=tenant, user=creator)
            .values_list("role", flat=True)
            .first()
            if creator is not None and creator.is_active
            else None
        )
        if creator_role is None:
            raise ApiKeyRefused(
                f"The member who created this API key no longer belongs to {tenant.name}: "
                "ask an admin for a new key."
            )
        if key.last_used_at is None or now - key.last_used_at > LAST_USED_RESOLUTION:
            ApiKey.objects.filter(id=key.id).update(last_used_at=now)
            key.last_used_at = now
    scope_role = Role.ADMIN if ApiKey.Scope.ADMIN in key.scopes else Role.MEMBER
    role = min(scope_role, creator_role, key=lambda r: ROLE_RANK.get(r, 0))
    return Actor(tenant=tenant, user=creator, role=role, api_key=key)
