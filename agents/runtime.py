"""The agent runtime: one agent's tool loop, every step an event for the run's log.

`agent_run` drives a LangChain chat model (in production `PoolChatModel`, so each
model call is routed, limited and accounted by the inference pool) through the loop
"model call -> tool calls -> model call ..." until the model answers without calling
a tool, or a limit, a cancel or an error ends it. It emits the run's frames through
`emit` (without `run_id` and `seq`, which the caller's event writer adds):

- `{"type": "token", "delta"}` for the model's text, as it streams;
- `{"type": "tool.start", "call_id", "name", "arguments"}` before a tool runs;
- `{"type": "tool.end", "call_id", "name", "result", "error", "truncated"}` after it,
  `result` cut to `AgentLimits.tool_result_chars`.

A result longer than that is passed by reference: the model gets its first part and
the call id as a `ref`, and from then on the runtime's own tool `tool_result_read(ref,
offset)` (no scopes; it reads what the run's tools already returned) gives it the rest
a part at a time.

The caller ends the run (`run.done` / `run.error`) from the `AgentResult` it gets back.

Why a hand-written loop and not `langchain.agents.create_agent`: the LangGraph agent
runs tools inside its graph, where a step limit is a recursion limit that raises,
a wall-time limit and a cancel can only be checked between graph nodes, and a tool
that hangs holds the whole graph. Here the loop is about a hundred lines over
`BaseChatModel.bind_tools` and `BaseTool.invoke`, and owns what matters to a run:
the exact order of events, the limits on steps, wall time and tokens with a stable
stop reason each, cancel checked between steps, between streamed chunks and while a
tool runs (in a worker thread that is abandoned when it ignores the cancel), and the
scope guard in front of every tool call.

Tools. The agent is offered the tools its spec names that the tenant's grant allows
(`agents.scopes.tools_allowed`). A call to anything else - a tool of the plugin whose
scopes are not granted, a tool the spec does not name, a name the plugin does not have
- is refused before anything runs (`tool_guard`) and the refusal is sent back to the
model as the tool's result. A tool that raises does not end the run: the error text
goes back to the model, which may correct itself.

A run whose context holds document text (`ToolContext.untrusted`: documents attached
to the conversation; or, from the moment one returns, a result of a tool with the
`documents.read` scope, in this run or earlier in the conversation) is offered no tool
that acts outside the run (`agents.scopes.side_effects`: outside requests, document
writes; code runs in the sandbox and stays available), and a call to one is refused:
a document cannot make the agent act on its say-so.

A tool learns whose call it serves from `config["configurable"]["parley_context"]`
(`agents.context.ToolContext`: tenant, member, run, documents in play, a database
scope, progress events, which this loop sends while the tool runs).

A tool sees the run's cancel through its `RunnableConfig`:
`config["configurable"]["parley_cancelled"]()` is true once the run is cancelled (or
out of time); long tools should check it and return early. The tenant's settings of
the plugin (secrets decrypted, server side only) are `config["configurable"]["parley_settings"]`.

Where a tool runs is the `tool_executor`'s choice, called in that worker thread: by
default right there (`tool_invoke_in_process`); the product passes
`agents.tool_queue.QueuedToolExecutor`, which sends tools with side effects to workers
of their own. Either way the loop watches the cancel and the deadline the same way.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    SystemMessage,
    ToolMessage,
    convert_to_messages,
)
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import BaseTool

from agents.context import CONTEXT_KEY, ToolAnswer, ToolContext
from agents.manifest import AgentSpec, PluginManifest
from agents.scopes import ToolRefused, side_effects, tool_guard, tools_allowed
from inference.tokens import CHARS_PER_TOKEN, prompt_tokens_estimate

Emit = Callable[[dict[str, Any]], None]
READS_DOCUMENTS = "documents.read"


class ToolExecutor(Protocol):
    """Runs one tool call the guard allowed and returns its output (or raises).
    `scopes` are the tool's scopes in its manifest; `config` carries the run's cancel
    and the plugin's settings (see the module docstring)."""

    def __call__(
        self,
        *,
        tool: BaseTool,
        scopes: frozenset[str],
        arguments: dict[str, Any],
        config: RunnableConfig,
    ) -> Any: ...


def tool_invoke_in_process(
    *, tool: BaseTool, scopes: frozenset[str], arguments: dict[str, Any], config: RunnableConfig
) -> Any:
    """The default executor: the tool runs in the calling thread."""
    return tool.invoke(arguments, config=config)


