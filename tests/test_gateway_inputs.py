"""What the OpenAI-compatible API takes from outside, checked at its edge: the Host
header (as Django checks it for the rest of the site), the JSON body (depth, NUL), the
token counts (`max_tokens` against the model's context and what the ledger holds),
and vLLM's sampling parameters (checked, then sent on to the backend). Real HTTP
through uvicorn, against synthetic backends and, for the `llm` tests, the real local
model server."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from inference import pool
from inference.types import MAX_TOKEN_COUNT
from tests import test_openai_api as api
from tests.synthetic import DEFAULT_MODEL
from tests.test_openai_api import HELLO, assert_openai_error, post, records, sdk, sse_events

pytestmark = pytest.mark.django_db(transaction=True)

# The API suite's fixtures: Parley under uvicorn, a synthetic backend, alice's key.
parley, backend, key = api.parley, api.backend, api.key


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": DEFAULT_MODEL, "messages": HELLO, **fields}


def post_to(parley: str, key: str, body: Any, headers: dict[str, str], **kwargs: Any):
    """`post` with more headers (Host, X-Forwarded-Host)."""
    return httpx.post(
        f"{parley}/chat/completions",
        content=json.dumps(body),
        headers={"Authorization": f"Bearer {key}", **headers},
        timeout=30,
        **kwargs,
    )


# --- Host -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        "evil.example",
        "127.0.0.1.evil.example",
        "localhost.evil.example",
        "",
        "localhost:80:80",
        "[::1]",
        "LOCALHOST",
        "localhost.",
        "localhost:8000",
        "127.0.0.1",
    ],
)
def test_the_host_is_checked_as_django_checks_it(parley, key, backend, host):
    """/v1 refuses exactly the hosts that Django refuses for the rest of the site."""
    site = parley.removesuffix("/v1")
    django = httpx.get(f"{site}/healthz", headers={"Host": host}, timeout=10)
    api = post_to(parley, key, chat(), {"Host": host})
    models = httpx.get(
        f"{parley}/models", headers={"Host": host, "Authorization": f"Bearer {key}"}, timeout=10
    )
    if django.status_code == 400:
        assert_openai_error(api, 400, "invalid_host")
        assert_openai_error(models, 400, "invalid_host")
    else:
        assert django.status_code == 200
        assert api.status_code == 200 and models.status_code == 200
    assert backend.request_count == (0 if django.status_code == 400 else 1)


def test_the_https_redirect_goes_only_to_an_allowed_host(parley, key, settings, backend):
    settings.SECURE_SSL_REDIRECT = True
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    evil = post_to(parley, key, chat(), {"Host": "evil.example"}, follow_redirects=False)
    assert "location" not in evil.headers
    assert_openai_error(evil, 400, "invalid_host")
    good = post_to(parley, key, chat(), {"Host": "localhost:8443"}, follow_redirects=False)
    assert good.status_code == 301
    assert good.headers["location"] == "https://localhost:8443/v1/chat/completions"
    # Behind a proxy that forwards the host: X-Forwarded-Host is the host, and checked.
    settings.USE_X_FORWARDED_HOST = True
    forwarded = post_to(
        parley, key, chat(), {"X-Forwarded-Host": "evil.example"}, follow_redirects=False
    )
    assert_openai_error(forwarded, 400, "invalid_host")
    # SECURE_SSL_HOST, when set, is where every redirect goes.
    settings.SECURE_SSL_HOST = "secure.localhost"
    moved = post_to(parley, key, chat(), {"Host": "localhost"}, follow_redirects=False)
    assert moved.headers["location"] == "https://secure.localhost/v1/chat/completions"
    assert backend.request_count == 0
    # SECURE_REDIRECT_EXEMPT: paths served over plain HTTP (matched without the "/").
    settings.SECURE_REDIRECT_EXEMPT = [r"^v1/models$"]
    models = httpx.get(f"{parley}/models", headers={"Authorization": f"Bearer {key}"}, timeout=10)
    assert models.status_code == 200


# --- the JSON body -----------------------------------------------------------------------


def nested(depth: int) -> bytes:
    """A chat body whose `metadata` nests lists so that the body is `depth` deep."""
    lists = b"[" * (depth - 1) + b'"deep"' + b"]" * (depth - 1)
    return json.dumps(chat()).encode()[:-1] + b', "metadata": ' + lists + b"}"


@pytest.mark.parametrize(
    "body",
    [b"[" * 20_000 + b"]" * 20_000, nested(20_000), nested(65)],
    ids=["bare", "in-a-field", "just-over-the-limit"],
)
def test_json_nested_too_deep_is_a_400(parley, alice, key, backend, body):
    response = post(parley, key, body)
    error = assert_openai_error(response, 400, "invalid_json")
    assert "64" in error["message"] and error["type"] == "invalid_request_error"
    assert backend.request_count == 0 and records(alice) == []


def test_json_nested_to_the_limit_is_served(parley, key, backend):
    assert post(parley, key, nested(64)).status_code == 200


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (chat(model="synthetic-model\u0000"), "model"),
        (chat(model="agent:calculator.calculator\u0000"), "model"),
        (chat(messages=[{"role": "user", "content": "hi\u0000there"}]), "messages"),
        (chat(stop=["\u0000"]), "stop"),
        (chat(user="\u0000"), "user"),
        (chat(metadata={"k\u0000": "v"}), "metadata"),
        (chat(messages=[{"role": "user", "content": "half an emoji \ud83d"}]), "messages"),
    ],
)
def test_a_nul_or_lone_surrogate_in_any_string_is_a_400_naming_the_field(
    parley, alice, key, backend, body, param
):
    error = assert_openai_error(post(parley, key, body), 400, "invalid_value")
    assert error["param"] == param and (
        "NUL" in error["message"] or "surrogate" in error["message"]
    )
    assert backend.request_count == 0 and records(alice) == []


def test_a_bad_key_is_still_a_401_before_a_bad_body(parley, backend):
    response = post(parley, "prk_nope", b"[" * 20_000)
    assert_openai_error(response, 401, "invalid_api_key")


# --- token counts ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param", "needle"),
    [
        ({"max_tokens": 4097}, "max_tokens", "4096"),
        ({"max_completion_tokens": 5000}, "max_completion_tokens", "4096"),
        ({"max_tokens": 2**31}, "max_tokens", str(MAX_TOKEN_COUNT)),
        ({"max_tokens": 10**30}, "max_tokens", str(MAX_TOKEN_COUNT)),
        ({"max_tokens": 100, "max_completion_tokens": 2**31}, "max_completion_tokens", ""),
        ({"max_tokens": 2.5}, "max_tokens", "integer"),
    ],
)
def test_max_tokens_beyond_the_context_or_the_ledger_is_a_400(
    parley, alice, key, backend, fields, param, needle
):
    error = assert_openai_error(post(parley, key, chat(**fields)), 400, "invalid_value")
    assert error["param"] == param and needle in error["message"]
    assert backend.request_count == 0 and records(alice) == []


def test_max_tokens_up_to_the_context_is_sent(parley, key, backend):
    assert post(parley, key, chat(max_completion_tokens=4096)).status_code == 200
    assert backend.bodies[0]["max_tokens"] == 4096


@pytest.mark.parametrize("stream", [False, True])
def test_the_largest_max_tokens_keeps_its_ledger_row(
    parley, alice, key, settings, synthetic_server, stream
):
    """A backend that does not tell its context length: the bound is what the ledger
    and the limits hold, and the call's row is written."""
    server = synthetic_server(pieces=["Hi", "!"], max_model_len=None)
    settings.PARLEY_BACKENDS = [server.url]
    pool.forget_cache()
    try:
        response = post(parley, key, chat(max_tokens=MAX_TOKEN_COUNT, stream=stream))
        assert response.status_code == 200, response.text
        if stream:
            events = sse_events(response)
            assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1])
        else:
            assert response.json()["choices"][0]["message"]["content"] == "Hi!"
        assert server.bodies[0]["max_tokens"] == MAX_TOKEN_COUNT
        (record,) = records(alice)
        assert record.outcome == "completed" and record.completion_tokens == 2
        assert record.reserved_tokens == MAX_TOKEN_COUNT
    finally:
        pool.forget_cache()


