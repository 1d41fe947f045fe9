"""The OpenAI-compatible API: who calls, what they ask, and the completion itself.

A call is authenticated by a tenant's API key (`Authorization: Bearer prk_...`, with
the `chat` scope), validated, and streamed from the inference pool through
`inference.apool.chat_stream`: the same limits (tenant, API key), fair admission,
routing, failover and usage ledger as every other LLM call of the platform. The key
is the caller: its own limits (PARLEY_KEY_*) and the tenant's plan apply, and the
ledger records the key.

The answer waits for the pool to reach a backend (the first StreamStarted), so that
refusals (a bad key, an unknown model, a limit, a busy pool) are HTTP errors with a
status; a failure after that ends the stream with an error event.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from django.utils import timezone

from gateway import formats
from gateway.agents import agent_events, agent_tools
from gateway.errors import (
    AUTHENTICATION,
    PERMISSION,
    ApiError,
    error_event,
    from_inference_error,
)
from inference import apool
from inference.backends import backend_rows
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
from tenants.models import ApiKey, Tenant
from tenants.quotas import Limits, limits_for
from tenants.rls import tenant_scope

PURPOSE = "openai.chat.completions"
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# Accepted with any value and not forwarded: they change nothing of the answer.
IGNORED = {"user", "store", "metadata", "service_tier"}
# Accepted only with the value that changes nothing (the pool forwards no other).
NEUTRAL = {
    "n": 1,
    "top_p": 1,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logprobs": False,
    "parallel_tool_calls": True,
}
HANDLED = {
    "model",
    "messages",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
}
MAX_MODEL_CHARS = 200  # the ledger's column


# --- the caller -------------------------------------------------------------------


def caller_authenticate(*, authorization: str | None) -> Actor:
    """The actor of an `Authorization: Bearer <key>` header: 401 without a valid key,
    403 for a key without the `chat` scope."""
    from tenants.services.api_keys import ApiKeyRefused, api_key_authenticate

    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(
            401,
            "No API key: send your Parley API key as 'Authorization: Bearer prk_...'.",
            type=AUTHENTICATION,
            code="missing_api_key",
        )
    try:
        actor = api_key_authenticate(token.strip())
    except ApiKeyRefused as exc:
        raise ApiError(401, exc.message, type=AUTHENTICATION, code="invalid_api_key") from None
    if not actor.has_scope(ApiKey.Scope.CHAT):
        raise ApiError(
            403,
            "This API key lacks the 'chat' scope.",
            type=PERMISSION,
            code="insufficient_scope",
        )
    return actor


# A caller (the key's actor and its tenant's limits) is remembered for a few seconds,
# by the SHA-256 of the presented key (never the key itself): a busy integrator's calls
# then skip the key's and the plan's lookups. A key, tenant, plan or membership saved
# or deleted in this process (a revocation, a suspension, a plan change, a key's
# creator demoted or removed) is forgotten at once (`auth_cache_clear`, on their
# post_save and post_delete: gateway.apps); elsewhere (another process, a bulk update)
# within AUTH_CACHE_S. Refusals are never remembered: a new key works at once.
AUTH_CACHE_S = 5.0
AUTH_CACHE_MAX = 10_000
_auth_cache: dict[bytes, tuple[float, Actor, Limits]] = {}
_auth_lock = threading.Lock()


def _forget_keys() -> None:
    with _auth_lock:
        _auth_cache.clear()


def auth_cache_clear(**_: Any) -> None:
    """Forget every remembered key, now and when the transaction that changed a key or
    a tenant commits (a post_save receiver): a call in between cannot keep the old
    state remembered."""
    from django.db import transaction

    _forget_keys()
    transaction.on_commit(_forget_keys)


def caller_cached(*, authorization: str | None) -> tuple[Actor, Limits]:
    """`caller_authenticate` and the tenant's limits, remembered for AUTH_CACHE_S."""
    digest = hashlib.sha256((authorization or "").encode()).digest()
    now = time.monotonic()
    hit = _auth_cache.get(digest)
    if hit is not None and hit[0] > now:
        return hit[1], hit[2]
    actor = caller_authenticate(authorization=authorization)
    limits = _tenant_limits(actor)
    until = now + AUTH_CACHE_S
    expires_at = actor.api_key.expires_at if actor.api_key is not None else None
    if expires_at is not None:  # never remembered past the key's expiry
        until = min(until, now + (expires_at - timezone.now()).total_seconds())
    with _auth_lock:
        if len(_auth_cache) >= AUTH_CACHE_MAX:
            for stale in [d for d, entry in _auth_cache.items() if entry[0] <= now]:
                del _auth_cache[stale]
            if len(_auth_cache) >= AUTH_CACHE_MAX:
                _auth_cache.clear()
        _auth_cache[digest] = (until, actor, limits)
    return actor, limits


