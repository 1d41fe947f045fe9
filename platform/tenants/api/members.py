"""Members, roles and invitations of the current tenant.

Any member lists the members; admins and owners (and API keys with the `admin` scope)
change roles, remove members and manage invitations. Ids of another tenant answer 404.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from django.http import HttpRequest
from ninja import Router, Schema, Status

from tenants.api.auth import actor_of
from tenants.models import Invitation, Membership
from tenants.selectors import invitation_list, invitation_status, member_list
from tenants.services.members import (
    invitation_create,
    invitation_revoke,
    member_leave,
    member_remove,
    member_role_change,
)

router = Router(tags=["members"])


class MemberOut(Schema):
    id: uuid.UUID
    user_id: uuid.UUID
    username: str
    display_name: str
    email: str
    role: str
    joined_at: datetime

    @staticmethod
    def resolve_username(membership: Membership) -> str:
        return membership.user.get_username()

    @staticmethod
    def resolve_display_name(membership: Membership) -> str:
        return membership.user.display_name

    @staticmethod
    def resolve_email(membership: Membership) -> str:
        return membership.user.email

    @staticmethod
    def resolve_joined_at(membership: Membership) -> datetime:
        return membership.created_at


class RoleIn(Schema):
    role: str


class InvitationOut(Schema):
    id: uuid.UUID
    email: str
    role: str
    status: str
    created_by: str | None
    created_at: datetime
    expires_at: datetime
    accepted_at: datetime | None
    accepted_by: str | None
    revoked_at: datetime | None

    @staticmethod
    def resolve_status(invitation: Invitation) -> str:
        return invitation_status(invitation)

    @staticmethod
    def resolve_created_by(invitation: Invitation) -> str | None:
        return invitation.created_by.get_username() if invitation.created_by else None

    @staticmethod
    def resolve_accepted_by(invitation: Invitation) -> str | None:
        return invitation.accepted_by.get_username() if invitation.accepted_by else None


class InvitationIn(Schema):
    email: str
    role: str = "member"


@router.get("", response=list[MemberOut], url_name="members")
def members_list(request: HttpRequest):
    return member_list(actor=actor_of(request))


@router.post("/leave", response={204: None}, url_name="members_leave")
def members_leave(request: HttpRequest):
    member_leave(actor=actor_of(request))
    return Status(204, None)


@router.get("/invitations", response=list[InvitationOut], url_name="invitations")
def invitations_list(request: HttpRequest):
    return invitation_list(actor=actor_of(request))


@router.post("/invitations", response={201: InvitationOut}, url_name="invitations")
def invitations_create(request: HttpRequest, payload: InvitationIn):
    invitation = invitation_create(actor=actor_of(request), email=payload.email, role=payload.role)
    return Status(201, invitation)


@router.delete("/invitations/{invitation_id}", response=InvitationOut, url_name="invitation")
def invitations_revoke(request: HttpRequest, invitation_id: str):
    return invitation_revoke(actor=actor_of(request), invitation_id=invitation_id)


@router.patch("/{membership_id}", response=MemberOut, url_name="member")
def members_role_change(request: HttpRequest, membership_id: str, payload: RoleIn):
    return member_role_change(
        actor=actor_of(request), membership_id=membership_id, role=payload.role
    )


@router.delete("/{membership_id}", response={204: None}, url_name="member")
def members_remove(request: HttpRequest, membership_id: str):
    member_remove(actor=actor_of(request), membership_id=membership_id)
    return Status(204, None)
