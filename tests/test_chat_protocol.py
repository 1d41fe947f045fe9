"""Websocket protocol v1: the AsyncAPI document, idempotent sends, cancel, attach,
branches, per-socket rate limits and single-use tickets."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from channels.db import database_sync_to_async as sync_to_async
from django.utils import timezone

from chat import protocol
from chat.eventlog import event_log, run_log_key
from chat.models import Conversation, Message, Run
from chat.prompts import prompt_build
from tenants.rls import operator_scope, tenant_scope
from tests import asyncapi
from tests.conftest import as_operator, ws_connect
from tests.factories import ConversationFactory, MessageFactory, RunFactory
from tests.ws_handshake import ws_refusal

LONG_PROMPT = "Write a long story about a lighthouse keeper, in at least 300 words."


def _in_tenant(person, fn, **kwargs):
    with tenant_scope(tenant_id=person.tenant.id, user_id=person.user.id):
        return fn(actor=person.actor, **kwargs)


# --- the AsyncAPI document --------------------------------------------------------


def test_the_document_names_every_frame_type_of_the_server():
    assert asyncapi.client_types() == set(protocol.FRAMES)
    assert asyncapi.server_types() == set(protocol.SERVER_TYPES)


def test_the_frame_table_names_a_handler_and_fields_of_each_frame_type():
    from chat.consumers import ChatConsumer

    fields = asyncapi.client_fields()
    for kind, frame_type in protocol.FRAMES.items():
        assert callable(getattr(ChatConsumer, frame_type.handler, None)), kind
        assert set(frame_type.ids) <= set(fields[kind]), kind


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        ({"type": "chat.send"}, "'content' must be a non-empty string."),
        ({"type": "chat.send", "content": " "}, "'content' must be a non-empty string."),
        (
            {"type": "chat.send", "content": "hi", "parent_message_id": "m"},
            "'parent_message_id' needs the message's 'conversation_id'.",
        ),
        (
            {"type": "chat.send", "content": "hi", "conversation_id": "", "parent_message_id": "m"},
            "'parent_message_id' needs the message's 'conversation_id'.",
        ),
        (
            {"type": "chat.send", "content": "hi", "document_ids": [""]},
            "'document_ids' must be a list of ids.",
        ),
        (
            {"type": "chat.send", "content": "hi", "document_ids": ["d"] * 21},
            "At most 20 documents per message.",
        ),
        (
            {"type": "chat.send", "content": "hi", "model": "m" * 201},
            "'model' must be a string of at most 200 characters.",
        ),
        ({"type": "chat.regenerate"}, "'message_id' is required."),
        ({"type": "chat.regenerate", "message_id": ""}, "'message_id' is required."),
        (
            {"type": "chat.regenerate", "message_id": 7},
            "'message_id' must be a string of at most 100 characters.",
        ),
        ({"type": "run.attach", "run_id": "r", "after": "3"}, "'after' must be an integer."),
        (
            {"type": "run.attach", "run_id": "r", "after": 3.0},
            "'after' must be an event's sequence number: an integer from 0 to 9223372036854775807.",
        ),
        (
            {"type": "run.attach", "run_id": "r", "after": -1},
            "'after' must be an event's sequence number: an integer from 0 to 9223372036854775807.",
        ),
        (
            {"type": "run.attach", "run_id": "r", "coalesce": "yes"},
            "'coalesce' must be true or false.",
        ),
    ],
    ids=lambda v: json.dumps(v)[:50] if isinstance(v, dict) else "",
)
def test_a_refused_frame_says_what_is_wrong(frame, message):
    """The schema's `x-error` of the field at fault (docs/asyncapi.yaml), with the code
    invalid_frame and the frame's client id."""
    parsed = protocol.parse(json.dumps({**frame, "client_id": "c-1"}), max_bytes=65536)
    with pytest.raises(protocol.FrameError) as refused:
        protocol.check(parsed)
    assert (refused.value.code, refused.value.message, refused.value.client_id) == (
        protocol.INVALID_FRAME,
        message,
        "c-1",
    )


