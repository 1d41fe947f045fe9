"""Holes an adversarial review found in authentication, each closed at its root:
the websocket origin check and the credentials a socket presents; an API key's rights
against its creator's current membership; the `chat` scope on sockets and tickets;
one login throttle for every form and every spelling of a username; operator routes
hidden from keys; handshake close codes; secrets that never follow a changed plugin
destination; tickets kept out of the access log."""

from __future__ import annotations

import json
import logging
import signal
import uuid

import pytest
from channels.db import database_sync_to_async as sync_to_async
from django.core.management import call_command
from django.test import Client

from chat.tickets import TICKET_PREFIX, SocketCredentials, socket_credentials
from gateway.errors import ApiError
from gateway.services import caller_authenticate
from tenants.models import ApiKey, AuditEvent, Membership, Role
from tenants.rls import operator_scope, tenant_scope
from tenants.services.api_keys import api_key_create
from tenants.services.login_throttle import login_throttle_reset, username_normalize
from tests.conftest import Person, ws_connect
from tests.factories import PASSWORD, MembershipFactory, UserFactory
from tests.ws_handshake import ws_refusal

pytestmark = pytest.mark.django_db

BAD_ORIGIN = "http://evil.example.com"


def key_of(person: Person, scopes: list[str]) -> tuple[ApiKey, str]:
    with tenant_scope(tenant_id=person.tenant.id, user_id=person.user.id):
        return api_key_create(actor=person.actor, name=f"k-{uuid.uuid4().hex[:8]}", scopes=scopes)


def bearer(secret: str) -> dict[str, str]:
    return {"HTTP_AUTHORIZATION": f"Bearer {secret}"}


def set_role(person: Person, role: str) -> None:
    with operator_scope():
        membership = Membership.objects.get(id=person.membership.id)
        membership.role = role
        membership.save(update_fields=["role"])


def admin_person(tenant, username: str) -> Person:
    return Person(MembershipFactory(tenant=tenant, role=Role.ADMIN, user__username=username))


# --- 1. the origin check and the credentials a socket presents -------------------------


@pytest.mark.parametrize(
    ("query", "ticket"),
    [
        (b"", None),
        (b"ticket=", None),
        (b"xticket=1", None),
        (b"a=ticket=", None),
        (b"ticket=pwt_x", "pwt_x"),
        (b"x=1&ticket=pwt_x", "pwt_x"),
        (b"ticket=pwt_a&ticket=pwt_b", ""),  # presented twice: presented, matches nothing
    ],
)
def test_one_reading_of_the_ticket(query, ticket):
    credentials = socket_credentials({"query_string": query, "headers": []})
    assert credentials == SocketCredentials(ticket=ticket)
    assert credentials.presented is (ticket is not None)


@pytest.mark.parametrize(
    ("header", "key"),
    [
        (b"Bearer prk_x", "prk_x"),
        (b"bearer  prk_x ", "prk_x"),
        (b"Bearer ", None),
        (b"Bearer", None),
        (b"Basic abc", None),
    ],
)
def test_one_reading_of_the_key(header, key):
    credentials = socket_credentials({"headers": [(b"authorization", header)]})
    assert credentials == SocketCredentials(api_key=key)
    assert credentials.presented is (key is not None)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("query", ["ticket=", "xticket=1", "a=ticket="])
async def test_no_real_ticket_no_escape_from_the_origin_check(alice, query):
    """A page on another origin cannot open a socket as the signed-in member by adding
    something ticket-like to the URL: such a socket is a browser socket."""
    connected, _, socket = await ws_connect(alice.user, origin=BAD_ORIGIN, path=f"/ws/v1/?{query}")
    if connected:
        await socket.close()
    assert not connected
    # From the right origin the same URL is an ordinary browser socket.
    connected, _, socket = await ws_connect(alice.user, path=f"/ws/v1/?{query}")
    assert connected
    await socket.close()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "presented",
    [
        {"path": "/ws/v1/?ticket=pwt_forged"},
        {"path": "/ws/v1/?ticket=junk"},
        {"path": "/ws/v1/?ticket=pwt_a&ticket=pwt_b"},
        {"headers": [(b"authorization", b"Bearer prk_nope")]},
    ],
)
async def test_a_bad_ticket_or_key_never_falls_back_to_the_cookie(alice, presented):
    for origin in (BAD_ORIGIN, "http://testserver"):
        frame, code = await ws_refusal(alice.user, origin=origin, **presented)
        assert (frame["code"], code) == ("unauthenticated", 4401)


