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
import math
import re
import threading
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from django.utils import timezone

from config.inputs import (
    INVALID_JSON,
    InvalidInput,
    contains_lone_surrogate,
    contains_nul,
    json_loads,
)
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
from inference.blocking import blocking
from inference.selectors import models_available, tenant_limits
from inference.types import (
    MAX_TOKEN_COUNT,
    ChatRequest,
    InferenceError,
    StreamEvent,
    StreamFinished,
    StreamStarted,
    TextDelta,
)
from tenants.access import Actor
from tenants.models import ApiKey
from tenants.quotas import Limits
from tenants.rls import tenant_scope

PURPOSE = "openai.chat.completions"
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_MODEL_CHARS = 200  # the ledger's column
MAX_STOP = 16  # stop strings
MAX_STOP_CHARS = 1000
MAX_LOGIT_BIAS = 300  # tokens, as OpenAI
MAX_TOP_LOGPROBS = 20


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
    try:
        return tenant_limits(actor.tenant_id)
    except InferenceError as exc:
        raise from_inference_error(exc) from None


# --- /v1/models -------------------------------------------------------------------------


def models_list(*, actor: Actor) -> list[dict[str, Any]]:
    """Every model a routable backend serves that the tenant's plan allows, once each,
    then the agents the tenant enabled (`agent_models`)."""
    limits = _tenant_limits(actor)
    found = [
        formats.model_object(
            model_id=model.id, created=model.created, max_model_len=model.max_model_len
        )
        for model in models_available()
        if limits.allows_model(model.id)
    ]
    return [*found, *agent_models(actor=actor)]


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
    max_tokens_param: str = "max_tokens"  # the name it was given as
    temperature: float | None = None
    sampling: dict[str, Any] | None = None  # for ChatRequest.sampling


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


# --- the parameters: each checked for its type and range (400 naming it otherwise) ---


