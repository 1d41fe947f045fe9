"""A LangChain chat model whose every call goes through the inference pool.

`PoolChatModel` turns LangChain messages into a `ChatRequest` and streams
`inference.pool.chat_stream`, so an agent's model call is routed, held under the
tenant's limits and written to the ledger like any chat call (purpose `agent.step`,
reference the run's id). Text streams as generation chunks (and `on_llm_new_token`
callbacks); the pool's usage arrives as `usage_metadata` on the last chunk.

Text only, for now: `ChatRequest` carries no tool definitions and the backend client
reads only `delta.content`, so `bind_tools` refuses with NotImplementedError. Tool
calling through the pool needs, in `inference/`: a `tools` field on ChatRequest sent as
the OpenAI `tools` parameter, a stream event for `delta.tool_calls` fragments (index,
id, function name, argument pieces) parsed by the client, and the pool passing it on;
here `_stream` then yields them as `tool_call_chunks`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.language_models.chat_models import generate_from_stream
from langchain_core.messages import AIMessageChunk, BaseMessage, convert_to_openai_messages
from langchain_core.outputs import ChatGenerationChunk, ChatResult

from inference import pool
from inference.types import ChatRequest, StreamFinished, StreamStarted, TextDelta

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

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> Any:
        raise NotImplementedError(
            "Tool calling through the inference pool is not available yet: ChatRequest "
            "carries no tools and the backend client does not parse delta.tool_calls."
        )

    def request(self, messages: list[BaseMessage]) -> ChatRequest:
        return ChatRequest(
            messages=[dict(m) for m in convert_to_openai_messages(messages)],
            model=self.model_name,
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            tenant_id=self.tenant_id,
            user_id=self.user_id,
            purpose=self.purpose,
            reference=self.reference,
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
        started: StreamStarted | None = None
        for event in pool.chat_stream(self.request(messages)):
            if isinstance(event, StreamStarted):
                started = event
            elif isinstance(event, TextDelta):
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=event.text))
                if run_manager is not None:
                    run_manager.on_llm_new_token(event.text, chunk=chunk)
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
