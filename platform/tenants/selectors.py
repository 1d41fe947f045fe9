"""Reads of tenants, memberships and invitations. Everything starts from an actor (or,
for a person's own tenants and for an invitation link, from the user or the token)
and answers `NotFound` for another tenant's rows exactly as for missing ones."""

from __future__ import annotations

import hashlib
import re
import uuid
from typing import Any

from django.db.models import Count, QuerySet
from django.utils import timezone

from tenants.access import Actor, NotFound, require_role
from tenants.models import Invitation, Membership, Plan, Role, Tenant, User
from tenants.rls import operator_scope

# `secrets.token_urlsafe(32)`: 32 random bytes, 43 URL-safe base64 characters.
INVITATION_TOKEN_PATTERN = re.compile(r"^[A-Za-z0-9_-]{43}$")


class InvitationRefused(Exception):
    """An invitation link that cannot be used, with the HTTP status and the reason the
    page shows."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def invitation_token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def invitation_status(invitation: Invitation, *, now: Any = None) -> str:
    """pending, accepted, revoked or expired."""
    if invitation.accepted_at is not None:
        return "accepted"
    if invitation.revoked_at is not None:
        return "revoked"
    if invitation.expires_at <= (now or timezone.now()):
        return "expired"
    return "pending"


def invitations_pending(*, tenant_id: Any) -> QuerySet[Invitation]:
    return Invitation.objects.filter(
        tenant_id=tenant_id,
        accepted_at__isnull=True,
        revoked_at__isnull=True,
        expires_at__gt=timezone.now(),
    )


def _uuid(value: Any) -> uuid.UUID:
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise NotFound from None


# --- members --------------------------------------------------------------------------


def member_list(*, actor: Actor) -> list[Membership]:
    """Every member of the actor's tenant (any member may see who else is in it)."""
    return list(
        Membership.objects.filter(tenant_id=actor.tenant_id)
        .select_related("user")
        .order_by("created_at", "id")
    )


def member_get(*, actor: Actor, membership_id: Any, for_update: bool = False) -> Membership:
    queryset = Membership.objects.select_related("user", "tenant")
    if for_update:
        queryset = queryset.select_for_update(of=("self",))
    try:
        return queryset.get(tenant_id=actor.tenant_id, id=_uuid(membership_id))
    except Membership.DoesNotExist:
        raise NotFound from None


def membership_of(*, actor: Actor, for_update: bool = False) -> Membership:
    """The actor's own membership (a person, not an API key)."""
    if actor.user is None or actor.api_key is not None:
        raise NotFound
    queryset = Membership.objects.select_related("user", "tenant")
    if for_update:
        queryset = queryset.select_for_update(of=("self",))
    try:
        return queryset.get(tenant_id=actor.tenant_id, user_id=actor.user.pk)
    except Membership.DoesNotExist:
        raise NotFound from None


def owner_count(*, tenant_id: Any, lock: bool = False) -> int:
    owners = Membership.objects.filter(tenant_id=tenant_id, role=Role.OWNER)
    if lock:
        # Locking the owners' rows serialises concurrent demotions and departures, so
        # two owners cannot step down at once and leave the tenant with none.
        return len(list(owners.select_for_update().values_list("id", flat=True)))
    return owners.count()


def memberships_of_user(*, user: User | Any) -> list[Membership]:
    """A person's own tenants (under their own scope: the membership policy shows a
    user their memberships in every tenant)."""
    if user is None or not getattr(user, "is_authenticated", False):
        return []
    return list(
        Membership.objects.filter(user_id=user.pk)
        .select_related("tenant")
        .order_by("tenant__name", "created_at")
    )


def membership_of_user(*, user: User | Any, tenant_id: Any) -> Membership:
    """The person's own membership in `tenant_id` (NotFound for any other tenant)."""
    if user is None or not getattr(user, "is_authenticated", False):
        raise NotFound
    try:
        return Membership.objects.select_related("tenant").get(
            user_id=user.pk, tenant_id=_uuid(tenant_id)
        )
    except Membership.DoesNotExist:
        raise NotFound from None


# --- invitations ----------------------------------------------------------------------


def invitation_list(*, actor: Actor) -> list[Invitation]:
    require_role(actor, Role.ADMIN)
    return list(
        Invitation.objects.filter(tenant_id=actor.tenant_id)
        .select_related("created_by", "accepted_by")
        .order_by("-created_at", "id")
    )


def invitation_get(*, actor: Actor, invitation_id: Any, for_update: bool = False) -> Invitation:
    require_role(actor, Role.ADMIN)
    queryset = Invitation.objects.select_related("created_by", "accepted_by")
    if for_update:
        queryset = queryset.select_for_update(of=("self",))
    try:
        return queryset.get(tenant_id=actor.tenant_id, id=_uuid(invitation_id))
    except Invitation.DoesNotExist:
        raise NotFound from None


def invitation_check(invitation: Invitation | None) -> Invitation:
    """The invitation if it can still be accepted, else InvitationRefused saying why."""
    if invitation is None:
        raise InvitationRefused(
            "This invitation link is not valid. Check that you copied the whole link.",
            status=404,
        )
    status = invitation_status(invitation)
    if status == "accepted":
        raise InvitationRefused("This invitation has already been used.", status=410)
    if status == "revoked":
        raise InvitationRefused("This invitation was revoked.", status=410)
    if status == "expired":
        raise InvitationRefused(
            "This invitation has expired. Ask for a new one.",
            status=410,
        )
    return invitation


def invitation_by_token(*, token: str) -> Invitation:
    """The pending invitation a link's token stands for, with its tenant, or
    InvitationRefused (malformed 400, unknown 404, used, revoked or expired 410)."""
    if not INVITATION_TOKEN_PATTERN.match(token or ""):
        raise InvitationRefused("This invitation link is malformed.", status=400)
    # Finding the invitation precedes knowing its tenant (the visitor is not a member
    # yet): a narrow lookup by the unique hash of the token.
    with operator_scope():
        invitation = (
            Invitation.objects.select_related("tenant", "tenant__plan")
            .filter(token_hash=invitation_token_hash(token))
            .first()
        )
    return invitation_check(invitation)


# --- the operator's view -----------------------------------------------------------------


def tenants_overview() -> list[Tenant]:
    """Every tenant with its plan and its number of members (`members`), by name: for
    operators only (it reads across tenants)."""
    with operator_scope():
        return list(
            Tenant.objects.select_related("plan")
            .annotate(members=Count("memberships"))
            .order_by("name")
        )


def plans_all() -> list[Plan]:
    return list(Plan.objects.order_by("name"))