def _integer(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(f"'{name}' must be an integer.", param=name)
    if not lo <= value <= hi:
        raise _invalid(f"'{name}' must be an integer from {lo} to {hi}.", param=name)
    return value


def _number(name: str, value: Any, lo: float, hi: float, *, above: bool = False) -> float:
    """A finite number in [lo, hi], or (lo, hi] when `above`."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (isinstance(value, float) and not math.isfinite(value))
    ):
        raise _invalid(f"'{name}' must be a number.", param=name)
    if not lo <= value <= hi or (above and value == lo):
        least = f"more than {lo:g}" if above else f"at least {lo:g}"
        raise _invalid(f"'{name}' must be {least} and at most {hi:g}.", param=name)
    return float(value)


def _boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _invalid(f"'{name}' must be true or false.", param=name)
    return value


def _unsupported(name: str, why: str) -> ApiError:
    return _invalid(
        f"The parameter '{name}' is not supported by this server: {why}.",
        param=name,
        code="unsupported_parameter",
    )


def _stop(value: Any) -> list[str] | None:
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise _invalid("'stop' must be a string or a list of non-empty strings.", param="stop")
    if len(stops) > MAX_STOP or any(len(s) > MAX_STOP_CHARS for s in stops):
        raise _invalid(
            f"'stop' takes at most {MAX_STOP} strings of at most {MAX_STOP_CHARS} characters.",
            param="stop",
        )
    return stops or None


def _logit_bias(value: Any) -> dict[str, float] | None:
    if not isinstance(value, dict):
        raise _invalid(
            "'logit_bias' must be an object mapping token ids to a bias from -100 to 100.",
            param="logit_bias",
        )
    if len(value) > MAX_LOGIT_BIAS:
        raise _invalid(f"'logit_bias' takes at most {MAX_LOGIT_BIAS} tokens.", param="logit_bias")
    bias = {}
    for token, amount in value.items():
        # (At most 10 digits before int(), which refuses very long digit strings.)
        if not (
            token.isascii()
            and token.isdigit()
            and len(token) <= 10
            and int(token) <= MAX_TOKEN_COUNT
        ):
            raise _invalid(
                f"'logit_bias' keys must be token ids (non-negative integers), not {token!r:.40}.",
                param="logit_bias",
            )
        bias[str(int(token))] = _number("logit_bias", amount, -100, 100)
    return bias or None


_SCHEMA_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _response_format(value: Any) -> dict[str, Any] | None:
    """`text` (the default: nothing to send), `json_object`, or `json_schema` with a
    name and a schema: as OpenAI defines them, and vLLM enforces them."""
    param = "response_format"
    kind = value.get("type") if isinstance(value, dict) else None
    if kind not in ("text", "json_object", "json_schema") or set(value) - {"type", "json_schema"}:
        raise _invalid(
            '\'response_format\' must be {"type": "text"}, {"type": "json_object"} '
            'or {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}.',
            param=param,
        )
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    spec = value.get("json_schema")
    if (
        not isinstance(spec, dict)
        or set(spec) - {"name", "description", "schema", "strict"}
        or not isinstance(spec.get("name"), str)
        or not _SCHEMA_NAME.fullmatch(spec["name"])
        or not isinstance(spec.get("schema"), dict)
        or not isinstance(spec.get("description") or "", str)
        or not isinstance(spec.get("strict", False), bool | None)
    ):
        raise _invalid(
            "'response_format.json_schema' needs a 'name' (letters, digits, _ and -, at most "
            "64) and a 'schema' (a JSON Schema object); 'description' and 'strict' are "
            "optional.",
            param="response_format.json_schema",
        )
    return {"type": "json_schema", "json_schema": spec}


# The sampling parameters sent on to the backend (inference.types.SAMPLING_PARAMETERS),
# vLLM's ranges: the check of each returns what to send (None: nothing).
SAMPLING: dict[str, Callable[[Any], Any]] = {
    "stop": _stop,
    "seed": lambda v: _integer("seed", v, -(2**63), 2**63 - 1),
    "top_p": lambda v: _number("top_p", v, 0, 1, above=True),
    # 0 and -1 both mean no top-k (older vLLM versions refuse 0).
    "top_k": lambda v: _integer("top_k", v, -1, MAX_TOKEN_COUNT) or -1,
    "min_p": lambda v: _number("min_p", v, 0, 1),
    "presence_penalty": lambda v: _number("presence_penalty", v, -2, 2),
    "frequency_penalty": lambda v: _number("frequency_penalty", v, -2, 2),
    "repetition_penalty": lambda v: _number("repetition_penalty", v, 0, 2, above=True),
    "logit_bias": _logit_bias,
    "response_format": _response_format,
}


def _n(value: Any) -> None:
    if _integer("n", value, 1, 128) != 1:
        raise _unsupported("n", "one choice per request (n=1)")


def _logprobs(value: Any) -> None:
    if _boolean("logprobs", value):
        raise _unsupported("logprobs", "token log probabilities are not returned")


def _top_logprobs(value: Any) -> None:
    if _integer("top_logprobs", value, 0, MAX_TOP_LOGPROBS):
        raise _unsupported("top_logprobs", "token log probabilities are not returned")


def _user(value: Any) -> None:
    if not isinstance(value, str):
        raise _invalid("'user' must be a string.", param="user")


def _ignored(value: Any) -> None:
    pass


# Accepted and not sent on: values that change nothing of the answer (no tools are
# served here, so `parallel_tool_calls` has nothing to apply to).
ACCEPTED: dict[str, Callable[[Any], None]] = {
    "n": _n,
    "logprobs": _logprobs,
    "top_logprobs": _top_logprobs,
    "parallel_tool_calls": lambda v: _ignored(_boolean("parallel_tool_calls", v)),
    "user": _user,
    "store": _ignored,
    "metadata": _ignored,
    "service_tier": _ignored,
}
# Read by completion_params_parse itself.
HANDLED = frozenset(
    {
        "model",
        "messages",
        "stream",
        "stream_options",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
    }
)
UNSUPPORTED = frozenset({"tools", "tool_choice", "functions", "function_call"})


def _max_tokens(data: dict[str, Any]) -> tuple[int | None, str]:
    """`max_completion_tokens` (else the older `max_tokens`), and its name."""
    found: tuple[int | None, str] = (None, "max_tokens")
    for name in ("max_tokens", "max_completion_tokens"):
        value = data.get(name)
        if value is not None:
            found = (_integer(name, value, 1, MAX_TOKEN_COUNT), name)
    return found


def _body_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object: not JSON, nested deeper than MAX_JSON_DEPTH or
    holding a NUL in any string is a 400 (config.inputs)."""
    try:
        data = json_loads(body)
    except InvalidInput as exc:
        param = _bad_text_param(body) if exc.code != INVALID_JSON else None
        raise _invalid(exc.message, param=param, code=exc.code) from None
    if not isinstance(data, dict):
        raise _invalid("The request body must be a JSON object.", code=INVALID_JSON)
    return data


def _bad_text_param(body: bytes) -> str | None:
    """The top-level field whose value holds text json_loads refused (a NUL, a lone
    surrogate), to name it in the error; None when it is a field's name."""
    data = json.loads(body)  # parsed before the text was refused: valid, not too deep
    if isinstance(data, dict):
        for name, value in data.items():
            if contains_nul(value) or contains_lone_surrogate(value):
                return None if contains_nul(name) or contains_lone_surrogate(name) else name
    return None


def completion_params_parse(*, body: bytes) -> CompletionParams:
    """The request body, checked: 400 with the offending parameter otherwise."""
    data = _body_object(body)
    sampling: dict[str, Any] = {}
    for name, value in data.items():
        if value is None or name in HANDLED:
            continue
        check = SAMPLING.get(name)
        if check is not None:
            checked = check(value)
            if checked is not None:
                sampling[name] = checked
            continue
        accept = ACCEPTED.get(name)
        if accept is not None:
            accept(value)
            continue
        if name in UNSUPPORTED:
            raise _unsupported(name, "tools and function calling are not served here")
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
    max_tokens, max_tokens_param = _max_tokens(data)
    temperature = data.get("temperature")
    if temperature is not None:
        temperature = _number("temperature", temperature, 0, 2)
    return CompletionParams(
        model=model,
        messages=messages,
        stream=bool(stream),
        include_usage=bool(include_usage),
        max_tokens=max_tokens,
        max_tokens_param=max_tokens_param,
        temperature=temperature,
        sampling=sampling or None,
    )


def _model_check(model: str) -> int | None:
    """The model's context length (the largest of the backends serving it; None when
    one of them does not tell), or 404 for a model no backend serves (before the call
    takes any of its limits); a model that a backend serves, routable or not, is the
    pool's to answer."""
    lengths = [row.max_model_len for row in backend_rows() if model in row.served_models]
    if not lengths:
        raise ApiError(
            404,
            f"The model {model!r} does not exist; /v1/models lists the models you can use.",
            param="model",
            code="model_not_found",
        )
    known = [length for length in lengths if length]
    return max(known) if len(known) == len(lengths) else None


def _caller_and_model(
    *, authorization: str | None, model: str | None
) -> tuple[Actor, Limits, int | None]:
    """The caller, its limits, and the model's context length (`_model_check`)."""
    actor, limits = caller_cached(authorization=authorization)
    context = _model_check(model) if model is not None else None
    return actor, limits, context


def _max_tokens_check(params: CompletionParams, context: int | None) -> None:
    """No more tokens asked for than the model's context holds, as vLLM refuses them
    (its check counts the prompt too; the gateway does not tokenize)."""
    if context is not None and params.max_tokens is not None and params.max_tokens > context:
        raise _invalid(
            f"'{params.max_tokens_param}' is {params.max_tokens}, more than the context "
            f"length of {params.model!r} ({context} tokens).",
            param=params.max_tokens_param,
        )


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
    actor, limits, context = await blocking(
        _caller_and_model,
        authorization=authorization,
        model=params.model if params and agent is None else None,
    )
    if invalid is not None or params is None:
        raise invalid or _invalid("The request body is invalid.")
    _max_tokens_check(params, context)
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    if agent is not None:
        if params.sampling:
            name = next(iter(params.sampling))
            raise _unsupported(name, "an agent's model calls take no sampling parameters")
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
