"""The websocket API end to end: real Redis, a real Celery worker, the real SmolLM2."""

from __future__ import annotations

import uuid

import pytest
from asgiref.sync import sync_to_async

from chat.models import Conversation, Message, Run
from tests.conftest import as_operator, ws_connect
from tests.ws_handshake import ws_refusal

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.llm]

PROMPT = "Count from 1 to 20, separated by spaces."


def _run_frames(frames, run_id):
    return [f for f in frames if f.get("run_id") == run_id and f["type"] != "run.started"]


async def _turn(socket, content=PROMPT, conversation_id=None, client_id=None):
    frame = {"type": "chat.send", "content": content}
    if conversation_id:
        frame["conversation_id"] = conversation_id
    if client_id:
        frame["client_id"] = client_id
    await socket.send(frame)
    started = await socket.receive(timeout=15)
    assert started["type"] == "run.started", started
    frames = await socket.receive_until(("run.done", "run.error"))
    return started, _run_frames(frames, started["run_id"])


async def test_turn_streams_smollm2_tokens_gaplessly_and_persists_them(alice, backend, worker):
    connected, _, socket = await ws_connect(alice.user)
    assert connected
    started, frames = await _turn(socket, client_id="c-1")
    assert started["client_id"] == "c-1"

    tokens = [f for f in frames if f["type"] == "token"]
    done = frames[-1]
    assert done["type"] == "run.done", done
    assert len(tokens) >= 10
    assert [f["seq"] for f in frames] == list(range(1, len(frames) + 1))
    assert done["usage"]["completion_tokens"] >= 10
    assert done["usage"]["prompt_tokens"] > 0
    assert done["usage"]["total_tokens"] == (
        done["usage"]["prompt_tokens"] + done["usage"]["completion_tokens"]
    )

    streamed = "".join(f["delta"] for f in tokens)
    run = await as_operator(
        lambda: Run.objects.select_related("assistant_message").get(id=started["run_id"])
    )
    assert run.state == Run.State.SUCCEEDED
    assert run.assistant_message is not None
    assert str(run.assistant_message.id) == done["message_id"]
    assert run.assistant_message.content == streamed
    assert run.completion_tokens == done["usage"]["completion_tokens"]
    assert run.backend == backend
    assert run.tenant_id == alice.tenant.id
    await socket.close()


async def test_follow_up_continues_the_conversation_thread(alice, backend, worker):
    connected, _, socket = await ws_connect(alice.user)
    assert connected
    first, frames = await _turn(socket, "Say hello.")
    assert frames[-1]["type"] == "run.done"
    second, frames = await _turn(socket, "Now say goodbye.", first["conversation_id"])
    assert frames[-1]["type"] == "run.done"
    assert second["conversation_id"] == first["conversation_id"]

    question = await as_operator(lambda: Message.objects.get(id=second["user_message_id"]))
    first_run = await as_operator(lambda: Run.objects.get(id=first["run_id"]))
    first_answer = await as_operator(lambda: Message.objects.get(id=first_run.assistant_message_id))
    assert question.parent_id == first_answer.id
    assert (
        await as_operator(
            lambda: Message.objects.filter(conversation_id=first["conversation_id"]).count()
        )
        == 4
    )
    await socket.close()


