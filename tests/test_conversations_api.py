"""The chat REST API: conversations (paging, search, rename, delete, export, the
message tree and its branches), sending, editing, regenerating, runs and their
events (JSON and Server-Sent Events), automatic titles, and outsiders."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.test import AsyncClient
from django.urls import reverse
from django.utils import timezone

from chat.eventlog import event_log, run_log_key
from chat.models import Conversation, Message, Run
from chat.selectors import message_search
from chat.services.conversations import conversation_rename
from chat.titles import conversation_title_generate, title_after_run, title_clean, title_fits
from inference import pool
from inference.models import UsageRecord
from tenants.models import ApiKey
from tenants.rls import in_tenant, operator_scope, tenant_scope
from tests.conftest import as_operator, chat_page_data, ws_connect
from tests.factories import ConversationFactory, MessageFactory, RunFactory, tool_step

pytestmark = pytest.mark.django_db

API = "/api/v1"


# --- building conversations -------------------------------------------------------


def conversation(person, title="A chat", *, updated_at=None, **fields) -> Conversation:
    c = ConversationFactory(tenant=person.tenant, user=person.user, title=title, **fields)
    with operator_scope():
        if updated_at is not None:
            Conversation.objects.filter(pk=c.pk).update(updated_at=updated_at)
            c.refresh_from_db()
    return c


def message(c: Conversation, role: str, content: str, parent=None, **fields) -> Message:
    m = MessageFactory(conversation=c, parent=parent, role=role, content=content)
    with operator_scope():
        if fields:
            Message.objects.filter(pk=m.pk).update(**fields)
            m.refresh_from_db()
    return m


def leaf(c: Conversation, m: Message | None) -> None:
    with operator_scope():
        Conversation.objects.filter(pk=c.pk).update(current_leaf=m)


def run_for(c: Conversation, question: Message, answer=None, **fields) -> Run:
    return RunFactory(conversation=c, user_message=question, assistant_message=answer, **fields)


def branched(person) -> dict[str, Any]:
    """q1 -> a1 -> q2 -> a2, and a regenerated answer a1b to q1 (a sibling of a1),
    and an edit q1b of q1 (a second root). The current leaf is a1b."""
    c = conversation(person, "Branches")
    base = timezone.now() - timedelta(minutes=10)
    q1 = message(c, "user", "What is a tree?", created_at=base)
    a1 = message(c, "assistant", "A plant.", q1, created_at=base + timedelta(seconds=1))
    q2 = message(c, "user", "And a forest?", a1, created_at=base + timedelta(seconds=2))
    a2 = message(c, "assistant", "Many trees.", q2, created_at=base + timedelta(seconds=3))
    a1b = message(c, "assistant", "A graph.", q1, created_at=base + timedelta(seconds=4))
    q1b = message(c, "user", "What is a trie?", created_at=base + timedelta(seconds=5))
    leaf(c, a1b)
    return {"c": c, "q1": q1, "a1": a1, "q2": q2, "a2": a2, "a1b": a1b, "q1b": q1b}


def login(client, person):
    client.force_login(person.user)
    return client


def key_for(person, scopes=("chat",), created_by=True) -> str:
    from tenants.services.api_keys import api_key_create

    with tenant_scope(tenant_id=person.tenant.id):
        name = f"int-{uuid.uuid4().hex[:6]}"
        key, secret = api_key_create(actor=person.actor, name=name, scopes=list(scopes))
        if not created_by:
            ApiKey.objects.filter(pk=key.pk).update(created_by=None)
    return secret


# --- the schema -----------------------------------------------------------------------


def test_openapi_schema_is_served_with_the_chat_paths(client):
    schema = client.get(f"{API}/openapi.json").json()
    for path, methods in {
        "/api/v1/conversations": {"get", "post"},
        "/api/v1/conversations/search": {"get"},
        "/api/v1/conversations/{conversation_id}": {"get", "patch", "delete"},
        "/api/v1/conversations/{conversation_id}/messages": {"get", "post"},
        "/api/v1/conversations/{conversation_id}/branch": {"put"},
        "/api/v1/conversations/{conversation_id}/runs": {"get"},
        "/api/v1/conversations/{conversation_id}/export": {"get"},
        "/api/v1/messages/{message_id}/edit": {"post"},
        "/api/v1/messages/{message_id}/regenerate": {"post"},
        "/api/v1/runs/{run_id}": {"get"},
        "/api/v1/runs/{run_id}/cancel": {"post"},
        "/api/v1/runs/{run_id}/events": {"get"},
    }.items():
        assert path in schema["paths"], path
        assert methods <= set(schema["paths"][path]), (path, schema["paths"][path].keys())
    events = schema["paths"]["/api/v1/runs/{run_id}/events"]["get"]["responses"]["200"]
    assert "text/event-stream" in events["content"]
    assert "RunEventsOut" in schema["components"]["schemas"]


# --- listing and paging ----------------------------------------------------------------


def test_conversations_page_by_cursor_newest_first(client, alice, bob, charlie):
    now = timezone.now()
    mine = [
        conversation(alice, f"Mine {i}", updated_at=now - timedelta(minutes=i)) for i in range(7)
    ]
    # Two with the same updated_at: the id breaks the tie, neither is lost.
    twins = [
        conversation(alice, f"Twin {i}", updated_at=now - timedelta(hours=1)) for i in range(2)
    ]
    conversation(bob, "Bob's")
    conversation(charlie, "Charlie's")
    login(client, alice)

    seen, cursor, pages = [], None, 0
    while True:
        url = f"{API}/conversations?limit=3" + (f"&cursor={cursor}" if cursor else "")
        body = client.get(url).json()
        assert len(body["items"]) <= 3
        seen += [item["id"] for item in body["items"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert seen == [str(c.id) for c in mine] + sorted((str(t.id) for t in twins), reverse=True)

    first = client.get(f"{API}/conversations").json()
    assert first["next_cursor"] is None and len(first["items"]) == 9
    assert {"Bob's", "Charlie's"}.isdisjoint(item["title"] for item in first["items"])


@pytest.mark.parametrize(
    ("query", "detail"),
    [
        ("limit=0", "limit must be between 1 and 100"),
        ("limit=101", "limit must be between 1 and 100"),
        ("cursor=not-a-cursor", "Bad cursor"),
        ("cursor=WyJ4IiwgInkiXQ", "Bad cursor"),  # ["x", "y"]
    ],
)
def test_bad_paging_gets_a_clear_400(client, alice, query, detail):
    response = login(client, alice).get(f"{API}/conversations?{query}")
    assert response.status_code == 400
    assert detail in response.json()["detail"]


# --- search -------------------------------------------------------------------------


def test_search_ranks_scopes_and_highlights(client, alice, bob, charlie):
    budget = conversation(alice, "Travel")
    message(budget, "user", "Plan the quarterly budget for the Zanzibar office retreat.")
    titled = conversation(alice, "Zanzibar budget")  # matches by title and message
    message(titled, "user", "Our Zanzibar budget is tight; cut the Zanzibar budget.")
    other = conversation(alice, "Recipes")
    message(other, "user", "How long do I boil an egg?")
    message(conversation(bob, "Bob's"), "user", "Bob's Zanzibar budget secrets")
    message(conversation(charlie, "Charlie's"), "user", "Charlie's Zanzibar budget secrets")
    login(client, alice)

    hits = client.get(f"{API}/conversations/search?q=zanzibar budget").json()["items"]
    assert [h["conversation"]["id"] for h in hits] == [str(titled.id), str(budget.id)]
    assert hits[0]["rank"] > hits[1]["rank"]
    assert "**Zanzibar**" in hits[1]["snippet"] and "**budget**" in hits[1]["snippet"]
    assert hits[1]["role"] == "user" and hits[1]["message_id"]
    assert "secrets" not in json.dumps(hits)

    # Web search syntax: a phrase, an exclusion, or.
    phrase = client.get(f'{API}/conversations/search?q="quarterly budget"').json()["items"]
    assert [h["conversation"]["id"] for h in phrase] == [str(budget.id)]
    excluded = client.get(f"{API}/conversations/search?q=budget -retreat").json()["items"]
    assert [h["conversation"]["id"] for h in excluded] == [str(titled.id)]
    either = client.get(f"{API}/conversations/search?q=egg or retreat").json()["items"]
    assert {h["conversation"]["id"] for h in either} == {str(other.id), str(budget.id)}
    assert client.get(f"{API}/conversations/search?q=nothinglikethis").json()["items"] == []

    # Bob finds his own message only; Charlie his.
    login(client, bob)
    bobs = client.get(f"{API}/conversations/search?q=zanzibar").json()["items"]
    assert [h["conversation"]["title"] for h in bobs] == ["Bob's"]
    login(client, charlie)
    charlies = client.get(f"{API}/conversations/search?q=zanzibar").json()["items"]
    assert [h["conversation"]["title"] for h in charlies] == ["Charlie's"]


def test_search_finds_titles_without_a_matching_message(client, alice):
    c = conversation(alice, "Kilimanjaro trip")
    message(c, "user", "Which boots should I pack?")
    hits = login(client, alice).get(f"{API}/conversations/search?q=kilimanjaro").json()["items"]
    assert len(hits) == 1
    assert hits[0]["conversation"]["id"] == str(c.id)
    assert hits[0]["message_id"] is None and hits[0]["snippet"] == ""


@pytest.mark.parametrize(
    ("query", "detail"),
    [("q=", "Give a search query"), ("q=" + "x" * 501, "over 500"), ("q=a&limit=51", "limit")],
)
def test_bad_searches_get_a_clear_400(client, alice, query, detail):
    response = login(client, alice).get(f"{API}/conversations/search?{query}")
    assert response.status_code == 400
    assert detail in response.json()["detail"]


def _llama_notes(person) -> None:
    c = conversation(person)
    for i in range(30):
        message(c, "user", f"note {i} about llamas and alpacas")


def test_message_search_finds_the_members_own_best_message_per_conversation(alice, bob):
    """parley_message_search (which uses the full-text index under row level security:
    tests/test_search_rls.py) applies the tenant and the member itself."""
    _llama_notes(alice)
    _llama_notes(bob)
    with tenant_scope(tenant_id=alice.tenant.id):
        hits = message_search(actor=alice.actor, query="llamas")
    # One conversation, its best message (all rank alike: the newest).
    assert len(hits) == 1
    with operator_scope():
        newest = Message.objects.filter(conversation_id=hits[0][0]).latest("created_at")
        assert Conversation.objects.get(id=hits[0][0]).user == alice.user
    assert hits[0][1] == newest.id and hits[0][2] > 0
    # No tenant in scope: nothing, whoever asks.
    assert message_search(actor=alice.actor, query="llamas") == []


# --- one conversation ------------------------------------------------------------------


def test_get_rename_and_automatic_titles_keep_a_chosen_title(
    client, alice, synthetic_server, settings
):
    c = conversation(alice, "First line title")
    q = message(c, "user", "First line title")
    message(c, "assistant", "Sure.", q)
    login(client, alice)
    assert client.get(f"{API}/conversations/{c.id}").json()["title"] == "First line title"

    response = client.patch(
        f"{API}/conversations/{c.id}", {"title": "  My   name  "}, content_type="application/json"
    )
    assert response.status_code == 200, response.content
    assert response.json()["title"] == "My name"
    assert response.json()["title_auto"] is False
    # A rename is not activity: the conversation keeps its place in the list.
    with operator_scope():
        assert Conversation.objects.get(pk=c.pk).updated_at == c.updated_at

    server = synthetic_server(pieces=["Robot ", "title"])
    settings.PARLEY_BACKENDS = [server.url]
    pool.forget_cache()
    conversation_title_generate(conversation_id=c.id, tenant_id=alice.tenant.id)
    assert server.request_count == 0  # not even asked
    with operator_scope():
        assert Conversation.objects.get(pk=c.pk).title == "My name"


@pytest.mark.parametrize(("title", "detail"), [("   ", "empty"), ("x" * 201, "limit is 200")])
def test_bad_titles_get_a_clear_400(client, alice, title, detail):
    c = conversation(alice, "Keep")
    response = login(client, alice).patch(
        f"{API}/conversations/{c.id}", {"title": title}, content_type="application/json"
    )
    assert response.status_code == 400 and detail in response.json()["detail"]
    with operator_scope():
        assert Conversation.objects.get(pk=c.pk).title == "Keep"


def test_delete_removes_messages_and_runs_and_cancels_live_runs(client, alice, bob):
    c = conversation(alice)
    q = message(c, "user", "hi")
    a = message(c, "assistant", "hello", q)
    done = run_for(c, q, a, state=Run.State.SUCCEEDED)
    queued = run_for(c, q, state=Run.State.QUEUED)
    kept = conversation(bob, "Bob's")
    run_for(kept, message(kept, "user", "mine"), state=Run.State.QUEUED)

    response = login(client, alice).delete(f"{API}/conversations/{c.id}")
    assert response.status_code == 204
    with operator_scope():
        assert not Conversation.objects.filter(pk=c.pk).exists()
        assert not Message.objects.filter(conversation_id=c.pk).exists()
        assert not Run.objects.filter(id__in=[done.id, queued.id]).exists()
        assert Run.objects.filter(conversation=kept, state=Run.State.QUEUED).count() == 1
        assert Message.objects.filter(conversation=kept).count() == 1
    # The queued run was cancelled before it went: its log says so to anyone attached.
    events = event_log().read_sync(run_log_key(tenant_id=alice.tenant.id, run_id=queued.id))
    assert [e["type"] for _, e in events] == ["run.error"]
    assert events[0][1]["code"] == "cancelled"
    assert client.get(f"{API}/conversations/{c.id}").status_code == 404


def test_export_markdown_has_the_current_branch(client, alice):
    tree = branched(alice)
    response = login(client, alice).get(f"{API}/conversations/{tree['c'].id}/export")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/markdown")
    disposition = response["Content-Disposition"]
    assert disposition.startswith("attachment;")
    assert f'filename="branches-{str(tree["c"].id)[:8]}.md"' in disposition
    text = response.content.decode()
    assert text.startswith("# Branches\n")
    assert "## User\n\nWhat is a tree?" in text
    assert "## Assistant\n\nA graph." in text
    assert text.index("What is a tree?") < text.index("A graph.")
    assert "A plant." not in text and "What is a trie?" not in text  # other branches


def test_export_json_has_the_whole_tree_and_runs(client, alice):
    tree = branched(alice)
    run_for(
        tree["c"],
        tree["q1"],
        tree["a1b"],
        state=Run.State.SUCCEEDED,
        model="m1",
        completion_tokens=3,
    )
    response = login(client, alice).get(f"{API}/conversations/{tree['c'].id}/export?format=json")
    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    assert response["Content-Disposition"].endswith('.json"')
    document = json.loads(response.content)
    assert document["conversation"]["title"] == "Branches"
    assert document["conversation"]["current_leaf_id"] == str(tree["a1b"].id)
    parents = {m["id"]: m["parent_id"] for m in document["messages"]}
    assert len(parents) == 6
    assert parents[str(tree["a2"].id)] == str(tree["q2"].id)
    assert parents[str(tree["q1b"].id)] is None
    (run,) = document["runs"]
    assert run["model"] == "m1" and run["completion_tokens"] == 3
    assert run["assistant_message_id"] == str(tree["a1b"].id)


STEPS = [
    tool_step(
        "call_1",
        "country_lookup",
        {"code": "KE"},
        result="Kenya: capital ```Nairobi```",
        truncated=True,
    ),
    tool_step(
        "call_2",
        "fetch",
        {"url": "http://x"},
        error="Refused: the scope network.fetch is not granted.",
    ),
]


def test_an_agents_answer_keeps_its_tool_calls_in_the_api_the_page_and_exports(client, alice):
    c = conversation(alice, title="Kenya")
    question = message(c, "user", "Capital of Kenya?")
    answer = message(c, "assistant", "Nairobi.", question, steps=STEPS)
    leaf(c, answer)
    login(client, alice)

    tree = client.get(f"{API}/conversations/{c.id}/messages").json()
    by_id = {m["id"]: m for m in tree["messages"]}
    # (The API gives each step its `artifacts`, none for these calls.)
    assert by_id[str(answer.id)]["steps"] == [{**step, "artifacts": []} for step in STEPS]
    assert by_id[str(question.id)]["steps"] == []
    data = chat_page_data(client.get(reverse("chat:conversation", args=[c.id])))
    assert [step["steps"] for step in data["branch"]] == [[], STEPS]

    document = json.loads(client.get(f"{API}/conversations/{c.id}/export?format=json").content)
    assert [m["steps"] for m in document["messages"]] == [[], STEPS]
    text = client.get(f"{API}/conversations/{c.id}/export").content.decode()
    assert "**Tool call:** `country_lookup`" in text
    assert '```json\n{\n  "code": "KE"\n}\n```' in text
    # A result holding a fence gets a longer one: the Markdown stays well formed.
    assert "Result (cut short):\n\n````\nKenya: capital ```Nairobi```\n````" in text
    assert "Error:\n\n```\nRefused: the scope network.fetch is not granted.\n```" in text
    assert text.index("country_lookup") < text.index("fetch") < text.index("Nairobi.")


def test_export_refuses_an_unknown_format(client, alice):
    c = conversation(alice)
    response = login(client, alice).get(f"{API}/conversations/{c.id}/export?format=pdf")
    assert response.status_code == 400 and "markdown or json" in response.json()["detail"]


# --- the message tree and branches -----------------------------------------------------


def test_tree_shows_every_message_and_the_current_branch_with_siblings(client, alice):
    tree = branched(alice)
    body = login(client, alice).get(f"{API}/conversations/{tree['c'].id}/messages").json()
    assert len(body["messages"]) == 6
    assert {m["id"]: m["parent_id"] for m in body["messages"]}[str(tree["a1"].id)] == str(
        tree["q1"].id
    )
    assert body["current_leaf_id"] == str(tree["a1b"].id)
    q1, a1b = body["branch"]
    assert q1["message_id"] == str(tree["q1"].id)
    assert q1["sibling_ids"] == [str(tree["q1"].id), str(tree["q1b"].id)]
    assert (q1["sibling_index"], q1["sibling_count"]) == (0, 2)
    assert a1b["sibling_ids"] == [str(tree["a1"].id), str(tree["a1b"].id)]
    assert (a1b["sibling_index"], a1b["sibling_count"]) == (1, 2)


def test_switching_branches_lands_on_the_newest_leaf_below(client, alice):
    tree = branched(alice)
    c = tree["c"]
    login(client, alice)

    def switch(m):
        return client.put(
            f"{API}/conversations/{c.id}/branch",
            {"message_id": str(m.id)},
            content_type="application/json",
        )

    body = switch(tree["a1"]).json()
    assert body["current_leaf_id"] == str(tree["a2"].id)
    assert [s["message_id"] for s in body["branch"]] == [
        str(tree[k].id) for k in ("q1", "a1", "q2", "a2")
    ]
    with operator_scope():
        assert Conversation.objects.get(pk=c.pk).current_leaf_id == tree["a2"].id
    assert switch(tree["q1b"]).json()["current_leaf_id"] == str(tree["q1b"].id)
    assert switch(tree["q1"]).json()["current_leaf_id"] == str(tree["a1b"].id)

    # A message of another conversation is not on any of this one's branches.
    elsewhere = message(conversation(alice), "user", "elsewhere")
    assert switch(elsewhere).status_code == 404
    bad = client.put(
        f"{API}/conversations/{c.id}/branch",
        {"message_id": "nope"},
        content_type="application/json",
    )
    assert bad.status_code in (400, 422)


# --- sending, editing, regenerating, cancelling ----------------------------------------------


def post(client, url, body=None):
    return client.post(url, body or {}, content_type="application/json")


def test_send_edit_regenerate_and_cancel(client, alice):
    login(client, alice)
    started = post(client, f"{API}/conversations", {"content": "Name a colour.", "client_id": "k1"})
    assert started.status_code == 202, started.content
    run = started.json()
    assert run["state"] == "queued"
    c_id, q1 = run["conversation_id"], run["user_message_id"]
    # A retry with the same client id is the same run.
    again = post(client, f"{API}/conversations", {"content": "Name a colour.", "client_id": "k1"})
    assert again.json()["id"] == run["id"]
    with operator_scope():
        answer = MessageFactory(parent=Message.objects.get(id=q1), role="assistant", content="Red")
        Conversation.objects.filter(pk=c_id).update(current_leaf=answer)

    follow = post(client, f"{API}/conversations/{c_id}/messages", {"content": "Another?"})
    assert follow.status_code == 202
    with operator_scope():
        q2 = Message.objects.get(id=follow.json()["user_message_id"])
    assert q2.parent_id == answer.id

    edited = post(client, f"{API}/messages/{q2.id}/edit", {"content": "One more?"}).json()
    with operator_scope():
        q2b = Message.objects.get(id=edited["user_message_id"])
    assert q2b.parent_id == answer.id and q2b.id != q2.id and q2b.content == "One more?"
    root_edit = post(client, f"{API}/messages/{q1}/edit", {"content": "Name a fruit."}).json()
    with operator_scope():
        assert Message.objects.get(id=root_edit["user_message_id"]).parent_id is None

    regenerated = post(client, f"{API}/messages/{answer.id}/regenerate").json()
    assert regenerated["user_message_id"] == q1 and regenerated["id"] != run["id"]
    assert post(client, f"{API}/messages/{answer.id}/edit", {"content": "x"}).status_code == 400

    explicit = post(
        client,
        f"{API}/conversations/{c_id}/messages",
        {"content": "Under the first question", "parent_message_id": q1},
    ).json()
    with operator_scope():
        assert Message.objects.get(id=explicit["user_message_id"]).parent_id == uuid.UUID(q1)

    cancelled = post(client, f"{API}/runs/{follow.json()['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    assert client.get(f"{API}/runs/{follow.json()['id']}").json()["state"] == "cancelled"
    runs = client.get(f"{API}/conversations/{c_id}/runs").json()
    assert len(runs) == 6 and runs[0]["id"] == explicit["id"]


@pytest.mark.parametrize(
    ("body", "detail"),
    [({"content": "  "}, "empty"), ({"content": "x" * 40000}, "limit")],
)
def test_bad_messages_get_a_clear_400_and_store_nothing(client, alice, body, detail):
    c = conversation(alice)
    response = post(login(client, alice), f"{API}/conversations/{c.id}/messages", body)
    assert response.status_code == 400 and detail in response.json()["detail"]
    with operator_scope():
        assert not Message.objects.filter(conversation=c).exists()


def test_a_run_that_cannot_be_queued_answers_503(client, alice, monkeypatch):
    """On the embedded default (no outer request transaction) or wherever the enqueue
    fails inside the call, the client gets 503 and the message stays stored."""
    from chat import api
    from chat.services.runs import RunNotQueued

    def refuse(**kwargs):
        raise RunNotQueued("x")

    monkeypatch.setattr(api, "chat_send", refuse)
    response = post(login(client, alice), f"{API}/conversations", {"content": "hi"})
    assert response.status_code == 503
    assert "saved" in response.json()["detail"]


@pytest.mark.django_db(transaction=True)
def test_a_broker_outage_answers_503_after_the_request_commits(client, alice, monkeypatch):
    """Production: the request's transaction commits after the view, and the hand-over
    to a worker fails then. The middleware answers 503; the message is stored."""
    import config.celery

    def broker_down(*args, **kwargs):
        raise ConnectionError("Error 111 connecting to redis")

    monkeypatch.setattr(config.celery, "enqueue", broker_down)
    response = post(login(client, alice), f"{API}/conversations", {"content": "Still there?"})
    assert response.status_code == 503, response.content
    assert "saved" in response.json()["detail"] and response["Retry-After"]
    with operator_scope():
        run = Run.objects.select_related("user_message").get(tenant=alice.tenant)
    assert run.state == Run.State.FAILED and run.error_code == "queue_unavailable"
    assert run.user_message.content == "Still there?"


# --- API keys ----------------------------------------------------------------------------


def test_api_keys_act_as_their_creator(client, alice):
    c = conversation(alice, "Alice's")
    secret = key_for(alice)
    body = client.get(f"{API}/conversations", HTTP_AUTHORIZATION=f"Bearer {secret}").json()
    assert [i["id"] for i in body["items"]] == [str(c.id)]

    docs_only = key_for(alice, scopes=["documents"])
    refused = client.get(f"{API}/conversations", HTTP_AUTHORIZATION=f"Bearer {docs_only}")
    assert refused.status_code == 403 and "'chat' scope" in refused.json()["detail"]

    # A key whose creator's account is gone carries nobody's rights (tenants.services.api_keys).
    orphan = key_for(alice, created_by=False)
    refused = client.get(f"{API}/conversations", HTTP_AUTHORIZATION=f"Bearer {orphan}")
    assert refused.status_code == 401 and "no longer belongs" in refused.json()["detail"]

    assert client.get(f"{API}/conversations").status_code == 401


# --- run events ---------------------------------------------------------------------------


def _log(person, run, events):
    log, key = event_log(), run_log_key(tenant_id=person.tenant.id, run_id=run.id)
    for seq, event in enumerate(events, 1):
        log.append(key, seq, event)
    return key


def test_run_events_read_from_a_cursor(client, alice):
    c = conversation(alice)
    q = message(c, "user", "hi")
    run = run_for(c, q, state=Run.State.RUNNING)
    _log(alice, run, [{"type": "token", "delta": "Hel"}, {"type": "token", "delta": "lo"}])
    login(client, alice)

    body = client.get(f"{API}/runs/{run.id}/events").json()
    assert [(e["seq"], e["delta"]) for e in body["events"]] == [(1, "Hel"), (2, "lo")]
    assert body["trimmed"] is False and body["run"]["state"] == "running"
    assert body["message"] is None
    body = client.get(f"{API}/runs/{run.id}/events?after=1").json()
    assert [e["seq"] for e in body["events"]] == [2]
    assert client.get(f"{API}/runs/{run.id}/events?after=2").json()["events"] == []
    assert client.get(f"{API}/runs/{run.id}/events?after=-1").status_code == 400


def test_a_trimmed_log_answers_from_the_stored_run(client, alice):
    c = conversation(alice)
    q = message(c, "user", "hi")
    a = message(c, "assistant", "Hello", q)
    run = run_for(c, q, a, state=Run.State.SUCCEEDED, last_seq=3, finished_at=timezone.now())
    login(client, alice)  # no log: it was trimmed
    body = client.get(f"{API}/runs/{run.id}/events?after=1").json()
    assert body["trimmed"] is True and body["events"] == []
    assert body["run"]["state"] == "succeeded" and body["run"]["last_seq"] == 3
    assert body["message"]["content"] == "Hello"
    # Nothing is missing for a client that saw the last event.
    assert client.get(f"{API}/runs/{run.id}/events?after=3").json()["trimmed"] is False

    queued = run_for(c, q, state=Run.State.QUEUED)  # no log yet: nothing to say
    body = client.get(f"{API}/runs/{queued.id}/events").json()
    assert body["trimmed"] is False and body["events"] == []


@pytest.mark.django_db(transaction=True)
async def test_run_events_stream_as_server_sent_events(alice):
    c = await sync_to_async(conversation)(alice)
    q = await sync_to_async(message)(c, "user", "hi")
    run = await sync_to_async(run_for)(c, q, state=Run.State.RUNNING)
    key = await sync_to_async(_log)(alice, run, [{"type": "token", "delta": "A"}])
    client = AsyncClient()
    await client.aforce_login(alice.user)
    url = f"{API}/runs/{run.id}/events"

    response = await client.get(url, headers={"Accept": "text/event-stream"})
    assert response.status_code == 200
    assert response["Content-Type"] == "text/event-stream"
    stream = response.streaming_content.__aiter__()
    first = await asyncio.wait_for(anext(stream), 10)
    assert first.startswith(b"id: 1\nevent: token\ndata: ")
    # Live: events logged after the stream opened arrive as they are written.
    log = event_log()
    log.append(key, 2, {"type": "token", "delta": "B"})
    log.append(key, 3, {"type": "run.done", "message_id": None})
    frames = [first]
    async for chunk in stream:
        frames.append(chunk)
    parsed = [_sse(f) for f in frames]
    assert [p["id"] for p in parsed] == ["1", "2", "3"]
    assert [p["data"]["type"] for p in parsed] == ["token", "token", "run.done"]
    assert parsed[1]["data"]["delta"] == "B" and parsed[1]["data"]["seq"] == 2
    assert parsed[2]["event"] == "run.done"

    # A reconnect resumes after Last-Event-ID.
    response = await client.get(url, headers={"Accept": "text/event-stream", "Last-Event-ID": "1"})
    resumed = [_sse(f) async for f in response.streaming_content]
    assert [p["id"] for p in resumed] == ["2", "3"]

    # The run ended and the client has everything: 204 stops EventSource reconnecting.
    await as_operator(
        lambda: Run.objects.filter(pk=run.pk).update(state=Run.State.SUCCEEDED, last_seq=3)
    )
    response = await client.get(url, headers={"Accept": "text/event-stream", "Last-Event-ID": "3"})
    assert response.status_code == 204


@pytest.mark.django_db(transaction=True)
async def test_a_trimmed_log_streams_one_trimmed_event(alice):
    c = await sync_to_async(conversation)(alice)
    q = await sync_to_async(message)(c, "user", "hi")
    a = await sync_to_async(message)(c, "assistant", "Stored answer", q)
    run = await sync_to_async(run_for)(c, q, a, state=Run.State.SUCCEEDED, last_seq=4)
    client = AsyncClient()
    await client.aforce_login(alice.user)
    response = await client.get(
        f"{API}/runs/{run.id}/events?after=0", headers={"Accept": "text/event-stream"}
    )
    frames = [_sse(f) async for f in response.streaming_content]
    assert len(frames) == 1
    assert frames[0]["id"] == "4" and frames[0]["event"] == "run.trimmed"
    assert frames[0]["data"]["run"]["state"] == "succeeded"
    assert frames[0]["data"]["message"]["content"] == "Stored answer"


def _sse(frame: bytes) -> dict[str, Any]:
    fields = dict(line.split(": ", 1) for line in frame.decode().strip().split("\n"))
    return {"id": fields["id"], "event": fields["event"], "data": json.loads(fields["data"])}


# --- frames to the member's sockets ---------------------------------------------------------


@pytest.mark.django_db(transaction=True)
async def test_changes_push_conversation_frames_to_the_owner_only(alice, bob):
    tree = await sync_to_async(branched)(alice)
    c = tree["c"]
    connected, _, socket = await ws_connect(alice.user)
    assert connected
    connected, _, bobs = await ws_connect(bob.user)
    assert connected

    await sync_to_async(in_tenant)(
        alice.tenant.id, conversation_rename, actor=alice.actor, conversation_id=c.id, title="New"
    )
    frame = await socket.receive()
    assert frame == {
        "type": "conversation.updated",
        "conversation_id": str(c.id),
        "title": "New",
        "title_auto": False,
        "current_leaf_id": str(tree["a1b"].id),
        "updated_at": frame["updated_at"],
    }

    client = AsyncClient()
    await client.aforce_login(alice.user)
    response = await client.put(
        f"{API}/conversations/{c.id}/branch",
        {"message_id": str(tree["a1"].id)},
        content_type="application/json",
    )
    assert response.status_code == 200
    frame = await socket.receive()
    assert frame["type"] == "conversation.updated"
    assert frame["current_leaf_id"] == str(tree["a2"].id)

    assert (await client.delete(f"{API}/conversations/{c.id}")).status_code == 204
    assert await socket.receive() == {
        "type": "conversation.updated",
        "conversation_id": str(c.id),
        "deleted": True,
    }
    assert await bobs.nothing_pending()
    await socket.close()
    await bobs.close()


# --- automatic titles -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ('"Budget planning for Q3."\nMore text', "Budget planning for Q3"),
        ("Title: **Zebra facts**", "Zebra facts"),
        ("## The  history\tof tea", "The history of tea"),
        ("\n\n  \u201cQuoted\u201d  \n", "Quoted"),
        ("...", ""),
        ("", ""),
    ],
)
def test_title_clean(raw, clean):
    assert title_clean(raw) == clean


def test_title_clean_cuts_long_titles_at_a_word():
    title = title_clean("word " * 40)
    assert len(title) <= 80 and title.endswith("…") and "\n" not in title
    assert not title[:-1].endswith(" ")


def test_titles_come_from_the_pool_and_fall_back_to_the_first_line(
    alice, synthetic_server, settings
):
    c = conversation(alice, "Tell me about the migration of zebras across the Serengeti plains")
    q = message(c, "user", "Tell me about the migration of zebras across the Serengeti plains")
    message(c, "assistant", "Zebras migrate in huge herds.", q)

    server = synthetic_server(pieces=['"Zebra ', "migration", '."\n', "Extra line"])
    settings.PARLEY_BACKENDS = [server.url]
    pool.forget_cache()
    assert conversation_title_generate(conversation_id=c.id, tenant_id=alice.tenant.id) == (
        "Zebra migration"
    )
    (body,) = server.bodies
    assert body["max_tokens"] <= 32 and body["temperature"] == 0
    assert "zebras" in json.dumps(body["messages"])
    with operator_scope():
        assert Conversation.objects.get(pk=c.pk).title == "Zebra migration"
        record = UsageRecord.objects.get(purpose="chat.title")
        assert record.reference == str(c.id) and record.user_id == alice.user.id

    failing = synthetic_server(fail="http500")
    settings.PARLEY_BACKENDS = [failing.url]
    pool.forget_cache()
    title = conversation_title_generate(conversation_id=c.id, tenant_id=alice.tenant.id)
    assert title == "Tell me about the migration of zebras across the Serengeti plains"
    with operator_scope():
        assert Conversation.objects.get(pk=c.pk).title == title


def test_a_rename_during_the_title_call_wins(alice, monkeypatch):
    from chat import titles
    from inference.types import TextDelta

    c = conversation(alice, "first line")
    q = message(c, "user", "first line")
    message(c, "assistant", "answer", q)

    def stream(request):
        # The member renames the conversation while the model is thinking.
        in_tenant(
            alice.tenant.id,
            conversation_rename,
            actor=alice.actor,
            conversation_id=c.id,
            title="Chosen",
        )
        yield TextDelta("Model title")

    monkeypatch.setattr(titles.pool, "chat_stream", stream)
    conversation_title_generate(conversation_id=c.id, tenant_id=alice.tenant.id)
    with operator_scope():
        assert Conversation.objects.get(pk=c.pk).title == "Chosen"


def test_a_title_is_queued_after_the_first_answer_only(
    alice, monkeypatch, django_capture_on_commit_callbacks
):
    from chat import titles

    queued: list[tuple[Any, ...]] = []
    monkeypatch.setattr(titles, "_enqueue", lambda *args: queued.append(args))
    c = conversation(alice, "x", model="m")
    q = message(c, "user", "x")
    a = message(c, "assistant", "y", q)
    run = run_for(c, q, a, state=Run.State.SUCCEEDED, model="m")
    with django_capture_on_commit_callbacks(execute=True):
        title_after_run(run=run)
    assert queued == [(str(c.id), str(alice.tenant.id), "m")]

    a2 = message(c, "assistant", "z", q)  # a second answer: titled already
    with django_capture_on_commit_callbacks(execute=True):
        title_after_run(run=run_for(c, q, a2, state=Run.State.SUCCEEDED))
    renamed = conversation(alice, "Mine", title_auto=False)
    rq = message(renamed, "user", "x")
    ra = message(renamed, "assistant", "y", rq)
    with django_capture_on_commit_callbacks(execute=True):
        title_after_run(run=run_for(renamed, rq, ra, state=Run.State.SUCCEEDED))
    assert len(queued) == 1


@pytest.mark.django_db(transaction=True)
def test_the_first_answer_titles_the_conversation_end_to_end(
    client, alice, synthetic_server, settings, worker
):
    server = synthetic_server(pieces=["Zebra ", "migration ", "facts"])
    settings.PARLEY_BACKENDS = [server.url]
    pool.forget_cache()
    started = post(
        login(client, alice), f"{API}/conversations", {"content": "Tell me about zebras please"}
    )
    assert started.status_code == 202, started.content
    c_id = started.json()["conversation_id"]
    title = _wait_for_title(c_id, "Tell me about zebras please")
    assert title == "Zebra migration facts"
    with operator_scope():
        assert UsageRecord.objects.filter(purpose="chat.title", reference=c_id).count() == 1
    assert server.request_count == 2  # the answer and the title


def _wait_for_title(conversation_id, first: str, timeout_s: float = 60) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with operator_scope():
            title = Conversation.objects.get(pk=conversation_id).title
        if title != first:
            return title
        time.sleep(0.1)
    raise AssertionError(f"no automatic title within {timeout_s}s")


@pytest.mark.llm
@pytest.mark.django_db(transaction=True)
def test_smollm2_titles_a_conversation(client, alice, backend, worker):
    first = "Explain in one sentence why the sky is blue."
    started = post(login(client, alice), f"{API}/conversations", {"content": first})
    assert started.status_code == 202
    c_id = started.json()["conversation_id"]
    deadline = timezone.now() + timedelta(seconds=120)
    while timezone.now() < deadline:
        with operator_scope():
            if UsageRecord.objects.filter(purpose="chat.title", reference=c_id).exists():
                break
        time.sleep(0.2)
    with operator_scope():
        record = UsageRecord.objects.get(purpose="chat.title", reference=c_id)
        title = Conversation.objects.get(pk=c_id).title
    assert record.completion_tokens > 0
    assert title and "\n" not in title and len(title) <= 80 and '"' not in title


# --- outsiders ----------------------------------------------------------------------------


def _everything(alice) -> list[tuple[str, str, dict[str, Any] | None]]:
    c = conversation(alice, "Merger plans")
    q = message(c, "user", "Merger plans, confidential")
    a = message(c, "assistant", "Merger answer", q)
    leaf(c, a)
    run = run_for(c, q, a, state=Run.State.RUNNING)
    _log(alice, run, [{"type": "token", "delta": "Merger"}])
    return [
        ("get", f"/conversations/{c.id}", None),
        ("patch", f"/conversations/{c.id}", {"title": "stolen"}),
        ("delete", f"/conversations/{c.id}", None),
        ("get", f"/conversations/{c.id}/messages", None),
        ("post", f"/conversations/{c.id}/messages", {"content": "injected"}),
        (
            "post",
            f"/conversations/{c.id}/messages",
            {"content": "injected", "parent_message_id": str(q.id)},
        ),
        ("put", f"/conversations/{c.id}/branch", {"message_id": str(q.id)}),
        ("get", f"/conversations/{c.id}/runs", None),
        ("get", f"/conversations/{c.id}/export", None),
        ("get", f"/conversations/{c.id}/export?format=json", None),
        ("post", f"/messages/{q.id}/edit", {"content": "injected"}),
        ("post", f"/messages/{a.id}/regenerate", {}),
        ("get", f"/runs/{run.id}", None),
        ("post", f"/runs/{run.id}/cancel", {}),
        ("get", f"/runs/{run.id}/events", None),
    ]


def test_outsiders_and_other_members_get_404_everywhere(client, alice, bob, charlie):
    calls = _everything(alice)
    with operator_scope():
        before = (Message.objects.count(), Run.objects.count(), Conversation.objects.count())
    for person in (charlie, bob):
        login(client, person)
        for method, path, body in calls:
            kwargs = {"content_type": "application/json"} if body is not None else {}
            args = (json.dumps(body),) if body is not None else ()
            response = getattr(client, method)(API + path, *args, **kwargs)
            assert response.status_code == 404, (person.user.username, method, path, response)
            assert "Merger" not in response.content.decode()
    with operator_scope():
        after = (Message.objects.count(), Run.objects.count(), Conversation.objects.count())
        c = Conversation.objects.get(title="Merger plans")
        assert not Run.objects.filter(cancel_requested_at__isnull=False).exists()
    assert before == after and c.title_auto
    # The owner reaches all of it.
    login(client, alice)
    assert client.get(API + calls[0][1]).status_code == 200
    assert client.get(API + "/conversations/search?q=merger").json()["items"]
    for person in (bob, charlie):
        login(client, person)
        assert client.get(API + "/conversations/search?q=merger").json()["items"] == []


def test_a_conversation_says_which_agent_answers_it(client, alice):
    c = conversation(alice, "With an agent")
    login(client, alice)
    assert client.get(f"{API}/conversations/{c.id}").json()["agent"] == ""
    with operator_scope():
        Conversation.objects.filter(pk=c.pk).update(agent="calculator.calculator")
    assert client.get(f"{API}/conversations/{c.id}").json()["agent"] == "calculator.calculator"


def test_an_off_subject_title_keeps_the_first_words(alice, synthetic_server, settings):
    """A small model's "title" about the chat itself (or a line of its answer) is not
    kept: the conversation keeps the first words of its question."""
    question = "How do I fix a leaking kitchen tap without calling a plumber"
    c = conversation(alice, question)
    q = message(c, "user", question)
    message(c, "assistant", "Turn off the water and replace the washer.", q)
    server = synthetic_server(pieces=["The answer to your question is"])
    settings.PARLEY_BACKENDS = [server.url]
    pool.forget_cache()
    assert conversation_title_generate(conversation_id=c.id, tenant_id=alice.tenant.id) == question
    assert server.request_count == 1


def test_first_words_titles_ask_no_model(alice, synthetic_server, settings):
    settings.PARLEY_TITLES = "first_words"
    c = conversation(alice, "Plan a three-day trip to Rome")
    q = message(c, "user", "Plan a three-day trip to Rome")
    message(c, "assistant", "Day 1: the Colosseum.", q)
    server = synthetic_server(pieces=["Rome trip"])
    settings.PARLEY_BACKENDS = [server.url]
    pool.forget_cache()
    title = conversation_title_generate(conversation_id=c.id, tenant_id=alice.tenant.id)
    assert title == "Plan a three-day trip to Rome" and server.request_count == 0


@pytest.mark.parametrize(
    ("title", "question", "fits"),
    [
        ("Zebra migration", "Tell me about the migration of zebras", True),
        ("Electric cars vs. hybrid cars", "Compare electric cars and hybrid cars.", True),
        ("That's a great title", "What should I pack for a camping weekend?", False),
        ("The answer to this question is", "What causes inflation?", False),
    ],
)
def test_a_title_fits_when_it_names_what_the_question_is_about(title, question, fits):
    assert title_fits(title, question) is fits
