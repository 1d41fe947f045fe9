"""What the pool takes and gives: requests, stream events, usage, errors.

The pool knows models, messages and tenants, never conversations.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# The most tokens one call may ask for (`max_tokens`) or be counted for (a reservation,
# a backend's usage): far beyond any model's context, and exact everywhere a count goes
# (a PostgreSQL integer; the Lua numbers of the limit scripts, which write larger ones
# with an exponent). Larger numbers are refused at the edge and clamped inside.
MAX_TOKEN_COUNT = 2**31 - 1


def token_count(value: Any) -> int:
    """A count of tokens (a backend's usage, an estimate) as the ledger and the limits
    hold it: 0 for a missing or unreadable one (not a finite number), clamped to
    [0, MAX_TOKEN_COUNT] (the Lua scripts of the limits read and write such numbers
    exactly; a larger one would be written with an exponent)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    if isinstance(value, float) and not math.isfinite(value):
        return 0
    return min(max(0, int(value)), MAX_TOKEN_COUNT)


# The sampling parameters of vLLM's OpenAI-compatible server that a ChatRequest may
# carry to the backend (`ChatRequest.sampling`), checked by the caller.
SAMPLING_PARAMETERS = frozenset(
    {
        "stop",
        "seed",
        "top_p",
        "top_k",
        "min_p",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "logit_bias",
        "response_format",
    }
)


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
    # Sampling parameters (SAMPLING_PARAMETERS: stop, seed, top_p, ...) with values the
    # caller has checked, put in the backend's request as they are; None: none.
    sampling: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.max_tokens is not None and not 1 <= self.max_tokens <= MAX_TOKEN_COUNT:
            raise ValueError(
                f"ChatRequest.max_tokens must be between 1 and {MAX_TOKEN_COUNT}, "
                f"not {self.max_tokens}"
            )
        if self.sampling and not SAMPLING_PARAMETERS.issuperset(self.sampling):
            unknown = sorted(set(self.sampling) - SAMPLING_PARAMETERS)
            raise ValueError(f"ChatRequest.sampling: unknown parameters {unknown}")
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
class ModelInfo:
    """A model the pool serves: its id, its context length (vLLM's `max_model_len`,
    None when not told) and, in the pool's list, when the first backend serving it
    joined the pool (OpenAI's `created`, in Unix seconds; 0 from one backend's list)."""

    id: str
    max_model_len: int | None = None
    created: int = 0


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
