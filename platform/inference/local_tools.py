"""Tool calls on the local model server, the way vLLM serves them.

The request: OpenAI's `tools` (function tools, each with a JSON-schema `parameters`)
and `tool_choice`: `none`, `auto` (the default when tools are given), `required`, or
`{"type": "function", "function": {"name": ...}}`.

The format: SmolLM2-135M's chat template is plain ChatML and knows no tools, so the
server uses the Hermes convention that vLLM's `hermes` parser reads (and SmolLM2's
larger siblings and Qwen use): the tools are described in the system message inside
`<tools></tools>`, and a call is

    <tool_call>
    {"name": "calculate", "arguments": {"expression": "2+2"}}
    </tool_call>

Earlier calls in the conversation are written back the same way, and a tool's result
as a `tool` message wrapped in `<tool_response></tool_response>`.

The grammar: the call's JSON is constrained by a llama.cpp grammar generated from the
tools' schemas (`llama_cpp.llama_grammar.json_schema_to_gbnf`), one alternative per
tool, so the name is one of the tools and the arguments always parse and match the
schema. `required` and a named function apply it from the first token (a call is
forced); `auto` applies it lazily, as llama.cpp's server does: the model writes
freely, and the moment its answer starts with `<tool_call>` the rest is constrained.
`none` offers no tools at all.

One call per turn (vLLM's `parallel_tool_calls=false`): a 135M model asked for
several calls at once mostly repeats the first.
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

TRIGGER = "<tool_call>"
CLOSE = "</tool_call>"
# The format's markup for a tool's result: the model reads it, and a small model echoes
# it after the result ("1000\n</tool_response>"); an answer ends where it starts.
RESPONSE_MARKUP = ("<tool_response>", "</tool_response>")
_NAME = re.compile(r"^[a-zA-Z0-9_.-]{1,64}$")

SYSTEM_TOOLS = """You can call functions (tools) to answer. The tools, as JSON schemas:
<tools>
{tools}
</tools>
{rule}
<tool_call>
{{"name": <function name>, "arguments": <arguments object>}}
</tool_call>"""
RULE_AUTO = (
    "When a tool can give the answer (arithmetic, units, dates, facts it knows), do not "
    "answer yourself: reply with only a tool call, in this format:"
)
RULE_FORCED = "Reply with only a tool call, in this format:"


class ToolError(ValueError):
    """Bad `tools` or `tool_choice`; the message says what (a 400 to the client)."""


@dataclass
class ToolPlan:
    tools: list[dict[str, Any]]  # OpenAI function tools, as given
    choice: str  # auto, required, or the name of the function
    grammar: str  # GBNF: root ::= "<tool_call>\n" call "\n</tool_call>"
    grammar_after_trigger: str  # the same without the "<tool_call>" it starts with

    @property
    def forced(self) -> bool:
        return self.choice != "auto"


def tool_plan(body: dict[str, Any], grammar_valid: Any = None) -> ToolPlan | None:
    """The tool plan of a chat request, or None when no tool may be called. Raises
    ToolError on malformed `tools` or `tool_choice`."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise ToolError("When using `tool_choice`, `tools` must be set.")
        return None
    if not isinstance(tools, list):
        raise ToolError("'tools' must be a list of function tools")
    names: list[str] = []
    for index, tool in enumerate(tools):
        where = f"tools[{index}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise ToolError(f"{where}: only tools of type 'function' are served")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise ToolError(f"{where}.function must be an object with a 'name'")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ToolError(f"{where}.function.name must be 1-64 letters, digits, '_', '-' or '.'")
        if name in names:
            raise ToolError(f"{where}: the function name {name!r} is given twice")
        names.append(name)
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise ToolError(f"{where}.function.description must be a string")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
            raise ToolError(f"{where}.function.parameters must be a JSON schema of an object")

    if choice is None or choice == "auto":
        chosen = "auto"
    elif choice == "none":
        return None
    elif choice == "required":
        chosen = "required"
    elif isinstance(choice, dict):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise ToolError(
                "'tool_choice' must be none, auto, required or "
                '{"type": "function", "function": {"name": ...}}'
            )
        if name not in names:
            raise ToolError(f"'tool_choice' names {name!r}, which is not one of the tools")
        chosen = name
    else:
        raise ToolError(
            "'tool_choice' must be none, auto, required or "
            '{"type": "function", "function": {"name": ...}}'
        )

    offered = [
        t for t in tools if chosen in ("auto", "required") or t["function"]["name"] == chosen
    ]
    alternatives = []
    for tool in offered:
        function = tool["function"]
        parameters = dict(function.get("parameters") or {"type": "object", "properties": {}})
        parameters.setdefault("type", "object")
        alternatives.append(
            {
                "type": "object",
                "properties": {"name": {"const": function["name"]}, "arguments": parameters},
                "required": ["name", "arguments"],
            }
        )
    schema = alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}
    try:
        call = json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # the converter raises whatever it meets
        raise ToolError(f"'tools': a parameters schema is not supported: {exc}") from exc
    call = re.sub(r"^root ::=", "tool-call ::=", call, count=1, flags=re.MULTILINE)
    # No control characters (raw newlines) inside strings: JSON forbids them, and a
    # small model that starts one tends never to close the string.
    call = call.replace('char ::= [^"\\\\]', 'char ::= [^"\\\\\\x00-\\x1F\\x7F]')
    grammar = f'root ::= "<tool_call>\\n" tool-call "\\n</tool_call>"\n{call}'
    after = f'root ::= "\\n"? tool-call "\\n</tool_call>"\n{call}'
    if grammar_valid is not None and not (grammar_valid(grammar) and grammar_valid(after)):
        raise ToolError("'tools': a parameters schema is not supported")
    return ToolPlan(tools=tools, choice=chosen, grammar=grammar, grammar_after_trigger=after)


