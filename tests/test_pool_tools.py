"""Tool calling through the inference pool: a synthetic vLLM-compatible server scripted
to call tools, the sync and async pools passing the tool-call fragments on, the pool
as a LangChain chat model with tools bound, and an agent run of the calculator plugin
end to end (real PostgreSQL and Redis, no model)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.utils.function_calling import convert_to_openai_tool

from agents.pool_model import PoolChatModel
from agents.registry import plugin_get
from agents.runtime import agent_run
from inference import apool, pool
from inference.models import UsageRecord
from inference.types import (
    ChatRequest,
    InferenceError,
    StreamFinished,
    StreamStarted,
    TextDelta,
    ToolCallDelta,
)
from inference.wire import tool_call_deltas
from tenants.rls import tenant_scope
from tests.synthetic import DEFAULT_MODEL, Reply, SyntheticServer, ToolCall

pytestmark = pytest.mark.django_db

QUESTION = [{"role": "user", "content": "What is 6 times 7, and 2 km in m?"}]
SIX_TIMES_SEVEN = ToolCall("calculate", {"expression": "6*7"}, id="call_calc")
TWO_KM = ToolCall("convert_units", {"value": 2, "from_unit": "km", "to_unit": "m"}, id="call_units")


@pytest.fixture(autouse=True)
def _pool(fresh_pool):
    """Every test here starts from an empty pool (conftest.fresh_pool)."""


@pytest.fixture
def calculator():
    return plugin_get("calculator").manifest


@pytest.fixture
def tools(calculator) -> list[dict[str, Any]]:
    return [convert_to_openai_tool(t) for t in calculator.tools]


@pytest.fixture
def scripted(synthetic_server, settings):
    """Start a synthetic backend answering with these replies, in order, as the pool's."""

    def start(*replies: Reply, **options: Any) -> SyntheticServer:
        server = synthetic_server(replies=list(replies), **options)
        settings.PARLEY_BACKENDS = [server.url]
        pool.forget_cache()
        return server

    return start


def assembled(events: list[Any]) -> dict[int, dict[str, Any]]:
    """The tool calls the fragments make, by index: id, name, the joined arguments."""
    calls: dict[int, dict[str, Any]] = {}
    for event in events:
        if isinstance(event, ToolCallDelta):
            call = calls.setdefault(event.index, {"id": None, "name": None, "arguments": ""})
            call["id"] = call["id"] or event.id
            call["name"] = call["name"] or event.name
            call["arguments"] += event.arguments
    return calls


def records(person) -> list[UsageRecord]:
    with tenant_scope(tenant_id=person.tenant.id):
        return list(UsageRecord.objects.order_by("created_at"))


def request_for(person, tools, **options: Any) -> ChatRequest:
    return ChatRequest(
        messages=QUESTION,
        tenant_id=str(person.tenant.id),
        user_id=str(person.user.id),
        purpose="test.tools",
        reference="r-1",
        tools=tools,
        **options,
    )


# --- the pool ------------------------------------------------------------------------


def test_the_pool_streams_tool_call_fragments_and_books_the_call(alice, scripted, tools):
    server = scripted(Reply(pieces=["Let me ", "compute."], tool_calls=[SIX_TIMES_SEVEN, TWO_KM]))
    events = list(pool.chat_stream(request_for(alice, tools, tool_choice="auto")))

    assert isinstance(events[0], StreamStarted) and events[0].model == DEFAULT_MODEL
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["Let me ", "compute."]
    fragments = [e for e in events if isinstance(e, ToolCallDelta)]
    # Arguments arrive in pieces; only each call's first fragment names it.
    assert len(fragments) > 6
    assert [(f.index, f.id, f.name) for f in fragments[:2]] == [
        (0, "call_calc", "calculate"),
        (0, None, None),
    ]
    assert assembled(events) == {
        0: {"id": "call_calc", "name": "calculate", "arguments": '{"expression": "6*7"}'},
        1: {
            "id": "call_units",
            "name": "convert_units",
            "arguments": json.dumps(TWO_KM.arguments),
        },
    }
    finished = events[-1]
    assert isinstance(finished, StreamFinished) and finished.finish_reason == "tool_calls"
    assert finished.usage.completion_tokens == len(fragments) + 2

    (body,) = server.bodies
    assert body["tools"] == tools and body["tool_choice"] == "auto"
    assert [t["function"]["name"] for t in body["tools"]] == [
        "calculate",
        "convert_units",
        "days_between",
        "date_shift",
    ]
    (record,) = records(alice)
    assert (record.purpose, record.reference, record.outcome) == ("test.tools", "r-1", "completed")
    assert (record.prompt_tokens, record.completion_tokens) == (7, len(fragments) + 2)


