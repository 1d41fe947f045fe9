"""Writes to a run as it executes: the claim, heartbeats, a cancel, and the end with
its answer (by its worker, or by the watchdog when the worker is gone).

No chat task is reachable from here, so the run lifecycle (chat.execution) and the
watchdog use these without an import circle; the writes a client starts (sending,
regenerating) are in chat.services.runs, which hands runs to workers."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from chat.eventlog import event_log, run_log_key
from chat.models import Conversation, Message, Run
from inference.types import InferenceError, StreamFinished
from tenants.rls import tenant_scope

USER_CANCELLED = "Cancelled by the user."


class RunClosed(Exception):
    """The run was ended by someone else (the watchdog, after its heartbeat went stale):
    its worker must not write an end of its own."""


def run_claim(*, run_id: Any) -> Run | None:
    """Move a queued run to running. A run is claimed once, however often it is delivered."""
    now = timezone.now()
    claimed = Run.objects.filter(id=run_id, state=Run.State.QUEUED).update(
        state=Run.State.RUNNING, started_at=now, heartbeat_at=now
    )
    if not claimed:
        return None
    return Run.objects.select_related("conversation", "user_message").get(id=run_id)


def run_heartbeat(run: Run, **fields: Any) -> bool:
    """Record liveness (and any fields); False once the run is no longer running
    (cancelled, e.g. because its tenant was suspended)."""
    with tenant_scope(tenant_id=run.tenant_id):
        return bool(
            Run.objects.filter(id=run.id, state=Run.State.RUNNING).update(
                heartbeat_at=timezone.now(), **fields
            )
        )


def run_cancel_request(*, run: Run) -> None:
    """Stop a run. A queued run ends `cancelled` at once (this writes its whole event
    log); a running one is flagged, next to its event log and on its row, and its
    worker stops at its next check. A finished run is left as it is."""
    key = run_log_key(tenant_id=run.tenant_id, run_id=run.id)
    now = timezone.now()
    cancelled_queued = Run.objects.filter(id=run.id, state=Run.State.QUEUED).update(
        state=Run.State.CANCELLED,
        cancel_requested_at=now,
        finished_at=now,
        error_code="cancelled",
        error_message=USER_CANCELLED,
        last_seq=1,
    )
    if cancelled_queued:
        # No worker will claim it: this is its whole event log.
        log = event_log()
        log.append(
            key,
            1,
            {
                "type": "run.error",
                "code": "cancelled",
                "message": USER_CANCELLED,
                "message_id": None,
            },
        )
        log.expire(key, settings.PARLEY_RUN_LOG_TTL_S)
    elif Run.objects.filter(id=run.id, state=Run.State.RUNNING).update(cancel_requested_at=now):
        event_log().cancel_request(key, settings.PARLEY_RUN_LOG_TTL_S)


def run_close(
    *,
    run: Run,
    text: str,
    steps: list[dict[str, Any]],
    state: str,
    last_seq: int,
    finished: StreamFinished | None = None,
    error: InferenceError | None = None,
    documents: dict[str, Any] | None = None,
) -> Message | None:
    """The worker's end of a run: store the answer (partial text is kept on failure)
    with how it read its `documents`, and close the run; RunClosed if it was closed
    already (the watchdog took it)."""
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
            run=run,
            text=text,
            steps=steps,
            succeeded=state == Run.State.SUCCEEDED,
            documents=documents,
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


def run_answer_keep(
    *, run: Run, message: Message | None, text: str, steps: list[dict[str, Any]], last_seq: int
) -> Message | None:
    """The watchdog's end of a run it took: store what the log shows (`text` and tool
    `steps`) as the answer, or update the `message` stored by an earlier attempt, and
    record the end's sequence number. Call within the run's tenant scope."""
    if message is None:
        message = run_answer_store(run=run, text=text, steps=steps)
    else:
        Message.objects.filter(id=message.id).update(content=text, steps=steps)
    Run.objects.filter(id=run.id).update(assistant_message=message, last_seq=last_seq)
    return message


def run_answer_store(
    *,
    run: Run,
    text: str,
    steps: list[dict[str, Any]] | None = None,
    succeeded: bool = False,
    documents: dict[str, Any] | None = None,
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
        documents=documents or {},
    )
    # The answer extends the branch the client is on, unless it moved elsewhere.
    Conversation.objects.filter(id=run.conversation_id, current_leaf_id=run.user_message_id).update(
        current_leaf=message
    )
    return message