# Why a run stopped. `done`: the model answered without calling a tool.
STOP_DONE = "done"
STOP_STEP_LIMIT = "step_limit"
STOP_TIME_LIMIT = "time_limit"
STOP_TOKEN_LIMIT = "token_limit"  # noqa: S105 - a stop reason, not a password
STOP_CANCELLED = "cancelled"


@dataclass(frozen=True)
class AgentLimits:
    max_steps: int = 8  # model calls per run
    max_seconds: float = 300.0  # wall time per run, tools included
    max_tokens: int = 50_000  # prompt + completion tokens over all model calls
    tool_result_chars: int = 4_000  # the longest tool result kept (event and model)
    # How long a tool may go on after a cancel or the time limit before it is abandoned.
    tool_grace_s: float = 2.0
    poll_s: float = 0.05  # how often a running tool's cancel and deadline are checked

    def __post_init__(self) -> None:
        for name in ("max_steps", "max_tokens", "tool_result_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"AgentLimits.{name} must be at least 1")
        for name in ("max_seconds", "poll_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"AgentLimits.{name} must be positive")
        if self.tool_grace_s < 0:
            raise ValueError("AgentLimits.tool_grace_s must not be negative")


@dataclass
class AgentResult:
    stop_reason: str  # one of the STOP_* codes
    detail: str  # a sentence saying why, for the log and the user
    text: str  # the final answer, or the text the model produced before it stopped
    steps: int  # model calls made
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # The whole conversation as LangChain messages, instructions first.
    messages: list[BaseMessage] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def succeeded(self) -> bool:
        return self.stop_reason == STOP_DONE


class _Stop(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(detail)


def agent_tools(
    *,
    spec: AgentSpec,
    manifest: PluginManifest,
    granted_scopes: Iterable[str],
    untrusted: bool = False,
) -> list[BaseTool]:
    """The tools offered to the agent: those its spec names whose scopes are granted;
    for an `untrusted` run (it reads document text), none with side effects."""
    named = set(spec.tools)
    return [
        tool
        for tool in tools_allowed(manifest, granted_scopes=granted_scopes)
        if tool.name in named and not (untrusted and side_effects(manifest.tool_scopes(tool.name)))
    ]


def bound_text(text: str, limit: int) -> tuple[str, bool]:
    """`text` cut to `limit` characters, and whether it was cut."""
    return (text, False) if len(text) <= limit else (text[:limit], True)


def tool_result_text(output: Any) -> str:
    """What a tool returned, as the text its `tool.end` event and the model see."""
    if isinstance(output, ToolAnswer):
        return output.text
    if isinstance(output, ToolMessage):
        output = output.content
    if isinstance(output, str):
        return output
    try:
        return json.dumps(output, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return str(output)


RESULT_READ = "tool_result_read"


def _result_reader(results: dict[str, str], limit: int) -> BaseTool:
    """The runtime's own tool, offered once a tool's result was cut: the rest of it, by
    reference (the call id), a part at a time."""
    from langchain_core.tools import StructuredTool

    def read(ref: str, offset: int = 0) -> str:
        full = results.get(ref)
        if full is None:
            return f"No stored result {ref!r}: give the `ref` a cut result named."
        offset = max(0, int(offset))
        part = full[offset : offset + limit]
        end = offset + len(part)
        more = (
            f"\n[characters {offset}-{end} of {len(full)}; read on with offset={end}]"
            if end < len(full)
            else f"\n[characters {offset}-{end} of {len(full)}: the end]"
        )
        return part + more

    return StructuredTool.from_function(
        read,
        name=RESULT_READ,
        description=(
            "Read more of a tool result that was cut because it was long: give the `ref` "
            "the cut result named and the `offset` to read from."
        ),
    )


def _estimate_tokens(messages: Sequence[BaseMessage]) -> int:
    # The pool's one estimate (inference.tokens), over the messages as the pool sees them.
    return prompt_tokens_estimate(
        [{"content": m.content, "tool_calls": getattr(m, "tool_calls", None)} for m in messages]
    )


class _Loop:
    def __init__(
        self,
        *,
        spec: AgentSpec,
        manifest: PluginManifest,
        granted_scopes: Iterable[str],
        model: BaseChatModel,
        emit: Emit,
        cancelled: Callable[[], bool],
        limits: AgentLimits,
        clock: Callable[[], float],
        settings: dict[str, Any] | None = None,
        tool_executor: ToolExecutor = tool_invoke_in_process,
        context: ToolContext | None = None,
    ) -> None:
        self.spec = spec
        self.tool_executor = tool_executor
        self.settings = dict(settings or {})
        self.manifest = manifest
        self.granted = frozenset(granted_scopes)
        self.events: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self.context = (
            dataclasses.replace(context, events=self.events) if context is not None else None
        )
        self.untrusted = False
        self.mark_untrusted(context is not None and context.untrusted)
        # Results longer than the cap, whole, by call id: the model reads on through
        # the runtime's RESULT_READ tool, offered once there is one.
        self.full_results: dict[str, str] = {}
        self.reader = _result_reader(
            self.full_results, limits.tool_result_chars - min(100, limits.tool_result_chars // 2)
        )
        self.model = model
        self.emit = emit
        self.cancelled = cancelled
        self.limits = limits
        self.clock = clock
        self.deadline = clock() + limits.max_seconds
        self.steps = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.text = ""

    def mark_untrusted(self, untrusted: bool = True) -> None:
        """Offer the tools a run that reads document text may use (none with side
        effects) from now on; `untrusted=False` only sets up a run that does not."""
        self.untrusted = self.untrusted or untrusted
        if self.context is not None and self.untrusted:
            self.context = dataclasses.replace(self.context, untrusted=True)
        self.tools = agent_tools(
            spec=self.spec,
            manifest=self.manifest,
            granted_scopes=self.granted,
            untrusted=self.untrusted,
        )
        self.offered = {tool.name for tool in self.tools}

    def reads_documents(self, name: str) -> bool:
        return READS_DOCUMENTS in self.manifest.tool_scopes(name)

    # --- limits -------------------------------------------------------------------

    def check(self) -> None:
        """Raise _Stop when the run is cancelled or out of time."""
        if self.cancelled():
            raise _Stop(STOP_CANCELLED, "The run was cancelled.")
        if self.clock() >= self.deadline:
            raise _Stop(
                STOP_TIME_LIMIT,
                f"The agent ran out of time ({self.limits.max_seconds:g} s per run).",
            )

    def interrupted(self) -> bool:
        return self.cancelled() or self.clock() >= self.deadline

    # --- a model call -------------------------------------------------------------

    def model_step(self, messages: list[BaseMessage]) -> AIMessage:
        runnable: Any = self.model
        tools = [*self.tools, self.reader] if self.full_results else self.tools
        if tools and self.steps == 0 and self.spec.tool_choice == "required":
            runnable = self.model.bind_tools(tools, tool_choice="required")
        elif tools:
            runnable = self.model.bind_tools(tools)
        self.steps += 1
        reply: AIMessageChunk | None = None
        text = ""
        stream = runnable.stream(messages)
        try:
            for chunk in stream:
                if not isinstance(chunk, AIMessageChunk):
                    continue
                reply = chunk if reply is None else reply + chunk
                delta = chunk.text if isinstance(chunk.content, list) else chunk.content
                if delta:
                    text += delta
                    self.text += delta
                    self.emit({"type": "token", "delta": delta})
                self.check()
        except _Stop:
            self.count_tokens(messages, reply, text)
            raise
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()  # a pool stream commits its usage when closed
        self.count_tokens(messages, reply, text)
        if reply is None:
            return AIMessage(content="")
        return AIMessage(
            content=reply.content,
            tool_calls=reply.tool_calls,
            invalid_tool_calls=reply.invalid_tool_calls,
            usage_metadata=reply.usage_metadata,
            response_metadata=reply.response_metadata,
            id=reply.id,
        )

    def count_tokens(
        self, messages: list[BaseMessage], reply: AIMessageChunk | None, text: str
    ) -> None:
        usage = reply.usage_metadata if reply is not None else None
        if usage and usage.get("total_tokens"):
            self.prompt_tokens += usage.get("input_tokens", 0)
            self.completion_tokens += usage.get("output_tokens", 0)
        else:
            self.prompt_tokens += _estimate_tokens(messages)
            calls = reply.tool_calls if reply is not None else []
            self.completion_tokens += (len(text) + len(json.dumps(calls))) // CHARS_PER_TOKEN

    # --- a tool call --------------------------------------------------------------

    def tool_step(self, call: dict[str, Any]) -> ToolMessage:
        call_id = call.get("id") or f"call_{uuid.uuid4().hex[:12]}"
        name = str(call.get("name") or "")
        arguments = call.get("args")
        if not isinstance(arguments, dict):
            arguments = {}
        self.emit({"type": "tool.start", "call_id": call_id, "name": name, "arguments": arguments})
        error: str | None = None
        artifacts: list[dict[str, Any]] = []
        try:
            reading = name == RESULT_READ and bool(self.full_results)
            tool = self.reader if reading else self.guard(name)
            if call.get("error"):  # an invalid tool call: arguments that do not parse
                raise ValueError(f"The arguments are not valid JSON: {call['error']}")
            output = self.invoke(tool, arguments, call_id=call_id, name=name)
            if isinstance(output, ToolAnswer):
                artifacts = [dict(artifact) for artifact in output.artifacts]
            result = tool_result_text(output)
            if len(result) > self.limits.tool_result_chars and name != RESULT_READ:
                # Passed by reference: the first part now, the rest on request.
                self.full_results[call_id] = result
                limit = self.limits.tool_result_chars
                shown = limit - min(200, limit // 2)
                result = (
                    f"{result[:shown]}\n[cut at {shown} of {len(result)} characters: read "
                    f"on with {RESULT_READ}(ref={call_id!r}, offset={shown})]"
                )
        except _Stop:
            raise
        except ToolRefused as exc:
            error = str(exc)
            result = f"Error: {exc}"
        except Exception as exc:  # a tool may raise anything; the model gets to see it
            error = f"{type(exc).__name__}: {exc}"
            result = f"Error: {error}"
        result, truncated = bound_text(result, self.limits.tool_result_chars)
        truncated = truncated or call_id in self.full_results
        if error is None and self.reads_documents(name) and not self.untrusted:
            # Document text is in the conversation now: no side effects from here on.
            self.mark_untrusted()
        end = {
            "type": "tool.end",
            "call_id": call_id,
            "name": name,
            "result": result,
            "error": error,
            "truncated": truncated,
        }
        if artifacts:
            end["artifacts"] = artifacts
        self.emit(end)
        return ToolMessage(
            content=result, tool_call_id=call_id, name=name, status="error" if error else "success"
        )

    def guard(self, name: str) -> BaseTool:
        tool = tool_guard(self.manifest, tool_name=name, granted_scopes=self.granted)
        scopes = self.manifest.tool_scopes(name)
        if self.untrusted and side_effects(scopes):
            raise ToolRefused(
                f"Tool {name!r} has side effects ({', '.join(sorted(side_effects(scopes)))}) "
                "and this run reads document text, which may carry instructions: tools "
                "with side effects are off while documents are in the conversation.",
                plugin=self.manifest.name,
                tool=name,
                missing=frozenset(),
            )
        if name not in self.offered:
            raise ToolRefused(
                f"Tool {name!r} is not one of the agent {self.spec.name!r}'s tools.",
                plugin=self.manifest.name,
                tool=name,
                missing=frozenset(),
            )
        return tool

    def invoke(self, tool: BaseTool, arguments: dict[str, Any], *, call_id: str, name: str) -> Any:
        """Run the tool in a worker thread, watching the cancel and the deadline."""
        if tool is self.reader:
            return tool.invoke(arguments)
        stop = threading.Event()
        outcome: dict[str, Any] = {}

        def should_stop() -> bool:
            return stop.is_set()

        def work() -> None:
            try:
                config: RunnableConfig = {
                    "configurable": {
                        "parley_cancelled": should_stop,
                        "parley_settings": self.settings,
                        CONTEXT_KEY: self.context,
                    }
                }
                outcome["value"] = self.tool_executor(
                    tool=tool,
                    scopes=self.manifest.tool_scopes(name),
                    arguments=arguments,
                    config=config,
                )
            except BaseException as exc:  # handed to the loop, which decides
                outcome["error"] = exc
            finally:
                _close_thread_connections()

        worker = threading.Thread(target=work, name=f"agent-tool-{name}", daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(self.limits.poll_s)
            self.send_progress()
            if worker.is_alive() and self.interrupted():
                stop.set()
                worker.join(self.limits.tool_grace_s)
                try:
                    self.check()
                except _Stop as reason:
                    self.end_interrupted_tool(call_id, name, reason, abandoned=worker.is_alive())
                    raise
        self.send_progress()
        if "error" in outcome:
            raise outcome["error"]
        return outcome.get("value")

    def send_progress(self) -> None:
        """The tool's progress events (ToolContext.progress), sent from this thread."""
        while True:
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                return
            self.emit(event)

    def end_interrupted_tool(
        self, call_id: str, name: str, reason: _Stop, *, abandoned: bool
    ) -> None:
        how = (
            f"abandoned: it did not stop within {self.limits.tool_grace_s:g} s"
            if abandoned
            else "stopped"
        )
        reason.detail = f"{reason.detail} The tool {name!r} was {how}."
        self.emit(
            {
                "type": "tool.end",
                "call_id": call_id,
                "name": name,
                "result": "",
                "error": f"{reason.reason}: the tool was {how}",
                "truncated": False,
            }
        )

    # --- the loop -----------------------------------------------------------------

    def run(self, messages: list[BaseMessage]) -> AgentResult:
        try:
            while True:
                self.check()
                if self.steps >= self.limits.max_steps:
                    raise _Stop(
                        STOP_STEP_LIMIT,
                        f"The agent reached its step limit ({self.limits.max_steps} model "
                        "calls) without a final answer.",
                    )
                if self.prompt_tokens + self.completion_tokens >= self.limits.max_tokens:
                    raise _Stop(
                        STOP_TOKEN_LIMIT,
                        f"The agent used its token limit ({self.limits.max_tokens} tokens) "
                        "without a final answer.",
                    )
                reply = self.model_step(messages)
                messages.append(reply)
                calls = [dict(c) for c in reply.tool_calls]
                calls += [
                    {**c, "error": c.get("error") or "unparsable"} for c in reply.invalid_tool_calls
                ]
                if not calls:
                    return self.result(STOP_DONE, "The agent answered.", messages, final=reply)
                for call in calls:
                    self.check()
                    messages.append(self.tool_step(call))
        except _Stop as stop:
            return self.result(stop.reason, stop.detail, messages)

    def result(
        self, reason: str, detail: str, messages: list[BaseMessage], final: AIMessage | None = None
    ) -> AgentResult:
        return AgentResult(
            stop_reason=reason,
            detail=detail,
            text=final.text if final is not None else self.text,
            steps=self.steps,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            messages=messages,
        )


def _close_thread_connections() -> None:
    # A tool that used the ORM opened connections in this thread; nothing else closes them.
    from django.db import connections

    connections.close_all()


def agent_run(
    *,
    spec: AgentSpec,
    manifest: PluginManifest,
    granted_scopes: Iterable[str],
    model: BaseChatModel,
    messages: list[dict[str, Any]],
    emit: Emit,
    cancelled: Callable[[], bool] = lambda: False,
    limits: AgentLimits | None = None,
    clock: Callable[[], float] = time.monotonic,
    settings: dict[str, Any] | None = None,
    tool_executor: ToolExecutor = tool_invoke_in_process,
    context: ToolContext | None = None,
) -> AgentResult:
    """Run the agent `spec` of plugin `manifest` on a conversation until it answers or
    stops; see the module docstring. `messages` are chat messages as dicts (`role`,
    `content`), oldest first; the spec's instructions go before them as the system
    message. Errors of the model call (inference.types.InferenceError) propagate: the
    caller ends the run with their code, as for a plain chat run."""
    if spec not in manifest.agents:
        raise ValueError(f"Agent {spec.name!r} is not one of plugin {manifest.name!r}'s agents.")
    if not messages:
        raise ValueError("An agent run needs at least one message.")
    history = [SystemMessage(content=spec.instructions), *convert_to_messages(messages)]
    # Results of document-reading tools earlier in the conversation are document text too.
    read_before = any(
        READS_DOCUMENTS in manifest.tool_scopes(str(call.get("name") or ""))
        for message in messages
        for call in message.get("tool_calls") or ()
    )
    if read_before:
        context = dataclasses.replace(context or ToolContext(tenant_id=""), untrusted=True)
    loop = _Loop(
        spec=spec,
        manifest=manifest,
        granted_scopes=granted_scopes,
        model=model,
        emit=emit,
        cancelled=cancelled,
        limits=limits or AgentLimits(),
        clock=clock,
        settings=settings,
        tool_executor=tool_executor,
        context=context,
    )
    return loop.run(history)
