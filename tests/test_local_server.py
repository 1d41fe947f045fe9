"""The local CPU model server (real SmolLM2-135M-Instruct through llama.cpp) answers
like a one-GPU vLLM server. No database."""

from __future__ import annotations

import json
import re
import threading
import time
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.llm

MODEL = "SmolLM2-135M-Instruct"
CTX = 8192
TALK = [{"role": "user", "content": "Write a long story about a brave knight and a dragon."}]


@pytest.fixture
def http(model_server):
    with httpx.Client(base_url=model_server.url, timeout=60) as client:
        yield client


def sse(response: httpx.Response) -> tuple[list[dict[str, Any]], bool]:
    """The JSON chunks of an SSE stream, and whether it ended with [DONE] (and nothing
    after it)."""
    chunks: list[dict[str, Any]] = []
    done = False
    for line in response.iter_lines():
        if not line.startswith("data:"):
            assert line.strip() == "", f"unexpected SSE line {line!r}"
            continue
        data = line[5:].strip()
        assert not done, f"data after [DONE]: {data!r}"
        if data == "[DONE]":
            done = True
            continue
        chunks.append(json.loads(data))
    return chunks, done


def stream_chat(http: httpx.Client, body: dict[str, Any]) -> tuple[list[dict[str, Any]], bool]:
    with http.stream("POST", "/v1/chat/completions", json={"stream": True, **body}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return sse(response)


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} missing from /metrics:\n{text}"
    return float(match.group(1))


