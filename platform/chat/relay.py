"""The one relay of a run's event log, for the websocket (`run.attach`) and the
Server-Sent Events of `GET /api/v1/runs/{id}/events`.

`run_relay` yields the run's frames after a cursor, live, until its terminal event; it
alone decides when the log is gone (`LogTrimmed`) and when nothing more will come.
Each transport only writes what it yields in its own way.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

from channels.db import database_sync_to_async

from chat.eventlog import event_log, run_log_key
from chat.models import Run
from chat.protocol import TERMINAL_EVENTS
from tenants.rls import tenant_scope

RELAY_POLL_S = 15.0  # how long a quiet log is waited on before the run is read again
COALESCE_MAX_CHARS = 16384  # the most text one coalesced token frame carries

Frame = dict[str, Any]


@dataclass(frozen=True)
class LogTrimmed:
    """The run ended and its log was trimmed before the client had every event: the
    stored run (`run`, read now) stands in for the rest."""

    run: Run


async def run_relay(
    run: Run,
    *,
    after: int,
    first: Iterable[tuple[int, dict[str, Any]]] = (),
    coalesce: bool = False,
    poll_s: float = RELAY_POLL_S,
) -> AsyncIterator[Frame | LogTrimmed | None]:
    """The run's frames after `after` (each with `run_id` and `seq`), starting with
    `first` (events already read), then live ones, up to the terminal frame. Yields
    None each time the log stayed quiet for `poll_s` (a transport may keep its
    connection alive), and ends with LogTrimmed when the log is gone, or without a
    word when the run was deleted or has nothing after `after`. With `coalesce`,
    consecutive token events read together share one frame (`first_seq` .. `seq`)."""
    run_id = str(run.id)
    log, key = event_log(), run_log_key(tenant_id=run.tenant_id, run_id=run.id)
    events = list(first)
    while True:
        if not events and run.is_terminal:
            # Ended: its log holds the rest, unless it was trimmed.
            if after >= run.last_seq:
                return
            if await database_sync_to_async(log.last_seq)(key) == 0:
                yield LogTrimmed(run)
                return
        if not events:
            events = await log.read(key, after, poll_s)
        if not events:
            current = await database_sync_to_async(_run_reread)(run)
            if current is None:
                return  # deleted with its conversation
            run = current
            yield None
            continue
        for frame in _coalesced(run_id, events) if coalesce else _frames(run_id, events):
            yield frame
            after = frame["seq"]
            if frame["type"] in TERMINAL_EVENTS:
                return
        events = []


def _run_reread(run: Run) -> Run | None:
    # A relay outlives the request or frame that started it: scope this read itself.
    with tenant_scope(tenant_id=run.tenant_id):
        return Run.objects.filter(id=run.id, tenant_id=run.tenant_id).first()


def _frames(run_id: str, events: list[tuple[int, dict[str, Any]]]) -> list[Frame]:
    return [{**event, "run_id": run_id, "seq": seq} for seq, event in events]


def _coalesced(run_id: str, events: list[tuple[int, dict[str, Any]]]) -> list[Frame]:
    """Consecutive `token` events as one frame: the joined deltas, `first_seq` and `seq`
    (the last event's). A client resuming from that `seq` misses nothing."""
    frames: list[Frame] = []
    pending: list[str] = []
    first = size = 0

    def flush(last: int) -> None:
        nonlocal pending, size
        if pending:
            frame: Frame = {"type": "token", "delta": "".join(pending)}
            frames.append({**frame, "run_id": run_id, "seq": last, "first_seq": first})
            pending, size = [], 0

    last = 0
    for seq, event in events:
        if event.get("type") == "token":
            delta = event.get("delta", "")
            if pending and size + len(delta) > COALESCE_MAX_CHARS:
                flush(last)
            if not pending:
                first = seq
            pending.append(delta)
            size += len(delta)
        else:
            flush(last)
            frames.append({**event, "run_id": run_id, "seq": seq})
        last = seq
    flush(last)
    return frames
