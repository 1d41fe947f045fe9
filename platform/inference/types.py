"""What the pool takes and gives: requests, stream events, usage, errors.

The pool knows models, messages and tenants, never conversations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ChatRequest:
    # OpenAI chat messages: `content` may be a string, a list of parts or None (an
    # assistant turn with `tool_calls`); a `tool` message answers one by `tool_call_id`.
    messages: list[dict[str, Any]]
    model: str = ""  # empty: the pool's default model
    max_tokens: int | None = None
    temperature: float | None = None
    tenant_id: str = ""
    # Who the call is for and what it serves: limits are per tenant, user and key; the
    # ledger records the purpose ("chat.run") and reference (the run's id).
    user_id: str = ""
    api_key_id: str = ""
    purpose: str = ""
    reference: str = ""
    # OpenAI tool schemas ({"type": "function", "function": {"name", "description",
    # "parameters"}}) and `tool_choice` ("auto", "none", "required" or a named tool),
    # sent to the backend only when set.
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None

    def __post_init__(self) -> None:
        for tool in self.tools or ():
            function = tool.get("function") if isinstance(tool, dict) else None
            if (
                not isinstance(tool, dict)
                or tool.get("type") != "function"
                or not isinstance(function, dict)
                or not function.get("name")
            ):
                raise ValueError(
                    "ChatRequest.tools: each tool must be an OpenAI tool schema "
                    '{"type": "function", "function": {"name": ..., "parameters": ...}}, '
                    f"not {tool!r:.200}"
                )
        if self.tool_choice is not None and not isinstance(self.tool_choice, str | dict):
            raise ValueError(
                "ChatRequest.tool_choice must be a string or a named tool, "
                f"not {type(self.tool_choice).__name__}"
            )


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


@dataclass(frozen=True)
class StreamStarted:
    backend: str
    model: str


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class ToolCallDelta:
    """A fragment of a tool call the model is making, as OpenAI streams `delta.tool_calls`:
    `index` names the call within the reply; its first fragment carries the call's `id`
    and function `name`, and every fragment a piece of the JSON `arguments` (joined in
    order they make the whole)."""

    index: int
    id: str | None
    name: str | None
    arguments: str


@dataclass(frozen=True)
class StreamFinished:
    finish_reason: str  # "stop", "length", "tool_calls" (the reply is tool calls), ...
    usage: Usage = field(default_factory=Usage)


StreamEvent = StreamStarted | TextDelta | ToolCallDelta | StreamFinished


class InferenceError(Exception):
    """A failed LLM call. `code` is stable and shown to clients; `retryable` says whether
    another backend may succeed (true only before the first token)."""

    def __init__(self, code: str, message: str, *, retryable: bool = False, status: int = 0):
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable
        self.status = status

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"
