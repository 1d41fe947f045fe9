"""A synthetic OpenAI/vLLM-compatible token server for tests.

A small Starlette app served by uvicorn in a background thread on a free port. It
answers like a one-GPU vLLM server (`/health`, `/v1/models` with `max_model_len`,
streaming `/v1/chat/completions` with a final usage chunk when
`stream_options.include_usage` is set) and emits exactly the tokens it is told to,
optionally failing in a chosen way:

- "none":          stream every token, a finish_reason, the usage chunk, [DONE]
- "http500":       answer 500 (with an OpenAI error object) before streaming anything
- "drop_after_n":  stream `drop_after` tokens, then end the response cleanly with no
                   finish_reason, no usage and no [DONE] (a backend that went away)
- "reset_after_n": stream `drop_after` tokens, then break the connection mid-body
- "no_usage":      a normal stream, but never a usage chunk

    with SyntheticServer(tokens=5) as server:
        ... server.url ... server.request_count ... server.bodies ...

A model that calls tools is scripted with `replies`: request n gets `replies[n]`, a
`Reply` of text pieces and/or `ToolCall`s, streamed as vLLM streams them (each call's
first fragment with its id and function name, then its JSON arguments in pieces of
`Reply.argument_chars`, finish_reason "tool_calls"); a request past the script's end
is answered 500.

    SyntheticServer(replies=[
        Reply(tool_calls=[ToolCall("calculate", {"expression": "6*7"})]),
        Reply(pieces=["It is ", "42."]),
    ])

or, from a test, the `synthetic_server` fixture: a factory that starts servers and
stops them all when the test ends.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from inference.local_process import free_port

FAIL_MODES = ("none", "http500", "drop_after_n", "reset_after_n", "no_usage")
DEFAULT_MODEL = "synthetic-model"


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any] | str  # a dict is sent as its JSON; a string as it is
    id: str = field(default_factory=lambda: f"chatcmpl-tool-{uuid.uuid4().hex[:16]}")

    @property
    def arguments_json(self) -> str:
        return self.arguments if isinstance(self.arguments, str) else json.dumps(self.arguments)


@dataclass(frozen=True)
class Reply:
    """One scripted answer: text pieces first, then tool calls."""

    pieces: Sequence[str] = ()
    tool_calls: Sequence[ToolCall] = ()
    argument_chars: int = 5  # the size of each streamed arguments fragment


class SyntheticDrop(RuntimeError):
    """Raised inside a streaming body to make uvicorn break the connection."""


class SyntheticServer:
    def __init__(
        self,
        *,
        tokens: int = 5,
        pieces: list[str] | None = None,
        delay_s: float = 0.0,
        fail: str = "none",
        drop_after: int = 2,
        model: str = DEFAULT_MODEL,
        max_model_len: int = 4096,
        prompt_tokens: int = 7,
        replies: Sequence[Reply] | None = None,
    ) -> None:
        if fail not in FAIL_MODES:
            raise ValueError(f"fail must be one of {FAIL_MODES}, not {fail!r}")
        if replies is not None and (pieces is not None or tokens != 5):
            raise ValueError("give either replies or tokens/pieces, not both")
        self.replies = list(replies) if replies is not None else None
        self.pieces = list(pieces) if pieces is not None else [f"tok{i} " for i in range(tokens)]
        self.delay_s = delay_s
        self.fail = fail
        self.drop_after = drop_after
        self.model = model
        self.max_model_len = max_model_len
        self.prompt_tokens = prompt_tokens
        self.port = 0
        self._lock = threading.Lock()
        self._bodies: list[dict[str, Any]] = []
        self._hits: Counter[str] = Counter()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    # --- what the tests look at --------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def request_count(self) -> int:
        """How many chat completion requests arrived (whatever became of them)."""
        with self._lock:
            return self._hits["/v1/chat/completions"]

    @property
    def bodies(self) -> list[dict[str, Any]]:
        """The JSON bodies of the chat completion requests, in order."""
        with self._lock:
            return list(self._bodies)

    def hits(self, path: str) -> int:
        with self._lock:
            return self._hits[path]

    # --- lifecycle -------------------------------------------------------------------

    def start(self, timeout_s: float = 10.0) -> SyntheticServer:
        if self._server is not None:
            return self
        self.port = free_port()
        config = uvicorn.Config(
            self.app(),
            host="127.0.0.1",
            port=self.port,
            lifespan="off",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=2,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, name=f"synthetic-{self.port}", daemon=True)
        self._server, self._thread = server, thread
        thread.start()
        deadline = time.monotonic() + timeout_s
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the synthetic server on port {self.port} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None or thread is None:
            return
        server.should_exit = True
        thread.join(timeout=10)
        if thread.is_alive():
            raise RuntimeError(f"the synthetic server on port {self.port} did not stop")

    def __enter__(self) -> SyntheticServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the app -------------------------------------------------------------------

    def _hit(self, path: str, body: dict[str, Any] | None = None) -> int:
        """Count the request (and keep its body); its number among those with a body."""
        with self._lock:
            self._hits[path] += 1
            if body is not None:
                self._bodies.append(body)
            return len(self._bodies) - 1

    @staticmethod
    def _error(message: str, status: int, kind: str) -> JSONResponse:
        return JSONResponse(
            {
                "error": {"message": message, "type": kind, "param": None, "code": status},
                "object": "error",
                "message": message,
                "type": kind,
                "code": status,
            },
            status_code=status,
        )

    def app(self) -> Starlette:
        async def health(request: Request) -> Response:
            self._hit("/health")
            return Response(status_code=200)

        async def models(request: Request) -> Response:
            self._hit("/v1/models")
            return JSONResponse(
                {
                    "object": "list",
                    "data": [
                        {
                            "id": self.model,
                            "object": "model",
                            "created": int(time.time()),
                            "owned_by": "synthetic",
                            "root": self.model,
                            "parent": None,
                            "max_model_len": self.max_model_len,
                        }
                    ],
                }
            )

        async def chat_completions(request: Request) -> Response:
            try:
                body = await request.json()
            except ValueError:
                self._hit("/v1/chat/completions")
                return self._error("the request body is not valid JSON", 400, "BadRequestError")
            number = self._hit("/v1/chat/completions", body)
            if body.get("model") not in (None, "", self.model):
                return self._error(
                    f"The model `{body.get('model')}` does not exist.", 404, "NotFoundError"
                )
            if self.fail == "http500":
                return self._error("synthetic failure", 500, "InternalServerError")

            if self.replies is None:
                reply = Reply(pieces=self.pieces)
            else:
                if number >= len(self.replies):
                    return self._error(
                        f"the script has {len(self.replies)} replies; this is request {number + 1}",
                        500,
                        "InternalServerError",
                    )
                reply = self.replies[number]
            max_tokens = body.get("max_tokens")
            all_pieces = list(reply.pieces)
            pieces = all_pieces if max_tokens is None else all_pieces[:max_tokens]
            calls = list(reply.tool_calls)
            fragments = [
                [
                    c.arguments_json[i : i + reply.argument_chars]
                    for i in range(0, len(c.arguments_json), reply.argument_chars)
                ]
                for c in calls
            ]
            if calls:
                finish = "tool_calls"
            else:
                finish = "length" if len(pieces) < len(all_pieces) else "stop"
            completion_tokens = len(pieces) + sum(1 + len(f) for f in fragments)
            usage = {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens,
            }
            completion_id = f"chatcmpl-{uuid.uuid4().hex}"
            created = int(time.time())

            if not body.get("stream"):
                await asyncio.sleep(self.delay_s * len(pieces))
                return JSONResponse(
                    {
                        "id": completion_id,
                        "object": "chat.completion",
                        "created": created,
                        "model": self.model,
                        "choices": [
                            {
                                "index": 0,
                                "message": {
                                    "role": "assistant",
                                    "content": "".join(pieces),
                                    **(
                                        {
                                            "tool_calls": [
                                                {
                                                    "id": c.id,
                                                    "type": "function",
                                                    "function": {
                                                        "name": c.name,
                                                        "arguments": c.arguments_json,
                                                    },
                                                }
                                                for c in calls
                                            ]
                                        }
                                        if calls
                                        else {}
                                    ),
                                },
                                "logprobs": None,
                                "finish_reason": finish,
                            }
                        ],
                        "usage": usage,
                    }
                )

            options = body.get("stream_options") or {}
            include_usage = bool(options.get("include_usage")) and self.fail != "no_usage"

            def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
                payload = {
                    "id": completion_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": self.model,
                    "choices": choices,
                    **extra,
                }
                return f"data: {json.dumps(payload)}\n\n"

            def choice(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
                return {
                    "index": 0,
                    "delta": delta,
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }

            async def events() -> AsyncIterator[str]:
                yield chunk([choice({"role": "assistant", "content": ""})])
                for index, piece in enumerate(pieces):
                    if self.fail in ("drop_after_n", "reset_after_n") and index >= self.drop_after:
                        if self.fail == "reset_after_n":
                            raise SyntheticDrop("synthetic connection reset")
                        return
                    if self.delay_s:
                        await asyncio.sleep(self.delay_s)
                    yield chunk([choice({"content": piece})])
                if self.fail in ("drop_after_n", "reset_after_n"):
                    # Fewer tokens than drop_after: still never finish properly.
                    if self.fail == "reset_after_n":
                        raise SyntheticDrop("synthetic connection reset")
                    return
                for index, (call, parts) in enumerate(zip(calls, fragments, strict=True)):
                    head = {
                        "index": index,
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": ""},
                    }
                    yield chunk([choice({"tool_calls": [head]})])
                    for part in parts:
                        if self.delay_s:
                            await asyncio.sleep(self.delay_s)
                        fragment = {"index": index, "function": {"arguments": part}}
                        yield chunk([choice({"tool_calls": [fragment]})])
                yield chunk([choice({}, finish)])
                if include_usage:
                    yield chunk([], usage=usage)
                yield "data: [DONE]\n\n"

            return StreamingResponse(
                events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )

        return Starlette(
            routes=[
                Route("/health", health, methods=["GET"]),
                Route("/v1/models", models, methods=["GET"]),
                Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            ]
        )


@pytest.fixture
def synthetic_server() -> Iterator[Callable[..., SyntheticServer]]:
    """A factory: `synthetic_server(tokens=5, fail="http500")` starts a server; every
    server it started is stopped when the test ends."""
    started: list[SyntheticServer] = []

    def start(**options: Any) -> SyntheticServer:
        server = SyntheticServer(**options).start()
        started.append(server)
        return server

    yield start
    for server in reversed(started):
        server.stop()


def refused_url() -> str:
    """A URL where nothing listens: connections to it are refused."""
    return f"http://127.0.0.1:{free_port()}"
