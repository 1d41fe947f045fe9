"""The admission queue in Redis, changed only by these Lua scripts (see
inference.admission for the queue and the key layout)."""

from __future__ import annotations

import logging
from typing import Any

from inference.admission import Admission, Slot
from inference.limits.redis import NOW

logger = logging.getLogger(__name__)


# The queue's operations as Lua functions, for the scripts below and for the call
# scripts of inference.store.redis. Expects `P` (the key prefix, <prefix>:adm) and
# `now` (Redis' clock, ms: inference.limits.redis.NOW) to be defined first. Leases and
# the lease argument `lease` are in ms.
LIB = """
local RUN, READY, VTC = P .. ':run', P .. ':ready', P .. ':vtc'
local WAITING, OWNER, SEQ = P .. ':waiting', P .. ':owner', P .. ':seq'

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

-- queue a ticket and admit what fits: 1 when it is admitted at once
local function admission_enter(tenant, ticket, capacity, lease)
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
end

-- renew a waiting ticket and admit what fits: 1 admitted, 0 waiting, -1 gone
local function admission_poll(ticket, capacity, lease)
    if redis.call('ZSCORE', WAITING, ticket) then
        redis.call('ZADD', WAITING, now + lease, ticket)
    end
    reclaim()
    admit(capacity, lease)
    if redis.call('ZSCORE', RUN, ticket) then return 1 end
    if redis.call('ZSCORE', WAITING, ticket) then return 0 end
    return -1
end

-- withdraw a ticket, or give back the slot it was just granted
local function admission_leave(ticket, capacity, lease)
    drop(ticket)
    redis.call('ZREM', RUN, ticket)
    redis.call('DEL', P .. ':wake:' .. ticket)
    reclaim()
    admit(capacity, lease)
end

-- charge the tenant's counter (`cost`: the number as text), free the slot, admit
local function admission_finish(slot, tenant, cost, capacity, lease)
    if tonumber(cost) > 0 then
        local counter = redis.call('HINCRBYFLOAT', VTC, tenant, cost)
        if redis.call('ZSCORE', READY, tenant) then redis.call('ZADD', READY, counter, tenant) end
    end
    redis.call('ZREM', RUN, slot)
    redis.call('DEL', P .. ':wake:' .. slot)
    reclaim()
    admit(capacity, lease)
end

-- extend a slot's lease: 1 when it was still held (an expired lease is not revived)
local function admission_renew(slot, lease)
    local expiry = redis.call('ZSCORE', RUN, slot)
    if expiry and tonumber(expiry) > now then
        redis.call('ZADD', RUN, 'XX', now + lease, slot)
        return 1
    end
    return 0
end
"""

_HEAD = NOW + "local P = ARGV[1]\n" + LIB

# ARGV: prefix, tenant, ticket, capacity, lease ms. Returns 1 when admitted at once.
_ENTER = _HEAD + "return admission_enter(ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]))"
# ARGV: prefix, ticket, capacity, lease ms. Returns 1 admitted, 0 waiting, -1 gone.
_POLL = _HEAD + "return admission_poll(ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]))"
# ARGV: prefix, ticket, capacity, lease ms.
_LEAVE = _HEAD + "admission_leave(ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]))\nreturn 1"
# ARGV: prefix, slot, tenant, cost, capacity, lease ms.
_FINISH = (
    _HEAD
    + "admission_finish(ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6]))\n"
    + "return 1"
)
# ARGV: prefix, slot, lease ms. Returns 1 when the slot was still held.
_RENEW = _HEAD + "return admission_renew(ARGV[2], tonumber(ARGV[3]))"


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
    def lease_ms(self) -> int:
        return int(self.lease_ttl_s * 1000)

    def enter(self, *, tenant_id: str, ticket: str, capacity: int) -> bool:
        args: list[str | int] = [self.key, tenant_id, ticket, capacity, self.lease_ms]
        return int(self._enter(args=args)) == 1

    def poll(self, *, ticket: str, capacity: int) -> int:
        return int(self._poll(args=[self.key, ticket, capacity, self.lease_ms]))

    def leave(self, *, ticket: str, capacity: int) -> None:
        self._leave(args=[self.key, ticket, capacity, self.lease_ms])

    def finish(self, slot: Slot) -> None:
        args: list[str | int] = [
            self.key,
            slot.id,
            slot.tenant_id,
            repr(slot.cost),
            slot.capacity,
            self.lease_ms,
        ]
        self._finish(args=args)

    def renew(self, slot_id: str) -> bool:
        alive = int(self._renew(args=[self.key, slot_id, self.lease_ms])) == 1
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
