"""The run watchdog: ends the runs nobody else will end.

A worker records a heartbeat on its run every PARLEY_RUN_HEARTBEAT_S. One that was
killed (out of memory, a lost machine, SIGKILL) leaves its run `running` and every
socket attached to it waiting. `runs_reap` (Celery beat every
PARLEY_RUN_WATCHDOG_INTERVAL_S; a thread of `serve` in embedded mode) ends:

- running runs whose heartbeat is older than PARLEY_RUN_STALL_S: `worker_lost`;
- queued runs no worker took within PARLEY_RUN_QUEUE_TIMEOUT_S (the broker lost the
  task): `queue_timeout`;
- runs a tenant suspension cancelled whose worker died before writing their end
  (they keep their `cancelled` reason).

Each run is taken with one conditional UPDATE that also records `last_seq`, so two
watchdogs, or a worker that wakes up, never both end it (the worker's own end checks
the same row, see `chat.services.run_state.run_close`). The partial text is rebuilt from the event
log's token deltas, the source of truth while a run is live, and stored as the
assistant message before the terminal `run.error` is appended with the next sequence
number: attached sockets end exactly where the log does. A stalled worker that comes
back finds its appends refused (out of sequence) and its run closed, and stops
without writing. The log is then trimmed like any finished run's.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db.models import Case, Q, Value, When
from django.utils import timezone

from chat.eventlog import Event, EventLogError, event_log, run_log_key
from chat.models import Message, Run
from chat.protocol import TERMINAL_EVENTS
from chat.services.run_state import run_answer_keep
from chat.steps import tool_steps
from tenants.rls import operator_scope, tenant_scope

logger = logging.getLogger(__name__)

BATCH = 200  # runs ended per pass at most; the next pass takes the rest
APPEND_ATTEMPTS = 20  # a stalled worker may still be appending while the watchdog ends it

WORKER_LOST = "worker_lost"
QUEUE_TIMEOUT = "queue_timeout"


def _stale(cutoff: datetime) -> Q:
    return Q(heartbeat_at__lt=cutoff) | Q(heartbeat_at__isnull=True)


def _stalled(cutoff: datetime) -> Q:
    return Q(state=Run.State.RUNNING, last_seq=0) & _stale(cutoff)


def _unclaimed(cutoff: datetime) -> Q:
    return Q(state=Run.State.QUEUED, created_at__lt=cutoff)


def _orphaned(cutoff: datetime) -> Q:
    # Cancelled while running (tenant suspension), and no end recorded since.
    return Q(state=Run.State.CANCELLED, last_seq=0, started_at__isnull=False) & _stale(cutoff)


def _failed_or_cancelled() -> Case:
    """A run someone asked to cancel ends `cancelled`, whatever stopped it."""
    return Case(
        When(cancel_requested_at__isnull=False, then=Value(Run.State.CANCELLED)),
        default=Value(Run.State.FAILED),
    )


def runs_reap(*, now: datetime | None = None) -> int:
    """End every run whose worker is gone (or that no worker took); the number ended."""
    now = now or timezone.now()
    stall_cutoff = now - timedelta(seconds=settings.PARLEY_RUN_STALL_S)
    queue_cutoff = now - timedelta(seconds=settings.PARLEY_RUN_QUEUE_TIMEOUT_S)
    with operator_scope():  # runs of every tenant
        found = list(
            Run.objects.filter(
                _stalled(stall_cutoff) | _unclaimed(queue_cutoff) | _orphaned(stall_cutoff)
            )
            .order_by("created_at")
            .values_list("id", "tenant_id")[:BATCH]
        )
    reaped = 0
    for run_id, tenant_id in found:
        try:
            with tenant_scope(tenant_id=tenant_id):
                taken = _take(run_id, stall_cutoff=stall_cutoff, queue_cutoff=queue_cutoff)
            if taken is not None:
                _close(taken)
                reaped += 1
        except Exception:
            logger.exception("the watchdog could not end run %s", run_id)
    return reaped


def _take(run_id: Any, *, stall_cutoff: datetime, queue_cutoff: datetime) -> Run | None:
    """Claim the end of one run for this watchdog, or None if it is no longer stuck
    (its worker beat again, finished it, or another watchdog took it)."""
    run = Run.objects.filter(id=run_id).first()
    if run is None:
        return None
    key = run_log_key(tenant_id=run.tenant_id, run_id=run.id)
    # The end goes after the last logged event; `last_seq` is final once it is appended.
    end = _last_seq(event_log().read_sync(key)) + 1
    now = timezone.now()
    stall_s, queue_s = settings.PARLEY_RUN_STALL_S, settings.PARLEY_RUN_QUEUE_TIMEOUT_S
    cases: list[tuple[Q, dict[str, Any]]] = [
        (
            _stalled(stall_cutoff),
            {
                "state": _failed_or_cancelled(),
                "error_code": WORKER_LOST,
                "error_message": (
                    f"The worker generating this answer stopped responding (no heartbeat "
                    f"for {stall_s:g} s); the answer ends here."
                ),
            },
        ),
        (
            _unclaimed(queue_cutoff),
            {
                "state": _failed_or_cancelled(),
                "error_code": QUEUE_TIMEOUT,
                "error_message": (
                    f"No worker took this run within {queue_s:g} s; send the message again."
                ),
            },
        ),
        (_orphaned(stall_cutoff), {}),  # keeps its `cancelled` state and reason
    ]
    taken = 0
    for condition, fields in cases:
        # One UPDATE: whoever changes the row first (a worker, another watchdog) wins.
        taken = Run.objects.filter(condition, id=run.id).update(
            **fields, finished_at=now, last_seq=end
        )
        if taken:
            break
    if not taken:
        return None
    run.refresh_from_db()
    return run


def _close(run: Run) -> None:
    """Store the partial text (and tool calls) and append the terminal event after the
    log's last one."""
    log = event_log()
    key = run_log_key(tenant_id=run.tenant_id, run_id=run.id)
    message: Message | None = None
    try:
        for _ in range(APPEND_ATTEMPTS):
            events = log.read_sync(key)
            if events and events[-1][1].get("type") in TERMINAL_EVENTS:
                logger.warning("run %s: its log has an end already; left as it is", run.id)
                return
            text = "".join(e.get("delta", "") for _, e in events if e.get("type") == "token")
            steps = tool_steps(e for _, e in events)
            end = _last_seq(events) + 1
            with tenant_scope(tenant_id=run.tenant_id):
                message = run_answer_keep(
                    run=run, message=message, text=text, steps=steps, last_seq=end
                )
            try:
                log.append(
                    key,
                    end,
                    {
                        "type": "run.error",
                        "code": run.error_code,
                        "message": run.error_message,
                        "message_id": str(message.id) if message else None,
                    },
                )
            except EventLogError:
                continue  # the stalled worker appended meanwhile: take its events too
            logger.warning(
                "watchdog: run %s of tenant %s ended %s (%s) with %d characters kept at seq %d",
                run.id,
                run.tenant_id,
                run.state,
                run.error_code,
                len(text),
                end,
            )
            return
        logger.error("watchdog: run %s kept growing; its log has no end", run.id)
    finally:
        log.expire(key, settings.PARLEY_RUN_LOG_TTL_S)


def _last_seq(events: list[tuple[int, Event]]) -> int:
    return events[-1][0] if events else 0
