"""Members and roles: who may change whose role, remove whom, leave; the audit log; the
HTTP API with sessions and API keys; an outsider's 404s; sockets of a removed member."""

from __future__ import annotations

import uuid

import pytest
from asgiref.sync import sync_to_async
from django.test import Client

from tenants.access import SESSION_TENANT_KEY
from tenants.models import AuditEvent, Invitation, Membership, Role
from tenants.rls import operator_scope, tenant_scope
from tenants.services.api_keys import api_key_create
from tests.conftest import Person, ws_connect
from tests.factories import MembershipFactory

pytestmark = pytest.mark.django_db

MEMBERS = "/api/v1/members"


@pytest.fixture
def dana(alice) -> Person:
    """Admin of tenant A."""
    return Person(MembershipFactory(tenant=alice.tenant, role=Role.ADMIN, user__username="dana"))


def as_user(person: Person) -> Client:
    client = Client()
    client.force_login(person.user)
    return client


def as_key(person: Person, scopes: list[str]) -> Client:
    """A client presenting an API key of the person's tenant (created by the person)."""
    with tenant_scope(tenant_id=person.tenant.id, user_id=person.user.id):
        _, secret = api_key_create(actor=person.actor, name=f"key-{uuid.uuid4()}", scopes=scopes)
    return Client(HTTP_AUTHORIZATION=f"Bearer {secret}")


def patch_role(client: Client, membership, role: str):
    return client.patch(
        f"{MEMBERS}/{membership.id}", {"role": role}, content_type="application/json"
    )


def roles(tenant) -> dict[str, str]:
    with operator_scope():
        return {
            m.user.username: m.role
            for m in Membership.objects.filter(tenant=tenant).select_related("user")
        }


def audit(action: str) -> list[AuditEvent]:
    with operator_scope():
        return list(AuditEvent.objects.filter(action=action).order_by("id"))


def detail(response) -> str:
    return response.json()["detail"]


# --- listing --------------------------------------------------------------------------


def test_any_member_lists_the_members_of_their_tenant_only(alice, bob, dana, charlie):
    response = as_user(bob).get(MEMBERS)
    assert response.status_code == 200
    listed = {m["username"]: m for m in response.json()}
    assert {name: m["role"] for name, m in listed.items()} == {
        "alice": "owner",
        "bob": "member",
        "dana": "admin",
    }
    assert listed["bob"]["id"] == str(bob.membership.id)
    assert listed["bob"]["email"] == "bob@example.com"
    assert [m["username"] for m in as_user(charlie).get(MEMBERS).json()] == ["charlie"]


# --- roles ----------------------------------------------------------------------------


def test_an_admin_promotes_and_demotes_a_member_and_it_is_audited(alice, bob, dana):
    client = as_user(dana)
    response = patch_role(client, bob.membership, "admin")
    assert response.status_code == 200, response.content
    assert response.json()["role"] == "admin"
    assert roles(alice.tenant)["bob"] == Role.ADMIN
    assert patch_role(client, bob.membership, "member").status_code == 200
    assert roles(alice.tenant)["bob"] == Role.MEMBER

    events = audit("member.role_changed")
    assert [(e.data["old_role"], e.data["new_role"]) for e in events] == [
        ("member", "admin"),
        ("admin", "member"),
    ]
    assert events[0].data["email"] == "bob@example.com"
    assert events[0].target_id == str(bob.membership.id)
    assert events[0].actor_user_id == dana.user.id
    assert events[0].tenant_id == alice.tenant.id


def test_an_admin_may_demote_another_admin(alice, dana):
    erin = MembershipFactory(tenant=alice.tenant, role=Role.ADMIN, user__username="erin")
    assert patch_role(as_user(dana), erin, "member").status_code == 200
    assert roles(alice.tenant)["erin"] == Role.MEMBER


def test_setting_the_same_role_changes_nothing(alice, bob, dana):
    assert patch_role(as_user(dana), bob.membership, "member").status_code == 200
    assert audit("member.role_changed") == []


def test_a_member_cannot_manage_members(alice, bob, dana):
    client = as_user(bob)
    before = roles(alice.tenant)
    for response in (
        patch_role(client, dana.membership, "member"),
        patch_role(client, bob.membership, "admin"),
        client.delete(f"{MEMBERS}/{dana.membership.id}"),
    ):
        assert response.status_code == 403, response.content
        assert "admin" in detail(response)
    assert roles(alice.tenant) == before
    assert audit("member.role_changed") == audit("member.removed") == []


