"""`POST /api/v1/ws/tickets`: a single-use ticket that opens one websocket (see chat.tickets)."""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.http import HttpRequest
from ninja import Router, Schema, Status

from chat.tickets import TicketRefused, ticket_issue
from tenants.api.auth import actor_of

router = Router(tags=["websocket"])


class TicketOut(Schema):
    ticket: str
    expires_in: int
    url: str


@router.post("/tickets", response={201: TicketOut})
def ticket_create(request: HttpRequest) -> Status:
    """A ticket for `/ws/v1/?ticket=...`, valid once, for `expires_in` seconds. Hand it to
    the browser page that opens the socket; never hand it your API key. A key needs the
    `chat` scope (else 403), and its scopes are checked again when the ticket is used."""
    try:
        ticket, ttl = ticket_issue(actor=actor_of(request))
    except TicketRefused as exc:
        raise ValidationError(exc.message) from None
    return Status(201, TicketOut(ticket=ticket, expires_in=ttl, url=f"/ws/v1/?ticket={ticket}"))
