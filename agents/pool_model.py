"""A LangChain chat model whose every call goes through the inference pool.

`PoolChatModel` turns LangChain messages into a `ChatRequest` and streams
`inference.pool.chat_stream`, so an agent's model call is routed, held under the
tenant's limits and written to the ledger like any chat call (purpose `agent.step`,
reference the run's id). Text streams as generation chunks (and `on_llm_new_token`
callbacks); the pool's usage arrives as `usage_metadata` on the last chunk.

Tools: `bind_tools` converts tools (BaseTool, functions, pydantic models, dicts) to
OpenAI tool schemas, sent as the request's `tools` with `tool_choice` ("auto" unless
told otherwise: the backend must run with vLLM's `--enable-auto-tool-choice`, see
deploy/README.md). The pool's ToolCallDelta fragments stream as `tool_call_chunks`,
which LangChain joins into the reply's `tool_calls` (or `invalid_tool_calls` when the
arguments are not JSON). The history goes back as OpenAI messages: an AIMessage with
its `tool_calls`, a ToolMessage as a `tool` message with its `tool_call_id`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.chat_models import generate_from_stream
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    convert_to_openai_messages,
)
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool

from inference import pool
from inference.types import ChatRequest, StreamFinished, StreamStarted, TextDelta, ToolCallDelta

AGENT_STEP_PURPOSE = "agent.step"


class PoolChatModel(BaseChatModel):
    """The pool as a LangChain chat model, for one run of one tenant's user."""

    tenant_id: str
    user_id: str = ""
    reference: str = ""  # the run's id, recorded in the ledger
    purpose: str = AGENT_STEP_PURPOSE
    model_name: str = ""  # empty: the pool's default model
    max_tokens: int | None = None
    temperature: float | None = None

    @property
    def _llm_type(self) -> str:
        return "parley-pool"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "purpose": self.purpose}

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: str | dict[str, Any] | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """This model with `tools` offered on every call. `tool_choice`: None or "auto"
        (the model decides), "none", "required" (or "any", True: some tool), a tool's
        name or an OpenAI named-tool dict (that tool)."""
        schemas = [convert_to_openai_tool(t) for t in tools]
        if not schemas:
            raise ValueError("bind_tools needs at least one tool.")
        return self.bind(tools=schemas, tool_choice=_tool_choice(tool_choice, schemas), **kwargs)

    def request(
        self,
        messages: list[BaseMessage],
        *,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
    ) -> ChatRequest:
        return ChatRequest(
            messages=[dict(m) for m in convert_to_openai_messages(messages)],
            model=self.model_name,
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            tenant_id=self.tenant_id,
            user_id=self.user_id,
            purpose=self.purpose,
            reference=self.reference,
            tools=tools or None,
            tool_choice=tool_choice if tools else None,
        )

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        if stop:
            raise ValueError("PoolChatModel does not support stop sequences.")
        request = self.request(
            messages, tools=kwargs.get("tools"), tool_choice=kwargs.get("tool_choice")
        )
        started: StreamStarted | None = None
        for event in pool.chat_stream(request):
            if isinstance(event, StreamStarted):
                started = event
            elif isinstance(event, TextDelta):
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=event.text))
                if run_manager is not None:
                    run_manager.on_llm_new_token(event.text, chunk=chunk)
                yield chunk
            elif isinstance(event, ToolCallDelta):
                # Fragments of one call share its index: LangChain joins their
                # arguments and parses them once the stream ends.
                fragment = tool_call_chunk(
                    name=event.name, args=event.arguments, id=event.id, index=event.index
                )
                chunk = ChatGenerationChunk(
                    message=AIMessageChunk(content="", tool_call_chunks=[fragment])
                )
                if run_manager is not None:
                    run_manager.on_llm_new_token("", chunk=chunk)
                yield chunk
            elif isinstance(event, StreamFinished):
                usage = event.usage
                metadata = {"finish_reason": event.finish_reason}
                if started is not None:
                    metadata |= {"model_name": started.model, "backend": started.backend}
                yield ChatGenerationChunk(
                    message=AIMessageChunk(
                        content="",
                        usage_metadata={
                            "input_tokens": usage.prompt_tokens,
                            "output_tokens": usage.completion_tokens,
                            "total_tokens": usage.total_tokens,
                        },
                        response_metadata=metadata,
                        chunk_position="last",
                    ),
                    generation_info={"finish_reason": event.finish_reason},
                )

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return generate_from_stream(self._stream(messages, stop, run_manager, **kwargs))


def _tool_choice(
    choice: str | dict[str, Any] | bool | None, schemas: list[dict[str, Any]]
) -> str | dict[str, Any]:
    """LangChain's tool_choice conventions as the OpenAI parameter vLLM takes."""
    if choice is None or choice == "auto":
        # Sent explicitly: older vLLM releases default to "none" even with tools.
        return "auto"
    if choice is True or choice == "any":
        return "required"
    if choice in ("none", "required"):
        return str(choice)
    names = [schema["function"]["name"] for schema in schemas]
    if isinstance(choice, str):
        if choice not in names:
            raise ValueError(
                f"tool_choice {choice!r} is neither auto, none, required, any nor one of "
                f"the tools ({', '.join(names)})."
            )
        return {"type": "function", "function": {"name": choice}}
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = (choice.get("function") or {}).get("name")
        if name not in names:
            raise ValueError(f"tool_choice names {name!r}, which is not one of the tools.")
        return choice
    raise ValueError(f"Unrecognized tool_choice {choice!r}.")
