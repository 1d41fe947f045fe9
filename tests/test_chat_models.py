"""Choosing what answers: GET /api/v1/models (the pool's models the member's tenant may
use, its default marked, and the agents it enabled), the chat page's model picker, and
a chosen model on `chat.send` reaching the run, or refused with `model_not_found`."""

from __future__ import annotations

import re
import uuid

import pytest
from asgiref.sync import sync_to_async
from django.urls import reverse

from agents.services import plugin_update
from chat.models import Conversation, Run
from inference import pool
from tenants.models import Plan, Tenant
from tenants.rls import operator_scope, tenant_scope
from tests.conftest import as_operator, chat_page_data, ws_connect

API = "/api/v1"
LARGE, SMALL = "m-large", "m-small"  # (listed by name: large first)
CALCULATOR = {
    "id": "calculator.calculator",
    "title": "Calculator",
    "description": "Answers questions that need exact numbers, units or dates.",
}


@pytest.fixture
def two_models(synthetic_server, settings):
    """Two scripted backends, each serving one model, as the pool; the small one is
    the platform's default."""
    small = synthetic_server(model=SMALL, max_model_len=2048, pieces=["small "])
    large = synthetic_server(model=LARGE, max_model_len=8192, pieces=["large "])
    settings.PARLEY_BACKENDS = [small.url, large.url]
    settings.PARLEY_DEFAULT_MODEL = SMALL
    pool.forget_cache()
    yield small, large
    pool.forget_cache()


def key_for(person, scopes) -> str:
    from tenants.services.api_keys import api_key_create

    with tenant_scope(tenant_id=person.tenant.id):
        _, secret = api_key_create(
            actor=person.actor, name=f"k-{uuid.uuid4().hex[:6]}", scopes=list(scopes)
        )
    return secret


def on_plan(person, **limits) -> None:
    with operator_scope():
        plan = Plan.objects.create(name=f"plan-{person.tenant.slug}", **limits)
        Tenant.objects.filter(id=person.tenant.id).update(plan=plan)


def enable(person, plugin: str) -> None:
    with tenant_scope(tenant_id=person.tenant.id):
        plugin_update(actor=person.actor, name=plugin, enabled=True)


# --- GET /api/v1/models ---------------------------------------------------------------


@pytest.mark.django_db
def test_a_member_sees_the_pools_models_with_the_default_marked(client, bob, two_models):
    client.force_login(bob.user)
    response = client.get(f"{API}/models")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["default_model"] == SMALL
    assert body["models"] == [
        {"id": LARGE, "context_length": 8192, "default": False},
        {"id": SMALL, "context_length": 2048, "default": True},
    ]
    assert body["agents"] == []


@pytest.mark.django_db
def test_the_platform_default_is_preselected_and_the_plan_limits_the_list(
    client, alice, two_models, settings
):
    settings.PARLEY_DEFAULT_MODEL = LARGE
    client.force_login(alice.user)
    body = client.get(f"{API}/models").json()
    assert [(m["id"], m["default"]) for m in body["models"]] == [(LARGE, True), (SMALL, False)]
    assert body["default_model"] == LARGE

    # No platform default: the pool's first model, one of them.
    settings.PARLEY_DEFAULT_MODEL = ""
    body = client.get(f"{API}/models").json()
    assert body["default_model"] in (SMALL, LARGE)
    assert [m["id"] for m in body["models"] if m["default"]] == [body["default_model"]]

    # A plan that allows only the large model, with the small one the platform's
    # default: the small one is not offered, and the large one is the tenant's default.
    settings.PARLEY_DEFAULT_MODEL = SMALL
    on_plan(alice, enabled_models=[LARGE])
    body = client.get(f"{API}/models").json()
    assert body["models"] == [{"id": LARGE, "context_length": 8192, "default": True}]
    assert body["default_model"] == LARGE


@pytest.mark.django_db
def test_agents_are_those_of_the_members_tenant_never_anothers(
    client, alice, bob, charlie, all_plugins, two_models
):
    enable(charlie, "calculator")
    client.force_login(bob.user)
    assert client.get(f"{API}/models").json()["agents"] == []
    client.force_login(charlie.user)
    assert client.get(f"{API}/models").json()["agents"] == [CALCULATOR]

    enable(alice, "calculator")
    client.force_login(bob.user)
    assert client.get(f"{API}/models").json()["agents"] == [CALCULATOR]


@pytest.mark.django_db
def test_anonymous_callers_are_refused_and_keys_need_the_chat_scope(client, alice, two_models):
    response = client.get(f"{API}/models")
    assert response.status_code == 401
    assert response.json() == {"detail": "Authentication required."}

    chat = key_for(alice, ["chat"])
    response = client.get(f"{API}/models", HTTP_AUTHORIZATION=f"Bearer {chat}")
    assert response.status_code == 200
    assert [m["id"] for m in response.json()["models"]] == [LARGE, SMALL]

    admin = key_for(alice, ["admin"])
    response = client.get(f"{API}/models", HTTP_AUTHORIZATION=f"Bearer {admin}")
    assert response.status_code == 403
    assert "'chat' scope" in response.json()["detail"]


@pytest.mark.django_db
def test_the_rest_api_refuses_a_model_the_tenant_may_not_use(client, alice, two_models):
    client.force_login(alice.user)
    response = client.post(
        f"{API}/conversations",
        {"content": "hello", "model": "no-such-model"},
        content_type="application/json",
    )
    assert response.status_code == 400
    assert response.json() == {
        "detail": f"The model 'no-such-model' is not one you may use; "
        f"choose one of: {LARGE}, {SMALL}."
    }
    with operator_scope():
        assert not Conversation.objects.exists()