# --- sampling parameters ---------------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
}


def test_sampling_parameters_are_checked_and_sent_to_the_backend(parley, alice, key, backend):
    sent = {
        "stop": ["\n\n", "END"],
        "seed": -(2**63),
        "top_p": 0.9,
        "min_p": 0.05,
        "presence_penalty": -1.5,
        "frequency_penalty": 2,
        "repetition_penalty": 1.1,
        "logit_bias": {"50256": -100, "11": 2.5},
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "city", "schema": SCHEMA, "strict": True},
        },
    }
    response = post(parley, key, chat(**sent, top_k=0, temperature=0.3, max_tokens=20))
    assert response.status_code == 200, response.text
    (body,) = backend.bodies
    for name, value in sent.items():
        if name == "frequency_penalty":
            value = 2.0
        if name == "logit_bias":
            value = {"50256": -100.0, "11": 2.5}
        assert body[name] == value, name
    assert body["top_k"] == -1  # 0 and -1 both mean no top-k; every vLLM version takes -1
    assert (body["temperature"], body["max_tokens"]) == (0.3, 20)
    # The tenant's cache salt is the pool's; the stream and usage options are the pool's.
    assert body["cache_salt"] == str(alice.tenant.id) and body["stream"] is True


def test_a_single_stop_string_and_json_object_through_the_sdk(parley, key, backend):
    completion = sdk(parley, key).chat.completions.create(
        model=DEFAULT_MODEL,
        messages=HELLO,
        stop="STOP",
        seed=7,
        response_format={"type": "json_object"},
        extra_body={"top_k": 20, "repetition_penalty": 1.2},
    )
    assert completion.choices[0].message.content == "Hello, world!"
    (body,) = backend.bodies
    assert body["stop"] == ["STOP"] and body["seed"] == 7
    assert body["response_format"] == {"type": "json_object"}
    assert (body["top_k"], body["repetition_penalty"]) == (20, 1.2)


