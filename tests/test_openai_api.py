"""The OpenAI-compatible API (/v1/chat/completions, /v1/models), served by uvicorn as
in production and called over real HTTP by the official `openai` package, LangChain's
ChatOpenAI and plain httpx, against synthetic backends."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import uvicorn

from inference import apool, pool
from inference.admission import admission
from inference.limits import limiter
from inference.local_process import free_port
from inference.models import UsageRecord
from inference.types import ChatRequest, StreamFinished, TextDelta
from tenants.access import Actor
from tenants.models import Plan, Role, Tenant
from tenants.rls import operator_scope, tenant_scope
from tenants.services.api_keys import api_key_create, api_key_revoke
from tests.synthetic import DEFAULT_MODEL

pytestmark = pytest.mark.django_db(transaction=True)
HELLO = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def parley() -> Iterator[str]:
    """Parley's ASGI application under uvicorn in a thread of this process: its /v1 URL."""
    from config.asgi import application

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(application, host="127.0.0.1", port=port, lifespan="off", log_config=None)
    )
    thread = threading.Thread(target=server.run, name="parley-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def backend(settings, synthetic_server):
    server = synthetic_server(pieces=["Hello", ",", " world", "!"], prompt_tokens=9)
    settings.PARLEY_BACKENDS = [server.url]
    pool.forget_cache()
    yield server
    pool.forget_cache()


def key_for(person, *, scopes=("chat",), name="integration") -> str:
    actor = Actor(tenant=person.tenant, user=person.user, role=Role.OWNER)
    with tenant_scope(tenant_id=person.tenant.id):
        _, secret = api_key_create(actor=actor, name=name, scopes=list(scopes))
    return secret


@pytest.fixture
def key(alice) -> str:
    return key_for(alice)


def sdk(parley: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=parley, api_key=key, max_retries=0, timeout=30)


def on_plan(person, **limits):
    with operator_scope():
        plan = Plan.objects.create(name=f"plan-{person.tenant.slug}", **limits)
        Tenant.objects.filter(id=person.tenant.id).update(plan=plan)


def records(person) -> list[UsageRecord]:
    with tenant_scope(tenant_id=person.tenant.id):
        return list(UsageRecord.objects.order_by("created_at"))


def post(parley: str, key: str | None, body: Any, **kwargs: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, bytes | str) else json.dumps(body)
    return httpx.post(
        f"{parley}/chat/completions", content=content, headers=headers, timeout=30, **kwargs
    )


def sse_events(response: httpx.Response) -> list[Any]:
    """The data of each SSE event; `[DONE]` as the string."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def assert_openai_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    return body["error"]


# --- the official SDK and LangChain --------------------------------------------------


def test_the_openai_sdk_completes_a_chat(parley, alice, key, backend):
    completion = sdk(parley, key).chat.completions.create(
        model=DEFAULT_MODEL, messages=HELLO, max_tokens=50, temperature=0.5
    )
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == DEFAULT_MODEL
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == "Hello, world!"
    assert completion.choices[0].finish_reason == "stop"
    usage = completion.usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (9, 4, 13)
    # The pool saw the call as the key's: forwarded parameters, ledger row, the tenant's
    # cache salt.
    (body,) = backend.bodies
    assert body["max_tokens"] == 50 and body["temperature"] == 0.5
    assert body["cache_salt"] == str(alice.tenant.id) and body["messages"] == HELLO
    (record,) = records(alice)
    assert (record.prompt_tokens, record.completion_tokens, record.outcome) == (9, 4, "completed")
    assert record.api_key_id is not None and record.user_id is None
    assert (record.purpose, record.reference) == ("openai.chat.completions", completion.id)
    assert record.model == DEFAULT_MODEL and record.backend == backend.url


def test_the_openai_sdk_streams_a_chat_with_usage(parley, alice, key, backend):
    stream = sdk(parley, key).chat.completions.create(
        model=DEFAULT_MODEL,
        messages=HELLO,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello, world!"
    assert {c.id for c in chunks} == {chunks[0].id}
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4 and chunks[-1].usage.prompt_tokens == 9
    assert all(c.usage is None for c in chunks[:-1])
    (record,) = records(alice)
    assert record.outcome == "completed" and record.reference == chunks[0].id


def test_langchain_chat_openai_invokes_and_streams(parley, alice, key, backend):
    from langchain_openai import ChatOpenAI

    model = ChatOpenAI(model=DEFAULT_MODEL, base_url=parley, api_key=key, max_retries=0, timeout=30)
    answer = model.invoke("hello there")
    assert answer.content == "Hello, world!"
    assert answer.usage_metadata is not None and answer.usage_metadata["output_tokens"] == 4
    pieces = list(model.stream("hello there"))
    assert "".join(str(p.content) for p in pieces) == "Hello, world!"

    async def astream() -> str:
        return "".join([str(p.content) async for p in model.astream("hello there")])

    assert asyncio.run(astream()) == "Hello, world!"
    assert [r.outcome for r in records(alice)] == ["completed"] * 3


# --- the wire format ------------------------------------------------------------------------


def test_the_stream_is_openai_server_sent_events(parley, key, backend):
    body = {"model": DEFAULT_MODEL, "messages": HELLO, "stream": True}
    with httpx.stream(
        "POST",
        f"{parley}/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk"
        assert set(chunk) == {"id", "object", "created", "model", "choices"}  # no usage asked
        (choice,) = chunk["choices"]
        assert set(choice) == {"index", "delta", "logprobs", "finish_reason"}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [c["choices"][0]["delta"].get("content") for c in chunks[1:-1]]
    assert deltas == ["Hello", ",", " world", "!"]
    assert chunks[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }


def test_text_content_parts_and_the_developer_role_are_accepted(parley, key, backend):
    body = {
        "model": DEFAULT_MODEL,
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}],
            },
        ],
        "max_completion_tokens": 2,
        "n": 1,
        "user": "end-user-7",
    }
    response = post(parley, key, body)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] == "length"
    (sent,) = backend.bodies
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "one\ntwo"},
    ]
    assert sent["max_tokens"] == 2


# --- /v1/models ---------------------------------------------------------------------------


def test_models_lists_what_the_tenant_may_use(
    parley, alice, charlie, key, settings, synthetic_server
):
    first = synthetic_server(model="model-a", max_model_len=8192)
    second = synthetic_server(model="model-b")
    settings.PARLEY_BACKENDS = [first.url, second.url]
    pool.forget_cache()
    listed = sdk(parley, key).models.list()
    assert sorted(m.id for m in listed.data) == ["model-a", "model-b"]
    entry = next(m for m in listed.data if m.id == "model-a")
    assert entry.object == "model" and entry.owned_by == "parley" and entry.created > 0
    assert entry.model_extra == {"max_model_len": 8192}
    on_plan(alice, enabled_models=["model-b"])
    assert [m.id for m in sdk(parley, key).models.list().data] == ["model-b"]
    # Another tenant's plan is its own.
    assert len(sdk(parley, key_for(charlie)).models.list().data) == 2
    pool.forget_cache()


def test_models_needs_a_valid_key(parley, backend):
    response = httpx.get(f"{parley}/models", timeout=10)
    assert_openai_error(response, 401, "missing_api_key")
    response = httpx.get(
        f"{parley}/models", headers={"Authorization": "Bearer prk_nope"}, timeout=10
    )
    assert_openai_error(response, 401, "invalid_api_key")


# --- errors in OpenAI's shape -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "code"),
    [
        (None, "missing_api_key"),
        ("Basic dXNlcjpwYXNz", "missing_api_key"),
        ("Bearer nonsense", "invalid_api_key"),
        ("Bearer prk_000000000000_" + "a" * 43, "invalid_api_key"),
    ],
)
def test_a_bad_key_is_401(parley, backend, header, code):
    headers = {"Authorization": header} if header else {}
    response = httpx.post(
        f"{parley}/chat/completions",
        json={"model": DEFAULT_MODEL, "messages": HELLO},
        headers=headers,
        timeout=10,
    )
    error = assert_openai_error(response, 401, code)
    assert error["type"] == "authentication_error"
    assert backend.request_count == 0


def test_the_sdk_raises_its_own_errors(parley, alice, key, backend):
    with pytest.raises(openai.AuthenticationError) as bad_key:
        sdk(parley, "prk_000000000000_" + "a" * 43).chat.completions.create(
            model=DEFAULT_MODEL, messages=HELLO
        )
    assert bad_key.value.code == "invalid_api_key"
    with pytest.raises(openai.NotFoundError) as unknown:
        sdk(parley, key).chat.completions.create(model="no-such-model", messages=HELLO)
    assert unknown.value.code == "model_not_found" and unknown.value.param == "model"
    with pytest.raises(openai.BadRequestError) as malformed:
        sdk(parley, key).chat.completions.create(model=DEFAULT_MODEL, messages=[])
    assert malformed.value.param == "messages"
    assert backend.request_count == 0
    assert records(alice) == []  # refused calls use nothing


def test_a_revoked_key_or_one_without_the_chat_scope_is_refused(parley, alice, backend):
    admin_only = key_for(alice, scopes=("admin",), name="admin-only")
    response = post(parley, admin_only, {"model": DEFAULT_MODEL, "messages": HELLO})
    assert_openai_error(response, 403, "insufficient_scope")
    secret = key_for(alice, name="soon-revoked")
    assert post(parley, secret, {"model": DEFAULT_MODEL, "messages": HELLO}).status_code == 200
    actor = Actor(tenant=alice.tenant, user=alice.user, role=Role.OWNER)
    with tenant_scope(tenant_id=alice.tenant.id):
        key_id = next(k for k in alice.tenant.api_keys.all() if k.name == "soon-revoked").id
        api_key_revoke(actor=actor, key_id=key_id)
    response = post(parley, secret, {"model": DEFAULT_MODEL, "messages": HELLO})
    assert "revoked" in assert_openai_error(response, 401, "invalid_api_key")["message"]


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        (b"{not json", None, "invalid_json"),
        (b"[1, 2]", None, "invalid_json"),
        ({"messages": HELLO}, "model", "missing_parameter"),
        ({"model": 7, "messages": HELLO}, "model", "invalid_value"),
        ({"model": DEFAULT_MODEL}, "messages", "missing_parameter"),
        ({"model": DEFAULT_MODEL, "messages": "hi"}, "messages", "invalid_value"),
        (
            {"model": DEFAULT_MODEL, "messages": [{"role": "wizard", "content": "x"}]},
            "messages[0].role",
            "invalid_value",
        ),
        (
            {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": 5}]},
            "messages[0].content",
            "invalid_value",
        ),
        (
            {
                "model": DEFAULT_MODEL,
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
                ],
            },
            "messages[0].content",
            "unsupported_content",
        ),
        (
            {"model": DEFAULT_MODEL, "messages": HELLO, "max_tokens": 0},
            "max_tokens",
            "invalid_value",
        ),
        (
            {"model": DEFAULT_MODEL, "messages": HELLO, "temperature": 3},
            "temperature",
            "invalid_value",
        ),
        ({"model": DEFAULT_MODEL, "messages": HELLO, "stream": "yes"}, "stream", "invalid_value"),
        (
            {"model": DEFAULT_MODEL, "messages": HELLO, "stream_options": {"include_usage": True}},
            "stream_options",
            "invalid_value",
        ),
        ({"model": DEFAULT_MODEL, "messages": HELLO, "n": 2}, "n", "unsupported_parameter"),
        (
            {"model": DEFAULT_MODEL, "messages": HELLO, "tools": [{"type": "function"}]},
            "tools",
            "unsupported_parameter",
        ),
        (
            {"model": DEFAULT_MODEL, "messages": HELLO, "frobnicate": 1},
            "frobnicate",
            "unknown_parameter",
        ),
    ],
)
def test_a_malformed_body_is_400_naming_the_parameter(parley, key, backend, body, param, code):
    error = assert_openai_error(post(parley, key, body), 400, code)
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert backend.request_count == 0


def test_an_unknown_model_is_404_and_takes_no_quota(parley, alice, key, backend):
    on_plan(alice, requests_per_minute=1)
    response = post(parley, key, {"model": "gpt-17", "messages": HELLO})
    error = assert_openai_error(response, 404, "model_not_found")
    assert "gpt-17" in error["message"] and error["param"] == "model"
    # The one request a minute is still there.
    assert post(parley, key, {"model": DEFAULT_MODEL, "messages": HELLO}).status_code == 200


def test_a_model_outside_the_plan_is_404(parley, alice, key, backend):
    on_plan(alice, enabled_models=["another-model"])
    response = post(parley, key, {"model": DEFAULT_MODEL, "messages": HELLO})
    assert "plan" in assert_openai_error(response, 404, "model_not_allowed")["message"]
    assert backend.request_count == 0


def test_over_the_rate_limit_is_429_with_retry_after(parley, alice, charlie, key, backend):
    on_plan(alice, requests_per_minute=1)
    assert post(parley, key, {"model": DEFAULT_MODEL, "messages": HELLO}).status_code == 200
    response = post(parley, key, {"model": DEFAULT_MODEL, "messages": HELLO, "stream": True})
    error = assert_openai_error(response, 429, "rate_limited")
    assert error["type"] == "rate_limit_error" and "requests per minute" in error["message"]
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    with pytest.raises(openai.RateLimitError):
        sdk(parley, key).chat.completions.create(model=DEFAULT_MODEL, messages=HELLO)
    # Another tenant is not affected.
    assert (
        post(parley, key_for(charlie), {"model": DEFAULT_MODEL, "messages": HELLO}).status_code
        == 200
    )
    assert backend.request_count == 2


def test_a_spent_budget_is_429_budget_exhausted(parley, alice, key, backend):
    on_plan(alice, monthly_token_budget=10)
    assert post(parley, key, {"model": DEFAULT_MODEL, "messages": HELLO}).status_code == 200
    response = post(parley, key, {"model": DEFAULT_MODEL, "messages": HELLO})
    error = assert_openai_error(response, 429, "budget_exhausted")
    assert error["type"] == "insufficient_quota"
    assert int(response.headers["Retry-After"]) >= 1


def test_per_key_limits_apply(parley, alice, settings, backend):
    settings.PARLEY_KEY_REQUESTS_PER_MINUTE = 1
    first, second = key_for(alice, name="one"), key_for(alice, name="two")
    assert post(parley, first, {"model": DEFAULT_MODEL, "messages": HELLO}).status_code == 200
    assert_openai_error(
        post(parley, first, {"model": DEFAULT_MODEL, "messages": HELLO}), 429, "rate_limited"
    )
    assert post(parley, second, {"model": DEFAULT_MODEL, "messages": HELLO}).status_code == 200


def test_no_backend_answering_is_503(parley, key, backend):
    from inference.backends import backend_set_state
    from inference.models import Backend

    assert post(parley, key, {"model": DEFAULT_MODEL, "messages": HELLO}).status_code == 200
    backend_set_state(backend_id=Backend.objects.get(base_url=backend.url).id, state="down")
    response = post(parley, key, {"model": DEFAULT_MODEL, "messages": HELLO})
    assert assert_openai_error(response, 503, "no_backend")["type"] == "server_error"
    # Nor does it list the model.
    assert sdk(parley, key).models.list().data == []


def test_unknown_urls_and_methods_answer_in_openai_shape(parley, key):
    assert_openai_error(httpx.get(f"{parley}/embeddings", timeout=10), 404, "unknown_url")
    response = httpx.get(
        f"{parley}/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=10
    )
    assert_openai_error(response, 405, "method_not_allowed")
    assert response.headers["Allow"] == "POST"


# --- the pool behind it: failover, mid-stream failures, disconnects, admission --------------


def test_a_backend_failing_before_the_first_token_is_failed_over(
    parley, alice, key, settings, synthetic_server
):
    broken = synthetic_server(fail="http500")
    healthy = synthetic_server(pieces=["ok"])
    settings.PARLEY_BACKENDS = [broken.url, healthy.url]
    settings.PARLEY_ROUTING_POLICY = "round_robin"
    pool.forget_cache()
    answers = [
        post(parley, key, {"model": DEFAULT_MODEL, "messages": HELLO, "stream": s})
        for s in (False, True, False)
    ]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert answers[0].json()["choices"][0]["message"]["content"] == "ok"
    assert healthy.request_count == 3 and broken.request_count >= 1
    assert [r.backend for r in records(alice)] == [healthy.url] * 3
    pool.forget_cache()


def test_a_stream_failing_midway_ends_with_an_error_event(
    parley, alice, key, settings, synthetic_server
):
    server = synthetic_server(tokens=6, fail="drop_after_n", drop_after=3)
    settings.PARLEY_BACKENDS = [server.url]
    pool.forget_cache()
    response = post(parley, key, {"model": DEFAULT_MODEL, "messages": HELLO, "stream": True})
    assert response.status_code == 200
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert error["code"] == "stream_interrupted" and error["type"] == "server_error"
    texts = [e["choices"][0]["delta"].get("content") for e in events[1:-2]]
    assert texts == ["tok0 ", "tok1 ", "tok2 "]
    # The SDK raises it.
    with pytest.raises(openai.APIError):
        list(
            sdk(parley, key).chat.completions.create(
                model=DEFAULT_MODEL, messages=HELLO, stream=True
            )
        )
    # Not streaming: a 502, and the partial text counted.
    response = post(parley, key, {"model": DEFAULT_MODEL, "messages": HELLO})
    assert_openai_error(response, 502, "stream_interrupted")
    assert [(r.outcome, r.completion_tokens) for r in records(alice)] == [("partial", 3)] * 3
    pool.forget_cache()


def test_a_client_that_disconnects_frees_its_slot_and_pays_what_it_got(
    parley, alice, key, settings, synthetic_server
):
    server = synthetic_server(tokens=200, delay_s=0.05)
    settings.PARLEY_BACKENDS = [server.url]
    pool.forget_cache()
    on_plan(alice, concurrent_runs=1)
    body = {"model": DEFAULT_MODEL, "messages": HELLO, "stream": True}
    with httpx.stream(
        "POST",
        f"{parley}/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    ) as response:
        assert response.status_code == 200
        lines = response.iter_lines()  # not a for loop: leaving one closes the response
        seen = 0
        while seen < 3:
            seen += '"content":"tok' in next(lines)
        # Meanwhile the one concurrent call is taken.
        answer = post(parley, key, {"model": DEFAULT_MODEL, "messages": HELLO})
        assert_openai_error(answer, 429, "rate_limited")
        assert records(alice) == []
    deadline = time.monotonic() + 10
    while not records(alice) and time.monotonic() < deadline:
        time.sleep(0.05)
    (record,) = records(alice)
    assert record.outcome == "partial" and 3 <= record.completion_tokens < 200
    # The slot is free again: the next call goes through.
    settings.PARLEY_BACKENDS = [synthetic_server(tokens=2).url]
    pool.forget_cache()
    assert post(parley, key, {"model": DEFAULT_MODEL, "messages": HELLO}).status_code == 200
    assert admission().inflight() == 0
    pool.forget_cache()


def test_a_saturated_pool_admits_calls_in_turn(parley, alice, key, settings, synthetic_server):
    server = synthetic_server(tokens=5, delay_s=0.1)
    settings.PARLEY_BACKENDS = [server.url]
    settings.PARLEY_BACKEND_MAX_INFLIGHT = 1
    pool.forget_cache()

    async def together() -> list[tuple[int, float, float]]:
        async with httpx.AsyncClient(timeout=30) as client:

            async def one() -> tuple[int, float, float]:
                started = time.monotonic()
                response = await client.post(
                    f"{parley}/chat/completions",
                    json={"model": DEFAULT_MODEL, "messages": HELLO},
                    headers={"Authorization": f"Bearer {key}"},
                )
                return response.status_code, started, time.monotonic()

            return await asyncio.gather(one(), one(), one())

    results = sorted(asyncio.run(together()), key=lambda r: r[2])
    assert [r[0] for r in results] == [200, 200, 200]
    # One at a time: each finished about a stream's length (0.5 s) after the previous.
    assert results[1][2] - results[0][2] > 0.35 and results[2][2] - results[1][2] > 0.35
    assert admission().inflight() == 0 and admission().waiting() == 0
    pool.forget_cache()


def test_a_silent_backend_times_out_before_the_first_token(parley, key, settings, synthetic_server):
    server = synthetic_server(tokens=3, delay_s=2.0)
    settings.PARLEY_BACKENDS = [server.url]
    settings.PARLEY_FIRST_TOKEN_TIMEOUT_S = 0.3
    settings.PARLEY_FAILOVER_ATTEMPTS = 1
    pool.forget_cache()
    started = time.monotonic()
    response = post(parley, key, {"model": DEFAULT_MODEL, "messages": HELLO})
    assert_openai_error(response, 504, "first_token_timeout")
    assert time.monotonic() - started < 1.8
    pool.forget_cache()


# --- the async pool is the sync pool's twin ----------------------------------------------------


def test_the_async_pool_streams_and_books_as_the_sync_pool(alice, backend):
    on_plan(alice, monthly_token_budget=10_000, concurrent_runs=1, requests_per_minute=10)
    request = ChatRequest(
        messages=HELLO,
        model=DEFAULT_MODEL,
        tenant_id=str(alice.tenant.id),
        user_id=str(alice.user.id),
        purpose="test",
        reference="r1",
    )
    sync_events = list(pool.chat_stream(request))

    async def collect() -> list[Any]:
        return [event async for event in apool.chat_stream(request)]

    async_events = asyncio.run(collect())
    assert async_events == sync_events
    assert [type(e) for e in async_events[1:]] == [TextDelta] * 4 + [StreamFinished]
    one, two = records(alice)
    fields = ("prompt_tokens", "completion_tokens", "outcome", "backend", "model", "user_id")
    fields += ("purpose", "reference", "reserved_tokens")
    assert [getattr(one, f) for f in fields] == [getattr(two, f) for f in fields]
    # Both settled their reservation and counted their use; neither holds a slot.
    assert limiter().budget_state(alice.tenant.id) == (2 * (9 + 4), 0)
    assert admission().inflight() == 0


def test_a_call_starts_in_one_redis_round_trip_and_ends_in_another(
    alice, backend, settings, monkeypatch
):
    """Limits, admission and the backend's lease are taken by one script (which also
    reads back the load for the next call's routing), and given back by one."""
    if not settings.REDIS_URL:
        pytest.skip("no REDIS_URL: the embedded mode keeps the calls' state in memory")
    from inference.aredis import PipelinedRedis
    from inference.store.redis import ASYNC_SCRIPTS

    on_plan(alice, monthly_token_budget=10_000, concurrent_runs=2, requests_per_minute=10)
    names = {script.sha: name for name, script in ASYNC_SCRIPTS.items()}
    sent: list[str] = []
    execute = PipelinedRedis.execute

    async def counted(self: PipelinedRedis, *args: Any) -> Any:
        sent.append(names.get(args[1], args[1]) if args[0] == "EVALSHA" else args[0])
        return await execute(self, *args)

    monkeypatch.setattr(PipelinedRedis, "execute", counted)
    request = ChatRequest(messages=HELLO, model=DEFAULT_MODEL, tenant_id=str(alice.tenant.id))

    async def twice() -> list[list[str]]:
        seen = []
        for _ in range(2):
            sent.clear()
            events = [event async for event in apool.chat_stream(request)]
            assert isinstance(events[-1], StreamFinished)
            seen.append(list(sent))
        return seen

    first, second = asyncio.run(twice())
    # The first call found this process's view of the load stale, and read it first; and
    # the month's budget counter missing: seeded from the ledger, START ran again.
    assert first == ["snapshot", "start", "start", "end"]
    assert second == ["start", "end"]
    assert len(records(alice)) == 2
    assert limiter().budget_state(alice.tenant.id) == (2 * (9 + 4), 0)
    assert admission().inflight() == 0


# --- the lean path: the ASGI app, the caller's cache, the backend client --------------------


def test_a_body_over_the_upload_limit_is_413(parley, key, settings, backend):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    body = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "x" * 2000}]}
    assert_openai_error(post(parley, key, body), 413, "body_too_large")
    # Without a Content-Length too (a chunked body).
    response = httpx.post(
        f"{parley}/chat/completions",
        content=iter([json.dumps(body).encode()]),
        headers={"Authorization": f"Bearer {key}"},
        timeout=10,
    )
    assert_openai_error(response, 413, "body_too_large")
    assert backend.request_count == 0


