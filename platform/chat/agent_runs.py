"""Executing an agent's run on a worker (the `agents` queue).

A run whose conversation has an agent ("<plugin>.<agent>") is answered by the agent
runtime (agents.runtime.agent_run) instead of one model call: the same claim, event log,
heartbeats, cancel and end as a plain chat run (chat.runner), with the agent's tool
calls logged as `tool.start` / `tool.end` between the token events. The agent's
instructions are the system message; its tools are those of the tenant's grant
(agents.selectors.tools_for_run); every model call goes through the inference pool
(agents.pool_model.PoolChatModel).

The stored answer is the concatenation of the logged token deltas, as for chat, so a
client that rebuilds the answer from the log gets the stored message. A limit (steps,
time, tokens) ends the run with `run.done` and the limit as its `finish_reason`, keeping
the text so far; a cancel ends it with `run.error` `cancelled`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from django.conf import settings
from langchain_core.language_models import BaseChatModel

from agents.pool_model import PoolChatModel
from agents.runs import tenant_agent_run
from agents.runtime import STOP_CANCELLED, STOP_DONE
from agents.selectors import tools_for_run
from chat.models import Run
from chat.runner import (
    CANCEL_POLL_S,
    USER_CANCELLED,
    RunEventWriter,
    _cancel_requested,
    _cancellation,
    _heartbeat,
    _Keepalive,
    run_claim,
    run_end,
    run_error,
    thread_messages,
)
from inference.types import InferenceError, StreamFinished, Usage
from tenants.access import NotFound
from tenants.rls import tenant_scope

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


class _CancelWatch:
    """The run's cancel as the agent runtime asks for it (often: between streamed
    chunks and while a tool runs): the flag next to the event log at most every
    CANCEL_POLL_S, the row with each heartbeat interval, which also notices a run
    that was ended elsewhere (its tenant suspended). `reason` says why it stopped."""

    def __init__(self, run: Run, writer: RunEventWriter) -> None:
        self.run = run
        self.writer = writer
        self.reason: InferenceError | None = None
        self._last_check = float("-inf")
        self._last_database = float("-inf")

    def __call__(self) -> bool:
        if self.reason is not None:
            return True
        now = time.monotonic()
        if now - self._last_check < CANCEL_POLL_S:
            return False
        self._last_check = now
        ask_database = now - self._last_database >= settings.PARLEY_RUN_HEARTBEAT_S
        if ask_database:
            self._last_database = now
            if not _heartbeat(self.run):
                self.reason = _cancellation(self.run)
                return True
        if _cancel_requested(self.run, self.writer, ask_database=ask_database):
            self.reason = USER_CANCELLED
            return True
        return False


def _emit(writer: RunEventWriter) -> Any:
    def emit(event: dict[str, Any]) -> None:
        if event["type"] == "token":
            writer.token(event["delta"])  # coalesced like a chat run's tokens
        else:
            writer.append(event)

    return emit


def agent_execute(*, run_id: Any, tenant_id: Any) -> None:
    with tenant_scope(tenant_id=tenant_id):
        run = run_claim(run_id=run_id)
        if run is None:
            logger.info("run %s is not queued (already claimed or gone); skipping", run_id)
            return
        messages = thread_messages(run=run, tool_calls=True)
    writer = RunEventWriter(run)
    cancelled = _CancelWatch(run, writer)
    finished: StreamFinished | None = None
    error: InferenceError | None = None
    keepalive = _Keepalive(run)
    try:
        tools = tools_for_run(tenant_id=run.tenant_id, agent=run.agent)
        result = tenant_agent_run(
            tools=tools,
            tenant_id=run.tenant_id,
            agent=run.agent,
            model=agent_model_build(run=run),
            messages=messages,
            emit=_emit(writer),
            cancelled=cancelled,
        )
        usage = Usage(
            prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens
        )
        if result.stop_reason == STOP_CANCELLED:
            error = cancelled.reason or InferenceError("cancelled", result.detail)
        else:
            reason = "stop" if result.stop_reason == STOP_DONE else result.stop_reason
            finished = StreamFinished(finish_reason=reason, usage=usage)
            if result.stop_reason != STOP_DONE:
                logger.info("agent run %s stopped: %s", run.id, result.detail)
    except NotFound:
        error = InferenceError(
            "agent_not_found", f"The agent {run.agent!r} is no longer enabled in this workspace."
        )
    except Exception as exc:
        error = run_error(run, exc)
    finally:
        keepalive.stop()
    run_end(run, writer, error=error, finished=finished)
