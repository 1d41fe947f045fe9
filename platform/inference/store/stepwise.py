"""A call's state kept by the process's three stores, one after the other: the limiter
(inference.limits), the admission queue (inference.admission) and the load store
(inference.load). The embedded mode's in-memory stores are kept this way."""

from __future__ import annotations

import asyncio

from django.conf import settings

from inference.admission import admission, admission_timeout
from inference.blocking import blocking
from inference.leases import renewer
from inference.ledger import UsageRow, usage_rows_write
from inference.limits import limiter
from inference.load import LEASE_S, load_board, load_store
from inference.models import Backend
from inference.plan import CallPlan, Settlement
from inference.store import NOTHING, CallStore, Ticket


class StepwiseStore(CallStore):
    def refresh_load(self, rows: list[Backend]) -> None:
        board = load_board()
        if board.stale():
            urls = [row.base_url for row in rows]
            own, store = board.own(), load_store()
            board.update(store.inflight(urls), store.metrics(urls), own)

    def _start(self, plan: CallPlan, ticket: Ticket, backend: str | None) -> None:
        if plan.identity is not None and plan.limits is not None:
            ticket.hold = limiter().acquire(
                identity=plan.identity, limits=plan.limits, estimated_tokens=plan.estimate
            )
        try:
            if ticket.hold is not None:
                ticket.admitted = admission().enter(
                    tenant_id=ticket.tenant, ticket=ticket.id, capacity=ticket.capacity
                )
            if ticket.admitted and backend:
                self.lease(ticket, backend)
        except BaseException:
            self.end(ticket, NOTHING)
            raise
        interval = min(settings.PARLEY_LIMIT_LEASE_TTL_S, LEASE_S) / 3
        ticket.renewal = renewer.add(lambda: ticket.ended or self.renew(ticket), interval)

    def wait_admitted(self, ticket: Ticket, timeout_s: float) -> None:
        admission().wait_turn(
            tenant_id=ticket.tenant, ticket=ticket.id, capacity=ticket.capacity, timeout_s=timeout_s
        )
        ticket.admitted = True

    def lease(self, ticket: Ticket, backend: str) -> None:
        if ticket.backend == backend:
            return
        self._unlease(ticket)
        ticket.count(backend)
        ticket.lease, ticket.backend = load_store().begin(backend), backend

    def _unlease(self, ticket: Ticket) -> None:
        if ticket.backend:
            backend, ticket.backend = ticket.backend, ""
            load_store().end(backend, ticket.lease)

    def end(self, ticket: Ticket, settlement: Settlement, row: UsageRow | None = None) -> None:
        if ticket.ended:
            return
        ticket.ended = True
        renewer.remove(ticket.renewal)
        try:
            if row is not None:
                usage_rows_write([row])
        finally:
            self._release(ticket, settlement)

    def _release(self, ticket: Ticket, settlement: Settlement) -> None:
        try:
            self._unlease(ticket)
            ticket.uncount()
        finally:
            if ticket.hold is not None:
                try:
                    limiter().settle(ticket.hold, used_tokens=settlement.tokens)
                finally:
                    self._leave(ticket, settlement)

    def _leave(self, ticket: Ticket, settlement: Settlement) -> None:
        """Give back the slot (charging the tenant's fairness counter), or the ticket
        of a call that was never admitted."""
        if not ticket.admitted:
            admission().leave(ticket=ticket.id, capacity=ticket.capacity)
            return
        admission().finish(ticket.slot(settlement))

    def renew(self, ticket: Ticket) -> bool:
        alive = True
        if ticket.hold is not None:
            alive = limiter().renew(ticket.hold)
            if ticket.admitted:
                alive = admission().renew(ticket.id) and alive
        backend, lease = ticket.backend, ticket.lease
        if backend:
            load_store().renew(backend, lease)
        return alive

    async def await_admitted(self, ticket: Ticket, timeout_s: float) -> None:
        adm = admission()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (remaining := deadline - loop.time()) > 0:
            # The in-memory queue signals threads only: poll it.
            await asyncio.sleep(min(remaining, adm.poll_s, 0.05))
            admitted = await blocking(
                adm.repoll, tenant_id=ticket.tenant, ticket=ticket.id, capacity=ticket.capacity
            )
            if admitted:
                ticket.admitted = True
                return
        raise admission_timeout(timeout_s)
