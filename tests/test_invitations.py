"""Invitations by link: created by admins and owners (at most their own role), mailed,
stored as a hash, expiring, listed and revoked; accepted by a signed-in person whose
email matches or by signing up on the page; every bad link gets a clear 4xx page and
changes nothing; the plan's member limit holds when inviting and when accepting."""

from __future__ import annotations

import hashlib
import re
import secrets
from datetime import timedelta

import pytest
from django.conf import settings as django_settings
from django.test import Client
from django.utils import timezone

from tenants.access import SESSION_TENANT_KEY
from tenants.models import AuditEvent, Invitation, Membership, Plan, Role, Tenant, User
from tenants.rls import operator_scope
from tests.conftest import Person
from tests.factories import PASSWORD, MembershipFactory, UserFactory

pytestmark = pytest.mark.django_db

INVITATIONS = "/api/v1/members/invitations"
LINK = re.compile(r"/invite/([A-Za-z0-9_-]+)/")
STRONG = "violet-kettle-91-orbit"


@pytest.fixture
def dana(alice) -> Person:
    """Admin of tenant A."""
    return Person(MembershipFactory(tenant=alice.tenant, role=Role.ADMIN, user__username="dana"))


def as_user(person_or_user) -> Client:
    client = Client()
    client.force_login(getattr(person_or_user, "user", person_or_user))
    return client


def invite(person, email="new@example.com", role="member"):
    return as_user(person).post(
        INVITATIONS, {"email": email, "role": role}, content_type="application/json"
    )


def invite_token(person, mailoutbox, email="new@example.com", role="member") -> str:
    response = invite(person, email, role)
    assert response.status_code == 201, response.content
    return LINK.search(mailoutbox[-1].body).group(1)


def invitation_of(token: str) -> Invitation:
    with operator_scope():
        return Invitation.objects.get(token_hash=hashlib.sha256(token.encode()).hexdigest())


def update_invitation(token: str, **fields) -> None:
    with operator_scope():
        Invitation.objects.filter(token_hash=hashlib.sha256(token.encode()).hexdigest()).update(
            **fields
        )


def members(tenant) -> dict[str, str]:
    with operator_scope():
        return {
            m.user.username: m.role
            for m in Membership.objects.filter(tenant=tenant).select_related("user")
        }


def audit(action: str) -> list[AuditEvent]:
    with operator_scope():
        return list(AuditEvent.objects.filter(action=action).order_by("id"))


def set_plan(tenant, max_members: int) -> None:
    with operator_scope():
        plan = Plan.objects.create(name=f"plan-{max_members}", max_members=max_members)
        Tenant.objects.filter(id=tenant.id).update(plan=plan)


# --- inviting -------------------------------------------------------------------------


def test_an_admin_invites_by_email_and_only_the_tokens_hash_is_stored(
    alice, dana, mailoutbox, settings
):
    settings.PARLEY_PUBLIC_URL = "https://chat.example.com"
    response = invite(dana, "New.Person@Example.com", "admin")
    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["email"], body["role"], body["status"]) == (
        "New.Person@Example.com",
        "admin",
        "pending",
    )
    assert body["created_by"] == "dana"

    [mail] = mailoutbox
    assert mail.to == ["New.Person@Example.com"]
    assert alice.tenant.name in mail.subject
    token = LINK.search(mail.body).group(1)
    assert len(token) == 43
    assert f"https://chat.example.com/invite/{token}/" in mail.body

    invitation = invitation_of(token)
    assert invitation.token_hash == hashlib.sha256(token.encode()).hexdigest()
    expected = timezone.now() + timedelta(days=7)
    assert abs((invitation.expires_at - expected).total_seconds()) < 60
    with operator_scope():
        stored = list(Invitation.objects.values())
        events = list(AuditEvent.objects.values())
    assert token not in str(stored)
    assert token not in str(events)
    assert token not in response.content.decode()
    [event] = audit("member.invited")
    assert event.data["email"] == "New.Person@Example.com"
    assert event.data["role"] == "admin"
    assert event.actor_user_id == dana.user.id