def test_https_is_required_as_the_production_settings_say(parley, key, settings, backend):
    settings.SECURE_SSL_REDIRECT = True
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    settings.SECURE_HSTS_SECONDS = 3600
    plain = post(parley, key, {"model": DEFAULT_MODEL, "messages": HELLO}, follow_redirects=False)
    assert plain.status_code == 301
    assert plain.headers["location"].startswith("https://127.0.0.1:")
    assert plain.headers["location"].endswith("/v1/chat/completions")
    proxied = httpx.post(
        f"{parley}/chat/completions",
        json={"model": DEFAULT_MODEL, "messages": HELLO},
        headers={"Authorization": f"Bearer {key}", "X-Forwarded-Proto": "https"},
        timeout=30,
    )
    assert proxied.status_code == 200
    assert proxied.headers["strict-transport-security"] == "max-age=3600"
    assert proxied.headers["x-content-type-options"] == "nosniff"


async def _asgi_get(app: Any, path: str, headers: dict[str, str], query: str = "") -> Any:
    """One GET through an ASGI application: its status and headers."""
    sent: list[dict[str, Any]] = []
    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.sleep(3600)  # the client stays until the answer is sent
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], {k.decode().lower(): v.decode() for k, v in start["headers"]}


SECURITY_HEADERS = ("strict-transport-security", "x-content-type-options", "location")


