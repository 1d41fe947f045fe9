"""A tenant's life: rename, suspend (everything refused, runs cancelled, sockets
closed), resume, export, delete; and the audit log that records it."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta

import pytest
from django.utils import timezone

from chat.eventlog import event_log, run_log_key
from chat.models import Conversation, Run
from tenants.models import ApiKey, AuditEvent, Membership, Tenant
from tenants.rls import operator_scope
from tests.conftest import as_operator, ws_connect
from tests.factories import ConversationFactory, MessageFactory, RunFactory, UserFactory
from tests.ws_handshake import ws_refusal

pytestmark = pytest.mark.django_db


@pytest.fixture
def operator(db):
    return UserFactory(username="olga", is_operator=True)


def suspend(client, operator, tenant, reason="Unpaid invoices"):
    client.force_login(operator)
    return client.post(
        f"/api/v1/operator/tenants/{tenant.id}/suspend",
        {"reason": reason},
        content_type="application/json",
    )


def with_conversation(person, text="Quarterly numbers"):
    conversation = ConversationFactory(tenant=person.tenant, user=person.user, title=text)
    run = RunFactory(user_message=MessageFactory(conversation=conversation, content=f"{text}?"))
    return conversation, run


# --- rename ---------------------------------------------------------------------------


def test_admins_rename_members_cannot(client, alice, bob):
    client.force_login(bob.user)
    response = client.patch("/api/v1/tenant", {"name": "Bob Corp"}, content_type="application/json")
    assert response.status_code == 403
    client.force_login(alice.user)
    assert (
        client.patch("/api/v1/tenant", {"name": " "}, content_type="application/json").status_code
        == 400
    )
    response = client.patch("/api/v1/tenant", {"name": "Acme"}, content_type="application/json")
    assert response.status_code == 200 and response.json()["name"] == "Acme"
    with operator_scope():
        event = AuditEvent.objects.get(action="tenant.renamed")
    assert event.actor_label == "alice" and event.data["to"] == "Acme"


# --- suspension -----------------------------------------------------------------------


def test_only_operators_suspend_and_others_see_no_such_route(client, alice, charlie, operator):
    assert suspend(client, alice.user, charlie.tenant).status_code == 404
    assert suspend(client, alice.user, alice.tenant).status_code == 404
    with operator_scope():
        assert Tenant.objects.get(id=charlie.tenant.id).state == Tenant.State.ACTIVE
    response = suspend(client, operator, charlie.tenant, reason="")
    assert response.status_code == 400 and "reason" in response.json()["detail"]


def test_suspension_refuses_members_keys_and_new_sockets(
    client, alice, operator, django_capture_on_commit_callbacks
):
    from tenants.rls import tenant_scope
    from tenants.services.api_keys import api_key_create

    with tenant_scope(tenant_id=alice.tenant.id):
        _, secret = api_key_create(actor=alice.actor, name="ci", scopes=["admin"])
    _, queued = with_conversation(alice)
    with django_capture_on_commit_callbacks(execute=True):
        assert suspend(client, operator, alice.tenant).status_code == 200

    client.force_login(alice.user)
    page = client.get("/")
    assert page.status_code == 403
    assert "suspended" in page.content.decode() and "Unpaid invoices" in page.content.decode()
    api = client.get("/api/v1/tenant")
    assert api.status_code == 403 and "suspended" in api.json()["detail"]
    client.logout()
    keyed = client.get("/api/v1/tenant", HTTP_AUTHORIZATION=f"Bearer {secret}")
    assert keyed.status_code == 401 and "suspended" in keyed.json()["detail"]

    with operator_scope():
        queued.refresh_from_db()
    assert queued.state == Run.State.CANCELLED
    assert "Unpaid invoices" in queued.error_message
    log = event_log().read_sync(run_log_key(tenant_id=alice.tenant.id, run_id=queued.id))
    assert [e["type"] for _, e in log] == ["run.error"]
    with operator_scope():
        assert AuditEvent.objects.filter(action="tenant.suspended", tenant=alice.tenant).exists()


@pytest.mark.django_db(transaction=True)
async def test_suspension_refuses_new_sockets(alice, operator):
    from channels.db import database_sync_to_async

    from tenants.services.tenants import tenant_suspend

    await database_sync_to_async(tenant_suspend)(
        operator=operator, tenant_id=alice.tenant.id, reason="Audit"
    )
    frame, code = await ws_refusal(alice.user)
    assert (frame["code"], code) == ("forbidden", 4403)
    assert "suspended" in frame["message"]


@pytest.mark.django_db(transaction=True)
async def test_suspension_closes_open_sockets_and_cancels_running_runs(
    alice, operator, settings, synthetic_server, worker
):
    from channels.db import database_sync_to_async

    from inference import pool
    from tenants.services.tenants import tenant_suspend

    server = synthetic_server(tokens=400, delay_s=0.02)
    settings.PARLEY_BACKENDS = [server.url]
    pool.forget_cache()
    connected, _, socket = await ws_connect(alice.user)
    assert connected
    await socket.send({"type": "chat.send", "content": "Talk for a long time."})
    started = await socket.receive()
    frames = [await socket.receive() for _ in range(5)]
    assert all(f["type"] == "token" for f in frames)

    await database_sync_to_async(tenant_suspend)(
        operator=operator, tenant_id=alice.tenant.id, reason="Security review"
    )
    frames = await socket.receive_until(("error",), timeout=10)
    assert frames[-1]["code"] == "tenant_suspended"
    assert "Security review" in frames[-1]["message"]

    key = run_log_key(tenant_id=alice.tenant.id, run_id=started["run_id"])
    logged = []
    for _ in range(100):  # the worker notices at its next heartbeat and ends the log
        logged = event_log().read_sync(key)
        if logged and logged[-1][1]["type"] != "token":
            break
        await asyncio.sleep(0.1)
    run = await as_operator(
        lambda: Run.objects.select_related("assistant_message").get(id=started["run_id"])
    )
    assert run.state == Run.State.CANCELLED
    assert run.error_code == "cancelled"
    assert logged[-1][1]["type"] == "run.error" and logged[-1][1]["code"] == "cancelled"
    partial = "".join(e["delta"] for _, e in logged if e["type"] == "token")
    assert partial and run.assistant_message.content == partial
    assert len(partial) < len("".join(server.pieces))  # it stopped early


def test_resume_lets_everyone_back(client, alice, operator):
    suspend(client, operator, alice.tenant)
    response = client.post(f"/api/v1/operator/tenants/{alice.tenant.id}/resume")
    assert response.status_code == 200 and response.json()["state"] == "active"
    client.force_login(alice.user)
    assert client.get("/").status_code == 200


# --- export ---------------------------------------------------------------------------


def test_owner_exports_everything_without_secrets(client, alice, bob, charlie):
    from tenants.rls import tenant_scope
    from tenants.services.api_keys import api_key_create

    with_conversation(alice, "Alice's plans")
    with_conversation(charlie, "Charlie's secrets")
    with tenant_scope(tenant_id=alice.tenant.id):
        _, secret = api_key_create(actor=alice.actor, name="ci", scopes=["chat"])
    client.force_login(bob.user)
    assert client.get("/api/v1/tenant/export").status_code == 403
    client.force_login(alice.user)
    response = client.get("/api/v1/tenant/export")
    assert response.status_code == 200
    assert "attachment" in response["Content-Disposition"]
    text = response.content.decode()
    archive = json.loads(text)
    assert archive["tenant"]["slug"] == alice.tenant.slug
    assert {m["username"] for m in archive["members"]} == {"alice", "bob"}
    assert [c["title"] for c in archive["conversations"]] == ["Alice's plans"]
    assert archive["conversations"][0]["messages"][0]["content"] == "Alice's plans?"
    assert archive["api_keys"][0]["name"] == "ci"
    assert "Charlie" not in text
    with operator_scope():
        key_hash = ApiKey.objects.get(tenant=alice.tenant).secret_hash
        assert Tenant.objects.get(id=alice.tenant.id).last_exported_at is not None
    assert secret not in text and key_hash not in text and "password" not in text


# --- deletion -------------------------------------------------------------------------


def test_deletion_needs_the_owner_a_fresh_export_and_the_slug(client, alice, bob, charlie):
    with_conversation(alice)
    with_conversation(charlie)
    slug = alice.tenant.slug
    client.force_login(bob.user)
    assert (
        client.post(
            "/api/v1/tenant/delete", {"confirm": slug}, content_type="application/json"
        ).status_code
        == 403
    )
    client.force_login(alice.user)
    response = client.post(
        "/api/v1/tenant/delete", {"confirm": slug}, content_type="application/json"
    )
    assert response.status_code == 400 and "Export" in response.json()["detail"]
    client.get("/api/v1/tenant/export")
    with operator_scope():
        Tenant.objects.filter(id=alice.tenant.id).update(
            last_exported_at=timezone.now() - timedelta(hours=25)
        )
    response = client.post(
        "/api/v1/tenant/delete", {"confirm": slug}, content_type="application/json"
    )
    assert response.status_code == 400
    client.get("/api/v1/tenant/export")
    response = client.post(
        "/api/v1/tenant/delete", {"confirm": "wrong"}, content_type="application/json"
    )
    assert response.status_code == 400 and slug in response.json()["detail"]

    response = client.post(
        "/api/v1/tenant/delete", {"confirm": slug}, content_type="application/json"
    )
    assert response.status_code == 204
    with operator_scope():
        assert not Tenant.objects.filter(id=alice.tenant.id).exists()
        assert not Conversation.objects.filter(tenant_id=alice.tenant.id).exists()
        assert not Membership.objects.filter(tenant_id=alice.tenant.id).exists()
        assert Conversation.objects.filter(tenant=charlie.tenant).count() == 1
        deleted = AuditEvent.objects.get(action="tenant.deleted")
    assert deleted.tenant_id == alice.tenant.id and deleted.data["slug"] == slug


# --- the audit log --------------------------------------------------------------------


def test_audit_log_is_for_admins_filterable_and_tenant_scoped(client, alice, bob, charlie):
    client.force_login(alice.user)
    client.patch("/api/v1/tenant", {"name": "Acme"}, content_type="application/json")
    client.post("/api/v1/keys", {"name": "ci", "scopes": ["chat"]}, content_type="application/json")
    client.force_login(charlie.user)
    client.patch("/api/v1/tenant", {"name": "Globex"}, content_type="application/json")

    client.force_login(alice.user)
    events = client.get("/api/v1/audit").json()
    assert [e["action"] for e in events] == ["api_key.created", "tenant.renamed"]
    assert client.get("/api/v1/audit?action=api_key.").json()[0]["action"] == "api_key.created"
    assert [e["action"] for e in client.get("/api/v1/audit?action=tenant.renamed").json()] == [
        "tenant.renamed"
    ]
    assert client.get("/api/v1/audit?actor=bob").json() == []
    assert len(client.get("/api/v1/audit?limit=1").json()) == 1
    assert client.get("/api/v1/audit?limit=0").status_code == 400
    newest = events[0]["id"]
    assert [e["action"] for e in client.get(f"/api/v1/audit?before_id={newest}").json()] == [
        "tenant.renamed"
    ]

    client.force_login(bob.user)
    assert client.get("/api/v1/audit").status_code == 403
    client.force_login(charlie.user)
    assert [e["data"]["to"] for e in client.get("/api/v1/audit").json()] == ["Globex"]


def test_operators_read_any_tenants_audit_log(client, alice, operator):
    client.force_login(alice.user)
    client.patch("/api/v1/tenant", {"name": "Acme"}, content_type="application/json")
    assert client.get(f"/api/v1/operator/tenants/{alice.tenant.id}/audit").status_code == 404
    client.force_login(operator)
    events = client.get(f"/api/v1/operator/tenants/{alice.tenant.id}/audit").json()
    assert [e["action"] for e in events] == ["tenant.renamed"]


def test_audit_events_cannot_be_changed_through_the_orm(alice):
    with operator_scope():
        event = AuditEvent.objects.create(tenant=alice.tenant, action="x.y")
        event.action = "forged"
        with pytest.raises(ValueError, match="append-only"):
            event.save()
        with pytest.raises(ValueError, match="append-only"):
            event.delete()


# --- operators create tenants and set plans; limits come from the plan ---------------


def test_operators_create_tenants_and_put_them_on_plans(client, operator, alice):
    from tenants.models import Plan
    from tenants.quotas import limits_for

    body = {"name": "Initech", "owner_username": "peter", "owner_password": "tps-reports-42!"}
    client.force_login(alice.user)
    assert (
        client.post("/api/v1/operator/tenants", body, content_type="application/json").status_code
        == 404
    )
    client.force_login(operator)
    response = client.post("/api/v1/operator/tenants", body, content_type="application/json")
    assert response.status_code == 201, response.content
    tenant_id = response.json()["id"]
    duplicate = client.post("/api/v1/operator/tenants", body, content_type="application/json")
    assert duplicate.status_code == 400 and "already exists" in duplicate.json()["detail"]

    with operator_scope():
        Plan.objects.create(
            name="team",
            max_members=10,
            requests_per_minute=60,
            enabled_models=["SmolLM2-135M-Instruct"],
            fairness_weight=2.0,
        )
    missing = client.put(
        f"/api/v1/operator/tenants/{tenant_id}/plan",
        {"plan": "gold"},
        content_type="application/json",
    )
    assert missing.status_code == 400 and "gold" in missing.json()["detail"]
    assert (
        client.put(
            f"/api/v1/operator/tenants/{tenant_id}/plan",
            {"plan": "team"},
            content_type="application/json",
        ).status_code
        == 200
    )
    with operator_scope():
        tenant = Tenant.objects.get(id=tenant_id)
        limits = limits_for(tenant)
        actions = list(AuditEvent.objects.filter(tenant=tenant).values_list("action", flat=True))
    assert (limits.plan, limits.max_members, limits.requests_per_minute) == ("team", 10, 60)
    assert limits.allows_model("SmolLM2-135M-Instruct") and not limits.allows_model("gpt-4")
    assert limits.tokens_per_minute is None  # unset limits are unlimited
    assert set(actions) == {"tenant.created", "tenant.plan_changed"}


def test_a_tenant_without_a_plan_is_unlimited(alice):
    from tenants.quotas import limits_for

    limits = limits_for(alice.tenant)
    assert limits.max_members is None and limits.allows_model("anything")


# --- Redis names come from server-side ids ----------------------------------------------


@pytest.mark.django_db(transaction=True)
async def test_redis_keys_of_a_run_are_named_from_its_tenant_not_the_client(
    alice, charlie, settings, synthetic_server, worker
):
    import redis

    from inference import pool

    server = synthetic_server(tokens=3)
    settings.PARLEY_BACKENDS = [server.url]
    pool.forget_cache()
    connected, _, socket = await ws_connect(alice.user)
    assert connected
    # A client naming another tenant changes nothing: ids come from the server.
    await socket.send({"type": "chat.send", "content": "hi", "tenant_id": str(charlie.tenant.id)})
    started = await socket.receive()
    await socket.receive_until(("run.done",))
    client = redis.Redis.from_url(settings.REDIS_URL)
    keys = [k.decode() for k in client.scan_iter(f"{settings.PARLEY_REDIS_PREFIX}:t:*")]
    assert (
        f"{settings.PARLEY_REDIS_PREFIX}:t:{alice.tenant.id}:run:{started['run_id']}:events" in keys
    )
    assert not [k for k in keys if str(charlie.tenant.id) in k]
    await socket.close()