CLIENT_FRAMES: list[Any] = [
    {"type": "ping"},
    {"type": "ping", "client_id": "p-1"},
    {"type": "ping", "client_id": ""},
    {"type": "ping", "client_id": None},
    {"type": "ping", "client_id": "x" * 101},
    {"type": "ping", "extra": "ignored"},
    {"type": "chat.send", "content": "hi"},
    {"type": "chat.send", "content": "   "},
    {"type": "chat.send", "content": 3},
    {"type": "chat.send"},
    {"type": "chat.send", "content": "hi", "conversation_id": "c", "parent_message_id": None},
    {"type": "chat.send", "content": "hi", "conversation_id": "c", "parent_message_id": "m"},
    {"type": "chat.send", "content": "hi", "parent_message_id": "m"},
    {"type": "chat.send", "content": "hi", "conversation_id": "c", "parent_message_id": ""},
    {"type": "chat.send", "content": "hi", "conversation_id": 4},
    {"type": "chat.send", "content": "hi", "model": "m" * 201},
    {"type": "chat.send", "content": "hi", "model": None, "agent": "reviewer"},
    {"type": "chat.send", "content": "hi", "document_ids": ["d1", "d2"]},
    {"type": "chat.send", "content": "hi", "document_ids": "d1"},
    {"type": "chat.send", "content": "hi", "document_ids": [""]},
    {"type": "chat.send", "content": "hi", "document_ids": ["d"] * 21},
    {"type": "chat.regenerate", "message_id": "m"},
    {"type": "chat.regenerate"},
    {"type": "chat.regenerate", "message_id": 7},
    {"type": "run.cancel", "run_id": "r"},
    {"type": "run.cancel", "run_id": ""},
    {"type": "run.attach", "run_id": "r", "after": 12},
    {"type": "run.attach", "run_id": "r"},
    {"type": "run.attach", "run_id": "r", "after": -1},
    {"type": "run.attach", "run_id": "r", "after": True},
    {"type": "run.attach", "run_id": "r", "after": "3"},
    {"type": "run.attach", "run_id": "r", "after": 3, "coalesce": True},
    {"type": "run.attach", "run_id": "r", "coalesce": "yes"},
    {"type": "nope"},
    {"content": "no type"},
]


@pytest.mark.parametrize("frame", CLIENT_FRAMES, ids=lambda f: json.dumps(f)[:60])
def test_the_server_accepts_exactly_the_client_frames_the_document_allows(frame):
    try:
        parsed = protocol.parse(json.dumps(frame), max_bytes=65536)
        protocol.check(parsed)
        accepted = True
    except protocol.FrameError:
        accepted = False
    problems = asyncapi.errors(frame, sent_by="client")
    assert accepted == (not problems), problems


def test_an_undocumented_server_frame_fails_the_check():
    with pytest.raises(AssertionError):
        asyncapi.check_server_frame({"type": "token", "run_id": "x", "seq": 0, "delta": "a"})
    with pytest.raises(AssertionError):
        asyncapi.check_server_frame({"type": "surprise"})


# --- frames that need no model ------------------------------------------------------


def _queued_run(person) -> Run:
    conversation = ConversationFactory(tenant=person.tenant, user=person.user)
    return RunFactory(user_message=MessageFactory(conversation=conversation, content="hello"))


@pytest.mark.django_db(transaction=True)
async def test_cancelling_a_queued_run_ends_it_for_every_attached_socket(alice):
    run = await sync_to_async(_queued_run)(alice)
    _, _, watcher = await ws_connect(alice.user)
    _, _, canceller = await ws_connect(alice.user)
    await watcher.send({"type": "run.attach", "run_id": str(run.id), "after": 0})
    assert await watcher.nothing_pending()

    await canceller.send({"type": "run.cancel", "run_id": str(run.id), "client_id": "k"})
    ack = await canceller.receive()
    assert ack == {"type": "run.cancelling", "run_id": str(run.id), "state": "cancelled"} | {
        "client_id": "k"
    }
    end = await watcher.receive()
    assert end["type"] == "run.error" and end["code"] == "cancelled" and end["seq"] == 1
    stored = await as_operator(lambda: Run.objects.get(id=run.id))
    assert stored.state == Run.State.CANCELLED and stored.cancel_requested_at is not None

    # Cancelling again changes nothing and says so.
    await canceller.send({"type": "run.cancel", "run_id": str(run.id)})
    assert (await canceller.receive())["state"] == "cancelled"
    await watcher.close()
    await canceller.close()