def render_messages(messages: list[dict[str, Any]], plan: ToolPlan | None) -> list[dict[str, Any]]:
    """Messages for the chat template: the tools in the system message, earlier calls
    and tool results written in the Hermes format."""
    out: list[dict[str, Any]] = []
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        if role == "assistant" and message.get("tool_calls"):
            calls = "\n".join(_call_text(call) for call in message["tool_calls"])
            content = f"{content}\n{calls}" if content else calls
        elif role == "tool":
            content = f"{RESPONSE_MARKUP[0]}\n{content}\n{RESPONSE_MARKUP[1]}"
        out.append({"role": role, "content": content})
    if plan is None:
        return out
    offered = [
        t["function"]
        for t in plan.tools
        if not plan.forced or plan.choice == "required" or t["function"]["name"] == plan.choice
    ]
    described = "\n".join(
        json.dumps(
            {
                "name": f["name"],
                "description": f.get("description", ""),
                "parameters": f.get("parameters", {"type": "object", "properties": {}}),
            }
        )
        for f in offered
    )
    system = SYSTEM_TOOLS.format(tools=described, rule=RULE_FORCED if plan.forced else RULE_AUTO)
    if out and out[0]["role"] == "system":
        out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{system}"}
    else:
        out.insert(0, {"role": "system", "content": system})
    return out


def _call_text(call: Any) -> str:
    function = call.get("function", {}) if isinstance(call, dict) else {}
    arguments = function.get("arguments", "{}")
    if isinstance(arguments, str):
        with contextlib.suppress(json.JSONDecodeError):
            arguments = json.loads(arguments)
    payload = {"name": function.get("name", ""), "arguments": arguments}
    return f"{TRIGGER}\n{json.dumps(payload)}\n{CLOSE}"


def check_tool_messages(messages: list[Any]) -> None:
    """Raise ToolError on malformed `tool_calls` of assistant messages."""
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            continue
        calls = message.get("tool_calls")
        if calls is None:
            continue
        if message.get("role") != "assistant" or not isinstance(calls, list):
            raise ToolError(f"messages[{index}].tool_calls must be a list, on an assistant message")
        for call in calls:
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise ToolError(f"messages[{index}].tool_calls: each needs function.name")


# --- reading the model's output ----------------------------------------------------


@dataclass
class CallParser:
    """Reads the generated text piece by piece and says what it is, as vLLM's hermes
    parser does: content, or a tool call's name, then its argument fragments.

    Events: ("content", text), ("name", function name), ("arguments", fragment).
    """

    state: str = "start"  # start, content, call, arguments, after
    buffer: str = ""
    depth: int = 0
    in_string: bool = False
    escape: bool = False
    name: str | None = None
    arguments: list[str] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)
    content: list[str] = field(default_factory=list)

    def feed(self, text: str) -> Iterator[tuple[str, str]]:
        self.raw.append(text)
        if self.state == "content":
            self.content.append(text)
            yield "content", text
            return
        self.buffer += text
        if self.state == "start":
            head = self.buffer.lstrip()
            if TRIGGER.startswith(head):
                return  # still maybe a call
            if not head.startswith(TRIGGER):
                self.state = "content"
                text, self.buffer = self.buffer, ""
                self.content.append(text)
                yield "content", text
                return
            self.state = "call"
            self.buffer = head[len(TRIGGER) :]
        if self.state == "call":
            match = re.match(
                r'\s*\{\s*"name"\s*:\s*"([^"]*)"\s*,\s*"arguments"\s*:\s*', self.buffer
            )
            if not match:
                return
            self.name = match.group(1)
            self.state = "arguments"
            self.buffer = self.buffer[match.end() :]
            yield "name", self.name
        if self.state == "arguments":
            out = []
            for char in self.buffer:
                out.append(char)
                if self.in_string:
                    if self.escape:
                        self.escape = False
                    elif char == "\\":
                        self.escape = True
                    elif char == '"':
                        self.in_string = False
                elif char == '"':
                    self.in_string = True
                elif char in "{[":
                    self.depth += 1
                elif char in "}]":
                    self.depth -= 1
                    if self.depth == 0:
                        self.state = "after"
                        break
            self.buffer = self.buffer[len(out) :] if self.state == "after" else ""
            fragment = "".join(out)
            if fragment:
                self.arguments.append(fragment)
                yield "arguments", fragment

    def flush(self) -> Iterator[tuple[str, str]]:
        """At the end of generation: text held back as a possible call start is content."""
        if self.state == "start" and self.buffer:
            self.state = "content"
            text, self.buffer = self.buffer, ""
            self.content.append(text)
            yield "content", text

    def calls(self) -> list[dict[str, Any]]:
        """The complete tool call as OpenAI's `tool_calls`, or [] when the text was no
        call (or an unfinished one)."""
        if self.state != "after" or self.name is None:
            return []
        arguments = "".join(self.arguments).strip()
        try:
            json.loads(arguments)
        except json.JSONDecodeError:
            return []
        return [
            {
                "id": call_id(),
                "type": "function",
                "function": {"name": self.name, "arguments": arguments},
            }
        ]

    def text(self) -> str:
        return "".join(self.raw)


def call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"
