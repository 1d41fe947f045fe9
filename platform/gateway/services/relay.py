"""`/v1/chat/completions`: the call started on the pool, then relayed.

The answer waits for the pool to reach a backend (the first StreamStarted), so that
refusals (a bad key, an unknown model, a limit, a busy pool) are HTTP errors with a
status; a failure after that ends the stream with an error event.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any

from gateway import formats
from gateway.agents import AGENT_MODEL_PREFIX, agent_events, agent_tools
from gateway.errors import ApiError, error_event, from_inference_error
from gateway.services.callers import caller_cached, caller_remembered
from gateway.services.parameters import (
    CompletionParams,
    completion_params_parse,
    invalid,
    max_tokens_check,
    unsupported,
)
from inference import apool
from inference.backends import abackend_rows
from inference.blocking import blocking, single_flight
from inference.models import Backend
from inference.types import (
    ChatRequest,
    InferenceError,
    StreamEvent,
    StreamFinished,
    StreamStarted,
    TextDelta,
)
from tenants.access import Actor
from tenants.quotas import Limits

PURPOSE = "openai.chat.completions"


def model_context(model: str, rows: list[Backend]) -> int | None:
    """The model's context length (the largest of the backends serving it; None when
    one of them does not tell), or 404 for a model no backend serves (before the call
    takes any of its limits); a model that a backend serves, routable or not, is the
    pool's to answer."""
    lengths = [row.max_model_len for row in rows if model in row.served_models]
    if not lengths:
        raise ApiError(
            404,
            f"The model {model!r} does not exist; /v1/models lists the models you can use.",
            param="model",
            code="model_not_found",
        )
    known = [length for length in lengths if length]
    return max(known) if len(known) == len(lengths) else None


async def _caller_and_model(
    *, authorization: str | None, model: str | None
) -> tuple[Actor, Limits, int | None]:
    """The caller, its limits, and the model's context length (`model_context`): on
    the event loop when the caller is remembered and the backend rows are fresh (the
    usual call: no thread, no query), else read on a bookkeeping thread, once for the
    calls that need the same meanwhile."""
    remembered = caller_remembered(authorization=authorization)
    if remembered is None:
        remembered = await single_flight(
            ("caller", authorization),
            lambda: blocking(caller_cached, authorization=authorization),
        )
    if model is None:
        return *remembered, None
    return *remembered, model_context(model, await abackend_rows())


class Completion:
    """A call the pool has started on a backend: relay it as SSE or collect it."""

    def __init__(
        self,
        *,
        params: CompletionParams,
        completion_id: str,
        events: AsyncGenerator[StreamEvent, None],
    ) -> None:
        self.params = params
        self.id = completion_id
        self.created = int(time.time())
        self._events = events

    async def sse(self) -> AsyncIterator[bytes]:
        """The event stream. A failure after the first byte is an error event."""
        writer = formats.ChunkWriter(
            completion_id=self.id,
            created=self.created,
            model=self.params.model,
            include_usage=self.params.include_usage,
        )
        async with aclosing(self._events) as events:
            yield writer.role()
            try:
                async for event in events:
                    if isinstance(event, TextDelta):
                        yield writer.content(event.text)
                    elif isinstance(event, StreamFinished):
                        yield writer.finish(event.finish_reason)
                        if self.params.include_usage:
                            yield writer.usage(event.usage)
            except InferenceError as exc:
                yield error_event(from_inference_error(exc))
            yield formats.DONE

    async def result(self) -> dict[str, Any]:
        """The whole completion as one `chat.completion` object."""
        text: list[str] = []
        finished: StreamFinished | None = None
        async with aclosing(self._events) as events:
            try:
                async for event in events:
                    if isinstance(event, TextDelta):
                        text.append(event.text)
                    elif isinstance(event, StreamFinished):
                        finished = event
            except InferenceError as exc:
                raise from_inference_error(exc) from None
        assert finished is not None  # the pool ends every stream with it or raises
        return formats.completion_object(
            completion_id=self.id,
            created=self.created,
            model=self.params.model,
            text="".join(text),
            finish_reason=finished.finish_reason,
            usage=finished.usage,
        )


async def completion_start(*, authorization: str | None, body: bytes) -> Completion:
    """Authenticate, validate, and start the call on a backend (the pool's opening:
    plan, limits, admission, routing). Raises ApiError: 401/403 for the key, 400 for
    the body, 404 for the model, 429 over a limit, 502-504 when no backend answers."""
    try:
        params: CompletionParams | None = completion_params_parse(body=body)
        bad: ApiError | None = None
    except ApiError as exc:
        params, bad = None, exc
    # The key comes first (a bad key with a bad body is a 401), with the model's check.
    agent = (
        params.model.removeprefix(AGENT_MODEL_PREFIX)
        if params and params.model and params.model.startswith(AGENT_MODEL_PREFIX)
        else None
    )
    actor, limits, context = await _caller_and_model(
        authorization=authorization,
        model=params.model if params and agent is None else None,
    )
    if bad is not None or params is None:
        raise bad or invalid("The request body is invalid.")
    max_tokens_check(params, context)
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    if agent is not None:
        if params.sampling:
            name = next(iter(params.sampling))
            raise unsupported(name, "an agent's model calls take no sampling parameters")
        tools = await blocking(agent_tools, actor=actor, agent=agent)
        return Completion(
            params=params,
            completion_id=completion_id,
            events=agent_events(
                actor=actor,
                tools=tools,
                agent=agent,
                model=params.model,
                messages=params.messages,
                reference=completion_id,
            ),
        )
    assert actor.api_key is not None
    request = ChatRequest(
        messages=params.messages,
        model=params.model,
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        sampling=params.sampling,
        tenant_id=str(actor.tenant_id),
        api_key_id=str(actor.api_key.id),
        purpose=PURPOSE,
        reference=completion_id,
    )
    events = apool.chat_stream(request, limits=limits)
    try:
        first = await anext(events)
    except StopAsyncIteration:  # pragma: no cover - the pool always starts or raises
        raise ApiError(502, "The inference pool returned nothing.", code="backend_error") from None
    except InferenceError as exc:
        await events.aclose()
        raise from_inference_error(exc) from None
    except BaseException:
        await events.aclose()
        raise
    assert isinstance(first, StreamStarted)
    return Completion(params=params, completion_id=completion_id, events=events)