@pytest.mark.django_db(transaction=True)
async def test_attaching_to_a_run_whose_log_was_trimmed_gets_its_stored_end(alice):
    run = await sync_to_async(_queued_run)(alice)

    def finish() -> Message:
        with operator_scope():
            answer = MessageFactory(
                parent=run.user_message, role="assistant", content="Hello there."
            )
            Run.objects.filter(id=run.id).update(
                state=Run.State.SUCCEEDED,
                assistant_message=answer,
                last_seq=4,
                finish_reason="stop",
                prompt_tokens=9,
                completion_tokens=3,
                finished_at=timezone.now(),
            )
            return answer

    answer = await sync_to_async(finish)()
    _, _, socket = await ws_connect(alice.user)
    await socket.send({"type": "run.attach", "run_id": str(run.id)})
    frame = await socket.receive()
    assert frame["type"] == "run.done" and frame["trimmed"] is True
    assert frame["seq"] == 4 and frame["message_id"] == str(answer.id)
    assert frame["usage"] == {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
    # A client that already has the end gets nothing more.
    await socket.send({"type": "run.attach", "run_id": str(run.id), "after": 4})
    assert await socket.nothing_pending()
    await socket.close()


@pytest.mark.django_db(transaction=True)
async def test_attach_replays_from_the_cursor_then_follows_live_events(alice):
    run = await sync_to_async(_queued_run)(alice)
    log, key = event_log(), run_log_key(tenant_id=alice.tenant.id, run_id=run.id)
    for seq, delta in enumerate(["a", "b", "c"], start=1):
        await sync_to_async(log.append)(key, seq, {"type": "token", "delta": delta})
    _, _, socket = await ws_connect(alice.user)
    await socket.send({"type": "run.attach", "run_id": str(run.id), "after": 1})
    assert [(f["seq"], f["delta"]) for f in [await socket.receive(), await socket.receive()]] == [
        (2, "b"),
        (3, "c"),
    ]
    await sync_to_async(log.append)(key, 4, {"type": "token", "delta": "d"})
    done = {
        "type": "run.done",
        "message_id": None,
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 1, "completion_tokens": 4, "total_tokens": 5},
    }
    await sync_to_async(log.append)(key, 5, done)
    assert (await socket.receive())["delta"] == "d"
    assert (await socket.receive())["type"] == "run.done"
    assert await socket.nothing_pending()
    await socket.close()


@pytest.mark.django_db(transaction=True)
async def test_a_coalescing_attach_joins_consecutive_tokens_and_keeps_the_cursor(alice):
    run = await sync_to_async(_queued_run)(alice)
    log, key = event_log(), run_log_key(tenant_id=alice.tenant.id, run_id=run.id)
    events = [{"type": "token", "delta": d} for d in ("He", "llo", ",", " you")]
    events.insert(2, {"type": "progress", "stage": "thinking"})
    events.append(
        {
            "type": "run.done",
            "message_id": None,
            "finish_reason": "stop",
            "usage": {"prompt_tokens": 1, "completion_tokens": 4, "total_tokens": 5},
        }
    )
    for seq, event in enumerate(events, start=1):
        await sync_to_async(log.append)(key, seq, event)
    _, _, socket = await ws_connect(alice.user)
    await socket.send({"type": "run.attach", "run_id": str(run.id), "coalesce": True})
    frames = await socket.receive_until(("run.done",))
    assert [(f["type"], f.get("first_seq"), f["seq"], f.get("delta")) for f in frames] == [
        ("token", 1, 2, "Hello"),
        ("progress", None, 3, None),
        ("token", 4, 5, ", you"),
        ("run.done", None, 6, None),
    ]
    # Resuming from a coalesced frame's seq misses nothing and repeats nothing.
    await socket.send({"type": "run.attach", "run_id": str(run.id), "after": 2, "coalesce": True})
    frames = await socket.receive_until(("run.done",))
    assert [f["seq"] for f in frames] == [3, 5, 6]
    await socket.close()


@pytest.mark.django_db(transaction=True)
async def test_frames_over_the_rate_get_errors_and_the_socket_recovers(alice, settings):
    settings.PARLEY_WS_FRAME_BURST = 3
    settings.PARLEY_WS_FRAMES_PER_S = 2.0
    _, _, socket = await ws_connect(alice.user)
    for n in range(5):
        await socket.send({"type": "ping", "client_id": f"p{n}"})
    replies = [await socket.receive() for _ in range(5)]
    assert [r["type"] for r in replies] == ["pong"] * 3 + ["error"] * 2
    assert {r["code"] for r in replies[3:]} == {"rate_limited"}
    assert [r["client_id"] for r in replies[3:]] == ["p3", "p4"]
    await asyncio.sleep(0.6)
    await socket.send({"type": "ping"})
    assert await socket.receive() == {"type": "pong"}
    await socket.close()


@pytest.mark.django_db(transaction=True)
async def test_unknown_agents_and_documents_are_not_found(alice):
    _, _, socket = await ws_connect(alice.user)
    await socket.send({"type": "chat.send", "content": "hi", "agent": "ghost", "client_id": "a"})
    reply = await socket.receive()
    assert reply["code"] == "not_found" and reply["client_id"] == "a"
    await socket.send({"type": "chat.send", "content": "hi", "document_ids": ["d-1"]})
    assert (await socket.receive())["code"] == "not_found"
    assert await as_operator(lambda: Message.objects.filter(tenant=alice.tenant).count()) == 0
    await socket.close()


