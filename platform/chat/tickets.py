"""Single-use, short-lived tickets that open a websocket for a browser integration.

A page on an integrator's site cannot send an `Authorization` header with a
websocket, and must never hold a long-lived API key. Its backend asks
`POST /api/v1/ws/tickets` (with its key, or a member's session) for a ticket and
hands it to the page, which connects to `/ws/v1/?ticket=...` within
PARLEY_WS_TICKET_TTL_S seconds. A ticket opens one socket, once; it names the actor
that asked for it and is checked again when redeemed (a key revoked, a member
removed or a tenant suspended since then refuses it). Only a hash of the ticket is
stored.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

from django.conf import settings
from django.core.cache import cache

from tenants.access import Actor, actor_for_user
from tenants.models import ApiKey, User
from tenants.rls import operator_scope, tenant_scope
from tenants.services.api_keys import ApiKeyRefused, api_key_actor

TICKET_PREFIX = "pwt_"


class TicketRefused(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _key(ticket: str) -> str:
    digest = hashlib.sha256(ticket.encode()).hexdigest()
    return f"chat:ws-ticket:{digest}"


def ticket_issue(*, actor: Actor) -> tuple[str, int]:
    """A new ticket for `actor` and its lifetime in seconds."""
    if actor.user is None:
        raise TicketRefused("Chat needs a person: this API key was created by no member.")
    ticket = TICKET_PREFIX + secrets.token_urlsafe(32)
    ttl = settings.PARLEY_WS_TICKET_TTL_S
    cache.set(
        _key(ticket),
        {
            "tenant_id": str(actor.tenant_id),
            "user_id": actor.user.pk,
            "api_key_id": str(actor.api_key.id) if actor.api_key is not None else None,
        },
        ttl,
    )
    return ticket, ttl


def ticket_redeem(ticket: Any) -> Actor:
    """The actor a ticket was issued to; the ticket is spent. Raises TicketRefused."""
    if not isinstance(ticket, str) or not ticket.startswith(TICKET_PREFIX) or len(ticket) > 100:
        raise TicketRefused("Malformed websocket ticket.")
    key = _key(ticket)
    grant = cache.get(key)
    # `add` is atomic (SET NX): of two sockets racing with one ticket, one wins.
    if grant is None or not cache.add(f"{key}:spent", 1, settings.PARLEY_WS_TICKET_TTL_S):
        raise TicketRefused("This websocket ticket is unknown, expired or already used.")
    cache.delete(key)
    if grant["api_key_id"] is not None:
        return _key_actor(grant["api_key_id"])
    with tenant_scope(user_id=grant["user_id"]):
        user = User.objects.filter(pk=grant["user_id"], is_active=True).first()
        actor = actor_for_user(user, tenant_id=grant["tenant_id"]) if user else None
    if actor is None or str(actor.tenant_id) != grant["tenant_id"]:
        raise TicketRefused("The member this ticket was issued to no longer has access.")
    if not actor.tenant.is_active:
        raise TicketRefused(f"{actor.tenant.name} is suspended.")
    return actor


def _key_actor(key_id: str) -> Actor:
    with operator_scope():
        key = ApiKey.objects.select_related("tenant", "created_by").filter(id=key_id).first()
    if key is None:
        raise TicketRefused("The API key this ticket was issued to was deleted.")
    try:
        return api_key_actor(key)
    except ApiKeyRefused as exc:
        raise TicketRefused(exc.message) from None
