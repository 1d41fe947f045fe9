"""Tool calls and prefix (KV) cache reuse on the local CPU model server, with the real
SmolLM2-135M-Instruct through llama.cpp: vLLM's shapes for tool calls, streamed and
not; tool_choice none/required/named; clear 400s for bad tools; the prefix-cache
counters; and an agent run of the calculator plugin through the pool on the real model."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from langchain_core.utils.function_calling import convert_to_openai_tool

from inference.local_tools import CallParser
from tests.test_local_server import metric, stream_chat

pytestmark = pytest.mark.llm

MODEL = "SmolLM2-135M-Instruct"
ARITHMETIC = [{"role": "user", "content": "What is 23 * 47?"}]


def calculator_instructions() -> str:
    from agents.registry import plugin_get

    return plugin_get("calculator").manifest.agents[0].instructions


@pytest.fixture
def http(model_server):
    with httpx.Client(base_url=model_server.url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def tools() -> list[dict[str, Any]]:
    from plugins.calculator.tools import calculate, convert_units, date_shift, days_between

    return [convert_to_openai_tool(t) for t in (calculate, convert_units, days_between, date_shift)]


def chat(http: httpx.Client, body: dict[str, Any]) -> httpx.Response:
    return http.post(
        "/v1/chat/completions", json={"temperature": 0, "max_tokens": 80, "model": MODEL, **body}
    )


def schema_of(tools: list[dict[str, Any]], name: str) -> dict[str, Any]:
    (tool,) = [t for t in tools if t["function"]["name"] == name]
    return tool["function"]["parameters"]


def check_arguments(tools: list[dict[str, Any]], name: str, arguments: str) -> dict[str, Any]:
    """The arguments parse as JSON and hold what the tool's schema requires, typed."""
    parsed = json.loads(arguments)
    schema = schema_of(tools, name)
    assert isinstance(parsed, dict)
    assert set(schema.get("required", [])) <= set(parsed)
    types = {"string": str, "number": (int, float), "integer": int}
    for key, value in parsed.items():
        assert key in schema["properties"], key
        kind = schema["properties"][key].get("type")
        if kind in types:
            assert isinstance(value, types[kind]), (key, value)
    return parsed


# --- vLLM's shapes ---------------------------------------------------------------------


def test_a_required_tool_call_non_streamed_is_vllms_message_tool_calls(http, tools):
    response = chat(http, {"messages": ARITHMETIC, "tools": tools, "tool_choice": "required"})
    assert response.status_code == 200, response.text
    (choice,) = response.json()["choices"]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["role"] == "assistant"
    assert not message["content"]
    (call,) = message["tool_calls"]
    assert call["id"].startswith("chatcmpl-tool-")
    assert call["type"] == "function"
    names = {t["function"]["name"] for t in tools}
    assert call["function"]["name"] in names
    check_arguments(tools, call["function"]["name"], call["function"]["arguments"])


def test_a_tool_call_streams_as_vllms_deltas(http, tools):
    chunks, done = stream_chat(
        http,
        {
            "model": MODEL,
            "messages": ARITHMETIC,
            "tools": tools,
            "tool_choice": "required",
            "temperature": 0,
            "max_tokens": 80,
            "stream_options": {"include_usage": True},
        },
    )
    assert done
    *body, usage = chunks
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] > 0
    assert body[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [c["choices"][0]["delta"] for c in body[1:-1]]
    calls = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert calls and len(calls) == len(deltas)  # nothing but the call
    (head,) = calls[0]
    assert head["index"] == 0 and head["type"] == "function"
    assert head["id"].startswith("chatcmpl-tool-")
    assert head["function"]["arguments"] == ""
    name = head["function"]["name"]
    fragments = []
    for call in calls[1:]:
        (part,) = call
        assert part["index"] == 0 and set(part) == {"index", "function"}
        assert set(part["function"]) == {"arguments"}
        fragments.append(part["function"]["arguments"])
    assert len(fragments) > 1  # streamed piece by piece, not at the end
    check_arguments(tools, name, "".join(fragments))
    assert body[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "tool_calls",
    }


def test_a_named_tool_choice_calls_that_tool(http, tools):
    named = {"type": "function", "function": {"name": "days_between"}}
    response = chat(http, {"messages": ARITHMETIC, "tools": tools, "tool_choice": named})
    assert response.status_code == 200, response.text
    (call,) = response.json()["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "days_between"
    check_arguments(tools, "days_between", call["function"]["arguments"])


def test_tool_choice_none_answers_in_text(http, tools):
    response = chat(http, {"messages": ARITHMETIC, "tools": tools, "tool_choice": "none"})
    assert response.status_code == 200, response.text
    (choice,) = response.json()["choices"]
    assert choice["finish_reason"] in ("stop", "length")
    assert choice["message"]["content"].strip()
    assert not choice["message"].get("tool_calls")
    assert "<tool_call>" not in choice["message"]["content"]


def test_auto_answers_either_text_or_a_valid_call(http, tools):
    for question in ("What is 23 * 47?", "Say hello.", "Convert 10 km to miles."):
        response = chat(http, {"messages": [{"role": "user", "content": question}], "tools": tools})
        assert response.status_code == 200, response.text
        (choice,) = response.json()["choices"]
        calls = choice["message"]["tool_calls"]
        if calls:
            assert choice["finish_reason"] == "tool_calls"
            check_arguments(tools, calls[0]["function"]["name"], calls[0]["function"]["arguments"])
        else:
            assert choice["finish_reason"] in ("stop", "length")
            assert choice["message"]["content"]


def test_a_tool_result_in_the_history_is_read(http, tools):
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "calculate", "arguments": '{"expression": "23 * 47"}'},
    }
    messages = [
        *ARITHMETIC,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "1081"},
    ]
    response = chat(http, {"messages": messages, "tools": tools, "tool_choice": "none"})
    assert response.status_code == 200, response.text
    assert "1081" in response.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize("tool_choice", ["auto", "none"])