# --- 2. a key's rights follow its creator's membership ---------------------------------


def test_a_demoted_creators_admin_key_acts_as_a_member(client, alice):
    dana = admin_person(alice.tenant, "dana")
    _, secret = key_of(dana, ["admin", "chat"])
    assert client.get("/api/v1/keys", **bearer(secret)).status_code == 200

    set_role(dana, Role.MEMBER)
    response = client.get("/api/v1/keys", **bearer(secret))
    assert response.status_code == 403
    assert "admin role" in response.json()["detail"]
    # Member rights remain: the key still chats.
    assert client.get("/api/v1/conversations", **bearer(secret)).status_code == 200

    set_role(dana, Role.ADMIN)
    assert client.get("/api/v1/keys", **bearer(secret)).status_code == 200


def test_a_keys_role_is_the_lower_of_scope_and_creator(alice):
    from tenants.services.api_keys import api_key_authenticate

    _, admin_scoped = key_of(alice, ["admin"])  # alice is an owner
    assert api_key_authenticate(admin_scoped).role == Role.ADMIN
    _, chat_only = key_of(alice, ["chat"])
    assert api_key_authenticate(chat_only).role == Role.MEMBER


def test_the_gateways_remembered_caller_follows_a_role_change(alice):
    from gateway import services

    dana = admin_person(alice.tenant, "dana")
    _, secret = key_of(dana, ["admin", "chat"])
    services.auth_cache_clear()
    actor, _ = services.caller_cached(authorization=f"Bearer {secret}")
    assert actor.role == Role.ADMIN
    set_role(dana, Role.MEMBER)
    actor, _ = services.caller_cached(authorization=f"Bearer {secret}")
    assert actor.role == Role.MEMBER

    with operator_scope():
        Membership.objects.filter(id=dana.membership.id).delete()
    with pytest.raises(services.ApiError) as refused:
        services.caller_cached(authorization=f"Bearer {secret}")
    assert refused.value.status == 401


def test_removing_a_member_revokes_their_keys_with_an_audit_reason(client, alice):
    dana = admin_person(alice.tenant, "dana")
    first, secret = key_of(dana, ["admin"])
    second, _ = key_of(dana, ["chat"])
    own, own_secret = key_of(alice, ["admin"])
    client.force_login(alice.user)
    response = client.delete(f"/api/v1/members/{dana.membership.id}")
    assert response.status_code in (200, 204), response.content
    client.logout()

    with operator_scope():
        revoked = {k.id for k in ApiKey.objects.filter(revoked_at__isnull=False)}
        events = list(AuditEvent.objects.filter(action="api_key.revoked").order_by("id"))
    assert revoked == {first.id, second.id}
    assert sorted(e.target_id for e in events) == sorted([str(first.id), str(second.id)])
    assert all(e.data == {"reason": "member.removed"} for e in events)
    assert all(e.actor_user_id == alice.user.id for e in events)

    refused = client.get("/api/v1/tenant", **bearer(secret))
    assert refused.status_code == 401
    assert refused.json()["detail"] == "This API key was revoked."
    assert client.get("/api/v1/tenant", **bearer(own_secret)).status_code == 200
    assert own.id not in revoked


def test_leaving_revokes_the_leavers_keys(client, alice):
    dana = admin_person(alice.tenant, "dana")
    key, _ = key_of(dana, ["chat"])
    client.force_login(dana.user)
    response = client.post("/api/v1/members/leave")
    assert response.status_code in (200, 204), response.content
    with operator_scope():
        assert ApiKey.objects.get(id=key.id).revoked_at is not None
        event = AuditEvent.objects.get(action="api_key.revoked", target_id=str(key.id))
    assert event.data == {"reason": "member.left"}