def test_neutral_values_are_accepted_and_not_sent(parley, key, backend):
    fields = {
        "n": 1,
        "logprobs": False,
        "top_logprobs": 0,
        "parallel_tool_calls": False,
        "user": "end-user-42",
        "response_format": {"type": "text"},
        "stop": [],
        "logit_bias": {},
        "store": True,
        "metadata": {"a": "b"},
    }
    assert post(parley, key, chat(**fields)).status_code == 200
    (body,) = backend.bodies
    assert not set(fields) & set(body)


@pytest.mark.parametrize(
    ("fields", "param", "code"),
    [
        ({"top_p": 0}, "top_p", "invalid_value"),
        ({"top_p": 1.5}, "top_p", "invalid_value"),
        ({"top_p": "0.5"}, "top_p", "invalid_value"),
        ({"top_k": -2}, "top_k", "invalid_value"),
        ({"top_k": 1.5}, "top_k", "invalid_value"),
        ({"top_k": True}, "top_k", "invalid_value"),
        ({"min_p": 1.1}, "min_p", "invalid_value"),
        ({"presence_penalty": 2.5}, "presence_penalty", "invalid_value"),
        ({"frequency_penalty": -3}, "frequency_penalty", "invalid_value"),
        ({"repetition_penalty": 0}, "repetition_penalty", "invalid_value"),
        ({"seed": 2**63}, "seed", "invalid_value"),
        ({"seed": "42"}, "seed", "invalid_value"),
        ({"stop": 5}, "stop", "invalid_value"),
        ({"stop": [""]}, "stop", "invalid_value"),
        ({"stop": ["x"] * 17}, "stop", "invalid_value"),
        ({"stop": ["x" * 1001]}, "stop", "invalid_value"),
        ({"logit_bias": [1, 2]}, "logit_bias", "invalid_value"),
        ({"logit_bias": {"token": 1}}, "logit_bias", "invalid_value"),
        ({"logit_bias": {"-1": 1}}, "logit_bias", "invalid_value"),
        ({"logit_bias": {"1": 101}}, "logit_bias", "invalid_value"),
        ({"logit_bias": {"7" * 5000: 1}}, "logit_bias", "invalid_value"),
        ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias", "invalid_value"),
        ({"response_format": {"type": "xml"}}, "response_format", "invalid_value"),
        ({"response_format": "json"}, "response_format", "invalid_value"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema",
            "invalid_value",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "no spaces", "schema": {}},
                }
            },
            "response_format.json_schema",
            "invalid_value",
        ),
        ({"n": 2}, "n", "unsupported_parameter"),
        ({"n": 0}, "n", "invalid_value"),
        ({"logprobs": True}, "logprobs", "unsupported_parameter"),
        ({"logprobs": "yes"}, "logprobs", "invalid_value"),
        ({"top_logprobs": 3}, "top_logprobs", "unsupported_parameter"),
        ({"top_logprobs": 21}, "top_logprobs", "invalid_value"),
        ({"parallel_tool_calls": "yes"}, "parallel_tool_calls", "invalid_value"),
        ({"user": 5}, "user", "invalid_value"),
        ({"tool_choice": "auto"}, "tool_choice", "unsupported_parameter"),
        ({"cache_salt": "another-tenant"}, "cache_salt", "unknown_parameter"),
        ({"priority": -100}, "priority", "unknown_parameter"),
        ({"guided_json": SCHEMA}, "guided_json", "unknown_parameter"),
    ],
)
def test_a_bad_sampling_parameter_is_a_400_naming_it(parley, key, backend, fields, param, code):
    error = assert_openai_error(post(parley, key, chat(**fields)), 400, code)
    assert error["param"] == param
    assert backend.request_count == 0