def _tenant_limits(actor: Actor) -> Limits:
    with tenant_scope(tenant_id=actor.tenant_id):
        tenant = Tenant.objects.select_related("plan").get(id=actor.tenant_id)
    return limits_for(tenant)


# --- /v1/models -------------------------------------------------------------------------


def models_list(*, actor: Actor) -> list[dict[str, Any]]:
    """Every model a routable backend serves that the tenant's plan allows, once each,
    then the agents the tenant enabled (`agent_models`)."""
    limits = _tenant_limits(actor)
    found: dict[str, dict[str, Any]] = {}
    for row in backend_rows():
        if row.state not in (Backend.State.HEALTHY, Backend.State.DEGRADED):
            continue
        for model in row.served_models:
            if model not in found and limits.allows_model(model):
                found[model] = formats.model_object(
                    model_id=model,
                    created=int(row.created_at.timestamp()),
                    max_model_len=row.max_model_len,
                )
    return [*found.values(), *agent_models(actor=actor)]


AGENT_MODEL_PREFIX = "agent:"


def agent_models(*, actor: Actor) -> list[dict[str, Any]]:
    """The agents of the plugins the caller's tenant enabled, as model objects
    `agent:<plugin>.<agent>` owned by their plugin."""
    from agents.selectors import agents_available

    with tenant_scope(tenant_id=actor.tenant_id):
        available = agents_available(actor=actor)
    return [
        {"id": f"{AGENT_MODEL_PREFIX}{agent.id}", "object": "model", "owned_by": agent.plugin.name}
        for agent in available
    ]


def models_answer(*, authorization: str | None) -> dict[str, Any]:
    actor = caller_authenticate(authorization=authorization)
    return {"object": "list", "data": models_list(actor=actor)}


# --- /v1/chat/completions: the request ----------------------------------------------------


@dataclass(frozen=True)
class CompletionParams:
    model: str
    messages: list[dict[str, Any]]
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    temperature: float | None = None


