"""Writes to conversations, messages and runs."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from chat.models import Conversation, Message, Run
from chat.selectors import conversation_get
from tenants.access import Actor
from tenants.rls import tenant_scope

logger = logging.getLogger(__name__)


class RunNotQueued(Exception):
    """The run was recorded but no worker could be handed it (the broker is down)."""


def _title_from(content: str) -> str:
    line = " ".join(content.split())
    return line[:80] + ("…" if len(line) > 80 else "")


def chat_send(
    *,
    actor: Actor,
    content: str,
    conversation_id: Any = None,
    model: str = "",
    client_id: str = "",
) -> Run:
    """Record the user's message and queue a run that answers it.

    Writes the user Message and the Run in one transaction and hands the run to a
    worker once that transaction commits. Raises NotFound for a conversation the
    actor cannot see, ValidationError for bad input."""
    if actor.user is None:
        raise ValidationError("Chat needs a person: this API key was created by no member.")
    if not isinstance(content, str) or not content.strip():
        raise ValidationError("The message is empty.")
    if len(content) > settings.PARLEY_MAX_MESSAGE_CHARS:
        raise ValidationError(
            f"The message is {len(content)} characters; the limit is "
            f"{settings.PARLEY_MAX_MESSAGE_CHARS}."
        )

    with transaction.atomic():
        if conversation_id:
            conversation = conversation_get(actor=actor, conversation_id=conversation_id)
            conversation = Conversation.objects.select_for_update().get(pk=conversation.pk)
            # Continue the newest branch: the new message answers the latest message.
            parent = conversation.messages.order_by("-created_at", "-id").first()
        else:
            conversation = Conversation.objects.create(
                tenant=actor.tenant, user=actor.user, title=_title_from(content), model=model
            )
            parent = None
        user_message = Message.objects.create(
            tenant=actor.tenant,
            conversation=conversation,
            parent=parent,
            role=Message.Role.USER,
            content=content,
        )
        run = Run.objects.create(
            tenant=actor.tenant,
            conversation=conversation,
            user=actor.user,
            user_message=user_message,
            model=model or conversation.model,
            client_id=client_id,
        )
        conversation.save(update_fields=["updated_at"])
        run_id, tenant_id = run.id, actor.tenant_id
        transaction.on_commit(lambda: run_enqueue(run_id=run_id, tenant_id=tenant_id))
    return run


def run_enqueue(*, run_id: uuid.UUID, tenant_id: uuid.UUID) -> None:
    """Hand the run to a worker. If that fails, the run is failed with a reason (the
    user's message stays stored) and RunNotQueued tells the caller."""
    from chat.tasks import run_execute_task
    from config.celery import enqueue

    try:
        enqueue(run_execute_task, str(run_id), str(tenant_id))
    except Exception as exc:
        logger.exception("could not enqueue run %s", run_id)
        with tenant_scope(tenant_id=tenant_id):
            Run.objects.filter(id=run_id, state=Run.State.QUEUED).update(
                state=Run.State.FAILED,
                error_code="queue_unavailable",
                error_message=f"The run could not be handed to a worker: {type(exc).__name__}",
                finished_at=timezone.now(),
            )
        raise RunNotQueued(str(run_id)) from exc