# --- tickets ---------------------------------------------------------------------------


def _ticket(client, **headers) -> dict[str, Any]:
    response = client.post("/api/v1/ws/tickets", **headers)
    assert response.status_code == 201, response.content
    return response.json()


@pytest.mark.django_db(transaction=True)
async def test_a_ticket_opens_one_socket_once_from_any_origin(alice, client):
    from tenants.services.api_keys import api_key_create

    _, secret = await sync_to_async(_in_tenant)(alice, api_key_create, name="site", scopes=["chat"])
    body = await sync_to_async(_ticket)(client, HTTP_AUTHORIZATION=f"Bearer {secret}")
    assert body["ticket"].startswith("pwt_") and body["expires_in"] > 0
    assert secret not in json.dumps(body)
    path = f"/ws/v1/?ticket={body['ticket']}"

    connected, _, socket = await ws_connect(origin="https://shop.example", path=path)
    assert connected
    await socket.send({"type": "ping"})
    assert await socket.receive() == {"type": "pong"}
    await socket.close()

    _, code = await ws_refusal(origin="https://shop.example", path=path)
    assert code == 4401  # spent


@pytest.mark.django_db(transaction=True)
async def test_a_members_ticket_acts_as_that_member(alice, client):
    await sync_to_async(client.force_login)(alice.user)
    body = await sync_to_async(_ticket)(client)
    run = await sync_to_async(_queued_run)(alice)
    connected, _, socket = await ws_connect(path=body["url"], origin=None)
    assert connected
    await socket.send({"type": "run.cancel", "run_id": str(run.id)})
    assert (await socket.receive())["type"] == "run.cancelling"  # alice's run: found
    await socket.close()


@pytest.mark.django_db(transaction=True)
async def test_tickets_are_refused_when_bad_or_their_key_was_revoked(alice, client):
    from tenants.services.api_keys import api_key_create, api_key_revoke

    key, secret = await sync_to_async(_in_tenant)(alice, api_key_create, name="s", scopes=["chat"])
    body = await sync_to_async(_ticket)(client, HTTP_AUTHORIZATION=f"Bearer {secret}")
    await sync_to_async(_in_tenant)(alice, api_key_revoke, key_id=key.id)
    for path in (body["url"], "/ws/v1/?ticket=pwt_forged", "/ws/v1/?ticket=junk"):
        frame, code = await ws_refusal(origin=None, path=path)
        assert (frame["code"], code) == ("unauthenticated", 4401), path
    anonymous = await sync_to_async(client.post)("/api/v1/ws/tickets")
    assert anonymous.status_code == 401


# --- with the model: idempotency, cancel, branches -------------------------------------


async def _started(socket, frame) -> dict[str, Any]:
    await socket.send(frame)
    started = await socket.receive(timeout=15)
    assert started["type"] == "run.started", started
    return started


def _text(frames) -> str:
    return "".join(f["delta"] for f in frames if f["type"] == "token")


@pytest.mark.llm
@pytest.mark.django_db(transaction=True)
async def test_a_repeated_client_id_returns_the_first_run(alice, backend, worker):
    frame = {"type": "chat.send", "content": "Say hello.", "client_id": "retry-1"}
    _, _, first = await ws_connect(alice.user)
    started = await _started(first, frame)
    first_frames = await first.receive_until(("run.done", "run.error"))
    # The client lost the connection and retries on a new socket, after the run ended.
    _, _, second = await ws_connect(alice.user)
    again = await _started(second, frame)
    assert again["run_id"] == started["run_id"]
    assert again["user_message_id"] == started["user_message_id"]
    replay = await second.receive_until(("run.done", "run.error"))
    assert replay == first_frames
    assert await as_operator(lambda: Run.objects.filter(tenant=alice.tenant).count()) == 1
    assert await as_operator(lambda: Message.objects.filter(role="user").count()) == 1
    await first.close()
    await second.close()


