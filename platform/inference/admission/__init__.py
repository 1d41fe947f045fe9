"""Fair admission to a saturated pool, across every process: VTC over Redis.

Every LLM call takes a slot before it goes to a backend, and gives it back when it
ends. While the platform's calls in flight are fewer than the pool's capacity (the
pool passes it: PARLEY_BACKEND_MAX_INFLIGHT times its routable backends), a call is
admitted at once. Otherwise it waits with a ticket: first in, first out within its
tenant, and across tenants the Virtual Token Counter of inference.fairness decides
(the backlogged tenant with the least weighted service goes first; a tenant that
becomes backlogged is lifted to the smallest counter among the backlogged; a call
charges its tenant's counter with its prompt and completion tokens when it ends).

    with admission.admitted(tenant_id=t, weight=limits.fairness_weight,
                            capacity=n, timeout_s=60) as slot:
        ... stream ...
        slot.charge(prompt_tokens=p, completion_tokens=c)

A waiter that gives up (timeout: AdmissionTimeout; `cancelled()` true: InferenceError
"cancelled"; any exception) takes its ticket back. Slots and waiting tickets are
leases: a process that dies stops renewing them and they are reclaimed, so a dead
waiter blocks no one and a dead call frees its slot.

Redis keys (a single Redis; the scripts name per-tenant queue keys themselves):

    <prefix>:adm:run          slots in flight: ids scored by lease expiry
    <prefix>:adm:ready        backlogged tenants scored by their counter (ties: by id)
    <prefix>:adm:vtc          hash: tenant -> virtual token counter
    <prefix>:adm:q:<tenant>   the tenant's waiting tickets scored by arrival (FIFO)
    <prefix>:adm:waiting      every waiting ticket scored by lease expiry
    <prefix>:adm:owner        hash: ticket -> tenant
    <prefix>:adm:seq          arrival counter
    <prefix>:adm:wake:<ticket>  pushed when the ticket is admitted (the waiter BLPOPs it)

Redis keeps this state in production, changed only by the Lua scripts of
inference.admission.redis; the embedded mode keeps the same state in memory
(inference.admission.memory, with inference.fairness' own VirtualTokenCounter), behind
the same interface. This module is the API.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

from django.conf import settings

from config.singleton import process_singleton
from inference.fairness import INPUT_COST, OUTPUT_COST
from inference.leases import renewer
from inference.types import InferenceError

logger = logging.getLogger(__name__)

ADMITTED, WAITING, GONE = 1, 0, -1


class AdmissionTimeout(InferenceError):
    """The pool stayed saturated for the whole wait."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__("pool_busy", message, status=503)
        self.retry_after_s = retry_after_s


