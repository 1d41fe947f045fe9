"""The one token estimate of the pool, made before a call without a tokenizer.

About four characters a token, plus a few tokens of framing per message (a chat
template wraps each turn in a role header and an end marker: ChatML and Llama 3 spend
four or five); tool calls in the history and the tools' schemas count as their JSON.
The router compares the prompt's estimate with a backend's context length, the limits
reserve the prompt's estimate plus the most the call may generate, and a call that
failed mid-stream is booked with the prompt's estimate.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

CHARS_PER_TOKEN = 4
FRAMING_TOKENS = 4  # per message


def prompt_tokens_estimate(
    messages: Sequence[dict[str, Any]], tools: list[dict[str, Any]] | None = None
) -> int:
    """The prompt's tokens, estimated."""
    chars = sum(
        len(str(m.get("content") or ""))
        + (len(json.dumps(m["tool_calls"])) if m.get("tool_calls") else 0)
        for m in messages
    )
    if tools:
        chars += len(json.dumps(tools))
    return chars // CHARS_PER_TOKEN + FRAMING_TOKENS * len(messages)


def estimate_tokens(
    *,
    messages: Sequence[dict[str, Any]],
    max_tokens: int,
    tools: list[dict[str, Any]] | None = None,
) -> int:
    """A call's reservation: its prompt, estimated, and the most it may generate."""
    return prompt_tokens_estimate(messages, tools) + max_tokens
