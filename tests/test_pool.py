"""The inference pool and its backend client against synthetic vLLM-compatible servers,
and a run executed end to end against one (real PostgreSQL and Redis, no model)."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest

from chat.chat_turn import chat_turn_execute as run_execute
from chat.eventlog import event_log, run_log_key
from chat.models import Message, Run
from inference import plan, pool
from inference.client import BackendClient, Timeouts
from inference.types import (
    ChatRequest,
    InferenceError,
    StreamFinished,
    StreamStarted,
    TextDelta,
    Usage,
)
from tenants.rls import operator_scope
from tests.factories import ConversationFactory, MembershipFactory, MessageFactory, RunFactory
from tests.synthetic import DEFAULT_MODEL, SyntheticServer, refused_url

HELLO = [{"role": "user", "content": "hello"}]

pytestmark = pytest.mark.django_db


ROUTING_POLICY = plan.policy


class InListedOrder:
    """A routing policy for failover tests: the first candidate in PARLEY_BACKENDS
    order, so a test decides which backend a call tries first. Routing itself is
    tested in tests/test_router.py."""

    name = "listed"

    def __init__(self, settings) -> None:
        self.settings = settings

    def choose(self, request, backends):
        from inference.router import candidates

        order = [url.rstrip("/") for url in self.settings.PARLEY_BACKENDS]
        pool_ = candidates(request, backends)
        return min(pool_, key=lambda b: order.index(b.id)) if pool_ else None


@pytest.fixture(autouse=True)
def _listed_order(settings, monkeypatch):
    monkeypatch.setattr(plan, "policy", lambda: InListedOrder(settings))


@pytest.fixture(autouse=True)
def _pool(fresh_pool, settings):
    """Every test here starts from an empty pool (conftest.fresh_pool)."""
    settings.PARLEY_HEALTH_TTL_S = 60.0


def collect(events_iter, events: list) -> None:
    for event in events_iter:
        events.append(event)


def text_of(events) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def client(url: str) -> BackendClient:
    return BackendClient(url, timeouts=Timeouts(connect_s=2.0, first_token_s=10.0, idle_s=10.0))


def direct(url: str):
    """A plain chat stream from one backend, bypassing the pool."""
    return client(url).chat_stream(ChatRequest(messages=HELLO), model=DEFAULT_MODEL)


# --- the synthetic server speaks vLLM's dialect --------------------------------------


def test_synthetic_server_streams_vllm_shaped_chunks(synthetic_server):
    server = synthetic_server(pieces=["a", "b", "c"], prompt_tokens=9, max_model_len=2048)
    assert httpx.get(f"{server.url}/health").status_code == 200
    models = httpx.get(f"{server.url}/v1/models").json()["data"]
    assert [(m["id"], m["max_model_len"]) for m in models] == [(DEFAULT_MODEL, 2048)]

    def stream(include_usage: bool) -> list:
        body = {"messages": HELLO, "stream": True}
        if include_usage:
            body["stream_options"] = {"include_usage": True}
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            data = [ln[5:].strip() for ln in response.iter_lines() if ln.startswith("data:")]
        assert data[-1] == "[DONE]"
        return [json.loads(d) for d in data[:-1]]

    chunks = stream(include_usage=True)
    assert len({c["id"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:4]] == ["a", "b", "c"]
    assert chunks[4]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}

    plain = stream(include_usage=False)
    assert not any("usage" in c for c in plain)
    assert plain[-1]["choices"][0]["finish_reason"] == "stop"
    assert server.request_count == 2


# --- BackendClient --------------------------------------------------------------------


def test_client_models_and_health(synthetic_server):
    server = synthetic_server(max_model_len=1234)
    backend = client(server.url)
    assert backend.health() is True
    assert [(m.id, m.max_model_len) for m in backend.models()] == [(DEFAULT_MODEL, 1234)]

    dead = client(refused_url())
    assert dead.health() is False
    with pytest.raises(InferenceError) as info:
        dead.models()
    assert info.value.code == "backend_unreachable"
    assert info.value.retryable


class CountingProxy:
    """A TCP proxy in front of a server that counts the connections made through it."""

    def __init__(self, port: int) -> None:
        self.target_port = port
        self.connections = 0
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)

        async def pipe(reader, writer) -> None:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.close()

        async def connect(client_reader, client_writer) -> None:
            self.connections += 1
            reader, writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            await asyncio.gather(pipe(client_reader, writer), pipe(reader, client_writer))

        server = self.loop.run_until_complete(asyncio.start_server(connect, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    def stop(self) -> None:
        async def shutdown() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop)
        self.thread.join(timeout=5)


def test_the_client_keeps_its_connection_between_calls(synthetic_server):
    """A worker's calls to a backend reuse one kept-alive connection, whatever client
    object makes them (the pool makes one per call)."""
    server = synthetic_server(tokens=3)
    proxy = CountingProxy(server.port)
    try:
        for _ in range(3):
            events = list(direct(proxy.url))
            assert text_of(events) == "tok0 tok1 tok2 "
        assert client(proxy.url).health() is True
        assert [m.id for m in client(proxy.url).models()] == [DEFAULT_MODEL]
        assert proxy.connections == 1
    finally:
        proxy.stop()


def test_client_streams_deltas_and_takes_usage_from_the_final_chunk(synthetic_server):
    server = synthetic_server(pieces=["Grüß", " dich", " 👋", "!"], prompt_tokens=21)
    request = ChatRequest(messages=HELLO, max_tokens=100, temperature=0.2, tenant_id="t-42")
    events = list(client(server.url).chat_stream(request, model=DEFAULT_MODEL))

    assert events[0] == StreamStarted(backend=server.url, model=DEFAULT_MODEL)
    assert [e.text for e in events[1:-1]] == ["Grüß", " dich", " 👋", "!"]
    assert events[-1] == StreamFinished(
        finish_reason="stop", usage=Usage(prompt_tokens=21, completion_tokens=4)
    )
    (body,) = server.bodies
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["cache_salt"] == "t-42"
    assert body["max_tokens"] == 100
    assert body["temperature"] == 0.2
    assert body["model"] == DEFAULT_MODEL


SAMPLING = {
    "stop": ["\n\n"],
    "seed": 11,
    "top_p": 0.9,
    "top_k": 20,
    "min_p": 0.1,
    "presence_penalty": 0.5,
    "frequency_penalty": 0.25,
    "repetition_penalty": 1.1,
    "logit_bias": {"42": -100.0},
    "response_format": {"type": "json_object"},
}


def test_both_clients_send_the_sampling_parameters(synthetic_server):
    """The sync client (workers) and the async one (the gateway) build one body."""
    import asyncio

    from inference.aclient import backend_stream

    server = synthetic_server(tokens=2)
    request = ChatRequest(messages=HELLO, tenant_id="t-7", sampling=SAMPLING)
    list(client(server.url).chat_stream(request, model=DEFAULT_MODEL))

    async def stream() -> list:
        return [e async for e in backend_stream(server.url, request, model=DEFAULT_MODEL)]

    assert text_of(asyncio.run(stream())) == "tok0 tok1 "
    sync_body, async_body = server.bodies
    assert sync_body == async_body
    assert {name: sync_body[name] for name in SAMPLING} == SAMPLING
    assert sync_body["cache_salt"] == "t-7"
    # Without sampling parameters, none is sent: the backend's defaults apply.
    list(client(server.url).chat_stream(ChatRequest(messages=HELLO), model=DEFAULT_MODEL))
    assert not set(SAMPLING) & set(server.bodies[-1])


@pytest.mark.parametrize(
    "fields",
    [
        {"sampling": {"cache_salt": "another-tenant"}},
        {"sampling": {"stream": False}},
        {"max_tokens": 0},
        {"max_tokens": 2**31},
    ],
)
def test_a_chat_request_takes_only_what_the_pool_can_send(fields):
    with pytest.raises(ValueError):
        ChatRequest(messages=HELLO, **fields)


@pytest.mark.parametrize(
    ("reported", "counted"),
    [
        (1234, 1234),
        (2**31 - 1, 2**31 - 1),
        (2**31, 2**31 - 1),
        (10**30, 2**31 - 1),
        (1e30, 2**31 - 1),
        (12.0, 12),
        (-5, 0),
        (float("inf"), 0),
        (float("nan"), 0),
        ("many", 0),
        (True, 0),
        (None, 0),
    ],
)
def test_a_backends_usage_is_read_as_a_count_the_ledger_holds(reported, counted):
    from inference.wire import chunk_events

    chunk = {"choices": [], "usage": {"prompt_tokens": reported, "completion_tokens": reported}}
    _, _, usage = chunk_events(chunk, started=True)
    assert usage == Usage(prompt_tokens=counted, completion_tokens=counted)


def test_client_without_a_usage_chunk_reports_zero_usage(synthetic_server):
    server = synthetic_server(tokens=3, fail="no_usage")
    events = list(client(server.url).chat_stream(ChatRequest(messages=HELLO), model=DEFAULT_MODEL))
    assert len([e for e in events if isinstance(e, TextDelta)]) == 3
    assert events[-1] == StreamFinished(finish_reason="stop", usage=Usage())


def test_client_reports_length_when_max_tokens_cuts_the_answer(synthetic_server):
    server = synthetic_server(tokens=10)
    request = ChatRequest(messages=HELLO, max_tokens=3)
    events = list(client(server.url).chat_stream(request, model=DEFAULT_MODEL))
    assert text_of(events) == "tok0 tok1 tok2 "
    assert events[-1].finish_reason == "length"
    assert events[-1].usage.completion_tokens == 3


def test_client_http500_before_streaming_is_retryable(synthetic_server):
    server = synthetic_server(fail="http500")
    events: list = []
    with pytest.raises(InferenceError) as info:
        collect(direct(server.url), events)
    assert events == []
    assert info.value.code == "backend_error"
    assert info.value.retryable
    assert info.value.status == 500
    assert info.value.message == "synthetic failure"


def test_client_unknown_model_is_rejected_not_retryable(synthetic_server):
    server = synthetic_server()
    with pytest.raises(InferenceError) as info:
        list(client(server.url).chat_stream(ChatRequest(messages=HELLO), model="nope"))
    assert info.value.code == "backend_rejected"
    assert info.value.status == 404
    assert not info.value.retryable


def test_client_drop_mid_stream_yields_the_partial_deltas_then_fails(synthetic_server):
    server = synthetic_server(tokens=6, fail="drop_after_n", drop_after=3)
    events: list = []
    with pytest.raises(InferenceError) as info:
        collect(direct(server.url), events)
    assert text_of(events) == "tok0 tok1 tok2 "
    assert not any(isinstance(e, StreamFinished) for e in events)
    assert info.value.code == "stream_interrupted"
    assert not info.value.retryable


def test_client_connection_reset_mid_stream_is_a_backend_error(synthetic_server):
    server = synthetic_server(tokens=6, fail="reset_after_n", drop_after=2)
    events: list = []
    with pytest.raises(InferenceError) as info:
        collect(direct(server.url), events)
    assert text_of(events) == "tok0 tok1 "
    assert info.value.code == "backend_error"
    assert not info.value.retryable


# --- the pool -------------------------------------------------------------------------


def test_no_backend_configured(settings):
    settings.PARLEY_BACKENDS = []
    with pytest.raises(InferenceError) as info:
        list(pool.chat_stream(ChatRequest(messages=HELLO)))
    assert info.value.code == "no_backend"


def test_no_healthy_backend(settings):
    settings.PARLEY_BACKENDS = [refused_url(), refused_url()]
    with pytest.raises(InferenceError) as info:
        list(pool.chat_stream(ChatRequest(messages=HELLO)))
    assert info.value.code == "no_backend"


def test_unknown_model(settings, synthetic_server):
    server = synthetic_server()
    settings.PARLEY_BACKENDS = [server.url]
    with pytest.raises(InferenceError) as info:
        list(pool.chat_stream(ChatRequest(messages=HELLO, model="no-such-model")))
    assert info.value.code == "model_not_found"
    assert server.request_count == 0


def test_default_model_is_the_first_served(settings, synthetic_server):
    server = synthetic_server(model="served-model", tokens=2)
    settings.PARLEY_BACKENDS = [server.url]
    events = list(pool.chat_stream(ChatRequest(messages=HELLO)))
    assert events[0] == StreamStarted(backend=server.url, model="served-model")
    assert server.bodies[0]["model"] == "served-model"


def test_refused_backend_listed_first_is_skipped(settings, synthetic_server):
    dead = refused_url()
    server = synthetic_server(tokens=4, prompt_tokens=5)
    settings.PARLEY_BACKENDS = [dead, server.url]
    events = list(pool.chat_stream(ChatRequest(messages=HELLO, model=DEFAULT_MODEL)))

    assert [e for e in events if isinstance(e, StreamStarted)] == [
        StreamStarted(backend=server.url, model=DEFAULT_MODEL)
    ]
    assert text_of(events) == "tok0 tok1 tok2 tok3 "
    assert events[-1] == StreamFinished("stop", Usage(prompt_tokens=5, completion_tokens=4))
    assert server.request_count == 1
    assert pool.backend_healthy(dead) is False


def test_backend_that_stops_accepting_connections_is_retried_on_the_next(
    settings, synthetic_server
):
    first = synthetic_server(tokens=2)
    second = synthetic_server(tokens=3)
    settings.PARLEY_BACKENDS = [first.url, second.url]
    # Both look healthy and serve the model (cached), then the first goes away.
    assert [m.id for m in pool.models_available()] == [DEFAULT_MODEL]
    first.stop()

    events = list(pool.chat_stream(ChatRequest(messages=HELLO, model=DEFAULT_MODEL)))
    assert [e.backend for e in events if isinstance(e, StreamStarted)] == [second.url]
    assert text_of(events) == "tok0 tok1 tok2 "
    assert isinstance(events[-1], StreamFinished)
    assert second.request_count == 1
    assert pool.backend_healthy(first.url) is False


def test_http500_before_the_first_token_is_retried_on_the_next_backend(
    settings, synthetic_server, monkeypatch
):
    broken = synthetic_server(fail="http500")
    good = synthetic_server(tokens=3, prompt_tokens=8)
    settings.PARLEY_BACKENDS = [broken.url, good.url]
    request = ChatRequest(messages=HELLO, model=DEFAULT_MODEL)

    events = list(pool.chat_stream(request))
    assert [e.backend for e in events if isinstance(e, StreamStarted)] == [good.url]
    assert text_of(events) == "tok0 tok1 tok2 "
    assert events[-1].usage == Usage(prompt_tokens=8, completion_tokens=3)
    assert (broken.request_count, good.request_count) == (1, 1)

    # The failed backend is marked degraded: the real router sends the next call straight
    # to the good one.
    monkeypatch.setattr(plan, "policy", ROUTING_POLICY)
    assert text_of(pool.chat_stream(request)) == "tok0 tok1 tok2 "
    assert (broken.request_count, good.request_count) == (1, 2)


def test_every_backend_failing_before_the_first_token_raises_the_last_error(
    settings, synthetic_server
):
    one = synthetic_server(fail="http500")
    two = synthetic_server(fail="http500")
    settings.PARLEY_BACKENDS = [one.url, two.url]
    with pytest.raises(InferenceError) as info:
        list(pool.chat_stream(ChatRequest(messages=HELLO, model=DEFAULT_MODEL)))
    assert info.value.code == "backend_error"
    assert info.value.status == 500
    assert (one.request_count, two.request_count) == (1, 1)


def test_stream_ending_before_any_token_is_retried(settings, synthetic_server):
    empty = synthetic_server(tokens=4, fail="drop_after_n", drop_after=0)
    good = synthetic_server(tokens=2)
    settings.PARLEY_BACKENDS = [empty.url, good.url]
    events = list(pool.chat_stream(ChatRequest(messages=HELLO, model=DEFAULT_MODEL)))
    # Both streams started; only the second produced anything.
    assert [e.backend for e in events if isinstance(e, StreamStarted)] == [empty.url, good.url]
    assert text_of(events) == "tok0 tok1 "
    assert (empty.request_count, good.request_count) == (1, 1)


@pytest.mark.parametrize(
    ("fail", "code"), [("drop_after_n", "stream_interrupted"), ("reset_after_n", "backend_error")]
)
def test_failure_after_the_first_token_is_not_retried(settings, synthetic_server, fail, code):
    dropping = synthetic_server(tokens=6, fail=fail, drop_after=3)
    spare = synthetic_server(tokens=2)
    settings.PARLEY_BACKENDS = [dropping.url, spare.url]
    events: list = []
    with pytest.raises(InferenceError) as info:
        collect(pool.chat_stream(ChatRequest(messages=HELLO, model=DEFAULT_MODEL)), events)

    assert text_of(events) == "tok0 tok1 tok2 "
    assert info.value.code == code
    assert not info.value.retryable
    assert (dropping.request_count, spare.request_count) == (1, 0)


def test_the_pool_never_retries_once_a_token_was_yielded(settings, synthetic_server, monkeypatch):
    """Even if a backend calls an error after its first token retryable, the caller has
    already seen text: the pool must not splice a second answer onto it."""
    first = synthetic_server(tokens=3)
    second = synthetic_server(tokens=3)
    settings.PARLEY_BACKENDS = [first.url, second.url]
    real_client_for = pool.client_for

    class FlakyAfterOneToken(BackendClient):
        def chat_stream(self, request, *, model):
            yield StreamStarted(backend=self.base_url, model=model)
            yield TextDelta("partial")
            raise InferenceError("backend_error", "went away", retryable=True)

    monkeypatch.setattr(
        pool,
        "client_for",
        lambda url: FlakyAfterOneToken(url) if url == first.url else real_client_for(url),
    )
    events: list = []
    with pytest.raises(InferenceError) as info:
        collect(pool.chat_stream(ChatRequest(messages=HELLO, model=DEFAULT_MODEL)), events)
    assert info.value.message == "went away"
    assert text_of(events) == "partial"
    assert second.request_count == 0


# --- a run executed against the synthetic server ---------------------------------------


@pytest.fixture
def queued_run(db):
    membership = MembershipFactory()
    tenant, user = membership.tenant, membership.user
    conversation = ConversationFactory(tenant=tenant, user=user, title="synthetic")
    run = RunFactory(user_message=MessageFactory(conversation=conversation))
    assert run.state == Run.State.QUEUED
    key = run_log_key(tenant_id=run.tenant_id, run_id=run.id)
    yield run
    from django.conf import settings

    if settings.REDIS_URL:
        import redis

        redis.Redis.from_url(settings.REDIS_URL).delete(key)


def logged(run: Run) -> list[tuple[int, dict]]:
    return event_log().read_sync(run_log_key(tenant_id=run.tenant_id, run_id=run.id))


def deltas(events: list[tuple[int, dict]]) -> str:
    return "".join(e["delta"] for _, e in events if e["type"] == "token")


@pytest.mark.django_db(transaction=True)
def test_run_dropped_mid_stream_keeps_the_partial_answer(settings, synthetic_server, queued_run):
    server = synthetic_server(
        pieces=["Hel", "lo, ", "wör", "ld", " and more"], fail="drop_after_n", drop_after=3
    )
    settings.PARLEY_BACKENDS = [server.url]

    run_execute(run_id=queued_run.id, tenant_id=queued_run.tenant_id)

    with operator_scope():
        run = Run.objects.select_related("assistant_message").get(id=queued_run.id)
    events = logged(run)
    assert run.state == Run.State.FAILED
    assert run.error_code == "stream_interrupted"
    assert run.error_message
    assert run.finished_at is not None
    assert run.assistant_message is not None
    assert run.assistant_message.content == "Hello, wör"
    assert run.assistant_message.content == deltas(events)
    assert run.assistant_message.role == Message.Role.ASSISTANT
    assert run.assistant_message.parent_id == run.user_message_id

    assert [seq for seq, _ in events] == list(range(1, len(events) + 1))
    assert [e["type"] for _, e in events] == ["token", "token", "token", "run.error"]
    last = events[-1][1]
    assert last["code"] == "stream_interrupted"
    assert last["message_id"] == str(run.assistant_message.id)
    assert run.last_seq == events[-1][0]
    assert server.request_count == 1


@pytest.mark.django_db(transaction=True)
def test_run_succeeds_and_persists_exactly_the_logged_deltas(
    settings, synthetic_server, queued_run
):
    server = synthetic_server(pieces=["Bon", "jour", " à", " tous", " 🎉"], prompt_tokens=13)
    settings.PARLEY_BACKENDS = [server.url]
    settings.PARLEY_MAX_TOKENS = 64

    run_execute(run_id=queued_run.id, tenant_id=queued_run.tenant_id)

    with operator_scope():
        run = Run.objects.select_related("assistant_message").get(id=queued_run.id)
    events = logged(run)
    assert run.state == Run.State.SUCCEEDED
    assert run.error_code == ""
    assert run.backend == server.url
    assert run.model == DEFAULT_MODEL
    assert (run.prompt_tokens, run.completion_tokens, run.finish_reason) == (13, 5, "stop")
    assert run.assistant_message.content == "Bonjour à tous 🎉"
    assert run.assistant_message.content == deltas(events)

    assert [seq for seq, _ in events] == list(range(1, len(events) + 1))
    seq, done = events[-1]
    assert [e["type"] for _, e in events[:-1]] == ["token"] * (len(events) - 1)
    assert done == {
        "type": "run.done",
        "message_id": str(run.assistant_message.id),
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 13, "completion_tokens": 5, "total_tokens": 18},
    }
    assert run.last_seq == seq

    (body,) = server.bodies
    assert body["messages"][0] == {"role": "system", "content": settings.PARLEY_SYSTEM_PROMPT}
    assert body["messages"][1:] == [{"role": "user", "content": "Say something."}]
    assert body["max_tokens"] == 64
    assert body["cache_salt"] == str(run.tenant_id)


@pytest.mark.django_db(transaction=True)
def test_run_executed_twice_runs_once(settings, synthetic_server, queued_run):
    server = synthetic_server(tokens=3)
    settings.PARLEY_BACKENDS = [server.url]

    run_execute(run_id=queued_run.id, tenant_id=queued_run.tenant_id)
    first = logged(queued_run)
    assert first[-1][1]["type"] == "run.done"

    run_execute(run_id=queued_run.id, tenant_id=queued_run.tenant_id)
    assert logged(queued_run) == first
    assert server.request_count == 1
    with operator_scope():
        assert Message.objects.filter(role=Message.Role.ASSISTANT).count() == 1
        assert Run.objects.get(id=queued_run.id).state == Run.State.SUCCEEDED


def test_synthetic_server_context_manager_stops_cleanly():
    with SyntheticServer(tokens=1) as server:
        url = server.url
        assert httpx.get(f"{url}/health").status_code == 200
        assert server.hits("/health") == 1
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health", timeout=2)
