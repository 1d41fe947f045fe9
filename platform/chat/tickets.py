"""Single-use, short-lived tickets that open a websocket for a browser integration.

A page on an integrator's site cannot send an `Authorization` header with a
websocket, and must never hold a long-lived API key. Its backend asks
`POST /api/v1/ws/tickets` (with its key, or a member's session) for a ticket and
hands it to the page, which connects to `/ws/v1/?ticket=...` within
PARLEY_WS_TICKET_TTL_S seconds. A ticket opens one socket, once; it names the actor
that asked for it and is checked again when redeemed (a key revoked, a member
removed or a tenant suspended since then refuses it). Only a hash of the ticket is
stored.

`socket_credentials` is the one reading of what a websocket presents: the ASGI router
(config.asgi) exempts a socket from the origin check only when it presents a ticket or
an API key there, and the consumer then authenticates by that and nothing else: a
socket that presents one never falls back to the session cookie, which a page on
another origin could ride.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from django.conf import settings
from django.core.cache import cache
from django.core.exceptions import PermissionDenied

from tenants.access import Actor, actor_for_user, require_scope
from tenants.models import ApiKey, User
from tenants.rls import operator_scope, tenant_scope
from tenants.services.api_keys import ApiKeyRefused, api_key_actor

TICKET_PREFIX = "pwt_"


class TicketRefused(Exception):
    """`forbidden`: the credentials are good but do not allow a socket (a suspended
    tenant, a key without the `chat` scope), as opposed to unknown or spent."""

    def __init__(self, message: str, *, forbidden: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.forbidden = forbidden


@dataclass(frozen=True)
class SocketCredentials:
    """What a websocket handshake presents besides cookies: a ticket from the query
    string, an API key from `Authorization: Bearer`. Either one, when set (even if
    invalid), is the socket's only credential."""

    ticket: str | None = None
    api_key: str | None = None

    @property
    def presented(self) -> bool:
        """True when the socket authenticates by a ticket or a key, never by the session
        cookie: then (and only then) its origin need not be checked."""
        return self.ticket is not None or self.api_key is not None


def socket_credentials(scope: dict[str, Any]) -> SocketCredentials:
    """The ticket and the key a websocket's handshake presents (config.asgi and
    chat.consumers both read them here). Empty values present nothing; a ticket or a
    key given twice is presented, but as "" (which no ticket or key matches)."""
    query = scope.get("query_string", b"").decode("latin1")
    tickets = [v for v in parse_qs(query, keep_blank_values=True).get("ticket", []) if v]
    keys = []
    for name, value in scope.get("headers", []):
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin1").strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                keys.append(token.strip())
    return SocketCredentials(
        ticket=(tickets[0] if len(tickets) == 1 else "") if tickets else None,
        api_key=(keys[0] if len(keys) == 1 else "") if keys else None,
    )


def _key(ticket: str) -> str:
    digest = hashlib.sha256(ticket.encode()).hexdigest()
    return f"chat:ws-ticket:{digest}"


def ticket_issue(*, actor: Actor) -> tuple[str, int]:
    """A new ticket for `actor` and its lifetime in seconds. A key needs the `chat`
    scope (PermissionDenied): a ticket opens a chat socket."""
    require_scope(actor, ApiKey.Scope.CHAT)
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
        raise TicketRefused(f"{actor.tenant.name} is suspended.", forbidden=True)
    return actor


def _key_actor(key_id: str) -> Actor:
    """The key's actor as of now: its current scopes and its creator's current role."""
    with operator_scope():
        key = ApiKey.objects.select_related("tenant", "created_by").filter(id=key_id).first()
    if key is None:
        raise TicketRefused("The API key this ticket was issued to was deleted.")
    try:
        actor = api_key_actor(key)
        require_scope(actor, ApiKey.Scope.CHAT)
    except ApiKeyRefused as exc:
        raise TicketRefused(exc.message, forbidden=exc.forbidden) from None
    except PermissionDenied as exc:
        raise TicketRefused(str(exc), forbidden=True) from None
    return actor