def test_an_answer_never_shows_the_formats_markup(http, tools, tool_choice):
    """SmolLM2 echoes the result's closing tag ("1000\n</tool_response>"): the answer
    ends where the markup starts, as vLLM's parser never shows it either."""
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "calculate", "arguments": '{"expression": "88 * 12 - 56"}'},
    }
    messages = [
        {"role": "system", "content": calculator_instructions()},
        {"role": "user", "content": "What is 88 * 12 - 56?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "1000"},
    ]
    body = {"messages": messages, "tools": tools, "tool_choice": tool_choice, "max_tokens": 40}
    content = chat(http, body).json()["choices"][0]["message"]["content"] or ""
    assert "1000" in content and "tool_response" not in content, content


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"tools": {"type": "function"}}, "'tools' must be a list"),
        ({"tools": [{"type": "retrieval"}]}, "only tools of type 'function'"),
        ({"tools": [{"type": "function"}]}, "must be an object with a 'name'"),
        ({"tools": [{"type": "function", "function": {"name": "no spaces"}}]}, "name must be"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]},
            "parameters must be a JSON schema of an object",
        ),
        ({"tool_choice": "required"}, "`tools` must be set"),
        ("TOOLS", None),
    ],
)
def test_bad_tools_are_a_clear_400(http, tools, body, words):
    if body == "TOOLS":
        cases = [
            ({"tools": tools, "tool_choice": "always"}, "'tool_choice' must be none"),
            (
                {"tools": tools, "tool_choice": {"type": "function", "function": {"name": "x"}}},
                "names 'x', which is not one of the tools",
            ),
            ({"tools": tools * 2}, "given twice"),
        ]
    else:
        cases = [(body, words)]
    for case, expected in cases:
        response = chat(http, {"messages": ARITHMETIC, **case})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["type"] == "BadRequestError"
        assert expected in error["message"], error["message"]


def test_the_call_parser_reads_hermes_calls_piece_by_piece():
    parser = CallParser()
    text = (
        '<tool_call>\n{"name": "calculate", "arguments": {"expression": "{1} + \\"2\\""} }'
        "\n</tool_call>"
    )
    events = [e for i in range(0, len(text), 3) for e in parser.feed(text[i : i + 3])]
    assert events[0] == ("name", "calculate")
    assert "".join(v for k, v in events if k == "arguments") == '{"expression": "{1} + \\"2\\""}'
    (call,) = parser.calls()
    assert json.loads(call["function"]["arguments"]) == {"expression": '{1} + "2"'}

    plain = CallParser()
    assert list(plain.feed("<to")) == []
    assert list(plain.feed("day")) == [("content", "<today")]
    assert plain.calls() == []
    short = CallParser()
    assert list(short.feed("<tool")) == []
    assert list(short.flush()) == [("content", "<tool")]


# --- prefix (KV) cache reuse -----------------------------------------------------------


def counters(http: httpx.Client) -> tuple[float, float]:
    text = http.get("/metrics").text
    return (
        metric(text, "vllm:prefix_cache_queries_total"),
        metric(text, "vllm:prefix_cache_hits_total"),
    )


