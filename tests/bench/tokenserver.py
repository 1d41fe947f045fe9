"""A synthetic OpenAI-compatible token server for benchmarks: a fixed number of tokens
per completion at a fixed rate per stream, for hundreds of streams at once.

tests/synthetic.py's server is made for tests (failure modes, recorded bodies,
Starlette, `sleep(delay)` per token, so a busy loop slows every stream down). This one
is made to be cheap and steady: a bare ASGI app under uvicorn (uvloop, httptools),
token chunks encoded once at start, and each stream paced against its own schedule
(token i is due at start + i / rate; a late loop catches up instead of drifting), as
a GPU server produces tokens whether or not its clients keep up.

It speaks what Parley uses of vLLM: `/health`, `/v1/models` (with `max_model_len`),
streaming `/v1/chat/completions` with the usage chunk under
`stream_options.include_usage`, and the non-streaming form.

    python tests/bench/tokenserver.py --port 8100 --tokens 200 --rate 25
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

MODEL = "bench-model"
PROMPT_TOKENS = 12
# Short words, about one token each, as a model streams them.
WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "with",
    "was",
    "on",
    "be",
    "by",
    "this",
    "are",
    "or",
    "an",
    "at",
    "from",
    "but",
    "not",
    "have",
    "which",
    "one",
    "all",
    "were",
    "can",
    "there",
    "been",
    "if",
    "more",
    "when",
    "will",
    "would",
    "who",
    "so",
    "no",
    "code",
    "data",
]


class TokenServer:
    def __init__(self, *, tokens: int, rate: float, model: str = MODEL) -> None:
        if tokens < 1 or rate <= 0:
            raise ValueError("tokens must be at least 1 and rate positive")
        self.tokens = tokens
        self.rate = rate
        self.model = model
        head = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0}
        prefix = json.dumps({**head, "model": model})[:-1]

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            body = prefix + ', "choices": ' + json.dumps(choices)
            for key, value in extra.items():
                body += f', "{key}": {json.dumps(value)}'
            return f"data: {body}}}\n\n".encode()

        def choice(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

        self.text = [f" {WORDS[i % len(WORDS)]}" for i in range(tokens)]
        self.role_chunk = chunk([choice({"role": "assistant", "content": ""})])
        self.token_chunks = [chunk([choice({"content": t})]) for t in self.text]
        self.finish_chunk = chunk([choice({}, "stop")])
        usage = {
            "prompt_tokens": PROMPT_TOKENS,
            "completion_tokens": tokens,
            "total_tokens": PROMPT_TOKENS + tokens,
        }
        self.usage_chunk = chunk([], usage=usage)
        self.usage = usage

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if path == "/health":
            await _respond(send, 200, b"")
        elif path == "/v1/models":
            data = [{"id": self.model, "object": "model", "max_model_len": 32768}]
            await _respond(send, 200, json.dumps({"object": "list", "data": data}).encode())
        elif path == "/v1/chat/completions" and method == "POST":
            body = b""
            while True:
                message = await receive()
                body += message.get("body", b"")
                if not message.get("more_body"):
                    break
            request = json.loads(body)
            if request.get("stream"):
                options = request.get("stream_options") or {}
                await self._stream(send, bool(options.get("include_usage")))
            else:
                await self._complete(send)
        else:
            await _respond(send, 404, b'{"error": {"message": "not found"}}')

    async def _stream(self, send: Any, include_usage: bool) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        loop = asyncio.get_running_loop()
        await send({"type": "http.response.body", "body": self.role_chunk, "more_body": True})
        start, interval = loop.time(), 1.0 / self.rate
        for i, token in enumerate(self.token_chunks, start=1):
            delay = start + i * interval - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await send({"type": "http.response.body", "body": token, "more_body": True})
        tail = self.finish_chunk + (self.usage_chunk if include_usage else b"")
        await send({"type": "http.response.body", "body": tail + b"data: [DONE]\n\n"})

    async def _complete(self, send: Any) -> None:
        await asyncio.sleep(self.tokens / self.rate)
        answer = {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(self.text)},
                    "finish_reason": "stop",
                }
            ],
            "usage": self.usage,
        }
        await _respond(send, 200, json.dumps(answer).encode())


async def _respond(send: Any, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens", type=int, default=200, help="tokens per completion")
    parser.add_argument("--rate", type=float, default=25.0, help="tokens per second per stream")
    args = parser.parse_args()
    app = TokenServer(tokens=args.tokens, rate=args.rate)
    uvicorn.run(
        app, host="127.0.0.1", port=args.port, lifespan="off", log_level="warning", backlog=4096
    )


if __name__ == "__main__":
    main()
