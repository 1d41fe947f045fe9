"""Executing a run on a worker: claim it once, stream from the pool, log every
event, persist the answer.

The event log is the source of truth while the run is live: every event gets the
next sequence number, token deltas arriving within PARLEY_TOKEN_COALESCE_MS are
coalesced into one event. The stored assistant message is the concatenation of
the logged deltas, byte for byte, and is written before `run.done` is logged, so
a client that sees `run.done` can read the message back.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from chat.eventlog import EventLogError, event_log, run_log_key
from chat.models import Conversation, Message, Run
from chat.selectors import message_thread
from chat.steps import tool_steps
from chat.titles import title_after_run
from inference import pool
from inference.types import ChatRequest, InferenceError, StreamFinished, StreamStarted, TextDelta
from tenants.rls import tenant_scope

logger = logging.getLogger(__name__)

TERMINAL_EVENTS = ("run.done", "run.error")
CANCEL_POLL_S = 0.2  # how often a streaming run looks for a `run.cancel`


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
        self.tool_events: list[dict[str, Any]] = []  # stored with the answer (chat.steps)

    def _append(self, event: dict[str, Any]) -> int:
        # Counted once the log took it: after a refusal (the watchdog ended the run)
        # every later append is refused too, never slotted in after the end.
        self.log.append(self.key, self.seq + 1, event)
        self.seq += 1
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

    def append(self, event: dict[str, Any]) -> int:
        """Log a non-token event after the token deltas waiting to be flushed."""
        self.flush()
        seq = self._append(event)
        if event.get("type") in ("tool.start", "tool.end"):
            self.tool_events.append(event)
        return seq

    def finish(self, event: dict[str, Any]) -> int:
        return self.append(event)

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
    return [
        {"role": "system", "content": settings.PARLEY_SYSTEM_PROMPT},
        *thread_messages(run=run),
    ]


def thread_messages(*, run: Run, tool_calls: bool = False) -> list[dict[str, Any]]:
    """The conversation's user and assistant messages up to the run's user message.
    With `tool_calls` (an agent's run), an answer's stored tool calls come before its
    text, as the agent made them: an assistant message calling the tools, then each
    tool's result (or error), so the agent knows what its tools returned earlier."""
    out: list[dict[str, Any]] = []
    for message in message_thread(conversation=run.conversation, leaf=run.user_message):
        if message.role not in (Message.Role.USER, Message.Role.ASSISTANT):
            continue
        if tool_calls and message.steps:
            out += _tool_call_messages(message.steps)
        if message.content:
            out.append({"role": message.role, "content": message.content})
    return out


def _tool_call_messages(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    calls = [
        {
            "id": step["call_id"],
            "name": step["name"],
            "args": step["arguments"] if isinstance(step.get("arguments"), dict) else {},
        }
        for step in steps
    ]
    results: list[dict[str, Any]] = []
    for step in steps:
        result = {"role": "tool", "tool_call_id": step["call_id"]}
        if step.get("error"):
            result.update(content=step["error"], status="error")
        else:
            result["content"] = step.get("result") or ""
        results.append(result)
    return [{"role": "assistant", "content": "", "tool_calls": calls}, *results]


def _heartbeat(run: Run, **fields: Any) -> bool:
    """Record liveness (and any fields); False once the run is no longer running
    (cancelled, e.g. because its tenant was suspended)."""
    with tenant_scope(tenant_id=run.tenant_id):
        return bool(
            Run.objects.filter(id=run.id, state=Run.State.RUNNING).update(
                heartbeat_at=timezone.now(), **fields
            )
        )


class RunClosed(Exception):
    """The run was ended by someone else (the watchdog, after its heartbeat went stale):
    its worker must not write an end of its own."""


class _Keepalive:
    """Heartbeats from a thread while the worker waits on the pool (admission to a
    saturated pool, a long prefill) and no stream event comes for the loop to beat on:
    the watchdog must see a stale heartbeat only when the worker is gone."""

    def __init__(self, run: Run) -> None:
        self._run = run
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{run.id}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        from django.db import connection

        try:
            while not self._stop.wait(settings.PARLEY_RUN_HEARTBEAT_S):
                try:
                    if not _heartbeat(self._run):
                        return  # ended elsewhere: the loop notices at its own next beat
                except Exception:
                    logger.warning("heartbeat of run %s failed", self._run.id, exc_info=True)
        finally:
            connection.close()  # this thread's own connection

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def _cancellation(run: Run) -> InferenceError:
    with tenant_scope(tenant_id=run.tenant_id):
        reason = Run.objects.filter(id=run.id).values_list("error_message", flat=True).first()
    return InferenceError("cancelled", reason or "The run was cancelled.")


def _cancel_requested(run: Run, writer: RunEventWriter, *, ask_database: bool) -> bool:
    """`run.cancel` sets a flag next to the event log (polled often, cheaply) and
    `cancel_requested_at` on the row (read with each heartbeat, in case the flag was lost)."""
    if writer.log.cancel_requested(writer.key):
        return True
    if not ask_database:
        return False
    with tenant_scope(tenant_id=run.tenant_id):
        return Run.objects.filter(id=run.id, cancel_requested_at__isnull=False).exists()


USER_CANCELLED = InferenceError("cancelled", "Cancelled by the user.")


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
    last_beat = last_cancel_check = time.monotonic()
    keepalive = _Keepalive(run)
    stream = pool.chat_stream(request)
    try:
        if _cancel_requested(run, writer, ask_database=True):
            error = USER_CANCELLED
        for event in stream if error is None else ():
            alive = True
            if isinstance(event, StreamStarted):
                run.backend, run.model = event.backend, event.model
                alive = _heartbeat(run, backend=run.backend, model=run.model)
            elif isinstance(event, TextDelta):
                writer.token(event.text)
            elif isinstance(event, StreamFinished):
                finished = event
            now = time.monotonic()
            beat = now - last_beat >= settings.PARLEY_RUN_HEARTBEAT_S
            if beat:
                last_beat = now
                alive = _heartbeat(run)
            if not alive:
                error, finished = _cancellation(run), None
                break
            if beat or now - last_cancel_check >= CANCEL_POLL_S:
                last_cancel_check = now
                if _cancel_requested(run, writer, ask_database=beat):
                    error, finished = USER_CANCELLED, None
                    break
    except Exception as exc:
        error = run_error(run, exc)
    finally:
        keepalive.stop()
        stream.close()  # a cancelled run hangs up on the backend, which stops generating
    run_end(run, writer, error=error, finished=finished)


def run_error(run: Run, exc: Exception) -> InferenceError:
    """The error a run ends with for `exc`, raised while it ran (call in the `except`)."""
    if isinstance(exc, InferenceError):
        return exc
    if isinstance(exc, EventLogError):
        # Someone else appended to the log: the watchdog ended this run (see RunClosed).
        logger.warning("run %s: %s", run.id, exc)
        return InferenceError("worker_lost", str(exc))
    logger.exception("run %s failed", run.id)
    return InferenceError("internal_error", f"The run failed: {type(exc).__name__}")


def run_end(
    run: Run,
    writer: RunEventWriter,
    *,
    error: InferenceError | None,
    finished: StreamFinished | None,
) -> None:
    """Store the answer (the logged deltas, byte for byte) and log the run's end:
    `run.done` when it `finished` without `error`, else `run.error`. A run the watchdog
    ended meanwhile keeps that end; a deleted one gets a `run.error` for attached sockets."""
    text = "".join(writer.text)
    steps = tool_steps(writer.tool_events)
    try:
        writer.flush()
        if error is None and finished is not None:
            message = _persist(
                run,
                text,
                steps,
                state=Run.State.SUCCEEDED,
                finished=finished,
                last_seq=writer.seq + 1,
            )
            title_after_run(run=run)
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
            message = _persist(run, text, steps, state=state, error=error, last_seq=writer.seq + 1)
            writer.finish(
                {
                    "type": "run.error",
                    "code": error.code,
                    "message": error.message,
                    "message_id": str(message.id) if message else None,
                }
            )
    except (RunClosed, EventLogError) as exc:
        if _run_deleted(run):
            # Its conversation was deleted mid-run: end the log for attached sockets.
            _end_deleted(writer)
        else:
            # This worker stalled and the watchdog ended the run: that end stands.
            logger.warning(
                "run %s was ended by the watchdog; dropping this worker's end (%s)", run.id, exc
            )
    finally:
        writer.expire()


def _run_deleted(run: Run) -> bool:
    with tenant_scope(tenant_id=run.tenant_id):
        return not Run.objects.filter(id=run.id).exists()


def _end_deleted(writer: RunEventWriter) -> None:
    with contextlib.suppress(EventLogError):  # someone else ended the log already
        writer.finish(
            {
                "type": "run.error",
                "code": "cancelled",
                "message": "The conversation was deleted.",
                "message_id": None,
            }
        )


def _persist(
    run: Run,
    text: str,
    steps: list[dict[str, Any]],
    *,
    state: str,
    last_seq: int,
    finished: StreamFinished | None = None,
    error: InferenceError | None = None,
) -> Message | None:
    """Store the answer (partial text is kept on failure) and close the run; RunClosed
    if it was closed already (the watchdog took it)."""
    with tenant_scope(tenant_id=run.tenant_id), transaction.atomic():
        # Open until an end is recorded (last_seq): running, or cancelled by a tenant
        # suspension (its worker writes the end). The row lock orders this against the
        # watchdog's take, which records last_seq.
        still_open = Run.objects.select_for_update().filter(
            id=run.id, state__in=(Run.State.RUNNING, Run.State.CANCELLED), last_seq=0
        )
        if not still_open.exists():
            raise RunClosed(f"run {run.id} was closed already")
        message = run_answer_store(
            run=run, text=text, steps=steps, succeeded=state == Run.State.SUCCEEDED
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


def run_answer_store(
    *, run: Run, text: str, steps: list[dict[str, Any]] | None = None, succeeded: bool = False
) -> Message | None:
    """The assistant message of a run: its answer with an agent's tool calls (`steps`),
    or what a run that did not succeed produced (none if nothing). Call within the
    run's tenant scope."""
    if not text and not steps and not succeeded:
        return None
    message = Message.objects.create(
        tenant_id=run.tenant_id,
        conversation_id=run.conversation_id,
        parent_id=run.user_message_id,
        role=Message.Role.ASSISTANT,
        content=text,
        steps=steps or [],
    )
    # The answer extends the branch the client is on, unless it moved elsewhere.
    Conversation.objects.filter(id=run.conversation_id, current_leaf_id=run.user_message_id).update(
        current_leaf=message
    )
    return message
