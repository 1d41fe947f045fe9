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

The embedded mode keeps the same state in memory (with inference.fairness' own
VirtualTokenCounter), behind the same interface.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

from django.conf import settings

from inference.fairness import INPUT_COST, OUTPUT_COST, VirtualTokenCounter
from inference.leases import renewer
from inference.singleton import process_singleton
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


# --- Redis -----------------------------------------------------------------------------

# Shared by every script: ARGV[1] is the key prefix (<prefix>:adm).
_COMMON = """
local P = ARGV[1]
local RUN, READY, VTC = P .. ':run', P .. ':ready', P .. ':vtc'
local WAITING, OWNER, SEQ = P .. ':waiting', P .. ':owner', P .. ':seq'
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)

-- take a waiting ticket out of the queue; a tenant with no ticket left is not backlogged
local function drop(ticket)
    local tenant = redis.call('HGET', OWNER, ticket)
    redis.call('ZREM', WAITING, ticket)
    redis.call('HDEL', OWNER, ticket)
    if tenant then
        local q = P .. ':q:' .. tenant
        redis.call('ZREM', q, ticket)
        if redis.call('ZCARD', q) == 0 then redis.call('ZREM', READY, tenant) end
    end
end

-- leases of dead processes: slots free up, tickets leave the queue
local function reclaim()
    redis.call('ZREMRANGEBYSCORE', RUN, '-inf', now)
    for _, ticket in ipairs(redis.call('ZRANGEBYSCORE', WAITING, '-inf', now)) do drop(ticket) end
end

-- while there is capacity: the head ticket of the backlogged tenant with the least counter
local function admit(capacity, lease)
    while redis.call('ZCARD', RUN) < capacity do
        local head = redis.call('ZRANGE', READY, 0, 0)
        if #head == 0 then return end
        local first = redis.call('ZRANGE', P .. ':q:' .. head[1], 0, 0)
        if #first == 0 then
            redis.call('ZREM', READY, head[1])
        else
            drop(first[1])
            redis.call('ZADD', RUN, now + lease, first[1])
            local wake = P .. ':wake:' .. first[1]
            redis.call('RPUSH', wake, 1)
            redis.call('PEXPIRE', wake, lease)
        end
    end
end
"""

# ARGV: prefix, tenant, ticket, capacity, lease ms. Returns 1 when admitted at once.
_ENTER = (
    _COMMON
    + """
local tenant, ticket = ARGV[2], ARGV[3]
local capacity, lease = tonumber(ARGV[4]), tonumber(ARGV[5])
reclaim()
if not redis.call('ZSCORE', READY, tenant) then
    -- the lift rule: no credit for the time the tenant was idle
    local counter = tonumber(redis.call('HGET', VTC, tenant) or '0')
    local lowest = redis.call('ZRANGE', READY, 0, 0, 'WITHSCORES')
    if #lowest > 0 and tonumber(lowest[2]) > counter then
        counter = tonumber(lowest[2])
        redis.call('HSET', VTC, tenant, lowest[2])
    end
    redis.call('ZADD', READY, counter, tenant)
end
redis.call('ZADD', P .. ':q:' .. tenant, redis.call('INCR', SEQ), ticket)
redis.call('ZADD', WAITING, now + lease, ticket)
redis.call('HSET', OWNER, ticket, tenant)
admit(capacity, lease)
if redis.call('ZSCORE', RUN, ticket) then return 1 end
return 0
"""
)

# ARGV: prefix, ticket, capacity, lease ms. Returns 1 admitted, 0 waiting, -1 gone.
_POLL = (
    _COMMON
    + """
local ticket, capacity, lease = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
if redis.call('ZSCORE', WAITING, ticket) then redis.call('ZADD', WAITING, now + lease, ticket) end
reclaim()
admit(capacity, lease)
if redis.call('ZSCORE', RUN, ticket) then return 1 end
if redis.call('ZSCORE', WAITING, ticket) then return 0 end
return -1
"""
)