def test_prefix_cache_counters_move_on_a_second_turn_even_after_a_title_request(http):
    history = [
        {"role": "system", "content": "You are a patient teacher. " * 20},
        {"role": "user", "content": "Explain photosynthesis in a few sentences."},
    ]
    first = chat(http, {"messages": history, "max_tokens": 24}).json()
    prompt_1 = first["usage"]["prompt_tokens"]
    history += [
        {"role": "assistant", "content": first["choices"][0]["message"]["content"]},
        {"role": "user", "content": "And respiration?"},
    ]
    # The platform asks the same server for a title between turns.
    title = [
        {"role": "system", "content": "Write a title of at most six words."},
        {"role": "user", "content": "Explain photosynthesis in a few sentences."},
    ]
    assert chat(http, {"messages": title, "max_tokens": 8}).status_code == 200
    queries, hits = counters(http)
    second = chat(http, {"messages": history, "max_tokens": 8}).json()
    queries_2, hits_2 = counters(http)
    assert queries_2 - queries == second["usage"]["prompt_tokens"]
    # The whole first turn (its prompt and most of its answer) was not prefilled again.
    assert hits_2 - hits >= prompt_1


def test_a_restored_prefix_gives_the_same_answer_as_a_fresh_prefill(http):
    long = [
        {"role": "system", "content": "You answer in one paragraph. " * 15},
        {"role": "user", "content": "Describe a lighthouse at night."},
    ]
    body = {"messages": long, "max_tokens": 24, "seed": 3}
    first = chat(http, body).json()["choices"][0]["message"]["content"]
    other = [{"role": "user", "content": "Name three colours. " * 10}]
    assert chat(http, {"messages": other, "max_tokens": 8}).status_code == 200
    again = chat(http, body).json()["choices"][0]["message"]["content"]
    assert again == first


# --- the platform path: the pool as a LangChain chat model, an agent run ----------------


def pool_model(person: Any) -> Any:
    from agents.pool_model import PoolChatModel

    return PoolChatModel(
        tenant_id=str(person.tenant.id),
        user_id=str(person.user.id),
        reference="run-local-1",
        temperature=0,
    )


@pytest.mark.django_db
def test_the_pool_model_gets_a_tool_call_from_the_real_model(alice, backend):
    from langchain_core.messages import AIMessage

    from agents.registry import plugin_get

    calculator = plugin_get("calculator").manifest
    bound = pool_model(alice).bind_tools(calculator.tools, tool_choice="required")
    for reply in (bound.invoke(ARITHMETIC), _streamed(bound.stream(ARITHMETIC))):
        assert isinstance(reply, AIMessage)
        assert not reply.invalid_tool_calls
        (call,) = reply.tool_calls
        assert call["name"] in {t.name for t in calculator.tools}
        assert isinstance(call["args"], dict) and call["id"]
        # the tool accepts the arguments the grammar allowed
        calculator.tool(call["name"]).invoke(call["args"])


def _streamed(chunks: Any) -> Any:
    from langchain_core.messages import AIMessage

    joined = None
    for chunk in chunks:
        joined = chunk if joined is None else joined + chunk
    return AIMessage(
        content=joined.content,
        tool_calls=joined.tool_calls,
        invalid_tool_calls=joined.invalid_tool_calls,
    )


@pytest.mark.django_db
def test_an_agent_run_of_the_calculator_calls_a_tool_on_the_real_model(alice, backend):
    """SmolLM2-135M never chooses a tool under `auto` (docs/benchmarks.md, local model
    server tool calls); the calculator requires one on its first step
    (AgentSpec.tool_choice), so its run makes a real call, which the tool accepts."""
    from agents.registry import plugin_get
    from agents.runtime import agent_run

    calculator = plugin_get("calculator").manifest
    (spec,) = calculator.agents
    events: list[dict[str, Any]] = []
    result = agent_run(
        spec=spec,
        manifest=calculator,
        granted_scopes=(),
        model=pool_model(alice),
        messages=[{"role": "user", "content": "What is 23 * 47?"}],
        emit=events.append,
    )
    starts = [e for e in events if e["type"] == "tool.start"]
    assert starts, (result.stop_reason, result.text)
    assert starts[0]["name"] in {t.name for t in calculator.tools}
    ends = [e for e in events if e["type"] == "tool.end"]
    assert ends and ends[0]["error"] is None
    assert "1081" in ends[0]["result"]