def test_without_tools_the_request_carries_neither_tools_nor_tool_choice(alice, scripted):
    server = scripted(Reply(pieces=["Hi."]))
    events = list(pool.chat_stream(request_for(alice, None)))
    assert events[-1] == StreamFinished(finish_reason="stop", usage=events[-1].usage)
    (body,) = server.bodies
    assert "tools" not in body and "tool_choice" not in body


@pytest.mark.django_db(transaction=True)
def test_the_async_pool_yields_the_same_tool_call_events(alice, scripted, tools):
    reply = Reply(tool_calls=[SIX_TIMES_SEVEN, TWO_KM], argument_chars=3)
    server = scripted(reply, reply)
    request = request_for(alice, tools, tool_choice="required")
    sync_events = list(pool.chat_stream(request))

    async def collect() -> list[Any]:
        return [event async for event in apool.chat_stream(request)]

    async_events = asyncio.run(collect())
    assert async_events == sync_events
    assert assembled(async_events)[0]["arguments"] == '{"expression": "6*7"}'
    assert async_events[-1].finish_reason == "tool_calls"
    assert [b["tools"] for b in server.bodies] == [tools, tools]
    assert [b["tool_choice"] for b in server.bodies] == ["required", "required"]
    one, two = records(alice)
    fields = ("prompt_tokens", "completion_tokens", "outcome", "purpose", "reference")
    assert [getattr(one, f) for f in fields] == [getattr(two, f) for f in fields]
    assert one.outcome == "completed"


def test_malformed_tool_call_fragments_are_a_backend_error():
    assert tool_call_deltas([{"index": 1, "function": {"arguments": '{"a'}}], started=True) == [
        ToolCallDelta(index=1, id=None, name=None, arguments='{"a')
    ]
    with pytest.raises(InferenceError, match="tool_calls is not a list") as caught:
        tool_call_deltas({"index": 0}, started=False)
    assert caught.value.code == "backend_error" and caught.value.retryable
    with pytest.raises(InferenceError, match="a tool call fragment") as caught:
        tool_call_deltas([{"index": "zero", "function": {}}], started=True)
    assert not caught.value.retryable


def test_a_tool_schema_that_is_not_one_is_refused():
    with pytest.raises(ValueError, match="OpenAI tool schema"):
        ChatRequest(messages=QUESTION, tools=[{"name": "calculate"}])
    with pytest.raises(ValueError, match="tool_choice must be"):
        ChatRequest(
            messages=QUESTION,
            tools=[{"type": "function", "function": {"name": "calculate"}}],
            tool_choice=3,  # type: ignore[arg-type]
        )


# --- the pool as a LangChain chat model ------------------------------------------------


def model_for(person, **options: Any) -> PoolChatModel:
    return PoolChatModel(
        tenant_id=str(person.tenant.id), user_id=str(person.user.id), reference="run-9", **options
    )


def test_bind_tools_then_invoke_and_stream_give_the_tool_call(alice, scripted, calculator, tools):
    reply = Reply(pieces=["Computing."], tool_calls=[SIX_TIMES_SEVEN])
    server = scripted(reply, reply)
    bound = model_for(alice).bind_tools(calculator.tools)

    message = bound.invoke(QUESTION)
    assert isinstance(message, AIMessage)
    assert message.content == "Computing."
    assert message.tool_calls == [
        {"name": "calculate", "args": {"expression": "6*7"}, "id": "call_calc", "type": "tool_call"}
    ]
    assert message.response_metadata["finish_reason"] == "tool_calls"

    chunks = list(bound.stream(QUESTION))
    joined = chunks[0]
    for chunk in chunks[1:]:
        joined += chunk
    assert joined.tool_calls == message.tool_calls
    assert sum(1 for c in chunks if c.tool_call_chunks) > 3  # streamed in fragments

    assert [(b["tools"], b["tool_choice"]) for b in server.bodies] == [(tools, "auto")] * 2
    assert [(r.purpose, r.reference) for r in records(alice)] == [("agent.step", "run-9")] * 2