def test_the_expiry_follows_the_setting(alice, mailoutbox, settings):
    settings.PARLEY_INVITATION_TTL_DAYS = 2
    invitation = invitation_of(invite_token(alice, mailoutbox))
    expected = timezone.now() + timedelta(days=2)
    assert abs((invitation.expires_at - expected).total_seconds()) < 60


def test_nobody_invites_above_their_own_role(alice, bob, dana, mailoutbox):
    response = invite(dana, role="owner")
    assert response.status_code == 403
    assert "owner" in response.json()["detail"]
    assert invite(bob, role="member").status_code == 403
    with operator_scope():
        assert not Invitation.objects.exists()
    assert mailoutbox == []
    assert invite(alice, role="owner").status_code == 201


def test_bad_emails_and_roles_are_refused(alice, mailoutbox):
    for email, role in [
        ("not-an-email", "member"),
        ("", "member"),
        ("x" * 250 + "@example.com", "member"),
        ("new@example.com", "king"),
    ]:
        response = invite(alice, email, role)
        assert response.status_code == 400, (email, role)
        assert response.json()["detail"]
    with operator_scope():
        assert not Invitation.objects.exists()
    assert mailoutbox == []


def test_a_second_pending_invitation_to_the_same_email_is_refused(alice, mailoutbox):
    token = invite_token(alice, mailoutbox, "new@example.com")
    response = invite(alice, "NEW@example.com")
    assert response.status_code == 400
    assert "already has a pending invitation" in response.json()["detail"]
    assert len(mailoutbox) == 1
    # Once the first is revoked or expired, a new invitation may go out.
    update_invitation(token, expires_at=timezone.now() - timedelta(seconds=1))
    second = invite_token(alice, mailoutbox, "new@example.com")
    invitation = invitation_of(second)
    response = as_user(alice).delete(f"{INVITATIONS}/{invitation.id}")
    assert response.status_code == 200
    assert invite(alice, "new@example.com").status_code == 201


def test_inviting_an_existing_member_is_refused(alice, bob, mailoutbox):
    response = invite(alice, "BOB@example.com")
    assert response.status_code == 400
    assert "already a member" in response.json()["detail"]
    assert mailoutbox == []


def test_the_member_limit_counts_members_and_pending_invitations(alice, bob, mailoutbox):
    set_plan(alice.tenant, 3)
    assert invite(alice, "one@example.com").status_code == 201
    response = invite(alice, "two@example.com")
    assert response.status_code == 400
    assert "allows 3 members" in response.json()["detail"]
    assert "2 members and 1 pending" in response.json()["detail"]
    with operator_scope():
        assert list(Invitation.objects.values_list("email", flat=True)) == ["one@example.com"]
    assert len(mailoutbox) == 1


# --- listing and revoking -------------------------------------------------------------


def test_invitations_are_listed_and_revoked(alice, dana, mailoutbox):
    token = invite_token(alice, mailoutbox, "new@example.com")
    invitation = invitation_of(token)
    listed = as_user(dana).get(INVITATIONS).json()
    assert [(i["email"], i["status"]) for i in listed] == [("new@example.com", "pending")]

    response = as_user(dana).delete(f"{INVITATIONS}/{invitation.id}")
    assert response.status_code == 200
    assert response.json()["status"] == "revoked"
    assert invitation_of(token).revoked_at is not None
    [event] = audit("invitation.revoked")
    assert event.data == {"email": "new@example.com", "role": "member"}
    assert event.target_id == str(invitation.id)
    # Revoking again changes nothing.
    assert as_user(dana).delete(f"{INVITATIONS}/{invitation.id}").status_code == 200
    assert len(audit("invitation.revoked")) == 1
    assert [i["status"] for i in as_user(alice).get(INVITATIONS).json()] == ["revoked"]


