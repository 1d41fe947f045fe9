"""Tools with side effects run on workers of their own (DESIGN section 4).

The agent loop (agents.runtime) runs in an `agents` worker. A tool whose scopes have
side effects (`agents.scopes.SCOPE_QUEUES`: code on the `sandbox` queue, outside
requests and document writes on the `tools` queue) is not run there:
`QueuedToolExecutor` sends it as the Celery task `agents.tasks.tool_execute` and waits
for its answer. A tool without such scopes runs in the agent worker as before.

Nothing secret goes through the broker. The message names the tenant, the agent
("<plugin>.<agent>"), the tool, the model's arguments, a call id and a deadline; the
tool worker rebuilds the tool and the plugin's settings itself (`tool_execute`, through
`agents.selectors.tools_for_run`), so a plugin disabled or a grant revoked while the
message waited refuses the call.

The answer comes back through Redis (Celery's result backend is off in Parley): the
tool worker pushes it onto a list whose key is built from server-side ids only (the
tenant and a call id made here), and the agent worker waits on it with BLPOP, a
fraction of a second at a time so it keeps watching the run's cancel and deadline. On
a cancel it sets a flag next to the answer, which the tool reads as
`config["configurable"]["parley_cancelled"]()`. A tool worker that does not answer
within `timeout_s` (PARLEY_TOOL_TIMEOUT_S) ends the call with an error the model sees.
Both keys expire shortly after the deadline.

Embedded mode (no broker, no Redis) runs the same task body on a thread of its own,
with the answer in this process's memory. Not on config.celery.enqueue's thread pool:
an agent run waiting there for its tool would hold one of the pool's threads, and
enough concurrent runs would leave no thread to run their tools.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

from django.conf import settings
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import BaseTool

from agents.context import CONTEXT_KEY, ToolAnswer, ToolContext, tool_context
from agents.runtime import tool_invoke_in_process, tool_result_text
from agents.scopes import ToolRefused, side_effects, tool_guard, tool_queue

logger = logging.getLogger(__name__)

CALL_RE = re.compile(r"^[0-9a-f]{32}$")
KEY_TTL_MARGIN_S = 60  # how long the keys outlive the call's deadline
CANCEL_POLL_S = 0.1  # how often a queued tool's cancel flag is read at most


class ToolTimeout(Exception):
    """The tool worker did not answer in time."""


class ToolError(Exception):
    """The tool raised on its worker; the message is its error."""


# --- where answers and cancel flags live ------------------------------------------------


def tool_result_key(*, tenant_id: Any, call: str) -> str:
    return f"{settings.PARLEY_REDIS_PREFIX}:t:{tenant_id}:tool:{call}:result"


def tool_cancel_key(*, tenant_id: Any, call: str) -> str:
    return f"{settings.PARLEY_REDIS_PREFIX}:t:{tenant_id}:tool:{call}:cancel"


class ToolResults(Protocol):
    def push(self, key: str, value: str, ttl_s: int) -> None: ...

    def pop(self, key: str, timeout_s: float) -> str | None: ...

    def flag(self, key: str, ttl_s: int) -> None: ...

    def flagged(self, key: str) -> bool: ...


class RedisToolResults:
    def __init__(self, url: str) -> None:
        import redis

        self._redis = redis.Redis.from_url(url, socket_timeout=30)

    def push(self, key: str, value: str, ttl_s: int) -> None:
        with self._redis.pipeline() as pipe:
            pipe.rpush(key, value)
            pipe.expire(key, ttl_s)
            pipe.execute()

    def pop(self, key: str, timeout_s: float) -> str | None:
        item = self._redis.blpop([key], timeout=timeout_s)
        if item is None:
            return None
        value = item[1]
        return value.decode() if isinstance(value, bytes) else str(value)

    def flag(self, key: str, ttl_s: int) -> None:
        self._redis.set(key, b"1", ex=ttl_s)

    def flagged(self, key: str) -> bool:
        return bool(self._redis.exists(key))


class MemoryToolResults:
    """Thread-safe: the tool runs on one thread, the agent loop waits on another."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._values: dict[str, tuple[list[str], float]] = {}  # key -> (values, expires at)

    def _drop_expired(self) -> None:
        now = time.time()
        for key in [k for k, (_, expires) in self._values.items() if expires < now]:
            del self._values[key]

    def push(self, key: str, value: str, ttl_s: int) -> None:
        with self._changed:
            self._drop_expired()
            values, _ = self._values.get(key, ([], 0.0))
            self._values[key] = ([*values, value], time.time() + ttl_s)
            self._changed.notify_all()

    def pop(self, key: str, timeout_s: float) -> str | None:
        until = time.monotonic() + timeout_s
        with self._changed:
            while True:
                self._drop_expired()
                values, expires = self._values.get(key, ([], 0.0))
                if values:
                    if len(values) == 1:
                        del self._values[key]
                    else:
                        self._values[key] = (values[1:], expires)
                    return values[0]
                left = until - time.monotonic()
                if left <= 0:
                    return None
                self._changed.wait(left)

    def flag(self, key: str, ttl_s: int) -> None:
        self.push(key, "1", ttl_s)

    def flagged(self, key: str) -> bool:
        with self._changed:
            self._drop_expired()
            return key in self._values