# ARGV: prefix, ticket, capacity, lease ms.
_LEAVE = (
    _COMMON
    + """
local ticket, capacity, lease = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
drop(ticket)
redis.call('ZREM', RUN, ticket)
redis.call('DEL', P .. ':wake:' .. ticket)
reclaim()
admit(capacity, lease)
return 1
"""
)

# ARGV: prefix, slot, tenant, cost, capacity, lease ms.
_FINISH = (
    _COMMON
    + """
local slot, tenant, cost = ARGV[2], ARGV[3], tonumber(ARGV[4])
local capacity, lease = tonumber(ARGV[5]), tonumber(ARGV[6])
if cost > 0 then
    local counter = redis.call('HINCRBYFLOAT', VTC, tenant, ARGV[4])
    if redis.call('ZSCORE', READY, tenant) then redis.call('ZADD', READY, counter, tenant) end
end
redis.call('ZREM', RUN, slot)
redis.call('DEL', P .. ':wake:' .. slot)
reclaim()
admit(capacity, lease)
return 1
"""
)

# ARGV: prefix, slot, lease ms. Returns 1 when the slot was still held.
_RENEW = (
    _COMMON
    + """
local expiry = redis.call('ZSCORE', RUN, ARGV[2])
if expiry and tonumber(expiry) > now then  -- an expired lease is not revived
    redis.call('ZADD', RUN, 'XX', now + tonumber(ARGV[3]), ARGV[2])
    return 1
end
return 0
"""
)


class RedisAdmission(Admission):
    def __init__(self, url: str, *, prefix: str, **kwargs: Any) -> None:
        import redis

        super().__init__(**kwargs)
        self.key = f"{prefix}:adm"
        self.redis = redis.Redis.from_url(url, decode_responses=True)
        self._enter = self.redis.register_script(_ENTER)
        self._poll = self.redis.register_script(_POLL)
        self._leave = self.redis.register_script(_LEAVE)
        self._finish = self.redis.register_script(_FINISH)
        self._renew = self.redis.register_script(_RENEW)

    @property
    def _lease_ms(self) -> int:
        return int(self.lease_ttl_s * 1000)

    def enter(self, *, tenant_id: str, ticket: str, capacity: int) -> bool:
        args: list[str | int] = [self.key, tenant_id, ticket, capacity, self._lease_ms]
        return int(self._enter(args=args)) == 1

    def poll(self, *, ticket: str, capacity: int) -> int:
        return int(self._poll(args=[self.key, ticket, capacity, self._lease_ms]))

    def leave(self, *, ticket: str, capacity: int) -> None:
        self._leave(args=[self.key, ticket, capacity, self._lease_ms])

    def finish(self, slot: Slot) -> None:
        args: list[str | int] = [
            self.key,
            slot.id,
            slot.tenant_id,
            repr(slot.cost),
            slot.capacity,
            self._lease_ms,
        ]
        self._finish(args=args)

    def renew(self, slot_id: str) -> bool:
        alive = int(self._renew(args=[self.key, slot_id, self._lease_ms])) == 1
        if not alive:
            logger.warning("slot %s outlived its lease and was reclaimed", slot_id)
        return alive

    def wait(self, ticket: str, timeout_s: float) -> None:
        # BLPOP's timeout 0 would block forever.
        self.redis.blpop([f"{self.key}:wake:{ticket}"], timeout=max(0.01, timeout_s))

    def counter(self, tenant_id: str) -> float:
        return float(self.redis.hget(f"{self.key}:vtc", tenant_id) or 0.0)

    def waiting(self, tenant_id: str | None = None) -> int:
        key = f"{self.key}:waiting" if tenant_id is None else f"{self.key}:q:{tenant_id}"
        return int(self.redis.zcard(key))

    def inflight(self) -> int:
        seconds, micros = self.redis.time()
        now_ms = seconds * 1000 + micros // 1000
        return int(self.redis.zcount(f"{self.key}:run", f"({now_ms}", "+inf"))


# --- in memory (embedded mode) ---------------------------------------------------------------


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


# --- the process's admission queue ------------------------------------------------------------


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
