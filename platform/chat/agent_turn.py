"""An agent's turn: the answer producer for a run whose conversation has an agent
("<plugin>.<agent>"), run on the `agents` queue.

The agent runtime (agents.runtime.agent_run) answers instead of one model call, inside
the same run lifecycle as a plain chat turn (chat.execution: claim, event log,
heartbeats, cancel, end), with the agent's tool calls logged as `tool.start` /
`tool.end` between the token events. The agent's instructions are the system message;
its tools are those of the tenant's grant (agents.selectors.tools_for_run); every
model call goes through the inference pool (agents.pool_model.PoolChatModel).

The stored answer is the concatenation of the logged token deltas, as for chat, so a
client that rebuilds the answer from the log gets the stored message. A limit (steps,
time, tokens) ends the run with `run.done` and the limit as its `finish_reason`, keeping
the text so far; a cancel ends it with `run.error` `cancelled`.
"""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from langchain_core.language_models import BaseChatModel

from agents.context import ToolContext
from agents.pool_model import PoolChatModel
from agents.runs import tenant_agent_run
from agents.runtime import STOP_CANCELLED, STOP_DONE
from agents.selectors import tools_for_run
from chat.documents import (
    answer_documents,
    documents_apply,
    documents_in_play,
    documents_progress,
)
from chat.execution import RunExecution, run_execute
from chat.models import Run
from chat.prompts import thread_messages
from documents.context import DocumentContext
from inference.types import InferenceError, StreamFinished, Usage
from tenants.access import NotFound

logger = logging.getLogger(__name__)


def agent_model_build(*, run: Run) -> BaseChatModel:
    """The chat model an agent run calls: the inference pool, on behalf of the run's
    user, each call recorded in the ledger against the run."""
    return PoolChatModel(
        tenant_id=str(run.tenant_id),
        user_id=str(run.user_id),
        reference=str(run.id),
        model_name=run.model,
        max_tokens=settings.PARLEY_MAX_TOKENS,
        temperature=settings.PARLEY_TEMPERATURE,
    )


class AgentTurn:
    """The answer is the agent's: model calls and tool calls until it is done or a
    limit stops it."""

    messages: list[dict[str, Any]]
    documents: DocumentContext | None
    context: ToolContext

    def prepare(self, run: Run) -> None:
        self.messages = thread_messages(run=run, tool_calls=True)
        in_play = documents_in_play(run=run)
        self.documents = documents_apply(
            run=run,
            messages=self.messages,
            max_tokens=settings.PARLEY_MAX_TOKENS,
            documents=in_play,
        )
        # Document text in the prompt makes the run untrusted: no tool with side effects.
        self.context = ToolContext(
            tenant_id=str(run.tenant_id),
            user_id=str(run.user_id),
            run_id=str(run.id),
            conversation_id=str(run.conversation_id),
            document_ids=tuple(str(d.id) for d in in_play),
            untrusted=self.documents is not None,
        )

    def produce(self, execution: RunExecution) -> StreamFinished:
        run = execution.run
        if self.documents is not None:
            execution.append(documents_progress(self.documents))
            execution.documents = self.documents.as_dict()
        try:
            tools = tools_for_run(tenant_id=run.tenant_id, agent=run.agent)
            result = tenant_agent_run(
                tools=tools,
                tenant_id=run.tenant_id,
                agent=run.agent,
                model=agent_model_build(run=run),
                messages=self.messages,
                emit=execution.emit,  # tokens coalesced like a chat turn's
                cancelled=execution.cancelled,
                context=self.context,
            )
        except NotFound:
            raise InferenceError(
                "agent_not_found",
                f"The agent {run.agent!r} is no longer enabled in this workspace.",
            ) from None
        if result.stop_reason == STOP_CANCELLED:
            raise execution.stop_reason or InferenceError("cancelled", result.detail)
        if result.stop_reason != STOP_DONE:
            logger.info("agent run %s stopped: %s", run.id, result.detail)
        if self.documents is not None:
            execution.documents = answer_documents(
                run=run, context=self.documents, answer="".join(execution.text)
            )
        return StreamFinished(
            finish_reason="stop" if result.stop_reason == STOP_DONE else result.stop_reason,
            usage=Usage(
                prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens
            ),
        )


def agent_turn_execute(*, run_id: Any, tenant_id: Any) -> None:
    run_execute(run_id=run_id, tenant_id=tenant_id, producer=AgentTurn())