def test_an_admin_cannot_make_demote_or_remove_an_owner(alice, bob, dana):
    client = as_user(dana)
    before = roles(alice.tenant)
    response = patch_role(client, bob.membership, "owner")
    assert response.status_code == 403
    assert "owner" in detail(response)
    response = patch_role(client, alice.membership, "admin")
    assert response.status_code == 403
    assert "owner" in detail(response)
    response = client.delete(f"{MEMBERS}/{alice.membership.id}")
    assert response.status_code == 403
    assert roles(alice.tenant) == before


def test_nobody_changes_their_own_role(alice, bob, dana):
    client = as_user(dana)
    for role in ("member", "owner"):
        response = patch_role(client, dana.membership, role)
        assert response.status_code == 403, role
        assert detail(response) == "You cannot change your own role."
    assert roles(alice.tenant)["dana"] == Role.ADMIN
    # A member has no right to manage members at all.
    assert patch_role(as_user(bob), bob.membership, "admin").status_code == 403
    assert roles(alice.tenant)["bob"] == Role.MEMBER


def test_an_owner_steps_down_only_while_another_owner_remains(alice, dana):
    client = as_user(alice)
    response = patch_role(client, alice.membership, "admin")
    assert response.status_code == 400
    assert "last owner" in detail(response)
    assert roles(alice.tenant)["alice"] == Role.OWNER

    assert patch_role(client, dana.membership, "owner").status_code == 200
    response = patch_role(client, alice.membership, "admin")
    assert response.status_code == 200, response.content
    assert roles(alice.tenant) == {"alice": "admin", "dana": "owner"}
    assert audit("member.role_changed")[-1].data["old_role"] == "owner"

    # dana is now the last owner: she can neither step down nor be demoted by alice.
    response = patch_role(as_user(dana), dana.membership, "member")
    assert response.status_code == 400
    assert "last owner" in detail(response)
    assert patch_role(client, dana.membership, "member").status_code == 403
    assert roles(alice.tenant) == {"alice": "admin", "dana": "owner"}


def test_an_owner_demotes_another_owner(alice, dana):
    client = as_user(alice)
    assert patch_role(client, dana.membership, "owner").status_code == 200
    assert patch_role(client, dana.membership, "member").status_code == 200
    assert roles(alice.tenant) == {"alice": "owner", "dana": "member"}


def test_unknown_roles_and_malformed_ids_are_refused(alice, bob):
    client = as_user(alice)
    response = patch_role(client, bob.membership, "superuser")
    assert response.status_code == 400
    assert "Unknown role" in detail(response)
    assert patch_role(client, bob.membership, "").status_code == 400
    for bad in ("not-a-uuid", uuid.uuid4()):
        assert client.patch(
            f"{MEMBERS}/{bad}", {"role": "admin"}, content_type="application/json"
        ).json() == {"detail": "Not found."}
        assert client.delete(f"{MEMBERS}/{bad}").status_code == 404
    assert roles(alice.tenant)["bob"] == Role.MEMBER


# --- removing and leaving ---------------------------------------------------------------


def test_an_admin_removes_a_member_and_it_is_audited(alice, bob, dana):
    response = as_user(dana).delete(f"{MEMBERS}/{bob.membership.id}")
    assert response.status_code == 204, response.content
    assert "bob" not in roles(alice.tenant)
    [event] = audit("member.removed")
    assert event.target_id == str(bob.membership.id)
    assert event.data == {"role": "member", "user": "bob", "email": "bob@example.com"}
    assert event.actor_user_id == dana.user.id
    # Removed means no access: bob's list is now someone else's business.
    assert as_user(bob).get(MEMBERS).status_code == 401


def test_an_owner_removes_another_owner_but_nobody_removes_themselves(alice, dana):
    client = as_user(alice)
    response = client.delete(f"{MEMBERS}/{alice.membership.id}")
    assert response.status_code == 400
    assert "leave" in detail(response)
    assert patch_role(client, dana.membership, "owner").status_code == 200
    assert client.delete(f"{MEMBERS}/{dana.membership.id}").status_code == 204
    assert roles(alice.tenant) == {"alice": "owner"}


