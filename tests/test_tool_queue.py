"""Tools with side effects run on their own queues (agents.tool_queue): an agent run on
the `agents` worker sends them to the `tools` (or `sandbox`) worker as
`agents.tasks.tool_execute` with ids only, and waits for the answer in Redis."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from celery import signals
from langchain_core.messages import AIMessage

from agents import tool_queue as tool_queue_module
from agents.registry import plugin_get
from agents.runtime import agent_run
from agents.scopes import tool_queue
from agents.services import plugin_scopes_grant
from agents.tool_queue import (
    MemoryToolResults,
    QueuedToolExecutor,
    tool_execute,
    tool_result_key,
    tool_results,
)
from chat.models import Run
from tenants.rls import tenant_scope
from tests.conftest import as_operator, plugin_install, ws_connect
from tests.scripted_model import ScriptedChatModel
from tests.test_agent_runs import AGENT, agent_turn, call, enable

pytestmark = pytest.mark.django_db(transaction=True)

SECRET = "sk-directory-12345"  # the example plugin's key in these tests
TASK = "agents.tasks.tool_execute"


@pytest.fixture(autouse=True)
def _all_plugins(all_plugins):
    """Every test here sees every installed plugin (conftest.all_plugins)."""


@pytest.fixture
def scripted(monkeypatch):
    from chat import agent_turn as agent_runs

    def install(*replies: AIMessage) -> ScriptedChatModel:
        model = ScriptedChatModel(script=iter(replies))
        monkeypatch.setattr(agent_runs, "agent_model_build", lambda *, run: model)
        return model

    return install


@pytest.fixture
def tool_tasks():
    """The tool tasks published (their message) and started (their queue), this test."""
    seen: dict[str, list[dict[str, Any]]] = {"published": [], "started": []}

    def published(sender=None, body=None, routing_key=None, headers=None, **kwargs):
        if sender == TASK:
            seen["published"].append({"body": body, "headers": headers, "queue": routing_key})

    def started(sender=None, task=None, kwargs=None, **extra):
        if task is not None and task.name == TASK:
            seen["started"].append(
                {
                    "queue": task.request.delivery_info.get("routing_key"),
                    "tool": (kwargs or {}).get("tool"),
                    "thread": threading.current_thread().name,
                }
            )

    signals.before_task_publish.connect(published, weak=False)
    signals.task_prerun.connect(started, weak=False)
    yield seen
    signals.before_task_publish.disconnect(published)
    signals.task_prerun.disconnect(started)


# --- which queue ------------------------------------------------------------------------


def test_scopes_with_side_effects_name_a_queue():
    assert tool_queue({"network.fetch"}) == "tools"
    assert tool_queue({"documents.write"}) == "tools"
    assert tool_queue({"code.execute"}) == "sandbox"
    assert tool_queue({"network.fetch", "code.execute"}) == "sandbox"  # the most isolated
    assert tool_queue({"documents.read"}) is None
    assert tool_queue(set()) is None


def test_the_call_names_the_queue_over_the_route():
    from config.celery import app

    router = app.amqp.router
    assert router.route({}, TASK)["queue"].name == "tools"
    assert router.route({"queue": "sandbox"}, TASK)["queue"].name == "sandbox"
    app.loader.import_default_modules()  # what a worker does on start
    assert TASK in app.tasks  # autodiscovered from the agents app


# --- through the workers ------------------------------------------------------------------


async def test_a_network_tool_runs_on_the_tools_queue_and_a_plain_one_in_process(
    alice, worker, scripted, tool_tasks
):
    await sync_to_async(enable)(alice)
    model = scripted(
        AIMessage(
            content="",
            tool_calls=[
                {"name": "country_lookup", "args": {"code": "KE"}, "id": "c1"},
                {"name": "country_codes", "args": {"prefix": "K"}, "id": "c2"},
            ],
        ),
        AIMessage(content="Nairobi."),
    )
    _, _, socket = await ws_connect(alice.user)
    _, frames = await agent_turn(socket, agent=AGENT)
    await socket.close()

    ends = [f for f in frames if f["type"] == "tool.end"]
    assert [(e["name"], e["result"], e["error"]) for e in ends] == [
        ("country_lookup", "Kenya: capital Nairobi, currency KES", None),
        ("country_codes", "KE", None),
    ]
    assert frames[-1]["type"] == "run.done"
    # The tool's answer went back to the model.
    assert [m.content for m in model.seen[1][-2:]] == [
        "Kenya: capital Nairobi, currency KES",
        "KE",
    ]
    # Only the network tool went through the broker, and it ran on the `tools` worker.
    assert [(s["tool"], s["queue"]) for s in tool_tasks["started"]] == [("country_lookup", "tools")]
    [message] = tool_tasks["published"]
    assert message["queue"] == "tools"
    args, kwargs, _ = message["body"]
    assert args == [] or args == ()
    assert set(kwargs) == {
        "tenant_id",
        "agent",
        "tool",
        "arguments",
        "call",
        "deadline",
        "context",
    }
    assert kwargs["tenant_id"] == str(alice.tenant.id) and kwargs["agent"] == AGENT
    # The run's context: ids only (agents.context.ToolContext.for_worker).
    assert kwargs["context"]["user_id"] == str(alice.user.id) and kwargs["context"]["run_id"]
    assert kwargs["context"]["untrusted"] is False
    assert kwargs["arguments"] == {"code": "KE"}
    # The plugin's settings (its secret key) never go through the broker.
    assert SECRET not in json.dumps([message["body"], message["headers"]], default=str)


async def test_a_grant_revoked_while_the_call_is_queued_refuses_it(
    alice, worker, scripted, tool_tasks
):
    await sync_to_async(enable)(alice)

    def revoke(sender=None, **kwargs):
        if sender == TASK:
            with tenant_scope(tenant_id=alice.tenant.id):
                plugin_scopes_grant(actor=alice.actor, name="example_lookup", scopes=[])

    signals.before_task_publish.connect(revoke, weak=False)
    try:
        model = scripted(call("country_lookup", code="KE"), AIMessage(content="No luck."))
        _, _, socket = await ws_connect(alice.user)
        _, frames = await agent_turn(socket, agent=AGENT)
        await socket.close()
    finally:
        signals.before_task_publish.disconnect(revoke)

    [end] = [f for f in frames if f["type"] == "tool.end"]
    assert "needs scopes not granted to it: network.fetch" in end["error"]
    assert end["result"].startswith("Error:") and "Kenya" not in end["result"]
    assert [s["queue"] for s in tool_tasks["started"]] == ["tools"]  # it ran, and refused
    assert "network.fetch" in model.seen[1][-1].content
    assert frames[-1]["type"] == "run.done"


async def test_a_tool_worker_that_never_answers_is_an_error_for_the_model(
    alice, worker, scripted, settings, monkeypatch
):
    settings.PARLEY_TOOL_TIMEOUT_S = 1.0
    lost: list[dict[str, Any]] = []
    # The message is lost on the way (or its worker is gone): nobody ever answers.
    monkeypatch.setattr(
        tool_queue_module,
        "tool_dispatch",
        lambda *, queue, message, expires_s: lost.append(message),
    )
    await sync_to_async(enable)(alice)
    model = scripted(call("country_lookup", code="KE"), AIMessage(content="The directory is down."))
    _, _, socket = await ws_connect(alice.user)
    began = time.monotonic()
    _, frames = await agent_turn(socket, agent=AGENT)
    await socket.close()

    assert len(lost) == 1
    [end] = [f for f in frames if f["type"] == "tool.end"]
    assert end["error"] == "ToolTimeout: the tool worker did not answer within 1 s"
    assert model.seen[1][-1].content == f"Error: {end['error']}"
    # The run went on: the model answered after the failed call.
    assert frames[-1]["type"] == "run.done" and frames[-1]["finish_reason"] == "stop"
    assert "".join(f["delta"] for f in frames if f["type"] == "token") == "The directory is down."
    assert time.monotonic() - began < 15


SLOW_FETCH_PLUGIN = '''
import time

from langchain_core.runnables import RunnableConfig
from langchain_core.tools import tool

from agents.hookspecs import hookimpl
from agents.manifest import AgentSpec, PluginManifest

SEEN = []

@tool(parse_docstring=True)
def slow_fetch(seconds: float, config: RunnableConfig) -> str:
    """Fetch slowly, giving up when the run is cancelled.

    Args:
        seconds: How long the fetch takes.
    """
    cancelled = config["configurable"]["parley_cancelled"]
    SEEN.append("started")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if cancelled():
            SEEN.append("cancelled")
            return "gave up"
        time.sleep(0.02)
    return "fetched"

@hookimpl
def parley_manifest():
    return PluginManifest(
        name="slowfetch", version="1", description="Fetches slowly, for the tests.",
        tools=[slow_fetch], scopes={"slow_fetch": ["network.fetch"]},
        agents=[AgentSpec(name="fetcher", title="Fetcher", description="Fetches.",
                          instructions="Fetch when asked.", tools=("slow_fetch",))],
    )
'''


@pytest.fixture
def slowfetch(tmp_path, monkeypatch):
    plugin_install(tmp_path, monkeypatch, name="slowfetch", source=SLOW_FETCH_PLUGIN)
    import pp_slowfetch

    return pp_slowfetch


async def test_cancel_reaches_a_queued_tool_and_ends_the_run_cancelled(
    alice, worker, scripted, tool_tasks, slowfetch
):
    await sync_to_async(enable)(alice, plugin="slowfetch", scopes=("network.fetch",), settings={})
    scripted(call("slow_fetch", seconds=30), AIMessage(content="never"))
    _, _, socket = await ws_connect(alice.user)
    await socket.send({"type": "chat.send", "content": "Fetch it.", "agent": "slowfetch.fetcher"})
    started = await socket.receive(timeout=15)
    tool_start = await socket.receive(timeout=30)
    assert tool_start["type"] == "tool.start" and tool_start["name"] == "slow_fetch"
    for _ in range(200):  # the tool worker has it
        if slowfetch.SEEN:
            break
        await sync_to_async(time.sleep)(0.05)
    began = time.monotonic()
    await socket.send({"type": "run.cancel", "run_id": started["run_id"]})
    frames = await socket.receive_until(("run.error", "run.done"), timeout=30)
    await socket.close()
    assert time.monotonic() - began < 10

    run_frames = [f for f in frames if f.get("run_id") == started["run_id"]]
    assert run_frames[-1]["type"] == "run.error" and run_frames[-1]["code"] == "cancelled"
    tool_end = next(f for f in run_frames if f["type"] == "tool.end")
    assert tool_end["error"] == "cancelled: the tool was stopped"  # it answered in time
    assert slowfetch.SEEN == ["started", "cancelled"]
    assert [(s["tool"], s["queue"]) for s in tool_tasks["started"]] == [("slow_fetch", "tools")]
    run = await as_operator(lambda: Run.objects.get(id=started["run_id"]))
    assert run.state == Run.State.CANCELLED


# --- embedded mode and the task body ----------------------------------------------------


def test_embedded_mode_runs_the_task_on_a_thread_with_answers_in_memory(
    alice, settings, monkeypatch
):
    settings.PARLEY_TASKS_IN_PROCESS = True
    settings.REDIS_URL = None
    enable(alice)
    ran: list[str] = []
    real = tool_queue_module.tool_execute

    def spy(**kwargs: Any) -> None:
        ran.append(threading.current_thread().name)
        real(**kwargs)

    monkeypatch.setattr(tool_queue_module, "tool_execute", spy)
    assert isinstance(tool_results(), MemoryToolResults)
    executor = QueuedToolExecutor(tenant_id=alice.tenant.id, agent=AGENT, timeout_s=10)
    lookup = plugin_get("example_lookup").manifest.tool("country_lookup")
    answer = executor(
        tool=lookup,
        scopes=frozenset({"network.fetch"}),
        arguments={"code": "JP"},
        config={"configurable": {"parley_cancelled": lambda: False}},
    )
    assert answer == "Japan: capital Tokyo, currency JPY"
    assert ran == ["agent-tools-tool"]  # its own thread, not the caller's


def test_a_tool_without_side_effects_never_leaves_the_process(alice, monkeypatch):
    calculator = plugin_get("calculator").manifest
    monkeypatch.setattr(
        tool_queue_module,
        "tool_dispatch",
        lambda **kwargs: pytest.fail("a tool without side effects was queued"),
    )
    executor = QueuedToolExecutor(tenant_id=alice.tenant.id, agent="calculator.x", timeout_s=1)
    model = ScriptedChatModel(
        script=iter([call("calculate", expression="6 * 7"), AIMessage(content="42")])
    )
    events: list[dict[str, Any]] = []
    result = agent_run(
        spec=calculator.agents[0],
        manifest=calculator,
        granted_scopes=(),
        model=model,
        messages=[{"role": "user", "content": "6 times 7?"}],
        emit=events.append,
        tool_executor=executor,
    )
    assert result.succeeded
    [end] = [e for e in events if e["type"] == "tool.end"]
    assert end["error"] is None and end["result"] == "42"


def test_the_task_refuses_bad_ids_and_drops_late_calls(alice):
    enable(alice)
    base = {
        "tenant_id": str(alice.tenant.id),
        "agent": AGENT,
        "tool": "country_lookup",
        "arguments": {"code": "KE"},
    }
    with pytest.raises(ValueError, match="32 hex digits"):
        tool_execute(**base, call="../../etc", deadline=time.time() + 5)
    call_id = "0" * 32
    tool_execute(**base, call=call_id, deadline=time.time() - 1)  # its waiter is gone
    key = tool_result_key(tenant_id=alice.tenant.id, call=call_id)
    assert tool_results().pop(key, 0.1) is None
    tool_execute(**base, call=call_id, deadline=time.time() + 5)
    assert json.loads(tool_results().pop(key, 1) or "{}") == {
        "result": "Kenya: capital Nairobi, currency KES"
    }


def test_memory_results_wait_expire_and_flag():
    results = MemoryToolResults()
    assert results.pop("k", 0.05) is None
    threading.Timer(0.05, results.push, args=("k", "v", 60)).start()
    assert results.pop("k", 2) == "v"
    results.push("old", "v", 0)
    time.sleep(0.01)
    assert results.pop("old", 0) is None
    assert not results.flagged("c")
    results.flag("c", 60)
    assert results.flagged("c")
