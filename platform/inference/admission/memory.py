"""The admission queue in this process's memory (the embedded mode); waiters are
threads."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from inference.admission import ADMITTED, GONE, WAITING, Admission, Slot
from inference.fairness import VirtualTokenCounter

logger = logging.getLogger(__name__)


class MemoryAdmission(Admission):
    """The same queue in this process's memory; waiters are threads."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._cond = threading.Condition()
        self._weights: dict[str, float] = {}
        self.vtc = VirtualTokenCounter(weight_of=lambda tenant: self._weights.get(tenant, 1.0))
        self._queues: dict[str, dict[str, None]] = {}  # tenant: tickets in arrival order
        self._waiting: dict[str, tuple[str, float]] = {}  # ticket: (tenant, expiry)
        self._run: dict[str, float] = {}  # slot: expiry

    def _drop(self, ticket: str) -> None:
        tenant, _ = self._waiting.pop(ticket, ("", 0.0))
        queue = self._queues.get(tenant)
        if queue is not None:
            queue.pop(ticket, None)
            if not queue:
                del self._queues[tenant]

    def _reclaim(self, now: float) -> None:
        for slot, expiry in list(self._run.items()):
            if expiry <= now:
                del self._run[slot]
        for ticket, (_, expiry) in list(self._waiting.items()):
            if expiry <= now:
                self._drop(ticket)

    def _admit(self, capacity: int, now: float) -> None:
        admitted = False
        while len(self._run) < capacity and self._queues:
            tenant = self.vtc.pick(set(self._queues))
            ticket = next(iter(self._queues[tenant]))
            self._drop(ticket)
            self._run[ticket] = now + self.lease_ttl_s
            admitted = True
        if admitted:
            self._cond.notify_all()

    def enter(self, *, tenant_id: str, ticket: str, capacity: int) -> bool:
        now = time.time()
        with self._cond:
            self._reclaim(now)
            if tenant_id not in self._queues:
                self.vtc.lift(tenant_id, set(self._queues))
            self._queues.setdefault(tenant_id, {})[ticket] = None
            self._waiting[ticket] = (tenant_id, now + self.lease_ttl_s)
            self._admit(capacity, now)
            return ticket in self._run

    def poll(self, *, ticket: str, capacity: int) -> int:
        now = time.time()
        with self._cond:
            if ticket in self._waiting:
                self._waiting[ticket] = (self._waiting[ticket][0], now + self.lease_ttl_s)
            self._reclaim(now)
            self._admit(capacity, now)
            if ticket in self._run:
                return ADMITTED
            return WAITING if ticket in self._waiting else GONE

    def leave(self, *, ticket: str, capacity: int) -> None:
        now = time.time()
        with self._cond:
            self._drop(ticket)
            self._run.pop(ticket, None)
            self._reclaim(now)
            self._admit(capacity, now)

    def finish(self, slot: Slot) -> None:
        now = time.time()
        with self._cond:
            if slot.prompt_tokens or slot.completion_tokens:
                self._weights[slot.tenant_id] = slot.weight
                self.vtc.charge(
                    slot.tenant_id,
                    prompt_tokens=slot.prompt_tokens,
                    completion_tokens=slot.completion_tokens,
                )
            self._run.pop(slot.id, None)
            self._reclaim(now)
            self._admit(slot.capacity, now)

    def renew(self, slot_id: str) -> bool:
        with self._cond:
            if self._run.get(slot_id, 0.0) <= time.time():
                logger.warning("slot %s outlived its lease and was reclaimed", slot_id)
                return False
            self._run[slot_id] = time.time() + self.lease_ttl_s
            return True

    def wait(self, ticket: str, timeout_s: float) -> None:
        with self._cond:
            if ticket in self._waiting:
                self._cond.wait(timeout=timeout_s)

    def counter(self, tenant_id: str) -> float:
        with self._cond:
            return self.vtc.counter(tenant_id)

    def waiting(self, tenant_id: str | None = None) -> int:
        with self._cond:
            if tenant_id is None:
                return len(self._waiting)
            return len(self._queues.get(tenant_id, {}))

    def inflight(self) -> int:
        now = time.time()
        with self._cond:
            return sum(1 for expiry in self._run.values() if expiry > now)