@pytest.mark.parametrize(
    ("options", "headers", "query"),
    [
        ({}, {}, ""),
        ({"SECURE_SSL_REDIRECT": True}, {}, "a=1&b=%20"),
        ({"SECURE_SSL_REDIRECT": True, "SECURE_SSL_HOST": "secure.localhost"}, {}, ""),
        ({"SECURE_SSL_REDIRECT": True}, {"X-Forwarded-Proto": "https"}, ""),
        ({"SECURE_HSTS_SECONDS": 600}, {"X-Forwarded-Proto": "https"}, ""),
        ({"SECURE_HSTS_SECONDS": 600}, {"X-Forwarded-Proto": "http"}, ""),
        (
            {"SECURE_HSTS_SECONDS": 600, "SECURE_HSTS_PRELOAD": True},
            {"X-Forwarded-Proto": "https"},
            "",
        ),
        (
            {"SECURE_HSTS_SECONDS": 31536000, "SECURE_HSTS_INCLUDE_SUBDOMAINS": True},
            {"X-Forwarded-Proto": "https"},
            "",
        ),
    ],
)
def test_v1_answers_with_the_security_headers_of_a_django_page(settings, options, headers, query):
    """gateway.asgi re-implements what Django's SecurityMiddleware does (the HTTPS
    redirect, HSTS, nosniff): /v1/ and a Django page answer the same request, under the
    same settings, with the same status and security headers."""
    from django.core.asgi import get_asgi_application

    from gateway.asgi import application as gateway_app

    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    for name, value in options.items():
        setattr(settings, name, value)
    django_app = get_asgi_application()  # its middleware reads the settings now
    request_headers = {"Host": "localhost:8000", **headers}

    async def both() -> tuple[Any, Any]:
        page = await _asgi_get(django_app, "/healthz", request_headers, query)
        api = await _asgi_get(gateway_app, "/v1/models", request_headers, query)
        return page, api

    (page_status, page_headers), (api_status, api_headers) = asyncio.run(both())
    redirected = page_status == 301
    assert (api_status == 301) == redirected
    assert api_status == 301 or api_status == 401  # no key: refused after the checks
    for name in SECURITY_HEADERS:
        expected = page_headers.get(name)
        if name == "location" and expected:
            expected = expected.replace("/healthz", "/v1/models")
        assert api_headers.get(name) == expected, name