_results: dict[str | None, ToolResults] = {}
_results_lock = threading.Lock()


def tool_results() -> ToolResults:
    """Redis where there is one (production, the tests), memory in embedded mode."""
    url = settings.REDIS_URL
    with _results_lock:
        if url not in _results:
            _results[url] = MemoryToolResults() if url is None else RedisToolResults(url)
        return _results[url]


# --- the agent worker's side ------------------------------------------------------------


@dataclass(frozen=True)
class QueuedToolExecutor:
    """A `agents.runtime.ToolExecutor` for the runs of one tenant's agent: tools with
    side effects on their queue, the others in-process."""

    tenant_id: Any
    agent: str  # "<plugin>.<agent>"
    timeout_s: float
    poll_s: float = 0.1  # how long one wait for the answer blocks
    grace_s: float = 2.0  # how long the answer is still awaited after a cancel

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.poll_s <= 0 or self.grace_s < 0:
            raise ValueError("QueuedToolExecutor needs a positive timeout_s and poll_s")

    def __call__(
        self,
        *,
        tool: BaseTool,
        scopes: frozenset[str],
        arguments: dict[str, Any],
        config: RunnableConfig,
    ) -> Any:
        queue = tool_queue(scopes)
        if queue is None:
            return tool_invoke_in_process(
                tool=tool, scopes=scopes, arguments=arguments, config=config
            )
        call = uuid.uuid4().hex
        deadline = time.time() + self.timeout_s
        context = tool_context(config)
        message = {
            "tenant_id": str(self.tenant_id),
            "agent": self.agent,
            "tool": tool.name,
            "arguments": arguments,
            "call": call,
            "deadline": deadline,
            "context": context.for_worker() if context is not None else None,
        }
        tool_dispatch(queue=queue, message=message, expires_s=self.timeout_s)
        cancelled = config.get("configurable", {}).get("parley_cancelled", lambda: False)
        return self.wait(
            tool=tool.name, call=call, deadline=deadline, cancelled=cancelled, context=context
        )

    def wait(
        self,
        *,
        tool: str,
        call: str,
        deadline: float,
        cancelled: Any,
        context: ToolContext | None = None,
    ) -> Any:
        results = tool_results()
        key = tool_result_key(tenant_id=self.tenant_id, call=call)
        cancel_sent = False
        while True:
            left = deadline - time.time()
            if left <= 0:
                break
            raw = results.pop(key, min(self.poll_s, left))
            if raw is not None:
                answer = json.loads(raw)
                if "progress" in answer:  # the tool's ToolContext.progress, relayed
                    if context is not None and context.events is not None:
                        context.events.put(answer["progress"])
                    continue
                return self.answer(tool, answer)
            if not cancel_sent and cancelled():
                cancel_sent = True
                results.flag(
                    tool_cancel_key(tenant_id=self.tenant_id, call=call),
                    int(self.timeout_s) + KEY_TTL_MARGIN_S,
                )
                # The tool may still answer (it stopped early); the loop decides.
                deadline = min(deadline, time.time() + self.grace_s)
        if cancel_sent:
            raise ToolTimeout(f"the tool did not stop within {self.grace_s:g} s of the cancel")
        raise ToolTimeout(f"the tool worker did not answer within {self.timeout_s:g} s")

    def answer(self, tool: str, answer: dict[str, Any]) -> Any:
        if "result" in answer:
            if answer.get("artifacts"):
                return ToolAnswer(str(answer["result"]), tuple(answer["artifacts"]))
            return answer["result"]
        if answer.get("refused"):
            raise ToolRefused(
                str(answer["error"]),
                plugin=self.agent.partition(".")[0],
                tool=tool,
                missing=frozenset(),
            )
        raise ToolError(str(answer["error"]))


