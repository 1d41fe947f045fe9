"""A logging filter that keeps websocket tickets out of the logs.

uvicorn logs every request's path with its query string: HTTP requests on
`uvicorn.access`, websocket handshakes (`"WebSocket /ws/v1/?ticket=pwt_..."`) on
`uvicorn.error`. A ticket is single-use and short-lived, but whoever reads the log
within its lifetime could open the socket first. LOGGING (config.settings.base) puts
this filter on both loggers; uvicorn's own logging setup (the `serve` command) adds
handlers to them and keeps their filters.

Imported while logging is configured, before the apps are loaded: nothing from the
apps here.
"""

from __future__ import annotations

import logging
import re

# The query parameter that carries a ticket, and a ticket's form anywhere else
# (chat.tickets.TICKET_PREFIX, then URL-safe base64).
_TICKET_PARAMETER = re.compile(r"(?<![A-Za-z0-9_])(ticket=)[^&#\s\"']*")
_TICKET = re.compile(r"pwt_[A-Za-z0-9_\-%]+")
REDACTED = "[redacted]"


def ticket_redact(text: str) -> str:
    """`text` without ticket values."""
    text = _TICKET_PARAMETER.sub(r"\1" + REDACTED, text)
    return _TICKET.sub("pwt_" + REDACTED, text)


class TicketRedactFilter(logging.Filter):
    """Rewrites a record's message and arguments without ticket values (the record
    itself, so every handler of the logger sees the redacted text)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = ticket_redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(
                ticket_redact(arg) if isinstance(arg, str) else arg for arg in record.args
            )
        elif isinstance(record.args, dict):
            record.args = {
                key: ticket_redact(value) if isinstance(value, str) else value
                for key, value in record.args.items()
            }
        return True