def test_a_caller_is_remembered_briefly_and_forgotten_when_changed(alice, monkeypatch):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from gateway import services
    from gateway.errors import ApiError

    services.auth_cache_clear()
    secret = key_for(alice)
    header = f"Bearer {secret}"
    actor, _ = services.caller_cached(authorization=header)
    assert actor.tenant_id == alice.tenant.id
    with CaptureQueriesContext(connection) as queries:
        again, _ = services.caller_cached(authorization=header)
    assert len(queries) == 0 and again.api_key.id == actor.api_key.id
    # A plan saved in this process applies at once.
    with operator_scope():
        plan = Plan.objects.create(name="small", requests_per_minute=3)
        tenant = Tenant.objects.get(id=alice.tenant.id)
        tenant.plan = plan
        tenant.save()
    assert services.caller_cached(authorization=header)[1].requests_per_minute == 3
    # Past AUTH_CACHE_S the key is looked up again.
    monkeypatch.setattr(services.callers, "AUTH_CACHE_S", 0.0)
    services.auth_cache_clear()
    services.caller_cached(authorization=header)  # remembered for 0 s
    with CaptureQueriesContext(connection) as queries:
        services.caller_cached(authorization=header)
    assert len(queries) > 0
    # Refusals are never remembered; a revoked key is refused at once.
    monkeypatch.setattr(services.callers, "AUTH_CACHE_S", 60.0)
    with pytest.raises(ApiError):
        services.caller_cached(authorization="Bearer prk_nope")
    services.caller_cached(authorization=header)
    owner = Actor(tenant=alice.tenant, user=alice.user, role=Role.OWNER)
    with tenant_scope(tenant_id=alice.tenant.id):
        api_key_revoke(actor=owner, key_id=actor.api_key.id)
    with pytest.raises(ApiError) as refused:
        services.caller_cached(authorization=header)
    assert refused.value.status == 401
    # Nor is a key remembered past its expiry (here set by a bulk update: no signal).
    from datetime import timedelta

    from django.utils import timezone

    from tenants.models import ApiKey

    expiring = key_for(alice, name="expiring")
    with operator_scope():
        ApiKey.objects.filter(name="expiring").update(
            expires_at=timezone.now() + timedelta(seconds=0.5)
        )
    services.caller_cached(authorization=f"Bearer {expiring}")
    time.sleep(0.6)
    with pytest.raises(ApiError) as expired:
        services.caller_cached(authorization=f"Bearer {expiring}")
    assert "expired" in expired.value.message


