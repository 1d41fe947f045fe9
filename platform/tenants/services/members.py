"""Memberships, roles and invitations.

Roles rank owner > admin > member. Only admins and owners manage members; nobody
grants, changes or removes a role above their own (only owners touch owners); nobody
changes their own role, except an owner stepping down while another owner remains;
the last owner can neither leave, be removed nor be demoted. Every change is audited;
removing a member (or their leaving) revokes the API keys they created there (each
revocation audited) and closes their sockets in that tenant, the keys' too, on commit.
A changed role changes what the member's keys may do at once (api_keys.api_key_actor).

Invitations go by link: `/invite/<token>/`, where the token is 256 random bits of which
only the SHA-256 is stored. The plan's `max_members` counts members and pending
invitations when inviting, and members again when accepting.
"""

from __future__ import annotations

import secrets
import uuid
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.mail import send_mail
from django.core.validators import validate_email
from django.db import IntegrityError, transaction
from django.utils import timezone

from tenants.access import Actor, require_role
from tenants.models import Invitation, Membership, Role, Tenant, User
from tenants.notify import notify_member_removed
from tenants.quotas import limits_for
from tenants.rls import tenant_scope
from tenants.selectors import (
    InvitationRefused,
    invitation_by_token,
    invitation_check,
    invitation_get,
    invitation_token_hash,
    invitations_pending,
    member_get,
    membership_of,
    owner_count,
)
from tenants.services.api_keys import api_keys_revoke_of_member
from tenants.services.audit import audit_record

INVITATION_PATH = "/invite/{token}/"


def _role(role: Any) -> str:
    if role not in Role.values:
        raise ValidationError(f"Unknown role {role!r}: choose one of {', '.join(Role.values)}.")
    return str(role)


def _a(role: str) -> str:
    return f"{'an' if role[0] in 'aeiou' else 'a'} {role}"


def _label(role: str) -> str:
    return str(Role(role).label).lower()


def _lock_tenant(tenant_id: Any) -> Tenant:
    """Lock the tenant's row: counting seats and then taking one happen one at a time."""
    return Tenant.objects.select_related("plan").select_for_update(of=("self",)).get(id=tenant_id)


def _is_self(actor: Actor, membership: Membership) -> bool:
    # An API key acts for its creator: a key touching its creator's membership counts
    # as the creator touching their own.
    return actor.user is not None and membership.user_id == actor.user.pk


def _person(membership: Membership) -> dict[str, str]:
    return {"user": membership.user.get_username(), "email": membership.user.email}


def _close_sockets(membership: Membership, message: str) -> None:
    tenant_id, user_id = membership.tenant_id, membership.user_id
    transaction.on_commit(
        lambda: notify_member_removed(tenant_id=tenant_id, user_id=user_id, message=message)
    )


# --- roles and membership -------------------------------------------------------------


def member_role_change(*, actor: Actor, membership_id: Any, role: str) -> Membership:
    require_role(actor, Role.ADMIN)
    role = _role(role)
    membership = member_get(actor=actor, membership_id=membership_id, for_update=True)
    old = membership.role
    if _is_self(actor, membership):
        stepping_down = actor.api_key is None and old == Role.OWNER
        if not stepping_down:
            raise PermissionDenied("You cannot change your own role.")
    else:
        if not actor.outranks_or_equals(old):
            raise PermissionDenied(
                f"You cannot change the role of {_a(old)}: it is above your own ({actor.role})."
            )
        if not actor.outranks_or_equals(role):
            raise PermissionDenied(
                f"You cannot grant the {role} role: it is above your own ({actor.role})."
            )
    if role == old:
        return membership
    if old == Role.OWNER and owner_count(tenant_id=actor.tenant_id, lock=True) <= 1:
        raise ValidationError(
            f"{membership.user.get_username()} is the last owner of {actor.tenant.name}: "
            "make another member an owner first."
        )
    membership.role = role
    membership.save(update_fields=["role"])
    audit_record(
        actor=actor,
        action="member.role_changed",
        target=membership,
        target_label=membership.user.get_username(),
        data={"old_role": old, "new_role": role, **_person(membership)},
    )
    return membership


