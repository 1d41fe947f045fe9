"""Reads of chat data, always scoped by the acting tenant and user.

A conversation of another tenant, or of another user, raises `NotFound`, exactly
like one that does not exist.
"""

from __future__ import annotations

import uuid
from typing import Any

from django.db.models import QuerySet

from chat.models import Conversation, Message, Run
from tenants.access import Actor, NotFound


def _uuid(value: Any) -> uuid.UUID:
    try:
        return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))
    except (ValueError, TypeError, AttributeError):
        raise NotFound from None


def conversation_list(*, actor: Actor) -> QuerySet[Conversation]:
    return Conversation.objects.filter(tenant=actor.tenant, user=actor.user)


def conversation_get(*, actor: Actor, conversation_id: Any) -> Conversation:
    try:
        return conversation_list(actor=actor).get(id=_uuid(conversation_id))
    except Conversation.DoesNotExist:
        raise NotFound from None


def run_get(*, actor: Actor, run_id: Any) -> Run:
    try:
        return Run.objects.get(tenant=actor.tenant, user=actor.user, id=_uuid(run_id))
    except Run.DoesNotExist:
        raise NotFound from None


def message_thread(*, conversation: Conversation, leaf: Message | None = None) -> list[Message]:
    """The messages from the root to `leaf` (default: the newest message), oldest first."""
    messages = {m.id: m for m in conversation.messages.all()}
    if not messages:
        return []
    if leaf is None:
        leaf = max(messages.values(), key=lambda m: (m.created_at, str(m.id)))
    thread: list[Message] = []
    node: Message | None = messages.get(leaf.id, leaf)
    while node is not None and len(thread) <= len(messages):
        thread.append(node)
        node = messages.get(node.parent_id) if node.parent_id else None
    thread.reverse()
    return thread