@pytest.mark.parametrize("how", ["membership_gone", "account_deleted", "account_deactivated"])
def test_a_key_whose_creator_is_gone_is_refused(client, alice, how):
    """Keys made before removals revoked them, or whose creator's account was deleted
    (created_by is then NULL) or deactivated, carry nobody's rights."""
    dana = admin_person(alice.tenant, "dana")
    _, secret = key_of(dana, ["admin", "chat"])
    with operator_scope():
        if how == "membership_gone":
            Membership.objects.filter(id=dana.membership.id).delete()
        elif how == "account_deleted":
            dana.user.delete()
        else:
            type(dana.user).objects.filter(pk=dana.user.pk).update(is_active=False)
    for path in ("/api/v1/tenant", "/api/v1/conversations"):
        response = client.get(path, **bearer(secret))
        assert response.status_code == 401, (path, response.content)
        assert "no longer belongs" in response.json()["detail"]
    # The OpenAI-compatible API (gateway.asgi, outside Django's request cycle)
    # authenticates its callers here.
    with pytest.raises(ApiError) as refused:
        caller_authenticate(authorization=f"Bearer {secret}")
    assert refused.value.status == 401
    assert "no longer belongs" in refused.value.message


@pytest.mark.django_db(transaction=True)
async def test_removal_closes_the_sockets_of_the_members_keys(alice):
    dana = await sync_to_async(admin_person)(alice.tenant, "dana")
    _, secret = await sync_to_async(key_of)(dana, ["chat"])
    connected, _, socket = await ws_connect(
        origin=None, headers=[(b"authorization", f"Bearer {secret}".encode())]
    )
    assert connected

    def remove():
        from tenants.services.members import member_remove

        with tenant_scope(tenant_id=alice.tenant.id, user_id=alice.user.id):
            member_remove(actor=alice.actor, membership_id=dana.membership.id)

    await sync_to_async(remove)()
    frame = await socket.receive()
    assert frame["type"] == "error" and frame["code"] == "api_key_revoked"
    assert (await socket.communicator.receive_output(timeout=5))["type"] == "websocket.close"


# --- 3. the `chat` scope on sockets and tickets ----------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("scopes", [["documents"], ["admin"]])
async def test_a_key_without_chat_opens_no_socket(alice, scopes):
    _, secret = await sync_to_async(key_of)(alice, scopes)
    frame, code = await ws_refusal(
        origin=None, headers=[(b"authorization", f"Bearer {secret}".encode())]
    )
    assert (frame["code"], code) == ("forbidden", 4403)
    assert "'chat' scope" in frame["message"]


@pytest.mark.parametrize("scopes", [["documents"], ["admin"]])
def test_a_key_without_chat_gets_no_ticket(client, alice, scopes):
    _, secret = key_of(alice, scopes)
    response = client.post("/api/v1/ws/tickets", **bearer(secret))
    assert response.status_code == 403
    assert "'chat' scope" in response.json()["detail"]


@pytest.mark.django_db(transaction=True)
async def test_a_ticket_is_checked_against_the_key_as_it_is_when_used(alice):
    dana = await sync_to_async(admin_person)(alice.tenant, "dana")
    _, secret = await sync_to_async(key_of)(dana, ["chat"])
    client = Client()
    response = await sync_to_async(client.post)("/api/v1/ws/tickets", **bearer(secret))
    assert response.status_code == 201
    ticket_url = response.json()["url"]

    def membership_gone():  # as a removal made before removals revoked keys left it
        with operator_scope():
            Membership.objects.filter(id=dana.membership.id).delete()

    await sync_to_async(membership_gone)()
    frame, code = await ws_refusal(origin=BAD_ORIGIN, path=ticket_url)
    assert (frame["code"], code) == ("unauthenticated", 4401)
    assert "no longer belongs" in frame["message"]


# --- 4 and 5. one login throttle: every spelling, every form ---------------------------

IP = "198.51.100.77"


@pytest.fixture
def clean_counts():
    def reset():
        for name in ("alice", "dana"):
            login_throttle_reset(username=name)
        for ip in (IP, "127.0.0.1"):
            login_throttle_reset(ip=ip)

    reset()
    yield
    reset()


@pytest.mark.parametrize(
    "typed",
    [
        " alice",
        "alice ",
        "\talice",
        "alice\u00a0",
        "\u2003alice\n",
        "\uff21\uff2c\uff29\uff23\uff25",
    ],
)
def test_username_normalisation(typed):
    assert username_normalize(typed).casefold() == "alice"


