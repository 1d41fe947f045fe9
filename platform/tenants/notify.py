"""Telling open websockets what changed: suspension closes a tenant's sockets, a
revoked key closes the sockets it opened. Group names derive from server-side ids."""

from __future__ import annotations

import uuid
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer


def tenant_group(tenant_id: Any) -> str:
    return f"tenant.{uuid.UUID(str(tenant_id))}"


def api_key_group(key_id: Any) -> str:
    return f"apikey.{uuid.UUID(str(key_id))}"


def user_group(tenant_id: Any, user_id: Any) -> str:
    return f"member.{uuid.UUID(str(tenant_id))}.{uuid.UUID(str(user_id))}"


def _send(group: str, message: dict[str, Any]) -> None:
    layer = get_channel_layer()
    if layer is not None:
        async_to_sync(layer.group_send)(group, message)


def notify_tenant_closed(*, tenant_id: Any, code: str, message: str) -> None:
    """Every socket of the tenant gets an `error` frame with `code` and is closed."""
    _send(tenant_group(tenant_id), {"type": "access.revoked", "code": code, "message": message})


def notify_api_key_revoked(*, key_id: Any) -> None:
    _send(
        api_key_group(key_id),
        {
            "type": "access.revoked",
            "code": "api_key_revoked",
            "message": "The API key of this connection was revoked.",
        },
    )


def notify_member_removed(*, tenant_id: Any, user_id: Any, message: str) -> None:
    _send(
        user_group(tenant_id, user_id),
        {"type": "access.revoked", "code": "access_revoked", "message": message},
    )