def test_the_pipelined_redis_client_keeps_replies_in_step(settings):
    """Every command of an event loop goes out on one connection: replies come back to
    their own callers, a cancelled caller's reply is read and dropped, and a connection
    Redis closes is replaced by the next command."""
    if not settings.REDIS_URL:
        pytest.skip("no REDIS_URL")
    from redis.exceptions import ResponseError

    from inference.aredis import PipelinedRedis, Script

    key = f"{settings.PARLEY_REDIS_PREFIX}:test-pipelined:{time.time_ns()}"
    echo = Script("return {KEYS[1], ARGV[1]}")

    async def scenario() -> None:
        client = PipelinedRedis(settings.REDIS_URL)
        replies = await asyncio.gather(
            *(client.evalsha(echo, [f"k{i}"], [i]) for i in range(200)),
            client.execute("INCRBY", key, 5),
        )
        assert replies[:200] == [[f"k{i}", str(i)] for i in range(200)]
        assert replies[200] == 5
        slow = asyncio.ensure_future(client.execute("INCRBY", key, 1))
        await asyncio.sleep(0)
        slow.cancel()  # its reply still comes, and goes nowhere
        assert await client.execute("GET", key) == "6"
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await client.execute("LPUSH", key, "x")
        assert await client.execute("DEL", key) == 1
        client.close()  # the connection goes; the next command opens another
        assert await client.execute("PING") == "PONG"
        client.close()

    asyncio.run(scenario())


