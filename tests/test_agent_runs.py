"""A conversation answered by a plugin's agent, end to end: the websocket, a real Celery
worker on the `agents` queue, the third-party example plugin's tools, and a scripted
LangChain chat model in place of the inference pool (injected through
chat.agent_turn.agent_model_build; the product path builds PoolChatModel)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage

from agents.pool_model import PoolChatModel
from agents.services import plugin_enable, plugin_scopes_grant, plugin_settings_update
from chat import agent_turn as agent_runs
from chat.models import Run
from tenants.access import Actor
from tenants.models import Role
from tenants.rls import tenant_scope
from tenants.services.api_keys import api_key_create
from tests.conftest import as_operator, plugin_install, ws_connect
from tests.factories import ConversationFactory, MessageFactory, RunFactory, tool_step
from tests.scripted_model import ScriptedChatModel

pytestmark = pytest.mark.django_db(transaction=True)

AGENT = "example_lookup.geographer"
ANSWER = "Kenya's capital is Nairobi and it pays in KES."


@pytest.fixture(autouse=True)
def _all_plugins(all_plugins):
    """Every test here sees every installed plugin (conftest.all_plugins)."""


def call(name: str, **args: Any) -> AIMessage:
    return AIMessage(content="", tool_calls=[{"name": name, "args": args, "id": f"call_{name}"}])


@pytest.fixture
def scripted(monkeypatch):
    """Make agent runs use a scripted model with these replies; returns the model."""

    def install(*replies: AIMessage) -> ScriptedChatModel:
        model = ScriptedChatModel(script=iter(replies))
        built: list[Run] = []

        def build(*, run: Run) -> BaseChatModel:
            built.append(run)
            return model

        monkeypatch.setattr(agent_runs, "agent_model_build", build)
        return model

    return install


def enable(person, *, scopes=("network.fetch",), plugin="example_lookup", settings=None):
    with tenant_scope(tenant_id=person.tenant.id):
        plugin_settings_update(
            actor=person.actor,
            name=plugin,
            settings={"api_key": "sk-directory-12345"} if settings is None else settings,
        )
        plugin_scopes_grant(actor=person.actor, name=plugin, scopes=list(scopes))
        plugin_enable(actor=person.actor, name=plugin)


async def agent_turn(socket, content="What is the capital of Kenya?", **extra):
    await socket.send({"type": "chat.send", "content": content, **extra})
    started = await socket.receive(timeout=15)
    assert started["type"] == "run.started", started
    frames = await socket.receive_until(("run.done", "run.error"), timeout=60)
    return started, [f for f in frames if f.get("run_id") == started["run_id"]]


def load_run(run_id: str) -> Run:
    return Run.objects.select_related("assistant_message", "conversation").get(id=run_id)


# --- the agent answers, with a tool ------------------------------------------------------


async def test_agent_calls_its_tool_and_streams_the_answer(alice, worker, scripted):
    await sync_to_async(enable)(alice)
    model = scripted(call("country_lookup", code="KE"), AIMessage(content=ANSWER))
    _, _, socket = await ws_connect(alice.user)
    started, frames = await agent_turn(socket, agent=AGENT, client_id="a-1")

    assert [f["seq"] for f in frames] == list(range(1, len(frames) + 1))
    kinds = [f["type"] for f in frames]
    assert kinds[:2] == ["tool.start", "tool.end"], kinds
    assert set(kinds[2:-1]) == {"token"} and kinds[-1] == "run.done", kinds
    start, end, done = frames[0], frames[1], frames[-1]
    assert start["name"] == "country_lookup" and start["arguments"] == {"code": "KE"}
    assert end["call_id"] == start["call_id"]
    assert end["result"] == "Kenya: capital Nairobi, currency KES" and end["error"] is None
    assert done["finish_reason"] == "stop"
    assert done["usage"]["total_tokens"] > 0

    streamed = "".join(f["delta"] for f in frames if f["type"] == "token")
    assert streamed == ANSWER
    run = await as_operator(load_run, started["run_id"])
    assert run.state == Run.State.SUCCEEDED and run.agent == AGENT
    assert run.conversation.agent == AGENT
    assert run.assistant_message.content == streamed
    assert str(run.assistant_message.id) == done["message_id"]
    # Its tool calls are stored with it, as the log showed them.
    assert run.assistant_message.steps == [
        {
            "call_id": start["call_id"],
            "name": "country_lookup",
            "arguments": {"code": "KE"},
            "result": "Kenya: capital Nairobi, currency KES",
            "error": None,
            "truncated": False,
        }
    ]
    # The agent's instructions are the system message; its granted tools are offered.
    assert model.seen[0][0].type == "system" and "countries" in model.seen[0][0].content
    assert model.seen[0][-1].content == "What is the capital of Kenya?"
    assert model.offered[0] == ["country_lookup", "country_codes"]
    # The tool's result went back to the model.
    assert model.seen[1][-1].content == "Kenya: capital Nairobi, currency KES"

    # Sticky: the next send without `agent` is answered by the agent again ...
    again = scripted(AIMessage(content="Still me."))
    started, frames = await agent_turn(
        socket, "And Japan?", conversation_id=started["conversation_id"]
    )
    assert frames[-1]["type"] == "run.done"
    # ... knowing what its tool returned in the first turn (the stored calls).
    history = again.seen[0]
    assert [m.type for m in history] == ["system", "human", "ai", "tool", "ai", "human"]
    assert history[2].tool_calls == [
        {
            "name": "country_lookup",
            "args": {"code": "KE"},
            "id": start["call_id"],
            "type": "tool_call",
        }
    ]
    assert history[3].tool_call_id == start["call_id"]
    assert history[3].content == "Kenya: capital Nairobi, currency KES"
    assert (history[4].content, history[5].content) == (ANSWER, "And Japan?")
    assert (await as_operator(load_run, started["run_id"])).agent == AGENT
    # ... until "none" returns the conversation to plain chat.
    await socket.send(
        {
            "type": "chat.send",
            "content": "Thanks",
            "conversation_id": started["conversation_id"],
            "agent": "none",
        }
    )
    plain = await socket.receive(timeout=15)
    assert plain["type"] == "run.started"
    await socket.receive_until(("run.done", "run.error"))  # no backend here: either end
    run = await as_operator(load_run, plain["run_id"])
    assert run.agent == "" and run.conversation.agent == ""
    await socket.close()


def test_agent_runs_go_to_the_agents_queue_and_the_watchdog_stays_on_default():
    from config.celery import app

    router = app.amqp.router
    route = router.route({}, "chat.tasks.agent_execute")
    assert route["queue"].name == "agents"
    assert router.route({}, "chat.tasks.run_execute")["queue"].name == "runs"
    assert router.route({}, "chat.tasks.runs_reap")["queue"].name == "default"


def test_the_product_path_builds_the_pool_model(alice):
    conversation = ConversationFactory(tenant=alice.tenant, user=alice.user)
    message = MessageFactory(conversation=conversation, content="hi")
    run = RunFactory(user_message=message, agent=AGENT)
    model = agent_runs.agent_model_build(run=run)
    assert isinstance(model, PoolChatModel)
    assert model.reference == str(run.id) and model.tenant_id == str(alice.tenant.id)
    from agents.runs import agent_limits

    limits = agent_limits()
    assert limits.max_steps == settings.PARLEY_AGENT_MAX_STEPS
    assert limits.max_seconds == settings.PARLEY_AGENT_MAX_SECONDS
    assert limits.max_tokens == settings.PARLEY_AGENT_MAX_TOKENS


# --- refusals ---------------------------------------------------------------------------


async def test_an_agent_that_is_not_enabled_is_not_found(alice, charlie, worker, scripted):
    scripted()
    _, _, socket = await ws_connect(alice.user)
    for agent in (AGENT, "example_lookup.nobody", "ghost"):
        await socket.send({"type": "chat.send", "content": "hi", "agent": agent, "client_id": "x"})
        reply = await socket.receive()
        assert reply["type"] == "error" and reply["code"] == "not_found", reply
        assert agent in reply["message"]
    await socket.close()

    # Alice's tenant enabled it: charlie (another tenant) still cannot use it.
    await sync_to_async(enable)(alice)
    _, _, socket = await ws_connect(charlie.user)
    await socket.send({"type": "chat.send", "content": "hi", "agent": AGENT})
    assert (await socket.receive())["code"] == "not_found"
    await socket.close()
    assert await as_operator(lambda: Run.objects.count()) == 0


async def test_a_tool_of_an_ungranted_scope_is_refused(alice, worker, scripted):
    await sync_to_async(enable)(alice, scopes=())
    model = scripted(call("country_lookup", code="KE"), AIMessage(content="I cannot look."))
    _, _, socket = await ws_connect(alice.user)
    _, frames = await agent_turn(socket, agent=AGENT)
    start, end = frames[0], frames[1]
    assert start["type"] == "tool.start" and start["name"] == "country_lookup"
    assert end["type"] == "tool.end" and end["result"].startswith("Error:")
    assert "network.fetch" in end["error"]
    assert frames[-1]["type"] == "run.done"
    assert model.offered[0] == ["country_codes"]  # never offered, refused when named anyway
    await socket.close()


# --- cancel -----------------------------------------------------------------------------

NAPPER_PLUGIN = '''
import time

from langchain_core.runnables import RunnableConfig
from langchain_core.tools import tool

from agents.hookspecs import hookimpl
from agents.manifest import AgentSpec, PluginManifest

@tool(parse_docstring=True)
def nap(seconds: float, config: RunnableConfig) -> str:
    """Sleep a while, waking up early when the run is cancelled.

    Args:
        seconds: How long to sleep.
    """
    cancelled = config["configurable"]["parley_cancelled"]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not cancelled():
        time.sleep(0.02)
    return "woke up"

@hookimpl
def parley_manifest():
    return PluginManifest(
        name="napper", version="1", description="Sleeps on request, for the tests.",
        tools=[nap], scopes={"nap": []},
        agents=[AgentSpec(name="sleeper", title="Sleeper", description="Naps.",
                          instructions="Nap when asked.", tools=("nap",))],
    )
'''


@pytest.fixture
def napper(tmp_path, monkeypatch):
    plugin_install(tmp_path, monkeypatch, name="napper", source=NAPPER_PLUGIN)
    return "napper.sleeper"


async def test_cancel_while_a_tool_runs_ends_the_run_cancelled(alice, worker, scripted, napper):
    await sync_to_async(enable)(alice, plugin="napper", scopes=(), settings={})
    scripted(call("nap", seconds=30), AIMessage(content="never"))
    _, _, socket = await ws_connect(alice.user)
    await socket.send({"type": "chat.send", "content": "Take a nap.", "agent": napper})
    started = await socket.receive(timeout=15)
    tool_start = await socket.receive(timeout=30)
    assert tool_start["type"] == "tool.start" and tool_start["name"] == "nap"
    began = time.monotonic()
    await socket.send({"type": "run.cancel", "run_id": started["run_id"]})
    frames = await socket.receive_until(("run.error", "run.done"), timeout=30)
    assert time.monotonic() - began < 10
    run_frames = [f for f in frames if f.get("run_id") == started["run_id"]]
    end = run_frames[-1]
    assert end["type"] == "run.error" and end["code"] == "cancelled", run_frames
    tool_end = next(f for f in run_frames if f["type"] == "tool.end")
    assert tool_end["error"].startswith("cancelled")
    seqs = [tool_start["seq"]] + [f["seq"] for f in run_frames if "seq" in f]
    assert seqs == list(range(1, len(seqs) + 1))
    run = await as_operator(load_run, started["run_id"])
    assert run.state == Run.State.CANCELLED
    # No text, but the call it made is kept with its end.
    assert run.assistant_message.content == ""
    (step,) = run.assistant_message.steps
    assert (step["name"], step["arguments"]) == ("nap", {"seconds": 30})
    assert step["error"] == tool_end["error"]
    assert end["message_id"] == str(run.assistant_message.id)
    await socket.close()


# --- through the inference pool ---------------------------------------------------------


async def test_the_agent_calls_tools_through_the_pool(alice, worker, synthetic_server, settings):
    """The product path, unpatched: PoolChatModel against a synthetic model server that
    calls the tool, then answers."""
    from inference import pool
    from tests.synthetic import Reply, ToolCall

    server = synthetic_server(
        replies=[
            Reply(tool_calls=[ToolCall("country_lookup", {"code": "JP"})]),
            Reply(pieces=["Tokyo ", "it is."]),
        ]
    )
    settings.PARLEY_BACKENDS = [server.url]
    pool.forget_cache()
    try:
        await sync_to_async(enable)(alice)
        _, _, socket = await ws_connect(alice.user)
        started, frames = await agent_turn(socket, "Capital of Japan?", agent=AGENT)
        await socket.close()
    finally:
        pool.forget_cache()
    kinds = [f["type"] for f in frames]
    assert kinds[:2] == ["tool.start", "tool.end"] and kinds[-1] == "run.done", frames
    assert frames[0]["arguments"] == {"code": "JP"}
    assert frames[1]["result"] == "Japan: capital Tokyo, currency JPY"
    streamed = "".join(f["delta"] for f in frames if f["type"] == "token")
    assert streamed == "Tokyo it is."
    run = await as_operator(load_run, started["run_id"])
    assert run.assistant_message.content == streamed
    # The tools were offered to the backend, and the tool's result sent back to it.
    assert [t["function"]["name"] for t in server.bodies[0]["tools"]] == [
        "country_lookup",
        "country_codes",
    ]
    assert server.bodies[1]["messages"][-1]["role"] == "tool"


# --- /v1/models -------------------------------------------------------------------------


def test_models_lists_the_tenants_agents_only(alice, charlie):
    from gateway.services import models_answer

    keys = {}
    for person in (alice, charlie):
        actor = Actor(tenant=person.tenant, user=person.user, role=Role.OWNER)
        with tenant_scope(tenant_id=person.tenant.id):
            keys[person.tenant.id] = api_key_create(actor=actor, name="models", scopes=["chat"])[1]

    def listed(person) -> list[dict[str, Any]]:
        return models_answer(authorization=f"Bearer {keys[person.tenant.id]}")["data"]

    assert [m for m in listed(alice) if m["id"].startswith("agent:")] == []
    enable(alice)
    assert [m for m in listed(alice) if m["id"].startswith("agent:")] == [
        {"id": f"agent:{AGENT}", "object": "model", "owned_by": "example_lookup"}
    ]
    assert [m for m in listed(charlie) if m["id"].startswith("agent:")] == []


# --- plain chat is unchanged with plugins installed ---------------------------------------


@pytest.mark.llm
async def test_plain_chat_still_streams_from_the_model(alice, backend, worker):
    _, _, socket = await ws_connect(alice.user)
    started, frames = await agent_turn(socket, "Count from 1 to 5.")
    assert frames[-1]["type"] == "run.done", frames[-1]
    assert {f["type"] for f in frames[:-1]} == {"token"}
    assert [f["seq"] for f in frames] == list(range(1, len(frames) + 1))
    run = await as_operator(load_run, started["run_id"])
    assert run.agent == "" and run.assistant_message.content == "".join(
        f["delta"] for f in frames[:-1]
    )
    await socket.close()


def test_an_agents_history_carries_its_earlier_tool_calls_and_plain_chat_does_not(alice):
    from chat.prompts import thread_messages

    steps = [
        tool_step("c1", "country_lookup", {"code": "KE"}, result="Kenya: capital Nairobi"),
        tool_step("c2", "fetch", error="The call did not finish: the run ended first."),
    ]
    c = ConversationFactory(tenant=alice.tenant, user=alice.user, title="t")
    ask = MessageFactory(conversation=c, content="KE?")
    # stopped before any text
    answer = MessageFactory(parent=ask, role="assistant", content="", steps=steps)
    run = RunFactory(user_message=MessageFactory(parent=answer, content="Again?"))
    with tenant_scope(tenant_id=alice.tenant.id):
        run = Run.objects.select_related("conversation", "user_message").get(id=run.id)
        plain = thread_messages(run=run)
        agent = thread_messages(run=run, tool_calls=True)
    assert plain == [{"role": "user", "content": "KE?"}, {"role": "user", "content": "Again?"}]
    assert agent == [
        {"role": "user", "content": "KE?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "c1", "name": "country_lookup", "args": {"code": "KE"}},
                {"id": "c2", "name": "fetch", "args": {}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "Kenya: capital Nairobi"},
        {
            "role": "tool",
            "tool_call_id": "c2",
            "content": "The call did not finish: the run ended first.",
            "status": "error",
        },
        {"role": "user", "content": "Again?"},
    ]
