"""Agents through the OpenAI-compatible API: `model: "agent:<plugin>.<agent>"`.

The agent of a plugin the caller's tenant enabled runs its tool loop
(`agents.runtime.agent_run`) in a thread of this process, its model calls going
through the pool like any call (routed, limited, booked in the ledger with purpose
`agent.step`). Its text streams as ordinary completion chunks; tool steps are not
part of OpenAI's format and are not sent (the websocket protocol shows them). A
client that hangs up cancels the loop at its next check.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator
from typing import Any

from django.db import connections

from gateway.errors import ApiError
from inference.types import (
    InferenceError,
    StreamEvent,
    StreamFinished,
    StreamStarted,
    TextDelta,
    Usage,
)
from tenants.access import Actor, NotFound

AGENT_BACKEND = "agent"  # StreamStarted.backend of an agent's completion
AGENT_MODEL_PREFIX = "agent:"  # an agent's model id: agent:<plugin>.<agent>


def agent_tools(*, actor: Actor, agent: str) -> Any:
    """The agent as the caller's tenant may run it, or 404 in OpenAI's shape."""
    from agents.selectors import tools_for_run

    try:
        return tools_for_run(tenant_id=actor.tenant_id, agent=agent)
    except NotFound:
        raise ApiError(
            404,
            f"The agent {agent!r} is not enabled for your workspace; /v1/models lists "
            "the models and agents you can use.",
            param="model",
            code="model_not_found",
        ) from None


async def agent_events(
    *,
    actor: Actor,
    tools: Any,
    agent: str,
    model: str,
    messages: list[dict[str, Any]],
    reference: str,
) -> AsyncGenerator[StreamEvent, None]:
    """The agent's run as the pool's stream events: started, text deltas, finished."""
    from agents.context import ToolContext
    from agents.pool_model import PoolChatModel
    from agents.runs import tenant_agent_run

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    stop = threading.Event()

    def emit(event: dict[str, Any]) -> None:
        if event["type"] == "token":
            loop.call_soon_threadsafe(queue.put_nowait, TextDelta(event["delta"]))

    def work() -> None:
        try:
            result = tenant_agent_run(
                tools=tools,
                tenant_id=actor.tenant_id,
                agent=agent,
                model=PoolChatModel(
                    tenant_id=str(actor.tenant_id),
                    user_id=str(actor.user.pk) if actor.user is not None else "",
                    reference=reference,
                ),
                messages=messages,
                emit=emit,
                cancelled=stop.is_set,
                # No conversation, no documents in play: the key's creator's call.
                context=ToolContext(
                    tenant_id=str(actor.tenant_id),
                    user_id=str(actor.user.pk) if actor.user is not None else "",
                    run_id=reference,
                ),
            )
            finish = "stop" if result.stop_reason == "done" else "length"
            usage = Usage(
                prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens
            )
            loop.call_soon_threadsafe(queue.put_nowait, StreamFinished(finish, usage))
        except BaseException as exc:  # handed to the stream, which raises it
            loop.call_soon_threadsafe(queue.put_nowait, exc)
        finally:
            connections.close_all()  # this thread's own database connections

    worker = threading.Thread(target=work, name=f"agent-{reference}", daemon=True)
    yield StreamStarted(backend=AGENT_BACKEND, model=model)
    worker.start()
    try:
        while True:
            item = await queue.get()
            if isinstance(item, InferenceError):
                raise item
            if isinstance(item, BaseException):
                raise InferenceError("internal_error", f"The agent failed: {type(item).__name__}")
            yield item
            if isinstance(item, StreamFinished):
                return
    finally:
        stop.set()  # a client that hung up stops the loop at its next check