def test_the_backend_connection_is_kept_alive_between_calls(backend):
    from inference.aclient import Connection, backend_stream, connections_for

    request = ChatRequest(messages=HELLO, model=DEFAULT_MODEL)

    async def twice() -> tuple[list[Any], list[Any], int, int]:
        first = [event async for event in backend_stream(backend.url, request, model=DEFAULT_MODEL)]
        idle = connections_for(backend.url).idle
        assert len(idle) == 1
        kept = idle[0]
        second = [
            event async for event in backend_stream(backend.url, request, model=DEFAULT_MODEL)
        ]
        assert idle == [kept]  # the same connection, back again

        # A kept connection that the backend closes as the request arrives (its
        # keep-alive timeout) is replaced, not an error.
        async def close_on_request(reader: Any, writer: Any) -> None:
            await reader.read(1)
            writer.transport.abort()

        closer = await asyncio.start_server(close_on_request, "127.0.0.1", 0)
        port = closer.sockets[0].getsockname()[1]
        kept.writer.close()
        idle[:] = [Connection(*await asyncio.open_connection("127.0.0.1", port))]
        third = [event async for event in backend_stream(backend.url, request, model=DEFAULT_MODEL)]
        closer.close()
        return first, second, len(third), len(idle)

    first, second, third_count, idle_count = asyncio.run(twice())
    assert first == second and third_count == len(first) and idle_count == 1
    assert "".join(e.text for e in first if isinstance(e, TextDelta)) == "Hello, world!"
    assert isinstance(first[-1], StreamFinished)
    assert first[-1].usage.prompt_tokens == 9 and first[-1].finish_reason == "stop"
    assert backend.request_count == 3


