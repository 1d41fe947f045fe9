"""Pushing frames to a member's open sockets (their browser tabs and their API-key
connections) after a change committed: `conversation.updated` and the like.

Only services call this, after their transaction commits; consumers forward the
frame as it is (`frame_forward`)."""

from __future__ import annotations

import uuid
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction


def conversation_group(tenant_id: Any, user_id: Any) -> str:
    return f"chat.{uuid.UUID(str(tenant_id))}.{uuid.UUID(str(user_id))}"


def frame_send(
    *, tenant_id: Any, user_id: Any, frame: dict[str, Any], unless_run: str | None = None
) -> None:
    """Send `frame` to every socket of this member once the current transaction commits;
    with `unless_run`, not to the socket that started that run (it knows)."""
    message = {"type": "frame.forward", "frame": frame}
    if unless_run is not None:
        message["unless_run"] = unless_run

    def send() -> None:
        layer = get_channel_layer()
        if layer is not None:
            async_to_sync(layer.group_send)(conversation_group(tenant_id, user_id), message)

    transaction.on_commit(send)