def test_an_admin_cannot_revoke_an_invitation_to_the_owner_role(alice, dana, mailoutbox):
    invitation = invitation_of(invite_token(alice, mailoutbox, role="owner"))
    response = as_user(dana).delete(f"{INVITATIONS}/{invitation.id}")
    assert response.status_code == 403
    with operator_scope():
        assert Invitation.objects.get(id=invitation.id).revoked_at is None


def test_an_accepted_invitation_cannot_be_revoked(alice, mailoutbox):
    token = invite_token(alice, mailoutbox, "frank@example.com")
    frank = UserFactory(username="frank")
    assert as_user(frank).post(f"/invite/{token}/").status_code == 302
    response = as_user(alice).delete(f"{INVITATIONS}/{invitation_of(token).id}")
    assert response.status_code == 400
    assert "already accepted" in response.json()["detail"]
    assert invitation_of(token).revoked_at is None


def test_members_and_malformed_ids_cannot_touch_invitations(alice, bob, mailoutbox):
    invitation = invitation_of(invite_token(alice, mailoutbox))
    assert as_user(bob).get(INVITATIONS).status_code == 403
    assert as_user(bob).delete(f"{INVITATIONS}/{invitation.id}").status_code == 403
    assert as_user(alice).delete(f"{INVITATIONS}/not-a-uuid").status_code == 404
    assert invitation_of_id(invitation.id).revoked_at is None


def invitation_of_id(invitation_id) -> Invitation:
    with operator_scope():
        return Invitation.objects.get(id=invitation_id)


# --- the page -------------------------------------------------------------------------


def test_the_page_shows_the_tenant_and_the_role(alice, mailoutbox):
    token = invite_token(alice, mailoutbox, role="admin")
    response = Client().get(f"/invite/{token}/")
    assert response.status_code == 200
    page = response.content.decode()
    assert f"Join {alice.tenant.name}" in page
    assert "<strong>Admin</strong>" in page
    assert "new@example.com" in page
    assert 'name="password1"' in page
    assert "no-cache" in response["Cache-Control"]
    assert "script-src 'self'" in response["Content-Security-Policy"]


def test_a_signed_in_person_with_the_invited_email_joins(alice, charlie, mailoutbox):
    token = invite_token(alice, mailoutbox, "frank@example.com", role="admin")
    frank = MembershipFactory(
        tenant=charlie.tenant, user__username="frank", user__email="Frank@Example.com"
    ).user
    client = as_user(frank)
    page = client.get(f"/invite/{token}/").content.decode()
    assert f"Join {alice.tenant.name}</button>" in page

    response = client.post(f"/invite/{token}/")
    assert response.status_code == 302
    assert response["Location"] == "/"
    assert client.session[SESSION_TENANT_KEY] == str(alice.tenant.id)
    assert members(alice.tenant)["frank"] == Role.ADMIN
    # A person may belong to several tenants.
    assert members(charlie.tenant)["frank"] == Role.MEMBER
    invitation = invitation_of(token)
    assert invitation.accepted_by_id == frank.id
    assert invitation.accepted_at is not None
    [accepted] = audit("invitation.accepted")
    assert accepted.data["email"] == "frank@example.com"
    assert accepted.tenant_id == alice.tenant.id
    [joined] = audit("member.joined")
    assert joined.data["role"] == "admin"
    assert joined.actor_user_id == frank.id
    # Now acting in the new tenant.
    listed = client.get("/api/v1/members").json()
    assert {m["username"] for m in listed} == {"alice", "frank"}


def test_a_signed_in_person_with_another_email_cannot_accept(alice, bob, charlie, mailoutbox):
    token = invite_token(alice, mailoutbox, "frank@example.com")
    client = as_user(charlie)
    page = client.get(f"/invite/{token}/").content.decode()
    assert "this invitation is for frank@example.com" in page
    assert '<button type="submit">Join' not in page
    response = client.post(f"/invite/{token}/")
    assert response.status_code == 403
    assert "This invitation is for frank@example.com" in response.content.decode()
    assert "charlie" not in members(alice.tenant)
    assert invitation_of(token).accepted_at is None
    assert SESSION_TENANT_KEY not in client.session