# --- agents as models ------------------------------------------------------------------


def _enable_calculator(person) -> None:
    from agents.services import plugin_enable

    with tenant_scope(tenant_id=person.tenant.id):
        plugin_enable(actor=person.actor, name="calculator")


def _calculator_backend(settings, synthetic_server):
    from tests.synthetic import Reply, ToolCall

    server = synthetic_server(
        replies=[
            Reply(tool_calls=[ToolCall("calculate", {"expression": "6*7"})]),
            Reply(pieces=["6 times 7 ", "is 42."]),
        ]
    )
    settings.PARLEY_BACKENDS = [server.url]
    pool.forget_cache()
    return server


@pytest.mark.parametrize("stream", [False, True])
def test_an_enabled_agent_answers_as_a_model_with_its_tools(
    parley, alice, key, settings, synthetic_server, stream
):
    server = _calculator_backend(settings, synthetic_server)
    _enable_calculator(alice)
    client = openai.OpenAI(base_url=parley, api_key=key)
    listed = [m.id for m in client.models.list()]
    assert "agent:calculator.calculator" in listed
    question = [{"role": "user", "content": "What is 6 times 7?"}]
    if stream:
        chunks = list(
            client.chat.completions.create(
                model="agent:calculator.calculator", messages=question, stream=True
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[-1].choices[0].finish_reason == "stop"
    else:
        answer = client.chat.completions.create(
            model="agent:calculator.calculator", messages=question
        )
        text = answer.choices[0].message.content
        assert answer.model == "agent:calculator.calculator"
        assert answer.usage.completion_tokens > 0
    assert text == "6 times 7 is 42."
    # The second model call carried the tool's real result back to the model.
    tool_messages = [m for m in server.bodies[1]["messages"] if m["role"] == "tool"]
    assert [m["content"] for m in tool_messages] == ["42"]
    purposes = [r.purpose for r in records(alice)]
    assert purposes == ["agent.step", "agent.step"]


def test_an_agent_not_enabled_is_an_unknown_model(parley, alice, charlie, key, backend):
    _enable_calculator(charlie)  # another tenant's enablement is not alice's
    response = post(parley, key, {"model": "agent:calculator.calculator", "messages": HELLO})
    assert_openai_error(response, 404, "model_not_found")
    response = post(parley, key, {"model": "agent:nope.nothing", "messages": HELLO})
    assert_openai_error(response, 404, "model_not_found")
    assert records(alice) == []