# --- the chat page's picker -------------------------------------------------------------


def _model_select(response) -> str:
    match = re.search(r'<select id="model".*?</select>', response.content.decode(), re.S)
    assert match, "the composer has no model choice"
    return match.group(0)


@pytest.mark.django_db
def test_the_page_preselects_the_default_then_the_conversations_model(client, alice, two_models):
    client.force_login(alice.user)
    home = client.get(reverse("chat:home"))
    data = chat_page_data(home)
    assert (data["default_model"], data["model"]) == (SMALL, SMALL)
    choice = _model_select(home)
    assert re.search(rf'<option value="{SMALL}" selected>{SMALL} \(default\)</option>', choice)
    assert re.search(rf'<option value="{LARGE}">{LARGE}</option>', choice)
    assert re.search(r'<label class="model-choice">\s*<span>Model</span>', home.content.decode())

    # A conversation that chose the large model shows it; one whose model left the pool
    # shows the default.
    for stored, shown in ((LARGE, LARGE), ("gone-model", SMALL)):
        with tenant_scope(tenant_id=alice.tenant.id):
            conversation = Conversation.objects.create(
                tenant=alice.tenant, user=alice.user, title="c", model=stored
            )
        page = client.get(reverse("chat:conversation", args=[conversation.id]))
        assert chat_page_data(page)["model"] == shown
        assert chat_page_data(page)["conversation"]["model"] == stored
        assert re.search(rf'<option value="{shown}" selected>', _model_select(page))


@pytest.mark.django_db
def test_without_models_the_picker_is_hidden(client, alice, settings):
    settings.PARLEY_BACKENDS = []
    pool.forget_cache()
    client.force_login(alice.user)
    home = client.get(reverse("chat:home"))
    assert chat_page_data(home)["models"] == []
    assert '<label class="model-choice" hidden>' in home.content.decode()


# --- chat.send over the websocket ----------------------------------------------------------


def asked(server, content: str) -> list[str]:
    """The models of the requests `server` got that answered `content` (a title is
    asked for too, after a conversation's first answer)."""
    return [b["model"] for b in server.bodies if b["messages"][-1]["content"] == content]


async def _turn(socket, **frame):
    await socket.send({"type": "chat.send", **frame})
    started = await socket.receive(timeout=15)
    assert started["type"] == "run.started", started
    frames = await socket.receive_until(("run.done", "run.error"), timeout=60)
    return started, [f for f in frames if f.get("run_id") == started["run_id"]]


@pytest.mark.django_db(transaction=True)
async def test_the_chosen_model_answers_and_the_conversation_keeps_it(alice, worker, two_models):
    small, large = two_models
    connected, _, socket = await ws_connect(alice.user)
    assert connected
    started, frames = await _turn(socket, content="hello", model=LARGE, client_id="m-1")
    assert frames[-1]["type"] == "run.done", frames
    assert asked(large, "hello") == [LARGE]
    assert small.bodies == []
    run = await as_operator(lambda: Run.objects.get(id=started["run_id"]))
    conversation = await as_operator(lambda: Conversation.objects.get(id=run.conversation_id))
    assert (run.model, conversation.model) == (LARGE, LARGE)

    # A later send that names no model is answered by the conversation's.
    _, frames = await _turn(socket, content="again", conversation_id=str(conversation.id))
    assert frames[-1]["type"] == "run.done", frames
    assert asked(large, "again") == [LARGE] and small.bodies == []

    # Choosing the other model moves the conversation to it.
    _, frames = await _turn(
        socket, content="small now", conversation_id=str(conversation.id), model=SMALL
    )
    assert frames[-1]["type"] == "run.done", frames
    assert asked(small, "small now") == [SMALL] and asked(large, "small now") == []
    await sync_refresh(conversation)
    assert conversation.model == SMALL
    await socket.close()


async def sync_refresh(row) -> None:
    await as_operator(row.refresh_from_db)


@pytest.mark.django_db(transaction=True)
async def test_a_model_not_in_the_pool_gets_an_error_frame_and_the_socket_goes_on(
    alice, worker, two_models
):
    small, large = two_models
    connected, _, socket = await ws_connect(alice.user)
    assert connected
    await socket.send(
        {"type": "chat.send", "content": "hello", "model": "no-such-model", "client_id": "bad"}
    )
    error = await socket.receive(timeout=15)
    assert error == {
        "type": "error",
        "code": "model_not_found",
        "message": f"The model 'no-such-model' is not one you may use; "
        f"choose one of: {LARGE}, {SMALL}.",
        "client_id": "bad",
    }
    # Nothing was stored, and no backend was asked.
    assert await as_operator(lambda: Conversation.objects.count()) == 0
    assert small.request_count == large.request_count == 0

    # A model the plan leaves out is refused the same way.
    await sync_to_async(on_plan)(alice, enabled_models=[SMALL])
    await socket.send({"type": "chat.send", "content": "hello", "model": LARGE})
    error = await socket.receive(timeout=15)
    assert error["code"] == "model_not_found" and f"choose one of: {SMALL}." in error["message"]

    # The same socket still answers.
    _, frames = await _turn(socket, content="hello", model=SMALL)
    assert frames[-1]["type"] == "run.done", frames
    assert asked(small, "hello") == [SMALL] and asked(large, "hello") == []
    await socket.close()
