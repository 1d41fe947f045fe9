"""Running a tenant's agent as the product does, wherever the run comes from (a chat
run on the `agents` queue, a call of the OpenAI-compatible API): the limits from the
settings, the tenant's plugin settings for the tools, tools with side effects on their
own worker queues (agents.tool_queue)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.conf import settings
from langchain_core.language_models import BaseChatModel

from agents.context import ToolContext
from agents.runtime import AgentLimits, AgentResult, Emit, agent_run
from agents.selectors import RunTools
from agents.tool_queue import QueuedToolExecutor


def agent_limits() -> AgentLimits:
    return AgentLimits(
        max_steps=settings.PARLEY_AGENT_MAX_STEPS,
        max_seconds=settings.PARLEY_AGENT_MAX_SECONDS,
        max_tokens=settings.PARLEY_AGENT_MAX_TOKENS,
    )


def tenant_agent_run(
    *,
    tools: RunTools,
    tenant_id: Any,
    agent: str,
    model: BaseChatModel,
    messages: list[dict[str, Any]],
    emit: Emit,
    cancelled: Callable[[], bool],
    context: ToolContext | None = None,
) -> AgentResult:
    """`agent_run` for the agent `agent` of `tenant_id`, as `tools_for_run` gave it;
    `context` is what its tools learn of the run (agents.context)."""
    return agent_run(
        spec=tools.agent,
        manifest=tools.manifest,
        granted_scopes=tools.granted_scopes,
        model=model,
        messages=messages,
        emit=emit,
        cancelled=cancelled,
        limits=agent_limits(),
        settings=tools.settings,
        # Tools with side effects run on their own workers; only ids travel there.
        tool_executor=QueuedToolExecutor(
            tenant_id=tenant_id, agent=agent, timeout_s=settings.PARLEY_TOOL_TIMEOUT_S
        ),
        context=context,
    )
