"""What the pool takes and gives: requests, stream events, usage, errors.

The pool knows models, messages and tenants, never conversations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ChatRequest:
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
class StreamFinished:
    finish_reason: str
    usage: Usage = field(default_factory=Usage)


StreamEvent = StreamStarted | TextDelta | StreamFinished


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