def _product_login(client, username, password):
    return client.post(
        "/accounts/login/", {"username": username, "password": password}, REMOTE_ADDR=IP
    )


def _admin_login(client, username, password):
    return client.post(
        "/admin/login/?next=/admin/",
        {"username": username, "password": password},
        REMOTE_ADDR=IP,
    )


def test_spellings_of_one_username_share_one_lock(client, alice, clean_counts):
    for typed in (" alice", "alice ", "\talice", "alice\u00a0", "ALICE"):
        assert _product_login(client, typed, "wrong-password").status_code == 200
    response = _product_login(client, "alice", PASSWORD)
    assert response.status_code == 429
    assert "_auth_user_id" not in client.session


def test_the_normalised_username_signs_in(client, alice, clean_counts):
    response = _product_login(client, " alice\u00a0", PASSWORD)
    assert response.status_code == 302
    assert "_auth_user_id" in client.session


@pytest.fixture
def staff_alice(alice):
    with operator_scope():
        type(alice.user).objects.filter(pk=alice.user.pk).update(is_staff=True, is_superuser=True)
    alice.user.refresh_from_db()
    return alice


def test_the_admin_login_works_and_is_throttled_like_the_product_login(
    client, staff_alice, clean_counts
):
    response = _admin_login(client, "alice", PASSWORD)
    assert response.status_code == 302, response.content
    assert "_auth_user_id" in client.session
    client.logout()

    for _ in range(5):
        _product_login(client, "alice", "wrong-password")
    response = _admin_login(client, "alice", PASSWORD)
    assert response.status_code == 200
    assert "_auth_user_id" not in client.session
    assert "Too many failed sign-in attempts for this account" in response.content.decode()


def test_failures_on_the_admin_login_count(client, staff_alice, clean_counts, monkeypatch):
    from django.contrib.auth.backends import ModelBackend

    for typed in ("alice", " alice", "Alice", "alice\u00a0", "alice"):
        assert _admin_login(client, typed, "wrong-password").status_code == 200
    checked = []
    original = ModelBackend.authenticate

    def spy(self, request, username=None, password=None, **kwargs):
        checked.append(username)
        return original(self, request, username=username, password=password, **kwargs)

    monkeypatch.setattr(ModelBackend, "authenticate", spy)
    assert _product_login(client, "alice", PASSWORD).status_code == 429
    assert _admin_login(client, "alice", PASSWORD).status_code == 200
    assert checked == []  # locked: the password was never checked
    assert "_auth_user_id" not in client.session


# --- 6. operator routes, handshake codes, plugin destinations, access logs -------------


OPERATOR_ROUTES = [
    ("get", "/api/v1/operator/tenants"),
    ("get", "/api/v1/operator/pool/backends"),
    ("get", "/api/v1/operator/plugins"),
    ("post", "/api/v1/operator/tenants/{tenant}/suspend"),
    ("post", "/api/v1/operator/tenants/{tenant}/resume"),
]


@pytest.mark.parametrize(("method", "path"), OPERATOR_ROUTES)
def test_operator_routes_answer_404_to_keys_and_members(alice, method, path):
    path = path.format(tenant=alice.tenant.id)
    body = {"data": json.dumps({"reason": "x"}), "content_type": "application/json"}
    body = body if method == "post" else {}
    for scopes in (["admin"], ["chat", "documents", "admin"]):
        _, secret = key_of(alice, scopes)
        client = Client(enforce_csrf_checks=True)
        response = getattr(client, method)(path, **body, **bearer(secret))
        assert response.status_code == 404, (scopes, response.content)
    member = Client(enforce_csrf_checks=True)
    member.force_login(alice.user)
    assert getattr(member, method)(path, **body).status_code == 404
    with operator_scope():
        assert not AuditEvent.objects.filter(action__startswith="tenant.").exists()


def test_operators_keep_their_routes_and_the_csrf_check(alice):
    operator = UserFactory(username="olga", is_operator=True)
    client = Client(enforce_csrf_checks=True)
    client.force_login(operator)
    assert client.get("/api/v1/operator/tenants").status_code == 200
    path = f"/api/v1/operator/tenants/{alice.tenant.id}/suspend"
    refused = client.post(path, json.dumps({"reason": "x"}), content_type="application/json")
    assert refused.status_code == 403  # a session write without the CSRF token
    assert Client().get("/api/v1/operator/tenants").status_code == 401