@pytest.mark.llm
@pytest.mark.django_db(transaction=True)
async def test_cancel_stops_a_running_generation_and_keeps_its_partial_text(alice, backend, worker):
    _, _, socket = await ws_connect(alice.user)
    started = await _started(socket, {"type": "chat.send", "content": LONG_PROMPT})
    frames = [await socket.receive(timeout=60)]
    assert frames[0]["type"] == "token"
    await socket.send({"type": "run.cancel", "run_id": started["run_id"]})
    frames += await socket.receive_until(("run.error", "run.done"), timeout=30)
    ack = [f for f in frames if f["type"] == "run.cancelling"]
    assert ack and ack[0]["state"] in ("running", "cancelled")
    end = frames[-1]
    assert end["type"] == "run.error" and end["code"] == "cancelled", end
    events = [f for f in frames if "seq" in f]
    assert [f["seq"] for f in events] == list(range(1, len(events) + 1))
    run = await as_operator(
        lambda: Run.objects.select_related("assistant_message").get(id=started["run_id"])
    )
    assert run.state == Run.State.CANCELLED
    assert run.assistant_message.content == _text(events)
    assert run.completion_tokens < 300  # it stopped long before a 300-word story
    await socket.close()


@pytest.mark.llm
@pytest.mark.django_db(transaction=True)
async def test_edit_and_regenerate_make_siblings_and_the_prompt_follows_the_branch(
    alice, backend, worker
):
    _, _, socket = await ws_connect(alice.user)
    first = await _started(socket, {"type": "chat.send", "content": "Say hello."})
    await socket.receive_until(("run.done",))
    conversation_id = first["conversation_id"]

    # Regenerate the answer: a second answer under the same question.
    await _started(socket, {"type": "chat.regenerate", "message_id": first["user_message_id"]})
    await socket.receive_until(("run.done",))
    # A follow-up goes under the newest answer (the current branch).
    follow = await _started(
        socket,
        {"type": "chat.send", "content": "And goodbye?", "conversation_id": conversation_id},
    )
    await socket.receive_until(("run.done",))
    # Edit the first question: a new root beside it.
    edit = await _started(
        socket,
        {
            "type": "chat.send",
            "content": "Say good morning.",
            "conversation_id": conversation_id,
            "parent_message_id": None,
        },
    )
    await socket.receive_until(("run.done",))

    def check() -> None:
        with tenant_scope(tenant_id=alice.tenant.id):
            runs = list(Run.objects.filter(conversation_id=conversation_id).order_by("created_at"))
            answers = [r.assistant_message for r in runs]
            assert [r.user_message_id for r in runs[:2]] == [runs[0].user_message_id] * 2
            assert answers[0].parent_id == answers[1].parent_id == runs[0].user_message_id
            assert answers[0].id != answers[1].id

            follow_run = Run.objects.get(id=follow["run_id"])
            assert follow_run.user_message.parent_id == answers[1].id
            prompt = [m["content"] for m in prompt_build(run=follow_run)[1:]]
            assert prompt == ["Say hello.", answers[1].content, "And goodbye?"]

            edit_run = Run.objects.get(id=edit["run_id"])
            assert edit_run.user_message.parent_id is None
            assert [m["content"] for m in prompt_build(run=edit_run)[1:]] == ["Say good morning."]
            conversation = Conversation.objects.get(id=conversation_id)
            assert conversation.current_leaf_id == edit_run.assistant_message_id

    await sync_to_async(check)()
    await socket.close()


@pytest.mark.django_db(transaction=True)
async def test_a_parent_from_another_conversation_is_not_found(alice):
    run = await sync_to_async(_queued_run)(alice)
    other = await sync_to_async(ConversationFactory)(tenant=alice.tenant, user=alice.user)
    _, _, socket = await ws_connect(alice.user)
    await socket.send(
        {
            "type": "chat.send",
            "content": "hi",
            "conversation_id": str(other.id),
            "parent_message_id": str(run.user_message_id),
        }
    )
    assert (await socket.receive())["code"] == "not_found"
    await socket.close()


@pytest.mark.django_db(transaction=True)
async def test_deleting_a_conversation_mid_run_ends_the_run_for_attached_sockets(
    alice, worker, settings, synthetic_server
):
    from chat.services.conversations import conversation_delete
    from inference import pool

    server = synthetic_server(tokens=400, delay_s=0.02)
    settings.PARLEY_BACKENDS = [server.url]
    pool.forget_cache()
    _, _, socket = await ws_connect(alice.user)
    started = await _started(socket, {"type": "chat.send", "content": "Go on and on."})
    assert (await socket.receive(timeout=30))["type"] == "token"
    await sync_to_async(_in_tenant)(
        alice, conversation_delete, conversation_id=started["conversation_id"]
    )
    frames = await socket.receive_until(("run.error", "run.done"), timeout=30)
    end = frames[-1]
    assert end["type"] == "run.error" and end["code"] == "cancelled", end
    events = [f for f in frames if "seq" in f]
    assert [f["seq"] for f in events] == list(range(events[0]["seq"], end["seq"] + 1))
    assert not await as_operator(lambda: Run.objects.filter(id=started["run_id"]).exists())
    await socket.close()
