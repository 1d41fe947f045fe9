"""What the OpenAI-compatible API sends: `chat.completion` objects and the SSE stream
of `chat.completion.chunk` objects, byte for byte as OpenAI's API sends them.

A stream is: a first chunk with the assistant role and empty content; a chunk per
token delta; a chunk with an empty delta and the finish reason; when
`stream_options.include_usage` is set, a last chunk with no choices and the usage
(every chunk before it then carries `"usage": null`); then `data: [DONE]`.
"""

from __future__ import annotations

import json
from typing import Any

from inference.types import Usage

DONE = b"data: [DONE]\n\n"


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class ChunkWriter:
    """Encodes the chunks of one completion. The parts shared by every chunk are
    encoded once: a token costs one `json.dumps` of its text."""

    def __init__(self, *, completion_id: str, created: int, model: str, include_usage: bool):
        head = _json(
            {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
            }
        )[:-1]
        usage_null = ',"usage":null' if include_usage else ""
        self._head = "data: " + head
        self._choice = self._head + ',"choices":[{"index":0,"delta":'
        self._open_tail = ',"logprobs":null,"finish_reason":null}]' + usage_null + "}\n\n"
        self._usage_null = usage_null

    def role(self) -> bytes:
        return (self._choice + '{"role":"assistant","content":""}' + self._open_tail).encode()

    def content(self, text: str) -> bytes:
        return (self._choice + '{"content":' + _json(text) + "}" + self._open_tail).encode()

    def finish(self, reason: str) -> bytes:
        tail = ',"logprobs":null,"finish_reason":' + _json(reason) + "}]" + self._usage_null
        return (self._choice + "{}" + tail + "}\n\n").encode()

    def usage(self, usage: Usage) -> bytes:
        return (self._head + ',"choices":[],"usage":' + _json(usage.as_dict()) + "}\n\n").encode()


def completion_object(
    *, completion_id: str, created: int, model: str, text: str, finish_reason: str, usage: Usage
) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage.as_dict(),
    }


def model_object(*, model_id: str, created: int, max_model_len: int | None) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": "parley",
    }
    if max_model_len:
        entry["max_model_len"] = max_model_len  # as vLLM adds it
    return entry
