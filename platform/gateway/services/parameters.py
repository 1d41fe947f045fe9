"""The parameters of `/v1/chat/completions`: the request body, checked (a 400 naming the
offending parameter otherwise), as CompletionParams.

Each parameter is checked for its type and range where it is read; the sampling
parameters vLLM takes (inference.types.SAMPLING_PARAMETERS) are checked against
vLLM's ranges and sent on; some of OpenAI's are accepted and change nothing; tools and
function calling are refused.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from config.inputs import (
    INVALID_JSON,
    InvalidInput,
    contains_lone_surrogate,
    contains_nul,
    json_loads,
)
from gateway.errors import ApiError
from inference.types import MAX_TOKEN_COUNT

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_MODEL_CHARS = 200  # the ledger's column
MAX_STOP = 16  # stop strings
MAX_STOP_CHARS = 1000
MAX_LOGIT_BIAS = 300  # tokens, as OpenAI
MAX_TOP_LOGPROBS = 20


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


def invalid(message: str, *, param: str | None = None, code: str = "invalid_value") -> ApiError:
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
                raise invalid(
                    f"Only text content parts are supported, not {kind!r}.",
                    param=param,
                    code="unsupported_content",
                )
            if not isinstance(part.get("text"), str):
                raise invalid("A text part needs a string 'text'.", param=param)
            texts.append(part["text"])
        return "\n".join(texts)
    raise invalid("A message's content must be a string or a list of text parts.", param=param)


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise invalid("'messages' must be a non-empty list.", param="messages")
    messages = []
    for index, message in enumerate(value):
        if not isinstance(message, dict):
            raise invalid("Each message must be an object.", param=f"messages[{index}]")
        role = message.get("role")
        if role not in ROLES:
            raise invalid(
                f"Unsupported role {role!r}: one of {', '.join(ROLES)}.",
                param=f"messages[{index}].role",
            )
        if message.get("tool_calls") or message.get("function_call"):
            raise invalid(
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
        raise invalid(f"'{name}' must be an integer.", param=name)
    if not lo <= value <= hi:
        raise invalid(f"'{name}' must be an integer from {lo} to {hi}.", param=name)
    return value


def _number(name: str, value: Any, lo: float, hi: float, *, above: bool = False) -> float:
    """A finite number in [lo, hi], or (lo, hi] when `above`."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (isinstance(value, float) and not math.isfinite(value))
    ):
        raise invalid(f"'{name}' must be a number.", param=name)
    if not lo <= value <= hi or (above and value == lo):
        least = f"more than {lo:g}" if above else f"at least {lo:g}"
        raise invalid(f"'{name}' must be {least} and at most {hi:g}.", param=name)
    return float(value)


def _boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise invalid(f"'{name}' must be true or false.", param=name)
    return value


def unsupported(name: str, why: str) -> ApiError:
    return invalid(
        f"The parameter '{name}' is not supported by this server: {why}.",
        param=name,
        code="unsupported_parameter",
    )


def _stop(value: Any) -> list[str] | None:
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise invalid("'stop' must be a string or a list of non-empty strings.", param="stop")
    if len(stops) > MAX_STOP or any(len(s) > MAX_STOP_CHARS for s in stops):
        raise invalid(
            f"'stop' takes at most {MAX_STOP} strings of at most {MAX_STOP_CHARS} characters.",
            param="stop",
        )
    return stops or None


def _logit_bias(value: Any) -> dict[str, float] | None:
    if not isinstance(value, dict):
        raise invalid(
            "'logit_bias' must be an object mapping token ids to a bias from -100 to 100.",
            param="logit_bias",
        )
    if len(value) > MAX_LOGIT_BIAS:
        raise invalid(f"'logit_bias' takes at most {MAX_LOGIT_BIAS} tokens.", param="logit_bias")
    bias = {}
    for token, amount in value.items():
        # (At most 10 digits before int(), which refuses very long digit strings.)
        if not (
            token.isascii()
            and token.isdigit()
            and len(token) <= 10
            and int(token) <= MAX_TOKEN_COUNT
        ):
            raise invalid(
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
        raise invalid(
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
        raise invalid(
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
        raise unsupported("n", "one choice per request (n=1)")


def _logprobs(value: Any) -> None:
    if _boolean("logprobs", value):
        raise unsupported("logprobs", "token log probabilities are not returned")


def _top_logprobs(value: Any) -> None:
    if _integer("top_logprobs", value, 0, MAX_TOP_LOGPROBS):
        raise unsupported("top_logprobs", "token log probabilities are not returned")


def _user(value: Any) -> None:
    if not isinstance(value, str):
        raise invalid("'user' must be a string.", param="user")


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
        raise invalid(exc.message, param=param, code=exc.code) from None
    if not isinstance(data, dict):
        raise invalid("The request body must be a JSON object.", code=INVALID_JSON)
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
            raise unsupported(name, "tools and function calling are not served here")
        raise invalid(
            f"Unrecognized request argument supplied: {name}",
            param=name,
            code="unknown_parameter",
        )
    model = data.get("model")
    if not isinstance(model, str) or not model.strip():
        raise invalid(
            "'model' is required: a model id from /v1/models.",
            param="model",
            code="missing_parameter" if model is None else "invalid_value",
        )
    if len(model) > MAX_MODEL_CHARS:
        raise invalid(f"'model' is longer than {MAX_MODEL_CHARS} characters.", param="model")
    if "messages" not in data:
        raise invalid("'messages' is required.", param="messages", code="missing_parameter")
    messages = _messages(data["messages"])
    stream = data.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise invalid("'stream' must be a boolean.", param="stream")
    options = data.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise invalid(
                "'stream_options' is only allowed when 'stream' is true.",
                param="stream_options",
            )
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise invalid(
                "'stream_options' takes one field, 'include_usage'.", param="stream_options"
            )
        requested = options.get("include_usage")
        if requested is not None and not isinstance(requested, bool):
            raise invalid("'include_usage' must be a boolean.", param="stream_options")
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


def max_tokens_check(params: CompletionParams, context: int | None) -> None:
    """No more tokens asked for than the model's context holds, as vLLM refuses them
    (its check counts the prompt too; the gateway does not tokenize)."""
    if context is not None and params.max_tokens is not None and params.max_tokens > context:
        raise invalid(
            f"'{params.max_tokens_param}' is {params.max_tokens}, more than the context "
            f"length of {params.model!r} ({context} tokens).",
            param=params.max_tokens_param,
        )
