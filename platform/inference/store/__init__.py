"""What a call holds while it runs, taken and given back in a few steps.

A tenant's call holds its place under the limits (inference.limits: window entries,
concurrency slots, the budget reservation) and an admission ticket, then a slot of the
pool (inference.admission); every call holds an in-flight lease on the backend it
streams from (inference.load). Each is a lease that expires unless renewed, so a
process that dies holds nothing for long; one renewal per call (inference.leases)
keeps them while it runs.

The steps, as a driver of inference.plan takes them (`start` and `end` once each):

- `start(plan, backend)`: limits, admission and, when admitted at once, the lease on
  the backend the plan picked; LimitExceeded when a limit refuses (nothing is held);
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
`aend`, `arefresh_load`): by default the sync step on a bookkeeping thread.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from inference.blocking import blocking, completing, taking
from inference.ledger import UsageRow
from inference.limits import Hold
from inference.load import load_board
from inference.models import Backend
from inference.plan import CallPlan, Settlement
from inference.singleton import process_singleton

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

    @classmethod
    def of(cls, plan: CallPlan) -> Ticket:
        if plan.identity is None:
            return cls(admitted=True)
        return cls(tenant=plan.identity.tenant_id, weight=plan.weight, capacity=plan.capacity)


class CallStore:
    def refresh_load(self, rows: list[Backend]) -> None:
        raise NotImplementedError

    def start(self, plan: CallPlan, backend: str | None) -> Ticket:
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
        async def undo(ticket: Ticket) -> None:
            await blocking(self.end, ticket, NOTHING)

        return await taking(blocking(self.start, plan, backend), undo)

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
    from inference.store.stepwise import StepwiseStore

    return StepwiseStore()