def poll_metrics(http: httpx.Client, until, timeout_s: float = 30) -> str:
    """Poll /metrics until `until(text)`; the text that satisfied it."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = http.get("/metrics").text
        if until(text):
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"/metrics never showed the expected state:\n{text}")
        time.sleep(0.02)


def test_health(http):
    response = http.get("/health")
    assert response.status_code == 200


def test_models_lists_smollm2_with_its_context_length(http):
    response = http.get("/v1/models")
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    (model,) = body["data"]
    assert model["id"] == MODEL
    assert model["object"] == "model"
    assert model["max_model_len"] == CTX


def test_streaming_with_usage_ends_with_a_usage_chunk(http):
    chunks, done = stream_chat(
        http,
        {
            "model": MODEL,
            "messages": TALK,
            "max_tokens": 8,
            "temperature": 0,
            "stream_options": {"include_usage": True},
        },
    )
    assert done
    *content, last = chunks
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["id"].startswith("chatcmpl-")
    for c in content:
        assert c["object"] == "chat.completion.chunk"
        assert c["model"] == MODEL
        assert isinstance(c["created"], int)
        (choice,) = c["choices"]
        assert choice["index"] == 0
        assert isinstance(choice["delta"], dict)
        assert "usage" not in c
    assert content[0]["choices"][0]["delta"]["role"] == "assistant"

    finishes = [c["choices"][0]["finish_reason"] for c in content]
    assert finishes[:-1] == [None] * (len(finishes) - 1)
    assert finishes[-1] == "length"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in content)
    assert text.strip()

    assert last["choices"] == []
    usage = last["usage"]
    assert usage["prompt_tokens"] > 0
    assert usage["completion_tokens"] == 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + 8


def test_streaming_without_include_usage_sends_no_usage_chunk(http):
    chunks, done = stream_chat(http, {"messages": TALK, "max_tokens": 4, "temperature": 0})
    assert done
    assert all("usage" not in c for c in chunks)
    assert all(c["choices"] for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_prompt_tokens_match_tokenize(http):
    count = http.post("/tokenize", json={"messages": TALK}).json()["count"]
    chunks, _ = stream_chat(
        http,
        {"messages": TALK, "max_tokens": 1, "stream_options": {"include_usage": True}},
    )
    assert chunks[-1]["usage"]["prompt_tokens"] == count


def test_non_streaming_returns_the_message_and_usage(http):
    response = http.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": TALK, "max_tokens": 8, "temperature": 0},
    )
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == MODEL
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"].strip()
    assert choice["finish_reason"] == "length"
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0
    assert usage["completion_tokens"] == 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + 8


def test_a_request_beyond_the_context_length_is_refused(http):
    response = http.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": TALK, "max_tokens": CTX, "stream": True},
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert "maximum context length" in error["message"]
    assert str(CTX) in error["message"]
    assert error["code"] == 400


def test_the_largest_request_that_fits_is_accepted(http):
    count = http.post("/tokenize", json={"messages": TALK}).json()["count"]
    # Exactly filling the context is allowed; the stream is abandoned at once.
    body = {"messages": TALK, "max_tokens": CTX - count, "stream": True}
    generated = metric(http.get("/metrics").text, "vllm:generation_tokens_total")
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
    over = {**body, "max_tokens": CTX - count + 1}
    assert http.post("/v1/chat/completions", json=over).status_code == 400
    # The abandoned stream frees the engine instead of decoding ~8000 tokens for nobody.
    idle = poll_metrics(
        http,
        lambda t: (
            metric(t, "vllm:num_requests_running") == 0
            and metric(t, "vllm:num_requests_waiting") == 0
        ),
        timeout_s=10,
    )
    assert metric(idle, "vllm:generation_tokens_total") - generated < 1000


def test_malformed_json_is_a_400_with_an_error_object(http):
    response = http.post(
        "/v1/chat/completions",
        content=b'{"messages": [',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400
    body = response.json()
    assert body["object"] == "error"
    assert body["error"]["type"] == "BadRequestError"
    assert "JSON" in body["error"]["message"]


def test_unknown_model_is_a_404(http):
    response = http.post(
        "/v1/chat/completions", json={"model": "gpt-17", "messages": TALK, "max_tokens": 2}
    )
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["type"] == "NotFoundError"
    assert "gpt-17" in error["message"]


def test_tokenize_counts_a_prompt(http):
    response = http.post("/tokenize", json={"prompt": "hello world"})
    assert response.status_code == 200
    body = response.json()
    assert body["max_model_len"] == CTX
    assert body["count"] == len(body["tokens"])
    assert 2 <= body["count"] <= 4  # "hello", " world", maybe a BOS


def test_metrics_speak_vllm_and_count_generated_tokens(http):
    before = http.get("/metrics")
    assert before.status_code == 200
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:generation_tokens_total",
    ):
        assert metric(before.text, name) >= 0
    assert metric(before.text, "vllm:num_requests_running") == 0
    assert 0 <= metric(before.text, "vllm:kv_cache_usage_perc") <= 1

    response = http.post(
        "/v1/chat/completions", json={"messages": TALK, "max_tokens": 6, "temperature": 0}
    )
    produced = response.json()["usage"]["completion_tokens"]
    assert produced == 6
    after = http.get("/metrics").text
    grown = metric(after, "vllm:generation_tokens_total") - metric(
        before.text, "vllm:generation_tokens_total"
    )
    assert grown == produced


def test_concurrent_streams_are_served_one_at_a_time(http, model_server):
    results: dict[str, tuple[list[dict[str, Any]], bool, float]] = {}

    def run(name: str, max_tokens: int) -> None:
        with httpx.Client(base_url=model_server.url, timeout=120) as client:
            chunks, done = stream_chat(
                client,
                {
                    "messages": TALK,
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "stream_options": {"include_usage": True},
                },
            )
        results[name] = (chunks, done, time.monotonic())

    long = threading.Thread(target=run, args=("long", 200))
    long.start()
    poll_metrics(http, lambda t: metric(t, "vllm:num_requests_running") == 1)
    short = threading.Thread(target=run, args=("short", 8))
    short.start()
    # While the long one decodes, the short one waits its turn.
    seen = poll_metrics(
        http,
        lambda t: metric(t, "vllm:num_requests_waiting") == 1 or "long" in results,
    )
    assert "long" not in results, "the long request ended before the second one was queued"
    assert metric(seen, "vllm:num_requests_running") == 1
    assert metric(seen, "vllm:num_requests_waiting") == 1
    assert metric(seen, "vllm:kv_cache_usage_perc") > 0
    long.join(timeout=120)
    short.join(timeout=120)

    for name, max_tokens in (("long", 200), ("short", 8)):
        chunks, done, _ = results[name]
        assert done, name
        usage = chunks[-1]["usage"]
        assert 0 < usage["completion_tokens"] <= max_tokens
    assert results["short"][0][-1]["usage"]["completion_tokens"] == 8
    # Served one at a time: the short request, queued behind the long one, ends after it.
    assert results["short"][2] > results["long"][2]
    final = http.get("/metrics").text
    assert metric(final, "vllm:num_requests_running") == 0
    assert metric(final, "vllm:num_requests_waiting") == 0


def test_a_stop_string_that_never_matches_does_not_change_the_answer(http):
    body = {
        "messages": [{"role": "user", "content": "Say hello in one short sentence."}],
        "max_tokens": 40,
        "temperature": 0,
    }

    def ask(stop: list[str]) -> dict[str, Any]:
        response = http.post("/v1/chat/completions", json={**body, "stop": stop})
        assert response.status_code == 200
        return response.json()

    ask(["ZZZ"])  # the same prompt state (prefix cache) for the two compared calls
    plain = ask(["ZZZ"])
    guarded = ask([".ZZZ", "!ZZZ", "?ZZZ"])  # holds back a final "." "!" or "?"
    text = plain["choices"][0]["message"]["content"]
    if (
        plain["choices"][0]["finish_reason"] != "stop"
        or plain["usage"]["completion_tokens"] != guarded["usage"]["completion_tokens"]
        or not text.endswith((".", "!", "?"))
    ):
        pytest.skip(f"the model did not answer as this check needs: {text!r}")
    assert guarded["choices"][0]["message"]["content"] == text


# --- vLLM's sampling parameters, applied by llama.cpp ---------------------------------------

STORY = [{"role": "user", "content": "Write a short story about a brave knight."}]


def complete(http: httpx.Client, **fields: Any) -> dict[str, Any]:
    body = {"messages": STORY, "max_tokens": 40, **fields}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def content(answer: dict[str, Any]) -> str:
    return answer["choices"][0]["message"]["content"]


def test_a_seed_makes_a_sampled_answer_repeatable(http):
    complete(http, temperature=1.0, seed=5)  # the same prompt state (prefix cache) below
    first = content(complete(http, temperature=1.0, seed=5))
    assert content(complete(http, temperature=1.0, seed=5)) == first
    assert content(complete(http, temperature=1.0, seed=2**63 - 1)) != first
    # A seed is the request's own: a request without one, after a seeded one, is not
    # seeded by it.
    unseeded = set()
    for _ in range(3):
        complete(http, temperature=1.0, seed=5)
        unseeded.add(content(complete(http, temperature=1.0)))
    assert len(unseeded) == 3 and first not in unseeded


def test_a_stop_string_ends_the_answer_before_it(http):
    complete(http, temperature=1.0, seed=9)
    text = content(complete(http, temperature=1.0, seed=9))
    word = next(w for w in text.split()[3:] if w.isalpha() and len(w) > 2)
    stopped = complete(http, temperature=1.0, seed=9, stop=["ZZZ", " " + word])
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert content(stopped) == text[: text.index(" " + word)]
    streamed, done = stream_chat(
        http, {"messages": STORY, "max_tokens": 40, "temperature": 1.0, "seed": 9, "stop": word}
    )
    assert done and streamed[-1]["choices"][0]["finish_reason"] == "stop"
    assert (
        "".join(c["choices"][0]["delta"].get("content", "") for c in streamed)
        == (text[: text.index(word)])
    )


def test_logit_bias_and_penalties_change_the_answer(http):
    greedy = complete(http, temperature=0, max_tokens=12)
    text = content(greedy)
    first = http.post("/tokenize", json={"prompt": text, "add_special_tokens": False})
    token = first.json()["tokens"][0]
    banned = complete(http, temperature=0, max_tokens=12, logit_bias={str(token): -100})
    again = http.post("/tokenize", json={"prompt": content(banned), "add_special_tokens": False})
    assert content(banned) != text and again.json()["tokens"][0] != token
    assert content(complete(http, temperature=0, max_tokens=12)) == text  # per request
    penalised = complete(
        http,
        temperature=0,
        max_tokens=40,
        repetition_penalty=2.0,
        presence_penalty=2.0,
        frequency_penalty=2.0,
    )
    assert content(penalised) != content(complete(http, temperature=0, max_tokens=40))


def test_response_format_constrains_the_answer_to_json(http):
    question = [{"role": "user", "content": "Describe a cat."}]
    loose = complete(
        http,
        messages=question,
        max_tokens=200,
        temperature=0,
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(content(loose)), dict)
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    strict = complete(
        http,
        messages=question,
        max_tokens=200,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "cat", "schema": schema}},
    )
    cat = json.loads(content(strict))
    assert isinstance(cat["name"], str) and isinstance(cat["age"], int)
    assert strict["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    "fields",
    [
        {"logprobs": True},
        {"top_logprobs": 2},
        {"n": 2},
        {"logit_bias": {"99999999": 5}},
        {"logit_bias": {"x": 5}},
        {"logit_bias": {"7" * 5000: 5}},
        {"top_p": 2},
        {"min_p": -0.1},
        {"repetition_penalty": 0},
        {"presence_penalty": 3},
        {"response_format": {"type": "xml"}},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
        {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "x"}}}},
    ],
)
def test_what_it_cannot_honour_is_refused(http, fields):
    response = http.post(
        "/v1/chat/completions", json={"messages": STORY, "max_tokens": 2, **fields}
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "BadRequestError"
