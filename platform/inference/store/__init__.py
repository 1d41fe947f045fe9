"""What a call holds while it runs, taken and given back in a few steps.

A tenant's call holds its place under the limits (inference.limits: window entries,
concurrency slots, the budget reservation) and an admission ticket, then a slot of the
pool (inference.admission); every call holds an in-flight lease on the backend it
streams from (inference.load). Each is a lease that expires unless renewed, so a
process that dies holds nothing for long; the process renews them while the call runs
(inference.leases).

The steps, as a driver of inference.plan takes them (`start` and `end` once each):

- `start(plan, backend)`: limits, admission and, when admitted at once, the lease on
  the backend the plan picked (counted on this process's LoadBoard from the moment it
  is picked: the calls routed meanwhile see it); LimitExceeded when a limit refuses
  (nothing is held);
- `wait_admitted(ticket, timeout_s)`: the turn of a ticket that was not admitted at
  once (AdmissionTimeout);
- `lease(ticket, backend)`: the lease on another backend (a failover, or the first
  pick of a call admitted late), giving back the one it had;
- `end(ticket, settlement, row)`: the call's ledger row written (`row`: None for a
  call that is not booked), then every lease given back, the usage counted against
  the limits and charged to the tenant's fairness counter (the row comes first: a
  month's budget counter is seeded from the ledger);
- `refresh_load(rows)`: this process's view of the load (inference.load.LoadBoard)
  read again when it is stale.

Each step has an async twin for event loops (`astart`, `await_admitted`, `alease`,
`aend`, `arefresh_load`): by default the sync step on a bookkeeping thread; Redis'
store (inference.store.redis) runs each step as one script, and its async twins on the
event loop itself.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from config.singleton import process_singleton
from inference.admission import Slot
from inference.blocking import blocking, completing, taking
from inference.ledger import UsageRow
from inference.limits import Hold
from inference.load import load_board
from inference.models import Backend
from inference.plan import CallPlan, Settlement

NOTHING = Settlement(0, 0, "failed")


@dataclass(eq=False)
class Ticket:
    """What one call holds between `start` and `end`."""

    tenant: str = ""  # "" for a call of no tenant: no limits, no admission
    weight: float = 1.0
    capacity: int = 0
    id: str = field(default_factory=lambda: uuid.uuid4().hex)  # admission ticket, then slot
    hold: Hold | None = None  # the limits' (a tenant's call)
    admitted: bool = False
    backend: str = ""  # the backend leased, and its lease
    lease: str = ""
    renewal: int = 0  # the registration with inference.leases.renewer
    ended: bool = False
    counted: str = ""  # the backend this call counts on this process's LoadBoard

    def count(self, backend: str | None) -> None:
        """Count the call on `backend` in this process's view of the load (instead of
        where it counted): from the moment it is picked, so that the calls routed
        meanwhile see it, until its lease there ends (`uncount`)."""
        if backend == self.counted:
            return
        self.uncount()
        if backend:
            load_board().took(backend)
            self.counted = backend

    def uncount(self) -> None:
        if self.counted:
            load_board().gave(self.counted)
            self.counted = ""

    def slot(self, settlement: Settlement) -> Slot:
        """The call's slot of the pool, charged with what it used (the cost its tenant's
        fairness counter is charged)."""
        slot = Slot(id=self.id, tenant_id=self.tenant, weight=self.weight, capacity=self.capacity)
        slot.charge(
            prompt_tokens=settlement.prompt_tokens, completion_tokens=settlement.completion_tokens
        )
        return slot

    @classmethod
    def of(cls, plan: CallPlan) -> Ticket:
        if plan.identity is None:
            return cls(admitted=True)
        return cls(tenant=plan.identity.tenant_id, weight=plan.weight, capacity=plan.capacity)


class CallStore:
    def refresh_load(self, rows: list[Backend]) -> None:
        raise NotImplementedError

    def start(self, plan: CallPlan, backend: str | None) -> Ticket:
        ticket = Ticket.of(plan)
        ticket.count(backend)
        try:
            self._start(plan, ticket, backend)
        finally:
            if ticket.backend != ticket.counted:  # refused, waiting, or failed
                ticket.uncount()
        return ticket

    def _start(self, plan: CallPlan, ticket: Ticket, backend: str | None) -> None:
        """Take the call's place (limits, admission) and, when admitted at once, its
        lease on `backend` (`ticket.backend`); on failure nothing is held."""
        raise NotImplementedError

    def wait_admitted(self, ticket: Ticket, timeout_s: float) -> None:
        raise NotImplementedError

    def lease(self, ticket: Ticket, backend: str) -> None:
        raise NotImplementedError

    def end(self, ticket: Ticket, settlement: Settlement, row: UsageRow | None = None) -> None:
        raise NotImplementedError

    def renew(self, ticket: Ticket) -> bool:
        """Extend every lease the ticket holds (the renewer calls this)."""
        raise NotImplementedError

    # --- for event loops -----------------------------------------------------------------

    async def arefresh_load(self, rows: list[Backend]) -> None:
        if load_board().stale():
            await blocking(self.refresh_load, rows)

    async def astart(self, plan: CallPlan, backend: str | None) -> Ticket:
        ticket = Ticket.of(plan)
        ticket.count(backend)  # at once: the calls routed after this one see it

        async def start() -> Ticket:
            try:
                await self._astart(plan, ticket, backend)
            finally:
                if ticket.backend != ticket.counted:
                    ticket.uncount()
            return ticket

        async def undo(ticket: Ticket) -> None:
            await self.aend(ticket, NOTHING)

        return await taking(start(), undo)

    async def _astart(self, plan: CallPlan, ticket: Ticket, backend: str | None) -> None:
        await blocking(self._start, plan, ticket, backend)

    async def await_admitted(self, ticket: Ticket, timeout_s: float) -> None:
        raise NotImplementedError

    async def alease(self, ticket: Ticket, backend: str) -> None:
        await completing(blocking(self.lease, ticket, backend))

    async def aend(
        self, ticket: Ticket, settlement: Settlement, row: UsageRow | None = None
    ) -> None:
        await completing(blocking(self.end, ticket, settlement, row))


@process_singleton
def call_store() -> CallStore:
    """Redis in production (each step one script: inference.store.redis), the
    in-memory stores one after the other in the embedded mode (.stepwise)."""
    from django.conf import settings

    if settings.REDIS_URL:
        from inference.store.redis import ScriptedStore

        return ScriptedStore(settings.REDIS_URL)
    from inference.store.stepwise import StepwiseStore

    return StepwiseStore()
