"""A plain chat turn: the answer producer that makes one streamed model call through
the inference pool (the run lifecycle around it is chat.execution's)."""

from __future__ import annotations

from typing import Any

from django.conf import settings

from chat.documents import answer_documents, documents_apply, documents_progress
from chat.execution import RunExecution, run_execute
from chat.models import Run
from chat.prompts import prompt_build
from documents.context import DocumentContext
from inference import pool
from inference.types import ChatRequest, InferenceError, StreamFinished, StreamStarted, TextDelta


class ChatTurn:
    """The answer is the model's completion of the prompt (chat.prompts.prompt_build)."""

    request: ChatRequest
    documents: DocumentContext | None

    def prepare(self, run: Run) -> None:
        messages = prompt_build(run=run)
        self.documents = documents_apply(
            run=run, messages=messages, max_tokens=settings.PARLEY_MAX_TOKENS
        )
        self.request = ChatRequest(
            messages=messages,
            model=run.model,
            max_tokens=settings.PARLEY_MAX_TOKENS,
            temperature=settings.PARLEY_TEMPERATURE,
            tenant_id=str(run.tenant_id),
            user_id=str(run.user_id),
            purpose="chat.run",
            reference=str(run.id),
        )

    def produce(self, execution: RunExecution) -> StreamFinished:
        run = execution.run
        finished: StreamFinished | None = None
        if self.documents is not None:
            execution.append(documents_progress(self.documents))
            execution.documents = self.documents.as_dict()
        stream = pool.chat_stream(self.request)
        try:
            execution.raise_if_cancelled()
            for event in stream:
                if isinstance(event, StreamStarted):
                    run.backend, run.model = event.backend, event.model
                    execution.heartbeat(backend=run.backend, model=run.model)
                elif isinstance(event, TextDelta):
                    execution.token(event.text)
                elif isinstance(event, StreamFinished):
                    finished = event
                execution.raise_if_cancelled()
        finally:
            stream.close()  # a cancelled run hangs up on the backend, which stops generating
        if finished is None:
            raise InferenceError("internal_error", "The stream ended unexpectedly.")
        if self.documents is not None:
            execution.documents = answer_documents(
                run=run, context=self.documents, answer="".join(execution.text)
            )
        return finished


def chat_turn_execute(*, run_id: Any, tenant_id: Any) -> None:
    run_execute(run_id=run_id, tenant_id=tenant_id, producer=ChatTurn())