async def test_another_socket_of_the_member_learns_of_a_new_run_and_follows_it(
    alice, bob, backend, worker
):
    """A second tab: told of the new conversation and of the run (no client id), it
    attaches and gets every event; the sending socket gets one run.started only;
    another member hears nothing."""
    _, _, sender = await ws_connect(alice.user)
    _, _, other_tab = await ws_connect(alice.user)
    _, _, colleague = await ws_connect(bob.user)
    started, frames = await _turn(sender, "Say hello.", client_id="send-1")
    assert not [f for f in frames if f["type"] == "run.started"]

    listed = await other_tab.receive()
    assert listed["type"] == "conversation.updated"
    assert listed["conversation_id"] == started["conversation_id"]
    assert listed["title"] == "Say hello."
    told = await other_tab.receive()
    assert told == {
        "type": "run.started",
        "run_id": started["run_id"],
        "conversation_id": started["conversation_id"],
        "user_message_id": started["user_message_id"],
    }
    await other_tab.send({"type": "run.attach", "run_id": told["run_id"], "after": 0})
    followed = await other_tab.receive_until(("run.done", "run.error"))
    assert _run_frames(followed, told["run_id"]) == frames

    # A follow-up in the same conversation: a run.started, no new listing.
    again, _ = await _turn(sender, "Now say goodbye.", started["conversation_id"])
    frame = await other_tab.receive()
    while frame["type"] == "conversation.updated":  # the automatic title may come first
        assert frame["conversation_id"] == started["conversation_id"]
        frame = await other_tab.receive()
    assert frame["type"] == "run.started" and frame["run_id"] == again["run_id"]
    assert not [f for f in await _drain(sender) if f["type"] == "run.started"], (
        "the sender was told twice"
    )
    assert not [f for f in await _drain(colleague) if "conversation_id" in f]
    for socket in (sender, other_tab, colleague):
        await socket.close()


async def _drain(socket) -> list[dict]:
    frames = []
    while not await socket.nothing_pending():
        frames.append(await socket.receive())
    return frames


async def test_outsider_cannot_post_to_a_conversation_and_gets_not_found(
    alice, charlie, backend, worker
):
    connected, _, socket = await ws_connect(alice.user)
    started, frames = await _turn(socket, "Say hello.")
    assert frames[-1]["type"] == "run.done"
    await socket.close()
    conversation_id = started["conversation_id"]
    before = await as_operator(
        lambda: Message.objects.filter(conversation_id=conversation_id).count()
    )

    connected, _, outsider = await ws_connect(charlie.user)
    assert connected
    await outsider.send(
        {"type": "chat.send", "content": "hi", "conversation_id": conversation_id, "client_id": "x"}
    )
    foreign = await outsider.receive()
    await outsider.send(
        {
            "type": "chat.send",
            "content": "hi",
            "conversation_id": str(uuid.uuid4()),
            "client_id": "x",
        }
    )
    missing = await outsider.receive()
    assert (
        foreign
        == missing
        == {
            "type": "error",
            "code": "not_found",
            "message": "No such conversation.",
            "client_id": "x",
        }
    )
    assert await outsider.nothing_pending()
    assert (
        await as_operator(lambda: Message.objects.filter(conversation_id=conversation_id).count())
        == before
    )
    assert not await as_operator(
        lambda: Conversation.objects.filter(tenant=charlie.tenant).exists()
    )
    await outsider.close()


async def test_bad_frames_get_error_frames_and_the_socket_still_completes_a_turn(
    alice, backend, worker, settings
):
    connected, _, socket = await ws_connect(alice.user)
    assert connected
    oversized = (
        '{"type": "chat.send", "content": "' + "x" * settings.PARLEY_WS_MAX_FRAME_BYTES + '"}'
    )
    cases = [
        ("{not json", "invalid_json"),
        ("[1, 2]", "invalid_frame"),
        ({"content": "no type"}, "invalid_frame"),
        ({"type": "chat.explode"}, "unknown_type"),
        ({"type": "chat.send"}, "invalid_frame"),
        ({"type": "chat.send", "content": "   "}, "invalid_frame"),
        ({"type": "chat.send", "content": "hi", "conversation_id": 42}, "invalid_frame"),
        ({"type": "chat.send", "content": "hi", "client_id": ""}, "invalid_frame"),
        (oversized, "frame_too_large"),
        ({"type": "chat.send", "content": "hi", "conversation_id": str(uuid.uuid4())}, "not_found"),
        ({"type": "chat.send", "content": "hi", "conversation_id": "not-a-uuid"}, "not_found"),
    ]
    for frame, code in cases:
        await socket.send(frame)
        reply = await socket.receive()
        assert reply["type"] == "error", (frame, reply)
        assert reply["code"] == code, (frame, reply)
        assert reply["message"]
    await socket.communicator.send_to(bytes_data=b"\xff\xfe")
    assert (await socket.receive())["code"] == "invalid_json"
    assert await as_operator(lambda: Run.objects.count()) == 0

    await socket.send({"type": "ping", "client_id": "p"})
    assert await socket.receive() == {"type": "pong", "client_id": "p"}
    _, frames = await _turn(socket, "Say hello.")
    assert frames[-1]["type"] == "run.done"
    assert [f["seq"] for f in frames] == list(range(1, len(frames) + 1))
    await socket.close()