def test_unparsable_arguments_become_an_invalid_tool_call(alice, scripted, calculator):
    scripted(Reply(tool_calls=[ToolCall("calculate", '{"expression": 6*7}', id="call_bad")]))
    message = model_for(alice).bind_tools(calculator.tools).invoke(QUESTION)
    assert message.tool_calls == []
    (invalid,) = message.invalid_tool_calls
    assert (invalid["id"], invalid["name"], invalid["args"]) == (
        "call_bad",
        "calculate",
        '{"expression": 6*7}',
    )


def test_tool_choice_names_a_tool_or_is_refused(alice, scripted, calculator):
    server = scripted(Reply(tool_calls=[SIX_TIMES_SEVEN]))
    model = model_for(alice)
    model.bind_tools(calculator.tools, tool_choice="calculate").invoke(QUESTION)
    assert server.bodies[0]["tool_choice"] == {
        "type": "function",
        "function": {"name": "calculate"},
    }
    with pytest.raises(ValueError, match="neither auto, none, required, any nor one of"):
        model.bind_tools(calculator.tools, tool_choice="fetch_page")
    with pytest.raises(ValueError, match="at least one tool"):
        model.bind_tools([])


def test_the_tool_history_goes_to_the_backend_as_openai_messages(alice, scripted, calculator):
    server = scripted(Reply(pieces=["42."]))
    history = [
        HumanMessage("What is 6 times 7?"),
        AIMessage(
            content="",
            tool_calls=[{"name": "calculate", "args": {"expression": "6*7"}, "id": "call_calc"}],
        ),
        ToolMessage(content="42", tool_call_id="call_calc", name="calculate"),
    ]
    message = model_for(alice).bind_tools(calculator.tools).invoke(history)
    assert message.content == "42." and message.tool_calls == []
    (body,) = server.bodies
    assert body["messages"][1:] == [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "type": "function",
                    "id": "call_calc",
                    "function": {"name": "calculate", "arguments": '{"expression": "6*7"}'},
                }
            ],
        },
        {"role": "tool", "name": "calculate", "tool_call_id": "call_calc", "content": "42"},
    ]


# --- an agent run through the pool -----------------------------------------------------


def test_an_agent_run_calls_the_calculator_through_the_pool(alice, scripted, calculator, tools):
    server = scripted(
        Reply(tool_calls=[SIX_TIMES_SEVEN]),
        Reply(pieces=["6 times 7 ", "is 42."]),
        prompt_tokens=30,
    )
    (spec,) = calculator.agents
    events: list[dict[str, Any]] = []
    result = agent_run(
        spec=spec,
        manifest=calculator,
        granted_scopes=(),
        model=model_for(alice),
        messages=[{"role": "user", "content": "What is 6 times 7?"}],
        emit=events.append,
    )

    assert [e["type"] for e in events] == ["tool.start", "tool.end", "token", "token"]
    assert events[0] == {
        "type": "tool.start",
        "call_id": "call_calc",
        "name": "calculate",
        "arguments": {"expression": "6*7"},
    }
    assert events[1] == {
        "type": "tool.end",
        "call_id": "call_calc",
        "name": "calculate",
        "result": "42",  # the calculator really ran
        "error": None,
        "truncated": False,
    }
    assert (result.stop_reason, result.text, result.steps) == ("done", "6 times 7 is 42.", 2)

    first, second = server.bodies
    assert first["tools"] == tools and second["tools"] == tools
    assert second["messages"][-2]["tool_calls"][0]["id"] == "call_calc"
    assert second["messages"][-1] == {
        "role": "tool",
        "name": "calculate",
        "tool_call_id": "call_calc",
        "content": "42",
    }
    rows = records(alice)
    assert [(r.purpose, r.reference, r.outcome) for r in rows] == [
        ("agent.step", "run-9", "completed")
    ] * 2
    assert result.prompt_tokens == 60
    assert result.completion_tokens == sum(r.completion_tokens for r in rows)
