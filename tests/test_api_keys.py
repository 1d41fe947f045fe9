"""API keys: shown once, stored hashed, scoped, expiring, revocable at once; usable on
HTTP (Bearer) and on the websocket (Authorization header)."""

from __future__ import annotations

import hashlib
from datetime import timedelta

import pytest
from django.utils import timezone

from tenants.models import ApiKey, AuditEvent
from tenants.rls import operator_scope
from tests.conftest import ws_connect
from tests.ws_handshake import ws_refusal

pytestmark = pytest.mark.django_db


def create(client, person, **body):
    client.force_login(person.user)
    body = {"name": "ci", "scopes": ["chat"], **body}
    return client.post("/api/v1/keys", body, content_type="application/json")


def bearer(secret: str) -> dict:
    return {"HTTP_AUTHORIZATION": f"Bearer {secret}"}


def test_a_key_is_shown_once_and_stored_hashed(client, alice):
    response = create(client, alice, scopes=["chat", "admin"])
    assert response.status_code == 201, response.content
    body = response.json()
    secret = body["secret"]
    assert secret.startswith(f"prk_{body['prefix']}_")
    with operator_scope():
        key = ApiKey.objects.get(id=body["id"])
        assert key.secret_hash == hashlib.sha256(secret.split("_", 2)[2].encode()).hexdigest()
        assert secret not in str(list(AuditEvent.objects.values_list("data", flat=True)))
    listed = client.get("/api/v1/keys").json()
    assert [k["name"] for k in listed] == ["ci"]
    assert "secret" not in listed[0] and "secret_hash" not in listed[0]
    assert "secret" not in client.get(f"/api/v1/keys/{body['id']}").json()


def test_keys_authenticate_http_and_carry_their_scopes(client, alice):
    admin_key = create(client, alice, name="admin", scopes=["admin"]).json()["secret"]
    chat_key = create(client, alice, name="chat", scopes=["chat"]).json()["secret"]
    client.logout()
    assert client.get("/api/v1/tenant", **bearer(admin_key)).json()["slug"] == alice.tenant.slug
    assert client.get("/api/v1/keys", **bearer(admin_key)).status_code == 200
    denied = client.get("/api/v1/keys", **bearer(chat_key))
    assert denied.status_code == 403
    assert "scope" in denied.json()["detail"]


@pytest.mark.parametrize(
    ("secret", "detail"),
    [
        ("nonsense", "Malformed API key"),
        ("prk_zzzzzzzzzzzz_" + "a" * 43, "Malformed API key"),
        ("prk_0123456789ab_" + "a" * 43, "Invalid API key."),
    ],
)
def test_malformed_and_unknown_keys_are_refused(client, secret, detail):
    response = client.get("/api/v1/tenant", **bearer(secret))
    assert response.status_code == 401
    assert detail in response.json()["detail"]


def test_a_forged_secret_for_a_real_prefix_is_refused(client, alice):
    body = create(client, alice).json()
    client.logout()
    forged = f"prk_{body['prefix']}_" + "A" * 43
    response = client.get("/api/v1/tenant", **bearer(forged))
    assert (response.status_code, response.json()["detail"]) == (401, "Invalid API key.")


def test_revoked_keys_are_refused_at_once(client, alice):
    body = create(client, alice, scopes=["admin"]).json()
    assert client.get("/api/v1/tenant", **bearer(body["secret"])).status_code == 200
    revoked = client.delete(f"/api/v1/keys/{body['id']}")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"]
    client.logout()
    response = client.get("/api/v1/tenant", **bearer(body["secret"]))
    assert (response.status_code, response.json()["detail"]) == (401, "This API key was revoked.")
    with operator_scope():
        assert AuditEvent.objects.filter(action="api_key.revoked").count() == 1