def test_a_member_leaves_by_the_api_and_it_is_audited(alice, bob):
    response = as_user(bob).post(f"{MEMBERS}/leave")
    assert response.status_code == 204, response.content
    assert "bob" not in roles(alice.tenant)
    [event] = audit("member.left")
    assert event.actor_user_id == bob.user.id
    assert event.data == {"role": "member", "user": "bob", "email": "bob@example.com"}


def test_the_last_owner_cannot_leave(alice, bob):
    response = as_user(alice).post(f"{MEMBERS}/leave")
    assert response.status_code == 400
    assert "last owner" in detail(response)
    client = as_user(alice)
    response = client.post("/tenants/leave/")
    assert response.status_code == 400
    assert "last owner" in response.content.decode()
    assert roles(alice.tenant) == {"alice": "owner", "bob": "member"}
    assert audit("member.left") == []


def test_an_owner_leaves_when_another_owner_remains(alice, dana):
    assert patch_role(as_user(alice), dana.membership, "owner").status_code == 200
    assert as_user(alice).post(f"{MEMBERS}/leave").status_code == 204
    assert roles(alice.tenant) == {"dana": "owner"}


def test_a_member_leaves_by_the_page_and_lands_in_another_tenant(alice, bob, charlie):
    MembershipFactory(tenant=charlie.tenant, user=bob.user)
    client = as_user(bob)
    session = client.session
    session[SESSION_TENANT_KEY] = str(alice.tenant.id)
    session.save()
    response = client.post("/tenants/leave/")
    assert response.status_code == 302
    assert response["Location"] == "/tenants/"
    assert SESSION_TENANT_KEY not in client.session
    assert "bob" not in roles(alice.tenant)
    page = client.get("/tenants/").content.decode()
    assert f"You left {alice.tenant.name}." in page
    assert charlie.tenant.name in page
    assert [m["username"] for m in client.get(MEMBERS).json()] == ["charlie", "bob"]


def test_leaving_needs_a_post(alice, bob):
    assert as_user(bob).get("/tenants/leave/").status_code == 405
    assert "bob" in roles(alice.tenant)


# --- API keys -------------------------------------------------------------------------


def test_a_key_with_the_admin_scope_acts_as_an_admin(alice, bob):
    client = as_key(alice, ["admin"])
    assert patch_role(client, bob.membership, "admin").status_code == 200
    assert roles(alice.tenant)["bob"] == Role.ADMIN
    # An admin, not the owner who created it.
    assert patch_role(client, bob.membership, "owner").status_code == 403
    assert patch_role(client, alice.membership, "admin").status_code == 403
    assert client.delete(f"{MEMBERS}/{alice.membership.id}").status_code == 403
    response = client.post(f"{MEMBERS}/leave")
    assert response.status_code == 403
    assert "API key" in detail(response)
    assert client.delete(f"{MEMBERS}/{bob.membership.id}").status_code == 204
    assert roles(alice.tenant) == {"alice": "owner"}
    [event] = audit("member.removed")
    assert event.actor_label.startswith("key:")
    assert event.actor_key_id is not None


def test_a_key_without_the_admin_scope_gets_403_on_admin_endpoints(alice, bob):
    client = as_key(alice, ["chat"])
    assert client.get(MEMBERS).status_code == 200
    responses = [
        patch_role(client, bob.membership, "admin"),
        client.delete(f"{MEMBERS}/{bob.membership.id}"),
        client.get(f"{MEMBERS}/invitations"),
        client.post(
            f"{MEMBERS}/invitations",
            {"email": "new@example.com", "role": "member"},
            content_type="application/json",
        ),
        client.delete(f"{MEMBERS}/invitations/{uuid.uuid4()}"),
    ]
    assert [r.status_code for r in responses] == [403] * 5
    assert roles(alice.tenant) == {"alice": "owner", "bob": "member"}
    with operator_scope():
        assert not Invitation.objects.exists()


def test_anonymous_callers_get_401(alice, bob):
    client = Client()
    assert client.get(MEMBERS).status_code == 401
    assert client.delete(f"{MEMBERS}/{bob.membership.id}").status_code == 401
    assert "bob" in roles(alice.tenant)


# --- outsiders ------------------------------------------------------------------------