@pytest.mark.django_db(transaction=True)
async def test_a_refused_handshake_says_why_with_its_close_code(alice):
    frame, code = await ws_refusal()
    assert (frame["code"], code) == ("unauthenticated", 4401)
    frame, code = await ws_refusal(
        origin=None, headers=[(b"authorization", b"Bearer prk_000000000000_" + b"x" * 43)]
    )
    assert (frame["code"], code) == ("unauthenticated", 4401)
    assert frame["message"] == "Invalid API key."
    # A foreign origin without a key or ticket stays an HTTP 403, before the handshake.
    connected, _, _ = await ws_connect(alice.user, origin=BAD_ORIGIN)
    assert not connected


DESTINATION_PLUGIN = """
from agents.hookspecs import hookimpl
from agents.manifest import PluginManifest

@hookimpl
def parley_manifest():
    return PluginManifest(
        name="webhook", version="1", description="Posts to a service.",
        settings_schema={
            "type": "object", "additionalProperties": False,
            "properties": {
                "url": {"type": "string", "format": "uri"},
                "token": {"type": "string", "writeOnly": True},
                "retries": {"type": "integer"},
            },
        },
    )
"""


def test_a_stored_secret_never_follows_a_changed_destination(client, alice, tmp_path, monkeypatch):
    from agents.models import TenantPlugin
    from tests.conftest import plugin_install

    plugin_install(tmp_path, monkeypatch, name="webhook", source=DESTINATION_PLUGIN)
    client.force_login(alice.user)
    url = "/api/v1/plugins/webhook"

    def put(settings):
        return client.put(url, json.dumps({"settings": settings}), content_type="application/json")

    first = {"url": "https://hooks.example.org/a", "token": "s3cret-token", "retries": 1}
    assert put(first).status_code == 200
    # Other settings change freely; the secret is kept.
    assert put({"url": "https://hooks.example.org/a", "retries": 2}).status_code == 200
    # A new destination with the stored secret: refused, nothing changes.
    for kept in ({}, {"token": True}):
        refused = put({"url": "https://attacker.example.net/", "retries": 2, **kept})
        assert refused.status_code == 400
        detail = refused.json()["detail"]
        assert "url" in detail and "token" in detail and "again" in detail
        assert "s3cret-token" not in detail
    with operator_scope():
        row = TenantPlugin.objects.get(tenant=alice.tenant, plugin="webhook")
    assert row.settings["url"] == "https://hooks.example.org/a"
    # With the secret typed again (or cleared), the destination may change.
    moved = put({"url": "https://new.example.org/", "token": "another-token", "retries": 2})
    assert moved.status_code == 200, moved.content
    assert put({"url": "https://third.example.org/", "token": None}).status_code == 200


def test_tickets_stay_out_of_the_servers_logs(monkeypatch):
    """The `serve` command's uvicorn configures its loggers; the filter of LOGGING
    stays on them and redacts tickets from the websocket and the access lines."""
    import uvicorn

    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    def run(app, **options):
        uvicorn.Config(app, **options)  # what uvicorn.run does first: sets up logging
        ticket = TICKET_PREFIX + "Zm9vYmFy-_x"
        for name, args in (
            ("uvicorn.error", ("127.0.0.1:5", f"/ws/v1/?ticket={ticket}")),
            ("uvicorn.access", ("127.0.0.1:5", f"/ws/v1/?x=1&ticket={ticket}&y=2")),
        ):
            logger = logging.getLogger(name)
            handler = Keep()
            logger.addHandler(handler)
            try:
                logger.info('%s - "WebSocket %s" [accepted]', *args)
            finally:
                logger.removeHandler(handler)

    monkeypatch.setattr(uvicorn, "run", run)
    monkeypatch.setattr(signal, "signal", lambda *args: None)
    call_command("serve", "--backend", "http://127.0.0.1:9")
    assert len(lines) == 2
    assert all("Zm9vYmFy" not in line for line in lines), lines
    assert "/ws/v1/?ticket=[redacted]" in lines[0]
    assert "ticket=[redacted]&y=2" in lines[1]