@pytest.mark.parametrize("number", [b"NaN", b"Infinity", b"-Infinity"])
def test_a_number_that_is_no_number_is_a_400(parley, key, backend, number):
    for name in (b"top_p", b"temperature", b"presence_penalty"):
        body = json.dumps(chat()).encode()[:-1] + b', "' + name + b'": ' + number + b"}"
        error = assert_openai_error(post(parley, key, body), 400, "invalid_value")
        assert error["param"] == name.decode()
    assert backend.request_count == 0


def test_an_agent_takes_no_sampling_parameters(parley, key, backend):
    response = post(parley, key, chat(model="agent:calculator.calculator", seed=1))
    error = assert_openai_error(response, 400, "unsupported_parameter")
    assert error["param"] == "seed"


# --- with the real model ---------------------------------------------------------------------


@pytest.mark.llm
def test_stop_and_seed_work_end_to_end_with_the_local_model(
    parley, alice, key, settings, model_server
):
    settings.PARLEY_BACKENDS = [model_server.url]
    pool.forget_cache()
    try:
        client = sdk(parley, key)
        model = client.models.list().data[0].id
        story = [{"role": "user", "content": "Write a short story about a brave knight."}]

        def answer(**fields: Any) -> openai.types.chat.ChatCompletion:
            return client.chat.completions.create(
                model=model, messages=story, max_tokens=40, temperature=1.0, **fields
            )

        first, again, other = answer(seed=1234), answer(seed=1234), answer(seed=99)
        text = first.choices[0].message.content or ""
        assert len(text) > 20 and again.choices[0].message.content == text
        assert other.choices[0].message.content != text
        # A stop string from the seeded answer ends the same answer just before it.
        word = next(w for w in text.split()[3:] if w.isalpha() and len(w) > 2)
        stopped = answer(seed=1234, stop=[" " + word])
        assert stopped.choices[0].finish_reason == "stop"
        assert stopped.choices[0].message.content == text[: text.index(" " + word)]
        assert len(records(alice)) == 4
    finally:
        pool.forget_cache()
