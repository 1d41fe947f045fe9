"""The acting party of a request, socket message or task, and how to find it.

Every read or write of tenant data starts from an `Actor`: its tenant scopes the
query. API keys are actors too (tenants.services.api_keys.api_key_actor).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from tenants.models import ApiKey, Membership, Role, Tenant, User


class NotFound(Exception):
    """The object does not exist *for this actor*: missing and foreign look the same."""


class Unavailable(Exception):
    """The request's data was committed, but a hand-over after the commit failed (the
    broker is down): the request answers 503 with this message, and nothing is lost."""


ROLE_RANK: dict[str, int] = {Role.MEMBER: 1, Role.ADMIN: 2, Role.OWNER: 3}


@dataclass(frozen=True)
class Actor:
    """A member of a tenant acting as themselves, or an integrator's API key (then
    `api_key` is set, `user` is the key's creator, its scopes limit it, and `role` is
    the lower of its scopes' role and its creator's current role:
    tenants.services.api_keys.api_key_actor)."""

    tenant: Tenant
    user: User | None
    role: str
    api_key: ApiKey | None = None

    @property
    def tenant_id(self) -> uuid.UUID:
        return self.tenant.id

    @property
    def is_admin(self) -> bool:
        return self.role in (Role.OWNER, Role.ADMIN)

    @property
    def label(self) -> str:
        if self.api_key is not None:
            return f"key:{self.api_key.name}"
        return self.user.get_username() if self.user is not None else "unknown"

    def has_scope(self, scope: str) -> bool:
        """Keys carry explicit scopes; members may do what their role allows."""
        if self.api_key is not None:
            return scope in self.api_key.scopes
        return True

    def outranks_or_equals(self, role: str) -> bool:
        return ROLE_RANK.get(self.role, 0) >= ROLE_RANK.get(role, 99)


SESSION_TENANT_KEY = "parley_tenant_id"


def id_parse(value: Any) -> uuid.UUID:
    """An id a client sent, as a UUID; NotFound when it is none (a malformed id names
    nothing, as an unknown one)."""
    try:
        return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))
    except (ValueError, TypeError, AttributeError):
        raise NotFound from None


def member_actor(*, tenant: Tenant, user: User) -> Actor:
    """A member acting in `tenant` from a worker (a run, a tool): their role there,
    the least one if they have none any more (their own documents stay theirs)."""
    membership = Membership.objects.filter(tenant=tenant, user=user).first()
    return Actor(tenant=tenant, user=user, role=membership.role if membership else Role.MEMBER)


def actor_for_user(user: User | Any, *, tenant_id: str | uuid.UUID | None = None) -> Actor | None:
    """The actor a signed-in user acts as: their membership in `tenant_id` (the tenant
    chosen in their session) or, failing that, their first membership. None for
    anonymous users and users with no membership."""
    if user is None or not getattr(user, "is_authenticated", False):
        return None
    memberships = Membership.objects.select_related("tenant").filter(user=user)
    membership = None
    if tenant_id:
        try:
            chosen = uuid.UUID(str(tenant_id))
        except ValueError:  # a malformed id in the session
            chosen = None
        if chosen is not None:
            membership = memberships.filter(tenant_id=chosen).first()
    if membership is None:
        membership = memberships.order_by("created_at").first()
    if membership is None:
        return None
    return Actor(tenant=membership.tenant, user=user, role=membership.role)


def actor_for_request(request: Any) -> Actor | None:
    return actor_for_user(request.user, tenant_id=request.session.get(SESSION_TENANT_KEY))


def require_scope(actor: Actor, scope: str) -> None:
    """Refuse (PermissionDenied, a 403) a key without `scope`; members pass."""
    from django.core.exceptions import PermissionDenied

    if not actor.has_scope(scope):
        raise PermissionDenied(f"This API key lacks the {str(scope)!r} scope.")


def require_role(actor: Actor, role: str, *, scope: str = "admin") -> None:
    """Refuse (PermissionDenied, a 403) unless the actor holds `role` or above; a key
    must also carry `scope`."""
    from django.core.exceptions import PermissionDenied

    require_scope(actor, scope)
    if not actor.outranks_or_equals(role):
        raise PermissionDenied(f"This needs the {role} role in {actor.tenant.name}.")
