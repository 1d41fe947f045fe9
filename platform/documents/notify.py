"""Telling the owner's open sockets how a document's ingestion goes: the
`document.updated` frame (docs/asyncapi.yaml), forwarded as it is by the socket's
`frame_forward` handler, the same message the chat services send.

It goes to the owner's `documents_group`, which their browser sockets join, and the
sockets of their API keys that have the `documents` scope (chat.consumers)."""

from __future__ import annotations

import uuid
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

from documents.models import Document


def documents_group(tenant_id: Any, user_id: Any) -> str:
    return f"documents.{uuid.UUID(str(tenant_id))}.{uuid.UUID(str(user_id))}"


def document_frame(document: Document) -> dict[str, Any]:
    frame: dict[str, Any] = {
        "type": "document.updated",
        "document_id": str(document.id),
        "state": document.state,
        "stage": document.stage,
        "done": document.progress_done,
        "total": document.progress_total,
    }
    if document.state == Document.State.FAILED:
        frame["error"] = document.error_message
    return frame


def document_updated_send(document: Document) -> None:
    """Send the document's state to its owner's sockets once the current transaction
    commits (at once outside one)."""
    message = {"type": "frame.forward", "frame": document_frame(document)}
    group = documents_group(document.tenant_id, document.owner_id)

    def send() -> None:
        layer = get_channel_layer()
        if layer is not None:
            async_to_sync(layer.group_send)(group, message)

    transaction.on_commit(send)