def test_an_existing_member_cannot_accept_again(alice, bob, mailoutbox):
    token = invite_token(alice, mailoutbox, "frank@example.com")
    frank = MembershipFactory(tenant=alice.tenant, user__username="frank").user
    response = as_user(frank).post(f"/invite/{token}/")
    assert response.status_code == 409
    assert "already a member" in response.content.decode()
    assert invitation_of(token).accepted_at is None


def test_someone_without_an_account_signs_up_and_joins(alice, mailoutbox):
    token = invite_token(alice, mailoutbox, "New@Example.com")
    client = Client()
    response = client.post(
        f"/invite/{token}/", {"username": "newbie", "password1": STRONG, "password2": STRONG}
    )
    assert response.status_code == 302, response.content.decode()
    assert response["Location"] == "/"
    user = User.objects.get(username="newbie")
    assert user.email == "New@Example.com"
    assert user.check_password(STRONG)
    assert members(alice.tenant)["newbie"] == Role.MEMBER
    assert client.session["_auth_user_id"] == str(user.id)
    assert client.session[SESSION_TENANT_KEY] == str(alice.tenant.id)
    assert client.get("/").status_code == 200
    assert [e.actor_user_id for e in audit("member.joined")] == [user.id]


@pytest.mark.parametrize(
    ("form", "field_message"),
    [
        ({"username": "newbie", "password1": "123", "password2": "123"}, "too short"),
        ({"username": "newbie", "password1": "password", "password2": "password"}, "too common"),
        ({"username": "newbie", "password1": STRONG, "password2": STRONG + "x"}, "differ"),
        ({"username": "ALICE", "password1": STRONG, "password2": STRONG}, "is taken"),
        ({"username": "", "password1": STRONG, "password2": STRONG}, "Choose a username"),
        ({"username": "bad name!", "password1": STRONG, "password2": STRONG}, "valid username"),
    ],
)
def test_bad_sign_ups_are_refused_and_change_nothing(alice, mailoutbox, form, field_message):
    token = invite_token(alice, mailoutbox)
    users = User.objects.count()
    response = Client().post(f"/invite/{token}/", form)
    assert response.status_code == 400
    assert field_message in response.content.decode()
    assert User.objects.count() == users
    assert members(alice.tenant) == {"alice": "owner"}
    assert invitation_of(token).accepted_at is None


def test_signing_up_with_the_email_of_an_existing_account_is_refused(alice, mailoutbox):
    token = invite_token(alice, mailoutbox, "frank@example.com")
    UserFactory(username="frank", email="FRANK@example.com")
    response = Client().post(
        f"/invite/{token}/", {"username": "frank2", "password1": STRONG, "password2": STRONG}
    )
    assert response.status_code == 400
    assert "log in to accept" in response.content.decode()
    assert not User.objects.filter(username="frank2").exists()
    assert invitation_of(token).accepted_at is None


def test_log_in_then_accept(alice, mailoutbox):
    token = invite_token(alice, mailoutbox, "frank@example.com")
    UserFactory(username="frank", email="frank@example.com")
    client = Client()
    page = client.get(f"/invite/{token}/").content.decode()
    assert f"/accounts/login/?next=/invite/{token}/" in page
    response = client.post(
        f"/accounts/login/?next=/invite/{token}/",
        {"username": "frank", "password": PASSWORD, "next": f"/invite/{token}/"},
    )
    assert response["Location"] == f"/invite/{token}/"
    assert client.post(f"/invite/{token}/").status_code == 302
    assert "frank" in members(alice.tenant)


# --- bad links ------------------------------------------------------------------------