@dataclass
class Slot:
    """An admitted call's place in the pool. Charge what it used before it ends."""

    id: str
    tenant_id: str
    weight: float
    capacity: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finished: bool = False

    def charge(self, *, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        self.prompt_tokens += max(0, prompt_tokens)
        self.completion_tokens += max(0, completion_tokens)

    @property
    def cost(self) -> float:
        """The weighted service to add to the tenant's counter (as VirtualTokenCounter)."""
        cost = INPUT_COST * self.prompt_tokens + OUTPUT_COST * self.completion_tokens
        return cost / max(self.weight, 1e-6)


class Admission:
    """The admission loop; RedisAdmission and MemoryAdmission keep the queue.

    The primitives (each atomic; capacity is the caller's current pool capacity):
    `enter` queues a ticket and admits what fits, `poll` renews a waiting ticket and
    admits what fits, `leave` withdraws a ticket (or gives back the slot it was just
    granted), `finish` charges the tenant, frees the slot and admits what fits,
    `renew` extends a slot's lease."""

    def __init__(self, *, lease_ttl_s: float, poll_s: float = 0.5) -> None:
        self.lease_ttl_s = lease_ttl_s
        self.poll_s = poll_s

    def enter(self, *, tenant_id: str, ticket: str, capacity: int) -> bool:
        raise NotImplementedError

    def poll(self, *, ticket: str, capacity: int) -> int:
        raise NotImplementedError

    def leave(self, *, ticket: str, capacity: int) -> None:
        raise NotImplementedError

    def finish(self, slot: Slot) -> None:
        raise NotImplementedError

    def renew(self, slot_id: str) -> bool:
        raise NotImplementedError

    def wait(self, ticket: str, timeout_s: float) -> None:
        """Block until the ticket may have been admitted, at most `timeout_s`."""
        raise NotImplementedError

    # introspection (metrics, tests)
    def counter(self, tenant_id: str) -> float:
        raise NotImplementedError

    def waiting(self, tenant_id: str | None = None) -> int:
        raise NotImplementedError

    def inflight(self) -> int:
        raise NotImplementedError

    def repoll(self, *, tenant_id: str, ticket: str, capacity: int) -> bool:
        """Renew a waiting ticket and admit what fits: True once it is admitted. A
        ticket whose waiting lease lapsed (a long pause) queues again."""
        state = self.poll(ticket=ticket, capacity=capacity)
        if state == GONE:
            logger.warning("admission ticket %s lapsed; queueing again", ticket)
            return self.enter(tenant_id=tenant_id, ticket=ticket, capacity=capacity)
        return state == ADMITTED

    def wait_turn(
        self,
        *,
        tenant_id: str,
        ticket: str,
        capacity: int,
        timeout_s: float,
        cancelled: Callable[[], bool] | None = None,
    ) -> None:
        """Block until the `ticket` that entered (and was not admitted at once) is
        admitted: AdmissionTimeout after `timeout_s`, InferenceError("cancelled") when
        `cancelled()` turns true (checked every `poll_s`). The caller leaves on failure."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise admission_timeout(timeout_s)
            if cancelled is not None and cancelled():
                raise InferenceError("cancelled", "The call was cancelled while waiting.")
            self.wait(ticket, min(remaining, self.poll_s))
            if self.repoll(tenant_id=tenant_id, ticket=ticket, capacity=capacity):
                return

    @contextmanager
    def admitted(
        self,
        *,
        tenant_id: Any,
        weight: float,
        capacity: int,
        timeout_s: float,
        cancelled: Callable[[], bool] | None = None,
    ) -> Iterator[Slot]:
        """Hold a slot of the pool for the block; wait for one while it is saturated.
        Raises AdmissionTimeout after `timeout_s`, InferenceError("cancelled") when
        `cancelled()` turns true (checked every `poll_s`)."""
        tenant = str(uuid.UUID(str(tenant_id)))
        capacity = max(0, int(capacity))
        ticket = uuid.uuid4().hex
        try:
            if not self.enter(tenant_id=tenant, ticket=ticket, capacity=capacity):
                self.wait_turn(
                    tenant_id=tenant,
                    ticket=ticket,
                    capacity=capacity,
                    timeout_s=timeout_s,
                    cancelled=cancelled,
                )
        except BaseException:
            self.leave(ticket=ticket, capacity=capacity)
            raise
        slot = Slot(id=ticket, tenant_id=tenant, weight=weight, capacity=capacity)
        token = renewer.add(lambda: slot.finished or self.renew(ticket), self.lease_ttl_s / 3)
        try:
            yield slot
        finally:
            renewer.remove(token)
            slot.finished = True
            self.finish(slot)


def admission_timeout(timeout_s: float) -> AdmissionTimeout:
    return AdmissionTimeout(f"The inference pool is busy: no capacity within {timeout_s:g} s.")


# The queues (they import the API above).
from inference.admission.memory import MemoryAdmission  # noqa: E402
from inference.admission.redis import RedisAdmission  # noqa: E402


@process_singleton
def admission() -> Admission:
    """Redis in production, memory in the embedded mode."""
    ttl = settings.PARLEY_LIMIT_LEASE_TTL_S
    if settings.REDIS_URL is None:
        return MemoryAdmission(lease_ttl_s=ttl)
    return RedisAdmission(settings.REDIS_URL, prefix=settings.PARLEY_REDIS_PREFIX, lease_ttl_s=ttl)


def admitted(
    *,
    tenant_id: Any,
    weight: float,
    capacity: int,
    timeout_s: float,
    cancelled: Callable[[], bool] | None = None,
) -> AbstractContextManager[Slot]:
    """`admission().admitted(...)`: see Admission.admitted."""
    return admission().admitted(
        tenant_id=tenant_id,
        weight=weight,
        capacity=capacity,
        timeout_s=timeout_s,
        cancelled=cancelled,
    )
