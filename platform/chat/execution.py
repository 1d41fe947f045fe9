"""The run lifecycle: what every run goes through on its worker, whatever produces
its answer.

    claim → prepare → produce (heartbeat, watch for cancel, append events) → persist → end

`run_execute` claims the run (a conditional update: a second delivery finds nothing to
claim), lets the answer producer read what it needs, keeps the run's heartbeat going
from a thread while the producer waits on the pool, and hands the producer a
RunExecution to stream into. Whatever happens, it then stores the answer and logs the
run's end. Producers implement AnswerProducer: chat.chat_turn.ChatTurn (one streamed
model call) and chat.agent_turn.AgentTurn (an agent's tool loop); a document review
or a code run is one more.

The event log is the source of truth while the run is live: every event gets the
next sequence number, token deltas arriving within PARLEY_TOKEN_COALESCE_MS are
coalesced into one event. The stored assistant message is the concatenation of the
logged deltas, byte for byte, and is written before `run.done` is logged, so a client
that sees `run.done` can read the message back.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any, Protocol

from django.conf import settings

from chat.eventlog import EventLogError, event_log, run_log_key
from chat.models import Run
from chat.services.run_state import (
    USER_CANCELLED,
    RunClosed,
    run_claim,
    run_close,
    run_heartbeat,
)
from chat.steps import tool_steps
from chat.titles import title_after_run
from inference.types import InferenceError, StreamFinished
from tenants.rls import tenant_scope

logger = logging.getLogger(__name__)

CANCEL_POLL_S = 0.2  # how often a producing run looks for a `run.cancel`


class AnswerProducer(Protocol):
    """What differs between runs: how the answer is made."""

    def prepare(self, run: Run) -> None:
        """Read what the answer needs (the prompt), in the run's tenant scope, right
        after the claim."""

    def produce(self, execution: RunExecution) -> StreamFinished:
        """Make the answer: stream it into `execution` (`token`, `emit`), asking
        `execution.cancelled()` often. Return how it finished; raise an InferenceError
        (`execution.raise_if_cancelled()`) to end the run with `run.error`."""
        ...


def run_execute(*, run_id: Any, tenant_id: Any, producer: AnswerProducer) -> None:
    """Execute a queued run with `producer` (the body of a run's Celery task)."""
    with tenant_scope(tenant_id=tenant_id):
        run = run_claim(run_id=run_id)
        if run is None:
            logger.info("run %s is not queued (already claimed or gone); skipping", run_id)
            return
        producer.prepare(run)
    execution = RunExecution(run)
    finished: StreamFinished | None = None
    error: InferenceError | None = None
    keepalive = Keepalive(run)
    try:
        finished = producer.produce(execution)
    except Exception as exc:
        error = run_error(run, exc)
    finally:
        keepalive.stop()
    execution.end(error=error, finished=finished)


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


class RunExecution:
    """One claimed run as its producer sees it: append events, beat, watch for cancel.
    `end` (called by run_execute) persists the answer and logs the end."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.log = event_log()
        self.key = run_log_key(tenant_id=run.tenant_id, run_id=run.id)
        self.seq = 0
        self.text: list[str] = []
        self.tool_events: list[dict[str, Any]] = []  # stored with the answer (chat.steps)
        # An answer over documents: how they were read and its checked quotes
        # (chat.documents), stored with the answer and sent with `run.done`.
        self.documents: dict[str, Any] = {}
        self._pending: list[str] = []
        self._last_flush = 0.0
        self._stop: InferenceError | None = None
        self._last_check = float("-inf")
        self._last_database = float("-inf")

    # --- events -------------------------------------------------------------------

    def token(self, delta: str) -> None:
        """A piece of the answer; coalesced with its neighbours into one `token` event."""
        self._pending.append(delta)
        self.text.append(delta)
        now = time.monotonic()
        if (now - self._last_flush) * 1000 >= settings.PARLEY_TOKEN_COALESCE_MS:
            self.flush(now)

    def append(self, event: dict[str, Any]) -> int:
        """Log a non-token event after the token deltas waiting to be flushed."""
        self.flush()
        seq = self._append(event)
        if event.get("type") in ("tool.start", "tool.end"):
            self.tool_events.append(event)
        return seq

    def emit(self, event: dict[str, Any]) -> None:
        """Log any event: `token` events through `token`, so they are coalesced too."""
        if event["type"] == "token":
            self.token(event["delta"])
        else:
            self.append(event)

    def flush(self, now: float | None = None) -> None:
        if self._pending:
            self._append({"type": "token", "delta": "".join(self._pending)})
            self._pending = []
        self._last_flush = now if now is not None else time.monotonic()

    def _append(self, event: dict[str, Any]) -> int:
        # Counted once the log took it: after a refusal (the watchdog ended the run)
        # every later append is refused too, never slotted in after the end.
        self.log.append(self.key, self.seq + 1, event)
        self.seq += 1
        return self.seq

    # --- liveness and cancel ------------------------------------------------------

    def heartbeat(self, **fields: Any) -> bool:
        """Record liveness (and any `fields` of the run); False once the run was ended
        elsewhere (its tenant suspended), which `cancelled()` then reports."""
        if run_heartbeat(self.run, **fields):
            return True
        self._stop = self._stop or _ended_elsewhere(self.run)
        return False

    def cancelled(self) -> bool:
        """Whether the run must stop; cheap enough to ask between streamed chunks. The
        flag next to the event log is read at most every CANCEL_POLL_S; the row (with
        a heartbeat, which also notices a run ended elsewhere) every heartbeat interval,
        in case the flag was lost. The first call reads both."""
        if self._stop is not None:
            return True
        now = time.monotonic()
        if now - self._last_check < CANCEL_POLL_S:
            return False
        self._last_check = now
        ask_database = now - self._last_database >= settings.PARLEY_RUN_HEARTBEAT_S
        if ask_database:
            self._last_database = now
            if not self.heartbeat():
                return True
        if self._cancel_requested(ask_database=ask_database):
            self._stop = InferenceError("cancelled", USER_CANCELLED)
            return True
        return False

    def raise_if_cancelled(self) -> None:
        """Raise why the run stops (an InferenceError) once `cancelled()` says so."""
        if self.cancelled() and self._stop is not None:
            raise self._stop

    @property
    def stop_reason(self) -> InferenceError | None:
        """Why `cancelled()` said the run must stop (None while it has not)."""
        return self._stop

    def _cancel_requested(self, *, ask_database: bool) -> bool:
        """`run.cancel` sets a flag next to the event log (polled often, cheaply) and
        `cancel_requested_at` on the row (read with each heartbeat)."""
        if self.log.cancel_requested(self.key):
            return True
        if not ask_database:
            return False
        with tenant_scope(tenant_id=self.run.tenant_id):
            return Run.objects.filter(id=self.run.id, cancel_requested_at__isnull=False).exists()

    # --- the end ------------------------------------------------------------------

    def end(self, *, error: InferenceError | None, finished: StreamFinished | None) -> None:
        """Store the answer (the logged deltas, byte for byte) and log the run's end:
        `run.done` when it `finished` without `error`, else `run.error`. A run the
        watchdog ended meanwhile keeps that end; a deleted one gets a `run.error` for
        attached sockets."""
        run = self.run
        text = "".join(self.text)
        steps = tool_steps(self.tool_events)
        try:
            self.flush()
            if error is None and finished is not None:
                message = run_close(
                    run=run,
                    text=text,
                    steps=steps,
                    state=Run.State.SUCCEEDED,
                    finished=finished,
                    last_seq=self.seq + 1,
                    documents=self.documents,
                )
                title_after_run(run=run)
                done: dict[str, Any] = {
                    "type": "run.done",
                    "message_id": str(message.id) if message else None,
                    "finish_reason": finished.finish_reason,
                    "usage": finished.usage.as_dict(),
                }
                if self.documents:
                    done["documents"] = self.documents
                self.append(done)
            else:
                error = error or InferenceError("internal_error", "The stream ended unexpectedly.")
                state = Run.State.CANCELLED if error.code == "cancelled" else Run.State.FAILED
                message = run_close(
                    run=run,
                    text=text,
                    steps=steps,
                    state=state,
                    error=error,
                    last_seq=self.seq + 1,
                    documents=self.documents,
                )
                self.append(
                    {
                        "type": "run.error",
                        "code": error.code,
                        "message": error.message,
                        "message_id": str(message.id) if message else None,
                    }
                )
        except (RunClosed, EventLogError) as exc:
            if _deleted(run):
                # Its conversation was deleted mid-run: end the log for attached sockets.
                with contextlib.suppress(EventLogError):  # someone else ended it already
                    self.append(
                        {
                            "type": "run.error",
                            "code": "cancelled",
                            "message": "The conversation was deleted.",
                            "message_id": None,
                        }
                    )
            else:
                # This worker stalled and the watchdog ended the run: that end stands.
                logger.warning(
                    "run %s was ended by the watchdog; dropping this worker's end (%s)",
                    run.id,
                    exc,
                )
        finally:
            self.log.expire(self.key, settings.PARLEY_RUN_LOG_TTL_S)


def _ended_elsewhere(run: Run) -> InferenceError:
    with tenant_scope(tenant_id=run.tenant_id):
        reason = Run.objects.filter(id=run.id).values_list("error_message", flat=True).first()
    return InferenceError("cancelled", reason or "The run was cancelled.")


def _deleted(run: Run) -> bool:
    with tenant_scope(tenant_id=run.tenant_id):
        return not Run.objects.filter(id=run.id).exists()


class Keepalive:
    """Heartbeats from a thread while the worker waits on the pool (admission to a
    saturated pool, a long prefill) and no stream event comes for the producer to beat
    on: the watchdog must see a stale heartbeat only when the worker is gone."""

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
                    if not run_heartbeat(self._run):
                        return  # ended elsewhere: the producer notices at its next check
                except Exception:
                    logger.warning("heartbeat of run %s failed", self._run.id, exc_info=True)
        finally:
            connection.close()  # this thread's own connection

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