def _bad_link_cases(alice, mailoutbox):
    expired = invite_token(alice, mailoutbox, "expired@example.com")
    update_invitation(expired, expires_at=timezone.now() - timedelta(minutes=1))
    revoked = invite_token(alice, mailoutbox, "revoked@example.com")
    update_invitation(revoked, revoked_at=timezone.now())
    used = invite_token(alice, mailoutbox, "used@example.com")
    update_invitation(used, accepted_at=timezone.now())
    return [
        ("short", 400, "malformed"),
        ("!" * 43, 400, "malformed"),
        (expired + "x", 400, "malformed"),
        (secrets.token_urlsafe(32), 404, "not valid"),
        (expired, 410, "expired"),
        (revoked, 410, "revoked"),
        (used, 410, "already been used"),
    ]


def test_bad_links_get_a_clear_error_page_and_change_nothing(alice, mailoutbox):
    cases = _bad_link_cases(alice, mailoutbox)
    with operator_scope():
        before = list(Invitation.objects.order_by("id").values())
    users = User.objects.count()
    signed_in = as_user(UserFactory(username="frank", email="used@example.com"))
    for token, status, text in cases:
        for client, method, data in [
            (Client(), "get", {}),
            (Client(), "post", {"username": "z", "password1": STRONG, "password2": STRONG}),
            (signed_in, "get", {}),
            (signed_in, "post", {}),
        ]:
            response = getattr(client, method)(f"/invite/{token}/", data)
            assert response.status_code == status, (token, method)
            page = response.content.decode()
            assert "This invitation cannot be used" in page
            assert text in page, (token, page)
    with operator_scope():
        assert list(Invitation.objects.order_by("id").values()) == before
    assert User.objects.count() == users + 1
    assert members(alice.tenant) == {"alice": "owner"}
    assert audit("invitation.accepted") == audit("member.joined") == []


def test_an_invitation_is_used_once(alice, mailoutbox):
    token = invite_token(alice, mailoutbox)
    client = Client()
    form = {"username": "newbie", "password1": STRONG, "password2": STRONG}
    assert client.post(f"/invite/{token}/", form).status_code == 302
    again = Client().post(
        f"/invite/{token}/", {"username": "other", "password1": STRONG, "password2": STRONG}
    )
    assert again.status_code == 410
    assert not User.objects.filter(username="other").exists()
    assert len(audit("member.joined")) == 1


def test_the_member_limit_holds_when_accepting(alice, mailoutbox):
    set_plan(alice.tenant, 2)
    token = invite_token(alice, mailoutbox, "frank@example.com")
    MembershipFactory(tenant=alice.tenant, user__username="gina")  # the seat is taken meanwhile
    frank = UserFactory(username="frank", email="frank@example.com")
    response = as_user(frank).post(f"/invite/{token}/")
    assert response.status_code == 409
    assert "allows 2 members" in response.content.decode()
    assert members(alice.tenant) == {"alice": "owner", "gina": "member"}
    assert invitation_of(token).accepted_at is None


def test_the_member_limit_refuses_a_sign_up_without_creating_the_account(alice, mailoutbox):
    set_plan(alice.tenant, 2)
    token = invite_token(alice, mailoutbox, "new@example.com")
    MembershipFactory(tenant=alice.tenant, user__username="gina")
    response = Client().post(
        f"/invite/{token}/", {"username": "newbie", "password1": STRONG, "password2": STRONG}
    )
    assert response.status_code == 409
    assert "allows 2 members" in response.content.decode()
    assert not User.objects.filter(username="newbie").exists()
    assert invitation_of(token).accepted_at is None


def test_a_suspended_tenant_cannot_be_joined(alice, mailoutbox):
    token = invite_token(alice, mailoutbox, "frank@example.com")
    with operator_scope():
        Tenant.objects.filter(id=alice.tenant.id).update(state=Tenant.State.SUSPENDED)
    frank = UserFactory(username="frank", email="frank@example.com")
    response = as_user(frank).post(f"/invite/{token}/")
    assert response.status_code == 403
    assert "suspended" in response.content.decode()
    assert "frank" not in members(alice.tenant)


def test_the_invitation_uses_the_configured_public_url(alice, mailoutbox):
    token = invite_token(alice, mailoutbox)
    assert f"{django_settings.PARLEY_PUBLIC_URL}/invite/{token}/" in mailoutbox[-1].body
