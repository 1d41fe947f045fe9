"""The parameters of `/v1/chat/completions`: the request body, checked by its schema in
docs/openai.yaml (a 400 naming the offending parameter otherwise), as CompletionParams.

The schema gives each parameter's type and range and the sentence of each refusal
(config.schemas); the sampling parameters vLLM takes (inference.types.SAMPLING_PARAMETERS)
are checked against vLLM's ranges and sent on; some of OpenAI's are accepted and change
nothing; tools and function calling are refused.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from config.inputs import (
    INVALID_JSON,
    InvalidInput,
    contains_lone_surrogate,
    contains_nul,
    json_loads,
)
from config.schemas import SchemaCheck
from gateway.errors import ApiError

DOCUMENT = Path(__file__).resolve().parents[3] / "docs" / "openai.yaml"
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


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


def unsupported(name: str, why: str) -> ApiError:
    return invalid(
        f"The parameter '{name}' is not supported by this server: {why}.",
        param=name,
        code="unsupported_parameter",
    )


@cache
def request_check() -> SchemaCheck:
    """The schema of the request body (docs/openai.yaml), compiled once."""
    document = yaml.safe_load(DOCUMENT.read_text())
    return SchemaCheck({"$ref": "#/components/schemas/ChatCompletionRequest"}, document=document)


def _content(value: str | list[dict[str, Any]]) -> str:
    """A message's content: a string, or its text parts joined with newlines (as vLLM)."""
    return value if isinstance(value, str) else "\n".join(part["text"] for part in value)


def _messages(value: list[dict[str, Any]]) -> list[dict[str, Any]]:
    messages = []
    for message in value:
        out: dict[str, Any] = {
            "role": ROLES[message["role"]],
            "content": _content(message["content"]),
        }
        if isinstance(message.get("name"), str):
            out["name"] = message["name"]
        messages.append(out)
    return messages


def _response_format(value: dict[str, Any]) -> dict[str, Any] | None:
    """`text` is the default: nothing to send."""
    if value["type"] == "text":
        return None
    if value["type"] == "json_object":
        return {"type": "json_object"}
    return {"type": "json_schema", "json_schema": value["json_schema"]}


# The sampling parameters sent on to the backend (inference.types.SAMPLING_PARAMETERS),
# as the backend takes them (checked by the schema first): None sends nothing.
SAMPLING: dict[str, Callable[[Any], Any]] = {
    "stop": lambda v: ([v] if isinstance(v, str) else v) or None,
    "seed": int,
    "top_p": float,
    # 0 and -1 both mean no top-k (older vLLM versions refuse 0).
    "top_k": lambda v: int(v) or -1,
    "min_p": float,
    "presence_penalty": float,
    "frequency_penalty": float,
    "repetition_penalty": float,
    "logit_bias": lambda v: {str(int(token)): float(bias) for token, bias in v.items()} or None,
    "response_format": _response_format,
}


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
    """The request body, checked by its schema: 400 with the offending parameter
    otherwise. A null value is an absent one (but for the required `messages`)."""
    data = _body_object(body)
    given = {name: value for name, value in data.items() if value is not None or name == "messages"}
    problem = request_check().problem(given)
    if problem is not None:
        raise invalid(problem.message, param=problem.param, code=problem.code)
    sampling = {}
    for name, send in SAMPLING.items():
        if name in given and (sent := send(given[name])) is not None:
            sampling[name] = sent
    # max_completion_tokens counts over the older max_tokens.
    max_tokens_param = "max_completion_tokens" if "max_completion_tokens" in given else "max_tokens"
    max_tokens = given.get(max_tokens_param)
    temperature = given.get("temperature")
    return CompletionParams(
        model=given["model"],
        messages=_messages(given["messages"]),
        stream=bool(given.get("stream")),
        include_usage=bool(given.get("stream_options", {}).get("include_usage")),
        max_tokens=None if max_tokens is None else int(max_tokens),
        max_tokens_param=max_tokens_param,
        temperature=None if temperature is None else float(temperature),
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
