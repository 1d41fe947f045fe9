"""A plain chat turn: the answer producer that makes one streamed model call through
the inference pool (the run lifecycle around it is chat.execution's)."""

from __future__ import annotations

from typing import Any

from django.conf import settings

from chat.execution import RunExecution, run_execute
from chat.models import Run
from chat.prompts import prompt_build
from inference import pool
from inference.types import ChatRequest, InferenceError, StreamFinished, StreamStarted, TextDelta


class ChatTurn:
    """The answer is the model's completion of the prompt (chat.prompts.prompt_build)."""

    request: ChatRequest

    def prepare(self, run: Run) -> None:
        self.request = ChatRequest(
            messages=prompt_build(run=run),
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
        return finished


def chat_turn_execute(*, run_id: Any, tenant_id: Any) -> None:
    run_execute(run_id=run_id, tenant_id=tenant_id, producer=ChatTurn())
