"""Chat's part in a tenant's life: cancel its runs when it is suspended, and add its
conversations to the tenant export."""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.utils import timezone

from chat.eventlog import EventLogError, event_log, run_log_key
from chat.models import Conversation, Run
from chat.services.conversations import message_export
from tenants.models import Tenant


def runs_cancel_for_tenant(*, tenant: Tenant, reason: str, **kwargs: Any) -> None:
    """Queued runs end here (their log gets the terminal event, as no worker will
    write it); running ones are stopped by their worker at its next heartbeat."""
    live = Run.objects.filter(tenant=tenant, state__in=[Run.State.QUEUED, Run.State.RUNNING])
    queued = list(live.filter(state=Run.State.QUEUED).values_list("id", flat=True))
    message = f"Cancelled: {reason}"
    live.update(
        state=Run.State.CANCELLED,
        error_code="cancelled",
        error_message=message,
        finished_at=timezone.now(),
    )

    def close_queued_logs() -> None:
        log = event_log()
        for run_id in queued:
            key = run_log_key(tenant_id=tenant.id, run_id=run_id)
            try:
                log.append(
                    key,
                    1,
                    {
                        "type": "run.error",
                        "code": "cancelled",
                        "message": message,
                        "message_id": None,
                    },
                )
            except EventLogError:
                continue  # a worker claimed it first and writes its own end
            log.expire(key, 3600)

    transaction.on_commit(close_queued_logs)


def conversations_export(tenant: Tenant) -> list[dict[str, Any]]:
    conversations = (
        Conversation.objects.filter(tenant=tenant)
        .prefetch_related("messages", "runs")
        .order_by("created_at")
    )
    return [
        {
            "id": str(c.id),
            "user_id": str(c.user_id),
            "title": c.title,
            "created_at": c.created_at.isoformat(),
            "messages": [
                message_export(m) for m in sorted(c.messages.all(), key=lambda m: m.created_at)
            ],
            "runs": [
                {
                    "id": str(r.id),
                    "state": r.state,
                    "model": r.model,
                    "prompt_tokens": r.prompt_tokens,
                    "completion_tokens": r.completion_tokens,
                    "error_code": r.error_code,
                    "created_at": r.created_at.isoformat(),
                }
                for r in sorted(c.runs.all(), key=lambda r: r.created_at)
            ],
        }
        for c in conversations
    ]