async def test_unauthenticated_sockets_are_refused(db):
    frame, code = await ws_refusal()
    assert (frame["code"], code) == ("unauthenticated", 4401)
    frame, code = await ws_refusal(cookie="forged-session-id")
    assert (frame["code"], code) == ("unauthenticated", 4401)


async def test_user_without_a_tenant_is_refused(db):
    from tests.factories import UserFactory

    user = await sync_to_async(UserFactory)()
    _, code = await ws_refusal(user)
    assert code == 4401


async def test_cross_origin_browser_socket_is_refused(alice):
    connected, _, _ = await ws_connect(alice.user, origin="http://evil.example.com")
    assert not connected
    connected, _, socket = await ws_connect(alice.user, origin="http://testserver")
    assert connected
    await socket.close()


async def test_a_broker_outage_gets_a_clear_error_and_keeps_the_message(alice, monkeypatch):
    import config.celery

    def broker_down(*args, **kwargs):
        raise ConnectionError("Error 111 connecting to redis")

    monkeypatch.setattr(config.celery, "enqueue", broker_down)
    connected, _, socket = await ws_connect(alice.user)
    assert connected
    await socket.send({"type": "chat.send", "content": "Are you there?", "client_id": "q"})
    reply = await socket.receive()
    assert reply["type"] == "error"
    assert reply["code"] == "unavailable"
    assert reply["client_id"] == "q"
    run = await as_operator(lambda: Run.objects.select_related("user_message").get())
    assert run.state == Run.State.FAILED
    assert run.error_code == "queue_unavailable"
    assert run.user_message.content == "Are you there?"

    monkeypatch.undo()
    await socket.send({"type": "ping"})
    # The conversation holds the message: the member's sockets list it; no run.started.
    listed, pong = await socket.receive(), await socket.receive()
    assert listed["type"] == "conversation.updated"
    assert listed["conversation_id"] == str(run.conversation_id)
    assert pong["type"] == "pong"
    await socket.close()


async def test_an_idle_socket_outlives_the_redis_client_timeout(alice):
    """A consumer waits on the channel layer with 5-second blocking reads; redis-py's
    default socket timeout is also 5 s. An idle socket must stay usable."""
    import asyncio

    connected, _, socket = await ws_connect(alice.user)
    assert connected
    await asyncio.sleep(12)
    await socket.send({"type": "ping", "client_id": "still-here"})
    assert await socket.receive() == {"type": "pong", "client_id": "still-here"}
    await socket.close()


@pytest.mark.parametrize(
    ("failure", "level"),
    [
        ("uvicorn.protocols.utils.ClientDisconnected", "INFO"),  # a reload mid-stream
        ("builtins.ConnectionResetError", "INFO"),
        ("builtins.ValueError", "ERROR"),  # a real fault is still reported as one
    ],
)
async def test_a_client_that_leaves_mid_relay_is_logged_as_leaving(
    caplog, monkeypatch, failure, level
):
    """A reload during a stream closes the socket while a frame is sent: logged as the
    client leaving (no traceback), where a real fault still logs an error."""
    import importlib
    import logging

    from chat import consumers

    module, name = failure.rsplit(".", 1)
    error = getattr(importlib.import_module(module), name)

    async def frames(run, *, after, coalesce):
        yield {"type": "token", "seq": 1, "run_id": str(run.id), "text": "Hi"}

    async def send(**kwargs):
        raise error()

    monkeypatch.setattr(consumers, "run_relay", frames)
    consumer = consumers.ChatConsumer()
    consumer.relays = {}
    monkeypatch.setattr(consumer, "send", send)
    run = Run(id=uuid.uuid4())
    with caplog.at_level(logging.INFO, logger="chat.consumers"):
        await consumer.relay(run, 0, False)
    records = [r for r in caplog.records if r.name == "chat.consumers"]
    assert [r.levelname for r in records] == [level]
    assert (records[0].exc_info is not None) == (level == "ERROR")
