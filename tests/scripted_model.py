"""A scripted LangChain chat model for agent tests (the product path never uses it)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import Field


class ScriptedChatModel(BaseChatModel):
    """Answers each call with the next scripted AIMessage, streamed word by word and
    with its tool calls as tool-call chunks (GenericFakeChatModel's stream drops them).
    Records what it was sent and which tools it was offered."""

    script: Iterator[AIMessage]
    seen: list[list[BaseMessage]] = Field(default_factory=list)
    offered: list[list[str]] = Field(default_factory=list)
    choices: list[Any] = Field(default_factory=list)  # each call's tool_choice

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
        return self.bind(tools=[convert_to_openai_tool(t) for t in tools], **kwargs)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        self.seen.append(list(messages))
        self.offered.append([t["function"]["name"] for t in kwargs.get("tools", [])])
        self.choices.append(kwargs.get("tool_choice"))
        reply = next(self.script)
        text = reply.content if isinstance(reply.content, str) else ""
        for piece in re.split(r"(?<= )", text) if text else []:
            yield ChatGenerationChunk(message=AIMessageChunk(content=piece))
        chunks = [
            {"name": c["name"], "args": json.dumps(c["args"]), "id": c["id"], "index": i}
            for i, c in enumerate(reply.tool_calls)
        ]
        yield ChatGenerationChunk(
            message=AIMessageChunk(
                content="", tool_call_chunks=chunks, usage_metadata=reply.usage_metadata
            )
        )

    def _generate(self, messages: list[BaseMessage], **kwargs: Any) -> ChatResult:
        raise AssertionError("the runtime streams")
