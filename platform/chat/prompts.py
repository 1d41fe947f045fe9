"""What a run's model sees: the conversation's thread up to the question, as chat
messages. The plain chat turn (chat.chat_turn) puts the system prompt first; an agent's
run (chat.agent_turn) also sees the tool calls stored with earlier answers."""

from __future__ import annotations

from typing import Any

from django.conf import settings

from chat.models import Message, Run
from chat.selectors import message_thread


def prompt_build(*, run: Run) -> list[dict[str, str]]:
    """System prompt first, then the conversation's thread up to the user's message: a
    stable prefix that later turns share, so follow-ups hit the backend's prefix cache."""
    return [
        {"role": "system", "content": settings.PARLEY_SYSTEM_PROMPT},
        *thread_messages(run=run),
    ]


def thread_messages(*, run: Run, tool_calls: bool = False) -> list[dict[str, Any]]:
    """The conversation's user and assistant messages up to the run's user message.
    With `tool_calls` (an agent's run), an answer's stored tool calls come before its
    text, as the agent made them: an assistant message calling the tools, then each
    tool's result (or error), so the agent knows what its tools returned earlier."""
    out: list[dict[str, Any]] = []
    for message in message_thread(conversation=run.conversation, leaf=run.user_message):
        if message.role not in (Message.Role.USER, Message.Role.ASSISTANT):
            continue
        if tool_calls and message.steps:
            out += _tool_call_messages(message.steps)
        if message.content:
            out.append({"role": message.role, "content": message.content})
    return out


def _tool_call_messages(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    calls = [
        {
            "id": step["call_id"],
            "name": step["name"],
            "args": step["arguments"] if isinstance(step.get("arguments"), dict) else {},
        }
        for step in steps
    ]
    results: list[dict[str, Any]] = []
    for step in steps:
        result = {"role": "tool", "tool_call_id": step["call_id"]}
        if step.get("error"):
            result.update(content=step["error"], status="error")
        else:
            result["content"] = step.get("result") or ""
        results.append(result)
    return [{"role": "assistant", "content": "", "tool_calls": calls}, *results]
