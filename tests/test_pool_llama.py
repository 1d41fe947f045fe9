"""The pool against three real llama.cpp servers (SmolLM2): spreading, failover before
the first token, a server killed mid-stream, and a restarted server coming back."""

from __future__ import annotations

import threading
import time

import pytest

from chat.chat_turn import chat_turn_execute as run_execute
from chat.eventlog import event_log, run_log_key
from chat.models import Message, Run
from inference import plan, pool
from inference.backends import backends_refresh
from inference.local_process import LocalModelServer
from inference.types import ChatRequest, StreamFinished, StreamStarted, TextDelta
from tenants.rls import operator_scope
from tests.factories import ConversationFactory, MembershipFactory, MessageFactory, RunFactory
from tests.test_pool import InListedOrder

pytestmark = [pytest.mark.llm, pytest.mark.django_db(transaction=True)]
MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    started = [
        LocalModelServer(threads=1, log_path=tmp_path_factory.mktemp("llama") / "server.log")
        for _ in range(3)
    ]
    for server in started:
        server.start()
    yield started
    for server in started:
        server.stop()


@pytest.fixture(autouse=True)
def _pool(settings, servers):
    settings.PARLEY_BACKENDS = [s.url for s in servers]
    settings.PARLEY_HEALTH_TTL_S = 60.0
    settings.PARLEY_TEMPERATURE = 0.0
    pool.forget_cache()
    yield
    pool.forget_cache()


def ask(text: str, *, system: str = "You are terse.", max_tokens: int = 6) -> list:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": text}]
    return list(
        pool.chat_stream(
            ChatRequest(messages=messages, model=MODEL, max_tokens=max_tokens, temperature=0.0)
        )
    )


def backends_of(events: list) -> list[str]:
    return [e.backend for e in events if isinstance(e, StreamStarted)]


def test_round_robin_spreads_calls_over_every_server(settings, servers):
    settings.PARLEY_ROUTING_POLICY = "round_robin"
    used = [backends_of(ask(f"Say {i}."))[0] for i in range(6)]
    assert sorted(used) == sorted([s.url for s in servers] * 2)


def test_prefix_affinity_keeps_a_shared_prefix_on_one_server(settings, servers):
    settings.PARLEY_ROUTING_POLICY = "prefix_load"
    handbook = "Company handbook. " * 120  # a long, shared system prompt
    first = [backends_of(ask(f"Question {i}?", system=handbook))[-1] for i in range(4)]
    assert len(set(first)) == 1  # every follow-up where the prefix is cached
    other = "A different manual entirely. " * 120
    assert backends_of(ask("Question?", system=other))  # and still served


def test_a_server_killed_before_the_first_token_is_failed_over_unnoticed(
    settings, servers, monkeypatch
):
    monkeypatch.setattr(plan, "policy", lambda: InListedOrder(settings))
    victim = servers[0]
    ask("Warm up.")  # the rows are healthy and cached
    victim.process.kill()
    victim.process.wait(timeout=10)
    try:
        events = ask("Say hello.")
        assert backends_of(events) == [servers[1].url]  # the client never saw the dead one
        assert isinstance(events[-1], StreamFinished)
        assert any(isinstance(e, TextDelta) for e in events)
    finally:
        victim.start()  # same port
    backends_refresh()
    assert backends_of(ask("Back again?")) == [victim.url]  # returned to rotation


def test_a_server_killed_mid_stream_ends_the_run_with_its_partial_text(settings, servers):
    victim = servers[2]
    settings.PARLEY_BACKENDS = [victim.url]
    settings.PARLEY_MAX_TOKENS = 400
    pool.forget_cache()
    membership = MembershipFactory()
    conversation = ConversationFactory(tenant=membership.tenant, user=membership.user)
    question = MessageFactory(
        conversation=conversation,
        content="Write a long story about a lighthouse keeper, in many paragraphs.",
    )
    run = RunFactory(user_message=question)
    worker = threading.Thread(
        target=run_execute, kwargs={"run_id": run.id, "tenant_id": run.tenant_id}
    )
    worker.start()
    key = run_log_key(tenant_id=run.tenant_id, run_id=run.id)
    deadline = time.monotonic() + 60
    while len(event_log().read_sync(key)) < 5:
        assert time.monotonic() < deadline, "no tokens streamed"
        time.sleep(0.05)
    victim.process.kill()
    victim.process.wait(timeout=10)
    worker.join(timeout=60)
    try:
        events = [e for _, e in event_log().read_sync(key)]
        assert events[-1]["type"] == "run.error"
        partial = "".join(e["delta"] for e in events if e["type"] == "token")
        with operator_scope():
            run.refresh_from_db()
            stored = Message.objects.get(id=run.assistant_message_id).content
        assert run.state == Run.State.FAILED and run.error_code
        assert partial and stored == partial
    finally:
        victim.start()