def member_remove(*, actor: Actor, membership_id: Any) -> None:
    require_role(actor, Role.ADMIN)
    membership = member_get(actor=actor, membership_id=membership_id, for_update=True)
    if not actor.outranks_or_equals(membership.role):
        raise PermissionDenied(
            f"You cannot remove {_a(membership.role)}: it is above your own ({actor.role})."
        )
    if _is_self(actor, membership):
        raise ValidationError("You cannot remove yourself: leave the tenant instead.")
    _membership_end(
        actor,
        membership,
        action="member.removed",
        last_owner=f"{membership.user.get_username()} is the last owner of "
        f"{actor.tenant.name} and cannot be removed.",
        farewell=f"You were removed from {actor.tenant.name}.",
    )


def member_leave(*, actor: Actor) -> None:
    """The actor (a person) leaves their tenant."""
    if actor.api_key is not None:
        raise PermissionDenied("An API key cannot leave a tenant: the member leaves, signed in.")
    membership = membership_of(actor=actor, for_update=True)
    _membership_end(
        actor,
        membership,
        action="member.left",
        last_owner=f"You are the last owner of {actor.tenant.name}: make another member an "
        "owner before leaving.",
        farewell=f"You left {actor.tenant.name}.",
    )


def _membership_end(
    actor: Actor, membership: Membership, *, action: str, last_owner: str, farewell: str
) -> None:
    """End a membership (removal or leaving): never the last owner's; audited; the
    API keys the person created in this tenant are revoked (a key never outlives its
    creator's membership); the person's open sockets in this tenant are closed."""
    if membership.role == Role.OWNER and owner_count(tenant_id=actor.tenant_id, lock=True) <= 1:
        raise ValidationError(last_owner)
    audit_record(
        actor=actor,
        action=action,
        target=membership,
        target_label=membership.user.get_username(),
        data={"role": membership.role, **_person(membership)},
    )
    api_keys_revoke_of_member(actor=actor, user_id=membership.user_id, reason=action)
    membership.delete()
    _close_sockets(membership, farewell)


# --- invitations ----------------------------------------------------------------------


def invitation_link(token: str) -> str:
    return settings.PARLEY_PUBLIC_URL + INVITATION_PATH.format(token=token)


def invitation_create(*, actor: Actor, email: str, role: str = Role.MEMBER) -> Invitation:
    """Invite `email` with `role` (at most the actor's own) and mail them the link. The
    token exists only in that email."""
    require_role(actor, Role.ADMIN)
    role = _role(role)
    if not actor.outranks_or_equals(role):
        raise PermissionDenied(
            f"You cannot invite someone as {role}: it is above your own role ({actor.role})."
        )
    email = (email or "").strip()
    if len(email) > 254:
        raise ValidationError("Enter a valid email address.")
    validate_email(email)
    tenant = _lock_tenant(actor.tenant_id)
    if Membership.objects.filter(tenant=tenant, user__email__iexact=email).exists():
        raise ValidationError(f"{email} is already a member of {tenant.name}.")
    pending = invitations_pending(tenant_id=tenant.id)
    if pending.filter(email__iexact=email).exists():
        raise ValidationError(
            f"{email} already has a pending invitation to {tenant.name}: revoke it to send "
            "a new one."
        )
    limit = limits_for(tenant).max_members
    if limit is not None:
        members, invited = Membership.objects.filter(tenant=tenant).count(), pending.count()
        if members + invited >= limit:
            raise ValidationError(
                f"The plan of {tenant.name} allows {limit} members; it has {members} "
                f"members and {invited} pending invitations."
            )
    token = secrets.token_urlsafe(32)
    invitation = Invitation.objects.create(
        tenant=tenant,
        email=email,
        role=role,
        token_hash=invitation_token_hash(token),
        created_by=actor.user,
        expires_at=timezone.now() + timedelta(days=settings.PARLEY_INVITATION_TTL_DAYS),
    )
    audit_record(
        actor=actor,
        action="member.invited",
        target=invitation,
        target_label=email,
        data={"email": email, "role": role, "expires_at": invitation.expires_at.isoformat()},
    )
    # Sent inside the transaction: if the mail server refuses it, no invitation exists
    # (the token is in this email only, so an unsent invitation could never be used).
    send_mail(
        subject=f"You are invited to {tenant.name} on Parley",
        message=(
            f"{actor.label} invited you to join {tenant.name} on Parley as {_label(role)}.\n\n"
            f"Accept the invitation: {invitation_link(token)}\n\n"
            f"The link expires on {invitation.expires_at:%Y-%m-%d %H:%M} UTC. If you did "
            "not expect this invitation, you can ignore this email.\n"
        ),
        from_email=None,
        recipient_list=[email],
        fail_silently=False,
    )
    return invitation


