"""Executing a run on a worker: claim it once, stream from the pool, log every
event, persist the answer.

The event log is the source of truth while the run is live: every event gets the
next sequence number, token deltas arriving within PARLEY_TOKEN_COALESCE_MS are
coalesced into one event. The stored assistant message is the concatenation of
the logged deltas, byte for byte, and is written before `run.done` is logged, so
a client that sees `run.done` can read the message back.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from chat.eventlog import event_log, run_log_key
from chat.models import Message, Run
from chat.selectors import message_thread
from inference import pool
from inference.types import ChatRequest, InferenceError, StreamFinished, StreamStarted, TextDelta
from tenants.rls import tenant_scope

logger = logging.getLogger(__name__)

TERMINAL_EVENTS = ("run.done", "run.error")


class RunEventWriter:
    """Appends a run's events with gapless sequence numbers, coalescing token deltas."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.log = event_log()
        self.key = run_log_key(tenant_id=run.tenant_id, run_id=run.id)
        self.seq = 0
        self._pending: list[str] = []
        self._last_flush = 0.0
        self.text: list[str] = []

    def _append(self, event: dict[str, Any]) -> int:
        self.seq += 1
        self.log.append(self.key, self.seq, event)
        return self.seq

    def token(self, delta: str) -> None:
        self._pending.append(delta)
        self.text.append(delta)
        now = time.monotonic()
        if (now - self._last_flush) * 1000 >= settings.PARLEY_TOKEN_COALESCE_MS:
            self.flush(now)

    def flush(self, now: float | None = None) -> None:
        if self._pending:
            self._append({"type": "token", "delta": "".join(self._pending)})
            self._pending = []
        self._last_flush = now if now is not None else time.monotonic()

    def finish(self, event: dict[str, Any]) -> int:
        self.flush()
        return self._append(event)

    def expire(self) -> None:
        self.log.expire(self.key, settings.PARLEY_RUN_LOG_TTL_S)


def run_claim(*, run_id: Any) -> Run | None:
    """Move a queued run to running. A run is claimed once, however often it is delivered."""
    now = timezone.now()
    claimed = Run.objects.filter(id=run_id, state=Run.State.QUEUED).update(
        state=Run.State.RUNNING, started_at=now, heartbeat_at=now
    )
    if not claimed:
        return None
    return Run.objects.select_related("conversation", "user_message").get(id=run_id)


def prompt_build(*, run: Run) -> list[dict[str, str]]:
    """System prompt first, then the conversation's thread up to the user's message: a
    stable prefix that later turns share, so follow-ups hit the backend's prefix cache."""
    messages = [{"role": "system", "content": settings.PARLEY_SYSTEM_PROMPT}]
    thread = message_thread(conversation=run.conversation, leaf=run.user_message)
    for message in thread:
        if message.role in (Message.Role.USER, Message.Role.ASSISTANT) and message.content:
            messages.append({"role": message.role, "content": message.content})
    return messages


def _heartbeat(run: Run, **fields: Any) -> bool:
    """Record liveness (and any fields); False once the run is no longer running
    (cancelled, e.g. because its tenant was suspended)."""
    with tenant_scope(tenant_id=run.tenant_id):
        return bool(
            Run.objects.filter(id=run.id, state=Run.State.RUNNING).update(
                heartbeat_at=timezone.now(), **fields
            )
        )


def _cancellation(run: Run) -> InferenceError:
    with tenant_scope(tenant_id=run.tenant_id):
        reason = Run.objects.filter(id=run.id).values_list("error_message", flat=True).first()
    return InferenceError("cancelled", reason or "The run was cancelled.")


def run_execute(*, run_id: Any, tenant_id: Any) -> None:
    with tenant_scope(tenant_id=tenant_id):
        run = run_claim(run_id=run_id)
        if run is None:
            logger.info("run %s is not queued (already claimed or gone); skipping", run_id)
            return
        messages = prompt_build(run=run)
    writer = RunEventWriter(run)
    request = ChatRequest(
        messages=messages,
        model=run.model,
        max_tokens=settings.PARLEY_MAX_TOKENS,
        temperature=settings.PARLEY_TEMPERATURE,
        tenant_id=str(run.tenant_id),
        user_id=str(run.user_id),
        purpose="chat.run",
        reference=str(run.id),
    )
    finished: StreamFinished | None = None
    error: InferenceError | None = None
    last_beat = time.monotonic()
    stream = pool.chat_stream(request)
    try:
        for event in stream:
            alive = True
            if isinstance(event, StreamStarted):
                run.backend, run.model = event.backend, event.model
                alive = _heartbeat(run, backend=run.backend, model=run.model)
            elif isinstance(event, TextDelta):
                writer.token(event.text)
            elif isinstance(event, StreamFinished):
                finished = event
            if time.monotonic() - last_beat >= settings.PARLEY_RUN_HEARTBEAT_S:
                last_beat = time.monotonic()
                alive = _heartbeat(run)
            if not alive:
                error, finished = _cancellation(run), None
                break
    except InferenceError as exc:
        error = exc
    except Exception as exc:
        logger.exception("run %s failed", run.id)
        error = InferenceError("internal_error", f"The run failed: {type(exc).__name__}")
    finally:
        stream.close()  # a cancelled run hangs up on the backend, which stops generating

    writer.flush()
    text = "".join(writer.text)
    try:
        if error is None and finished is not None:
            message = _persist(
                run, text, state=Run.State.SUCCEEDED, finished=finished, last_seq=writer.seq + 1
            )
            writer.finish(
                {
                    "type": "run.done",
                    "message_id": str(message.id) if message else None,
                    "finish_reason": finished.finish_reason,
                    "usage": finished.usage.as_dict(),
                }
            )
        else:
            error = error or InferenceError("internal_error", "The stream ended unexpectedly.")
            state = Run.State.CANCELLED if error.code == "cancelled" else Run.State.FAILED
            message = _persist(run, text, state=state, error=error, last_seq=writer.seq + 1)
            writer.finish(
                {
                    "type": "run.error",
                    "code": error.code,
                    "message": error.message,
                    "message_id": str(message.id) if message else None,
                }
            )
    finally:
        writer.expire()


def _persist(
    run: Run,
    text: str,
    *,
    state: str,
    last_seq: int,
    finished: StreamFinished | None = None,
    error: InferenceError | None = None,
) -> Message | None:
    """Store the answer (partial text is kept on failure) and close the run."""
    with tenant_scope(tenant_id=run.tenant_id), transaction.atomic():
        message = None
        if text or state == Run.State.SUCCEEDED:
            message = Message.objects.create(
                tenant_id=run.tenant_id,
                conversation_id=run.conversation_id,
                parent_id=run.user_message_id,
                role=Message.Role.ASSISTANT,
                content=text,
            )
        fields: dict[str, Any] = {
            "state": state,
            "finished_at": timezone.now(),
            "assistant_message": message,
            "last_seq": last_seq,
        }
        if finished is not None:
            fields.update(
                finish_reason=finished.finish_reason,
                prompt_tokens=finished.usage.prompt_tokens,
                completion_tokens=finished.usage.completion_tokens,
            )
        if error is not None:
            fields.update(error_code=error.code, error_message=error.message[:2000])
        Run.objects.filter(id=run.id).update(**fields)
    return message