def test_expired_keys_are_refused(client, alice):
    soon = timezone.now() + timedelta(seconds=60)
    body = create(client, alice, expires_at=soon.isoformat()).json()
    with operator_scope():
        ApiKey.objects.filter(id=body["id"]).update(
            expires_at=timezone.now() - timedelta(seconds=1)
        )
    client.logout()
    response = client.get("/api/v1/tenant", **bearer(body["secret"]))
    assert (response.status_code, response.json()["detail"]) == (401, "This API key has expired.")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"name": ""}, "needs a name"),
        ({"scopes": []}, "non-empty subset"),
        ({"scopes": ["chat", "root"]}, "unknown: root"),
        ({"expires_at": "2000-01-01T00:00:00Z"}, "in the future"),
    ],
)
def test_bad_key_requests_get_clear_errors_and_change_nothing(client, alice, body, message):
    response = create(client, alice, **body)
    assert response.status_code == 400
    assert message in response.json()["detail"]
    with operator_scope():
        assert not ApiKey.objects.exists()


def test_duplicate_live_names_are_refused_but_a_revoked_name_can_be_reused(client, alice):
    first = create(client, alice).json()
    duplicate = create(client, alice)
    assert duplicate.status_code == 400 and "already exists" in duplicate.json()["detail"]
    client.delete(f"/api/v1/keys/{first['id']}")
    assert create(client, alice).status_code == 201


def test_members_cannot_manage_keys_and_outsiders_see_nothing(client, alice, bob, charlie):
    key = create(client, alice).json()
    client.force_login(bob.user)
    assert client.get("/api/v1/keys").status_code == 403
    assert create(client, bob).status_code == 403
    client.force_login(charlie.user)
    assert client.get("/api/v1/keys").json() == []
    assert client.get(f"/api/v1/keys/{key['id']}").status_code == 404
    assert client.delete(f"/api/v1/keys/{key['id']}").status_code == 404
    with operator_scope():
        assert ApiKey.objects.get(id=key["id"]).revoked_at is None


def test_last_used_is_recorded(client, alice):
    body = create(client, alice, scopes=["admin"]).json()
    assert body["last_used_at"] is None
    client.logout()
    client.get("/api/v1/tenant", **bearer(body["secret"]))
    with operator_scope():
        assert ApiKey.objects.get(id=body["id"]).last_used_at is not None


@pytest.mark.django_db(transaction=True)
async def test_a_key_opens_a_websocket_without_origin_and_revocation_closes_it(alice):
    from channels.db import database_sync_to_async as sync_to_async

    from tenants.services.api_keys import api_key_create, api_key_revoke

    key, secret = await sync_to_async(_in_tenant)(
        alice, api_key_create, name="bot", scopes=["chat"]
    )
    connected, _, socket = await ws_connect(
        origin=None, headers=[(b"authorization", f"Bearer {secret}".encode())]
    )
    assert connected
    await socket.send({"type": "ping"})
    assert (await socket.receive())["type"] == "pong"

    await sync_to_async(_in_tenant)(alice, api_key_revoke, key_id=key.id)
    frame = await socket.receive()
    assert frame == {
        "type": "error",
        "code": "api_key_revoked",
        "message": "The API key of this connection was revoked.",
    }
    assert (await socket.communicator.receive_output(timeout=5))["type"] == "websocket.close"

    frame, code = await ws_refusal(
        origin=None, headers=[(b"authorization", f"Bearer {secret}".encode())]
    )
    assert (frame["code"], code) == ("unauthenticated", 4401)
    assert frame["message"] == "This API key was revoked."


async def test_a_bad_key_on_the_websocket_is_refused():
    frame, code = await ws_refusal(origin=None, headers=[(b"authorization", b"Bearer prk_nope")])
    assert (frame["code"], code) == ("unauthenticated", 4401)


def _in_tenant(person, fn, **kwargs):
    from tenants.rls import tenant_scope

    with tenant_scope(tenant_id=person.tenant.id, user_id=person.user.id):
        return fn(actor=person.actor, **kwargs)