def tool_dispatch(*, queue: str, message: dict[str, Any], expires_s: float) -> None:
    """Send one tool call to the workers of `queue` (embedded mode: a thread)."""
    from agents.tasks import tool_execute_task

    if settings.PARLEY_TASKS_IN_PROCESS:
        thread = threading.Thread(
            target=_run_in_thread, args=(message,), name=f"agent-{queue}-tool", daemon=True
        )
        thread.start()
    else:
        tool_execute_task.apply_async(kwargs=message, queue=queue, expires=expires_s)


def _run_in_thread(message: dict[str, Any]) -> None:
    from django.db import connections

    try:
        tool_execute(**message)
    except Exception:
        logger.exception("in-process tool call %s failed", message.get("call"))
    finally:
        connections.close_all()


# --- the tool worker's side -------------------------------------------------------------


def tool_execute(
    *,
    tenant_id: str,
    agent: str,
    tool: str,
    arguments: dict[str, Any],
    call: str,
    deadline: float,
    context: dict[str, Any] | None = None,
) -> None:
    """Run one queued tool call and push its answer (the body of agents.tasks.tool_execute).
    The tool and the settings come from the database, as of now: a plugin disabled or a
    scope revoked since the call was queued refuses it; so is a tool with side effects
    called by a run that reads document text (`context["untrusted"]`), again here. The
    tool's progress events go back on the answer's list, ahead of the answer."""
    from agents.selectors import tools_for_run
    from tenants.access import NotFound

    if not CALL_RE.match(call):
        raise ValueError(f"A tool call id is 32 hex digits, not {call!r}.")
    if not isinstance(arguments, dict):
        raise ValueError("A tool call's arguments are an object.")
    if time.time() >= deadline:
        logger.warning("tool call %s (%s) arrived after its deadline; dropped", call, tool)
        return
    results = tool_results()
    ttl = int(deadline - time.time()) + KEY_TTL_MARGIN_S

    def reply(answer: dict[str, Any]) -> None:
        results.push(tool_result_key(tenant_id=tenant_id, call=call), json.dumps(answer), ttl)

    try:
        run_tools = tools_for_run(tenant_id=tenant_id, agent=agent)
    except NotFound:
        reply({"error": f"The agent {agent!r} is no longer enabled here.", "refused": True})
        return
    try:
        tool_guard(run_tools.manifest, tool_name=tool, granted_scopes=run_tools.granted_scopes)
    except ToolRefused as exc:
        reply({"error": str(exc), "refused": True})
        return
    found = next((t for t in run_tools.tools if t.name == tool), None)
    if found is None:
        reply({"error": f"Tool {tool!r} is not one of the agent's tools.", "refused": True})
        return
    run_context = ToolContext.from_worker({**context, "tenant_id": tenant_id}) if context else None
    if (
        run_context is not None
        and run_context.untrusted
        and side_effects(run_tools.manifest.tool_scopes(tool))
    ):
        reply(
            {
                "error": f"Tool {tool!r} has side effects and the run reads document text.",
                "refused": True,
            }
        )
        return
    if run_context is not None:
        events = _RelayedEvents(lambda event: reply({"progress": event}))
        run_context = dataclasses.replace(run_context, events=events)

    cancel_key = tool_cancel_key(tenant_id=tenant_id, call=call)
    seen = {"at": float("-inf"), "cancelled": False}

    def cancelled() -> bool:
        if seen["cancelled"] or time.time() >= deadline:
            return True
        now = time.monotonic()
        if now - seen["at"] >= CANCEL_POLL_S:
            seen["at"] = now
            seen["cancelled"] = results.flagged(cancel_key)
        return bool(seen["cancelled"])

    config: RunnableConfig = {
        "configurable": {
            "parley_cancelled": cancelled,
            "parley_settings": run_tools.settings,
            CONTEXT_KEY: run_context,
        }
    }
    try:
        output = found.invoke(arguments, config=config)
    except Exception as exc:  # a tool may raise anything; the model gets to see it
        reply({"error": f"{type(exc).__name__}: {exc}"})
        return
    if isinstance(output, ToolAnswer) and output.artifacts:
        reply({"result": output.text, "artifacts": list(output.artifacts)})
        return
    reply({"result": tool_result_text(output)})


class _RelayedEvents:
    """Stands in for ToolContext.events on a tool worker: each event is pushed at once."""

    def __init__(self, send: Any) -> None:
        self._send = send

    def put(self, event: dict[str, Any]) -> None:
        self._send(event)