def invitation_revoke(*, actor: Actor, invitation_id: Any) -> Invitation:
    invitation = invitation_get(actor=actor, invitation_id=invitation_id, for_update=True)
    if not actor.outranks_or_equals(invitation.role):
        raise PermissionDenied(
            f"You cannot revoke an invitation as {invitation.role}: it is above your own "
            f"role ({actor.role})."
        )
    if invitation.accepted_at is not None:
        raise ValidationError("This invitation was already accepted: remove the member instead.")
    if invitation.revoked_at is None:
        invitation.revoked_at = timezone.now()
        invitation.save(update_fields=["revoked_at"])
        audit_record(
            actor=actor,
            action="invitation.revoked",
            target=invitation,
            target_label=invitation.email,
            data={"email": invitation.email, "role": invitation.role},
        )
    return invitation


def _join(*, invitation_id: uuid.UUID, tenant_id: uuid.UUID, user: User) -> Membership:
    """Accept the invitation as `user`, inside the invitation's tenant scope. The
    invitation is read again under a lock: of two concurrent accepts, one wins."""
    tenant = _lock_tenant(tenant_id)
    invitation = invitation_check(
        Invitation.objects.select_for_update().filter(id=invitation_id, tenant=tenant).first()
    )
    if not tenant.is_active:
        raise InvitationRefused(f"{tenant.name} is suspended on this platform.", status=403)
    if (user.email or "").strip().lower() != invitation.email.strip().lower():
        signed_in_as = user.get_username() + (f" ({user.email})" if user.email else "")
        raise InvitationRefused(
            f"This invitation is for {invitation.email}, but you are signed in as "
            f"{signed_in_as}. Sign in with the account of {invitation.email} to accept it.",
            status=403,
        )
    if Membership.objects.filter(tenant=tenant, user=user).exists():
        raise InvitationRefused(f"You are already a member of {tenant.name}.", status=409)
    limit = limits_for(tenant).max_members
    if limit is not None and Membership.objects.filter(tenant=tenant).count() >= limit:
        raise InvitationRefused(
            f"{tenant.name} is full: its plan allows {limit} members. Ask an admin of "
            f"{tenant.name} to make room.",
            status=409,
        )
    membership = Membership.objects.create(tenant=tenant, user=user, role=invitation.role)
    invitation.accepted_at, invitation.accepted_by = timezone.now(), user
    invitation.save(update_fields=["accepted_at", "accepted_by"])
    actor = Actor(tenant=tenant, user=user, role=membership.role)
    audit_record(
        actor=actor,
        action="invitation.accepted",
        target=invitation,
        target_label=invitation.email,
        data={"email": invitation.email, "role": invitation.role, "user": user.get_username()},
    )
    audit_record(
        actor=actor,
        action="member.joined",
        target=membership,
        target_label=user.get_username(),
        data={
            "role": membership.role,
            "email": user.email,
            "invitation_id": str(invitation.id),
        },
    )
    return membership


def invitation_accept(*, token: str, user: User) -> Membership:
    """A signed-in person whose email is the invitation's joins its tenant."""
    invitation = invitation_by_token(token=token)
    with tenant_scope(tenant_id=invitation.tenant_id, user_id=user.pk):
        return _join(invitation_id=invitation.id, tenant_id=invitation.tenant_id, user=user)


def invitation_signup(*, token: str, username: str, password: str) -> tuple[User, Membership]:
    """Someone without an account creates one (with the invitation's email) and joins."""
    invitation = invitation_by_token(token=token)
    username = (username or "").strip()
    if not username:
        raise ValidationError({"username": "Choose a username."})
    if len(username) > 150:
        raise ValidationError({"username": "A username has at most 150 characters."})
    User.username_validator(username)
    if User.objects.filter(username__iexact=username).exists():
        raise ValidationError({"username": f"The username {username!r} is taken."})
    if User.objects.filter(email__iexact=invitation.email).exists():
        raise ValidationError(
            f"An account with {invitation.email} already exists: log in to accept the invitation."
        )
    user = User(username=username, email=invitation.email)
    try:
        validate_password(password, user)
    except ValidationError as exc:
        raise ValidationError({"password": exc.messages}) from None
    user.set_password(password)
    with tenant_scope(tenant_id=invitation.tenant_id):
        try:
            with transaction.atomic():
                user.save()
        except IntegrityError:  # a concurrent sign-up took the username or the email
            raise ValidationError({"username": f"The username {username!r} is taken."}) from None
        membership = _join(invitation_id=invitation.id, tenant_id=invitation.tenant_id, user=user)
    return user, membership