def test_an_outsider_gets_404_on_every_id(alice, bob, dana, charlie):
    with tenant_scope(tenant_id=alice.tenant.id, user_id=alice.user.id):
        from tenants.services.members import invitation_create

        invitation = invitation_create(actor=alice.actor, email="new@example.com", role="member")
    before = roles(alice.tenant)
    for client in (as_user(charlie), as_key(charlie, ["admin"])):
        for membership in (alice.membership, bob.membership, dana.membership):
            for response in (
                patch_role(client, membership, "member"),
                client.delete(f"{MEMBERS}/{membership.id}"),
            ):
                assert response.status_code == 404
                assert response.json() == {"detail": "Not found."}
        response = client.delete(f"{MEMBERS}/invitations/{invitation.id}")
        assert response.status_code == 404
        assert response.json() == {"detail": "Not found."}
        assert "new@example.com" not in client.get(f"{MEMBERS}/invitations").content.decode()
        assert {m["username"] for m in client.get(MEMBERS).json()} == {"charlie"}
    assert roles(alice.tenant) == before
    with operator_scope():
        assert Invitation.objects.get(id=invitation.id).revoked_at is None


# --- sockets --------------------------------------------------------------------------


async def _closed(socket) -> dict:
    """The error frame that precedes the close, after checking the socket closed."""
    frame = await socket.receive()
    closing = await socket.communicator.receive_output(timeout=5)
    assert closing == {"type": "websocket.close", "code": 4403}
    return frame


@pytest.mark.django_db(transaction=True)
async def test_removing_a_member_closes_their_sockets_in_that_tenant_only(alice, bob, charlie):
    await sync_to_async(MembershipFactory)(tenant=charlie.tenant, user=bob.user)
    connected, _, bob_a = await ws_connect(bob.user, tenant=alice.tenant)
    assert connected
    connected, _, bob_b = await ws_connect(bob.user, tenant=charlie.tenant)
    assert connected
    connected, _, alice_a = await ws_connect(alice.user)
    assert connected

    response = await sync_to_async(
        lambda: as_user(alice).delete(f"{MEMBERS}/{bob.membership.id}")
    )()
    assert response.status_code == 204

    assert await _closed(bob_a) == {
        "type": "error",
        "code": "access_revoked",
        "message": f"You were removed from {alice.tenant.name}.",
    }
    assert await alice_a.nothing_pending()
    assert await bob_b.nothing_pending()
    await bob_b.send({"type": "ping"})
    assert (await bob_b.receive())["type"] == "pong"
    await bob_b.close()
    await alice_a.close()


@pytest.mark.django_db(transaction=True)
async def test_leaving_closes_the_members_sockets(alice, bob):
    connected, _, socket = await ws_connect(bob.user)
    assert connected
    response = await sync_to_async(lambda: as_user(bob).post("/tenants/leave/"))()
    assert response.status_code == 302
    frame = await _closed(socket)
    assert frame["code"] == "access_revoked"
    assert frame["message"] == f"You left {alice.tenant.name}."


@pytest.mark.django_db(transaction=True)
async def test_a_refused_removal_closes_nothing(alice, bob, dana):
    connected, _, socket = await ws_connect(alice.user)
    assert connected
    response = await sync_to_async(
        lambda: as_user(dana).delete(f"{MEMBERS}/{alice.membership.id}")
    )()
    assert response.status_code == 403
    assert await socket.nothing_pending()
    await socket.close()


def test_lookups_are_scoped_by_the_actor_even_past_row_level_security(alice, bob, charlie):
    """The first wall on its own: with every row visible, another tenant's ids are still
    not found for charlie."""
    from tenants.access import NotFound
    from tenants.selectors import invitation_get, invitation_list, member_get, member_list
    from tenants.services.members import invitation_create

    with tenant_scope(tenant_id=alice.tenant.id, user_id=alice.user.id):
        invitation = invitation_create(actor=alice.actor, email="new@example.com", role="member")
    with operator_scope():
        with pytest.raises(NotFound):
            member_get(actor=charlie.actor, membership_id=bob.membership.id)
        with pytest.raises(NotFound):
            invitation_get(actor=charlie.actor, invitation_id=invitation.id)
        assert [m.user.username for m in member_list(actor=charlie.actor)] == ["charlie"]
        assert invitation_list(actor=charlie.actor) == []
        assert member_get(actor=alice.actor, membership_id=bob.membership.id) == bob.membership
