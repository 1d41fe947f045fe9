"""The acting party of a request, socket message or task, and how to find it.

Every read or write of tenant data starts from an `Actor`: its tenant scopes the
query. Later, API keys become actors too.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from tenants.models import Membership, Role, Tenant, User


class NotFound(Exception):
    """The object does not exist *for this actor*: missing and foreign look the same."""


@dataclass(frozen=True)
class Actor:
    tenant: Tenant
    user: User
    role: str

    @property
    def tenant_id(self) -> uuid.UUID:
        return self.tenant.id

    @property
    def is_admin(self) -> bool:
        return self.role in (Role.OWNER, Role.ADMIN)


SESSION_TENANT_KEY = "parley_tenant_id"


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