def _invalid(message: str, *, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _content(value: Any, index: int) -> str:
    """A message's content: a string, or text parts (joined with newlines, as vLLM
    does); other parts (images, audio) are not served here."""
    param = f"messages[{index}].content"
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise _invalid(
                    f"Only text content parts are supported, not {kind!r}.",
                    param=param,
                    code="unsupported_content",
                )
            if not isinstance(part.get("text"), str):
                raise _invalid("A text part needs a string 'text'.", param=param)
            texts.append(part["text"])
        return "\n".join(texts)
    raise _invalid("A message's content must be a string or a list of text parts.", param=param)


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise _invalid("'messages' must be a non-empty list.", param="messages")
    messages = []
    for index, message in enumerate(value):
        if not isinstance(message, dict):
            raise _invalid("Each message must be an object.", param=f"messages[{index}]")
        role = message.get("role")
        if role not in ROLES:
            raise _invalid(
                f"Unsupported role {role!r}: one of {', '.join(ROLES)}.",
                param=f"messages[{index}].role",
            )
        if message.get("tool_calls") or message.get("function_call"):
            raise _invalid(
                "Tool calls are not supported.",
                param=f"messages[{index}]",
                code="unsupported_parameter",
            )
        out: dict[str, Any] = {
            "role": ROLES[role],
            "content": _content(message.get("content"), index),
        }
        if isinstance(message.get("name"), str):
            out["name"] = message["name"]
        messages.append(out)
    return messages


def _int_at_least_1(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _invalid(f"'{name}' must be an integer of at least 1.", param=name)
    return value


def completion_params_parse(*, body: bytes) -> CompletionParams:
    """The request body, checked: 400 with the offending parameter otherwise."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise _invalid("The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise _invalid("The request body must be a JSON object.", code="invalid_json")
    for name, value in data.items():
        if name in HANDLED or name in IGNORED or value is None:
            continue
        if name in NEUTRAL and value == NEUTRAL[name] and type(value) is type(NEUTRAL[name]):
            continue
        if name in NEUTRAL or name in ("stop", "seed", "tools", "tool_choice", "functions"):
            raise _invalid(
                f"The parameter '{name}' is not supported by this server"
                + (f" (only {NEUTRAL[name]!r})." if name in NEUTRAL else "."),
                param=name,
                code="unsupported_parameter",
            )
        raise _invalid(
            f"Unrecognized request argument supplied: {name}",
            param=name,
            code="unknown_parameter",
        )
    model = data.get("model")
    if not isinstance(model, str) or not model.strip():
        raise _invalid(
            "'model' is required: a model id from /v1/models.",
            param="model",
            code="missing_parameter" if model is None else "invalid_value",
        )
    if len(model) > MAX_MODEL_CHARS:
        raise _invalid(f"'model' is longer than {MAX_MODEL_CHARS} characters.", param="model")
    if "messages" not in data:
        raise _invalid("'messages' is required.", param="messages", code="missing_parameter")
    messages = _messages(data["messages"])
    stream = data.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _invalid("'stream' must be a boolean.", param="stream")
    options = data.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise _invalid(
                "'stream_options' is only allowed when 'stream' is true.",
                param="stream_options",
            )
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise _invalid(
                "'stream_options' takes one field, 'include_usage'.", param="stream_options"
            )
        requested = options.get("include_usage")
        if requested is not None and not isinstance(requested, bool):
            raise _invalid("'include_usage' must be a boolean.", param="stream_options")
        include_usage = bool(requested)
    max_tokens = _int_at_least_1(data, "max_completion_tokens") or _int_at_least_1(
        data, "max_tokens"
    )
    temperature = data.get("temperature")
    if temperature is not None:
        if isinstance(temperature, bool) or not isinstance(temperature, int | float):
            raise _invalid("'temperature' must be a number.", param="temperature")
        if not 0 <= temperature <= 2:
            raise _invalid("'temperature' must be between 0 and 2.", param="temperature")
        temperature = float(temperature)
    return CompletionParams(
        model=model,
        messages=messages,
        stream=bool(stream),
        include_usage=bool(include_usage),
        max_tokens=max_tokens,
        temperature=temperature,
    )


def _model_check(model: str) -> None:
    """404 for a model no backend serves (before the call takes any of its limits);
    a model that a backend serves, routable or not, is the pool's to answer."""
    if not any(model in row.served_models for row in backend_rows()):
        raise ApiError(
            404,
            f"The model {model!r} does not exist; /v1/models lists the models you can use.",
            param="model",
            code="model_not_found",
        )


def _caller_and_model(*, authorization: str | None, model: str | None) -> tuple[Actor, Limits]:
    caller = caller_cached(authorization=authorization)
    if model is not None:
        _model_check(model)
    return caller


# --- /v1/chat/completions: the answer -----------------------------------------------------


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
        invalid: ApiError | None = None
    except ApiError as exc:
        params, invalid = None, exc
    # The key comes first (a bad key with a bad body is a 401), in one blocking step
    # with the model's check.
    agent = (
        params.model.removeprefix(AGENT_MODEL_PREFIX)
        if params and params.model and params.model.startswith(AGENT_MODEL_PREFIX)
        else None
    )
    actor, limits = await apool.blocking(
        _caller_and_model,
        authorization=authorization,
        model=params.model if params and agent is None else None,
    )
    if invalid is not None or params is None:
        raise invalid or _invalid("The request body is invalid.")
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    if agent is not None:
        tools = await apool.blocking(agent_tools, actor=actor, agent=agent)
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
