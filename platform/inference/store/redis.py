"""What a call holds, in Redis: one script, one round trip, per step of the call.

The scripts are made of the limits' and the admission queue's own Lua functions
(inference.limits.redis, inference.admission.redis) and the load store's keys
(inference.load), so they keep the very state RedisLimiter, RedisAdmission and
RedisLoadStore keep:

- START: the limits checked and recorded (`limits_acquire`), the ticket queued and,
  when the pool has room, admitted (`admission_enter`), the lease on the backend the
  plan picked taken; and the load of every backend read back (calls in flight, scraped
  metrics) for this process's LoadBoard, so that the next call is routed without
  reading it. A refusal takes nothing.
- POLL: a waiting ticket renewed, and admitted when its turn comes (queued again when
  its waiting lease lapsed).
- END: `limits_settle`, `admission_finish` (`admission_leave` for a ticket never
  admitted), the backend's lease given back.
- RENEW: a ticket's leases extended; the process renews all its tickets in one
  pipeline, every third of the shortest lease.
- SNAPSHOT: the load alone, for a process whose LoadBoard went stale.

- MOVE: a lease moved to another backend (a failover).

The sync steps run on a redis-py client of the process; their async twins on the
running event loop's PipelinedRedis (inference.aredis: every step of every call on one
connection, pipelined).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any

from django.conf import settings

from config.redis_clients import async_redis
from inference.admission import RedisAdmission, admission, admission_timeout
from inference.admission.redis import LIB as ADMISSION_LIB
from inference.aredis import PipelinedRedis, Script
from inference.blocking import blocking, completing, single_flight
from inference.leases import renewer
from inference.ledger import UsageRow, usage_rows_write
from inference.ledger_writer import writer as ledger_writer
from inference.limits import RedisLimiter, limiter, month_of
from inference.limits.redis import ACQUIRE_FN, NOW, RENEW_FN, SETTLE_FN
from inference.load import LEASE_S, METRIC_FIELDS, inflight_key, load_board, metrics_key, metrics_of
from inference.models import Backend
from inference.plan import CallPlan, Settlement
from inference.store import CallStore, Ticket
from inference.types import token_count

logger = logging.getLogger(__name__)

# The load of `count` backends: their in-flight sets are KEYS[first ...], their metrics
# hashes the `count` keys after those; `now_s`, the caller's clock (the sets' scores).
# Per backend: its calls in flight (expired leases dropped), then its METRIC_FIELDS.
LOAD_LIB = """
local function load_snapshot(first, count, now_s)
    local out = {}
    for i = 0, count - 1 do
        local inflight = KEYS[first + i]
        redis.call('ZREMRANGEBYSCORE', inflight, '-inf', now_s)
        out[#out + 1] = redis.call('ZCARD', inflight)
        local m = redis.call('HMGET', KEYS[first + count + i], FIELDS)
        for j = 1, #m do out[#out + 1] = m[j] end
    end
    return out
end
""".replace("FIELDS", ", ".join(f"'{field}'" for field in METRIC_FIELDS))

# KEYS: the limits' (nl), then the in-flight sets and metrics hashes of nb backends.
# ARGV: nl, na, admission prefix ('' for no admission), tenant, ticket, capacity,
# admission lease ms, the index of the backend to lease (0: none), lease id, the
# caller's clock (s), the lease's expiry (s), nb, then the limits' na arguments.
# Returns the limits' refusal ({1, ...} or {2}: seed the budget), or {0, admitted, the
# load of the nb backends}.
START = (
    NOW
    + "local P = ARGV[3]\n"
    + ADMISSION_LIB
    + ACQUIRE_FN
    + LOAD_LIB
    + """
local nl, na = tonumber(ARGV[1]), tonumber(ARGV[2])
if nl > 0 then
    local refused = limits_acquire({unpack(KEYS, 1, nl)}, {unpack(ARGV, 13, 12 + na)})
    if refused[1] ~= 0 then return refused end
end
local admitted = 1
if P ~= '' then
    admitted = admission_enter(ARGV[4], ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7]))
end
local lease_at = tonumber(ARGV[8])
if admitted == 1 and lease_at > 0 then
    redis.call('ZADD', KEYS[nl + lease_at], ARGV[11], ARGV[9])
end
local reply = {0, admitted}
local load = load_snapshot(nl + 1, tonumber(ARGV[12]), ARGV[10])
for i = 1, #load do reply[#reply + 1] = load[i] end
return reply
"""
)

# ARGV: admission prefix, tenant, ticket, capacity, lease ms. Returns {admitted, lapsed}.
POLL = (
    NOW
    + "local P = ARGV[1]\n"
    + ADMISSION_LIB
    + """
local state = admission_poll(ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]))
if state == -1 then
    return {admission_enter(ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])), 1}
end
return {state, 0}
"""
)

# KEYS: the limits' settle keys (ns), then the leased backend's in-flight set (if any).
# ARGV: ns, nsa, admission prefix ('' for none), ticket, admitted (1/0), tenant, cost,
# capacity, admission lease ms, lease id ('' for none), then the limits' nsa arguments.
END = (
    NOW
    + "local P = ARGV[3]\n"
    + ADMISSION_LIB
    + SETTLE_FN
    + """
local ns, nsa = tonumber(ARGV[1]), tonumber(ARGV[2])
if ns > 0 then limits_settle({unpack(KEYS, 1, ns)}, {unpack(ARGV, 11, 10 + nsa)}) end
if P ~= '' then
    if ARGV[5] == '1' then
        admission_finish(ARGV[4], ARGV[6], ARGV[7], tonumber(ARGV[8]), tonumber(ARGV[9]))
    else
        admission_leave(ARGV[4], tonumber(ARGV[8]), tonumber(ARGV[9]))
    end
end
if ARGV[10] ~= '' then redis.call('ZREM', KEYS[ns + 1], ARGV[10]) end
return 1
"""
)

# KEYS: the limits' leased sets (nk), then the leased backend's in-flight set (if any).
# ARGV: admission prefix, nk, the limits' 3 renew arguments, slot ('' for none),
# admission lease ms, lease id ('' for none), the lease's expiry (s).
# Returns {limits alive, slot alive}.
RENEW = (
    NOW
    + "local P = ARGV[1]\n"
    + ADMISSION_LIB
    + RENEW_FN
    + """
local nk = tonumber(ARGV[2])
local limits_alive, slot_alive = 1, 1
if nk > 0 and limits_renew({unpack(KEYS, 1, nk)}, {ARGV[3], ARGV[4], ARGV[5]}) < nk then
    limits_alive = 0
end
if ARGV[6] ~= '' then slot_alive = admission_renew(ARGV[6], tonumber(ARGV[7])) end
if ARGV[8] ~= '' then redis.call('ZADD', KEYS[nk + 1], 'XX', ARGV[9], ARGV[8]) end
return {limits_alive, slot_alive}
"""
)

# KEYS: the in-flight sets and metrics hashes of nb backends. ARGV: the caller's clock
# (s), nb.
SNAPSHOT = LOAD_LIB + "return load_snapshot(1, tonumber(ARGV[2]), ARGV[1])"

# KEYS: the in-flight set the lease leaves (or none), the one it goes to. ARGV: the lease
# it leaves ('' for none), the new lease's id, its expiry (s).
MOVE = """
if ARGV[1] ~= '' then redis.call('ZREM', KEYS[1], ARGV[1]) end
redis.call('ZADD', KEYS[#KEYS], ARGV[3], ARGV[2])
return 1
"""

SCRIPTS = {
    "start": START,
    "poll": POLL,
    "end": END,
    "renew": RENEW,
    "snapshot": SNAPSHOT,
    "move": MOVE,
}
ASYNC_SCRIPTS = {name: Script(text) for name, text in SCRIPTS.items()}


class ScriptedStore(CallStore):
    def __init__(self, url: str) -> None:
        import redis

        self.url = url
        self.redis = redis.Redis.from_url(url, decode_responses=True)
        self.scripts = {name: self.redis.register_script(text) for name, text in SCRIPTS.items()}
        self._loops: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, tuple[PipelinedRedis, Any]
        ] = weakref.WeakKeyDictionary()
        self._live: set[Ticket] = set()
        self._live_lock = threading.Lock()
        self._renewal = 0  # the registration with the renewer, while there are tickets

    @property
    def limiter(self) -> RedisLimiter:
        found = limiter()
        assert isinstance(found, RedisLimiter), "the scripted store keeps Redis' limits"
        return found

    @property
    def admission(self) -> RedisAdmission:
        found = admission()
        assert isinstance(found, RedisAdmission), "the scripted store keeps Redis' queue"
        return found

    def _aredis(self) -> tuple[PipelinedRedis, Any]:
        """The running event loop's clients: the steps' (every script pipelined on one
        connection), and redis-py's for the wait of tickets (BLPOP holds a connection
        while it waits)."""
        loop = asyncio.get_running_loop()
        found = self._loops.get(loop)
        if found is None:
            found = self._loops[loop] = (PipelinedRedis(self.url), async_redis(self.url))
        return found

    async def _ascript(self, name: str, keys: list[str], args: list[Any]) -> Any:
        return await self._aredis()[0].evalsha(ASYNC_SCRIPTS[name], keys, args)

    # --- start ------------------------------------------------------------------------

    def _hold(self, plan: CallPlan, ticket: Ticket) -> None:
        if plan.identity is not None and plan.limits is not None:
            ticket.hold = self.limiter.hold_for(
                identity=plan.identity,
                limits=plan.limits,
                estimated_tokens=plan.estimate,
                call_id=ticket.id,
            )

    def _start_call(
        self, plan: CallPlan, ticket: Ticket, backend: str | None
    ) -> tuple[list[str], list[Any], dict[str, int]]:
        keys: list[str] = []
        limit_args: list[Any] = []
        if ticket.hold is not None:
            keys, limit_args = self.limiter.acquire_keys_args(ticket.hold)
        urls = [row.base_url for row in plan.rows]
        lease_at = urls.index(backend) + 1 if backend else 0
        nl = len(keys)
        keys += [inflight_key(url) for url in urls] + [metrics_key(url) for url in urls]
        adm, now = self.admission, time.time()
        args: list[Any] = [
            nl,
            len(limit_args),
            adm.key if ticket.hold is not None else "",
            ticket.tenant,
            ticket.id,
            ticket.capacity,
            adm.lease_ms,
            lease_at,
            ticket.id,
            repr(now),
            repr(now + LEASE_S),
            len(urls),
            *limit_args,
        ]
        # (The call already counts on `backend`: the snapshot will count its lease.)
        return keys, args, load_board().own()

    def _started(
        self, plan: CallPlan, ticket: Ticket, backend: str | None, reply: Any, own: dict
    ) -> bool:
        """START's answer: True once the ticket holds its place (admitted or waiting);
        False when the month's budget counter must be seeded first; LimitExceeded when
        a limit refused the call."""
        if int(reply[0]) != 0:
            assert ticket.hold is not None
            refused = self.limiter.acquire_result(ticket.hold, reply)
            assert refused is not None
            if refused[0] == "seed":
                return False
            raise self.limiter.exceeded(ticket.hold, *refused)
        ticket.admitted = int(reply[1]) == 1
        if backend and ticket.admitted:
            ticket.backend, ticket.lease = backend, ticket.id
        self._board_update(plan.rows, reply[2:], own)
        self._live_add(ticket)
        return True

    def _start(self, plan: CallPlan, ticket: Ticket, backend: str | None) -> None:
        self._hold(plan, ticket)
        for _ in range(3):
            keys, args, own = self._start_call(plan, ticket, backend)
            reply = self.scripts["start"](keys=keys, args=args)
            if self._started(plan, ticket, backend, reply, own):
                return
            assert ticket.hold is not None
            self.limiter.seed_budget(ticket.hold)
        raise RuntimeError("the budget counter could not be seeded")

    async def _astart(self, plan: CallPlan, ticket: Ticket, backend: str | None) -> None:
        self._hold(plan, ticket)
        for _ in range(3):
            keys, args, own = self._start_call(plan, ticket, backend)
            reply = await self._ascript("start", keys, args)
            if self._started(plan, ticket, backend, reply, own):
                return
            assert ticket.hold is not None
            await blocking(self.limiter.seed_budget, ticket.hold)
        raise RuntimeError("the budget counter could not be seeded")

    # --- the load ----------------------------------------------------------------------------

    def _board_update(self, rows: list[Backend], values: Sequence[Any], own: dict) -> None:
        """A snapshot of `rows`' load (LOAD_LIB's answer) into this process's board."""
        step = 1 + len(METRIC_FIELDS)
        inflight, metrics = {}, {}
        for i, row in enumerate(rows):
            inflight[row.base_url] = int(values[i * step])
            found = metrics_of(values[i * step + 1 : (i + 1) * step])
            if found is not None:
                metrics[row.base_url] = found
        load_board().update(inflight, metrics, own)

    def _snapshot_call(self, rows: list[Backend]) -> tuple[list[str], list[Any], dict]:
        urls = [row.base_url for row in rows]
        keys = [inflight_key(url) for url in urls] + [metrics_key(url) for url in urls]
        return keys, [repr(time.time()), len(urls)], load_board().own()

    def refresh_load(self, rows: list[Backend]) -> None:
        if load_board().stale():
            keys, args, own = self._snapshot_call(rows)
            self._board_update(rows, self.scripts["snapshot"](keys=keys, args=args), own)

    async def arefresh_load(self, rows: list[Backend]) -> None:
        async def refresh() -> None:
            keys, args, own = self._snapshot_call(rows)
            self._board_update(rows, await self._ascript("snapshot", keys, args), own)

        if load_board().stale():  # read once for the calls that find it stale meanwhile
            await single_flight(("load", id(self)), refresh)

    # --- admission ------------------------------------------------------------------------

    def _poll_args(self, ticket: Ticket) -> list[Any]:
        adm = self.admission
        return [adm.key, ticket.tenant, ticket.id, ticket.capacity, adm.lease_ms]

    def _polled(self, ticket: Ticket, reply: Any) -> bool:
        if int(reply[1]):
            logger.warning("admission ticket %s lapsed; queueing again", ticket.id)
        ticket.admitted = int(reply[0]) == 1
        return ticket.admitted

    def wait_admitted(self, ticket: Ticket, timeout_s: float) -> None:
        adm = self.admission
        deadline = time.monotonic() + timeout_s
        while (remaining := deadline - time.monotonic()) > 0:
            # BLPOP's timeout 0 would block forever.
            wake = max(0.01, min(remaining, adm.poll_s))
            self.redis.blpop([f"{adm.key}:wake:{ticket.id}"], timeout=wake)
            if self._polled(ticket, self.scripts["poll"](keys=[], args=self._poll_args(ticket))):
                return
        raise admission_timeout(timeout_s)

    async def await_admitted(self, ticket: Ticket, timeout_s: float) -> None:
        adm = self.admission
        waits = self._aredis()[1]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (remaining := deadline - loop.time()) > 0:
            wake = max(0.01, min(remaining, adm.poll_s))
            await waits.blpop([f"{adm.key}:wake:{ticket.id}"], timeout=wake)
            reply = await self._ascript("poll", [], self._poll_args(ticket))
            if self._polled(ticket, reply):
                return
        raise admission_timeout(timeout_s)

    # --- a lease on another backend -----------------------------------------------------

    def _move_call(self, ticket: Ticket, backend: str) -> tuple[list[str], list[Any]]:
        left = ticket.backend
        keys = [inflight_key(left), inflight_key(backend)] if left else [inflight_key(backend)]
        return keys, [ticket.lease if left else "", ticket.id, repr(time.time() + LEASE_S)]

    def _moved(self, ticket: Ticket, backend: str) -> None:
        ticket.count(backend)
        ticket.backend, ticket.lease = backend, ticket.id

    def lease(self, ticket: Ticket, backend: str) -> None:
        if ticket.backend != backend:
            keys, args = self._move_call(ticket, backend)
            self.scripts["move"](keys=keys, args=args)
            self._moved(ticket, backend)

    async def alease(self, ticket: Ticket, backend: str) -> None:
        if ticket.backend != backend:
            keys, args = self._move_call(ticket, backend)
            await completing(self._ascript("move", keys, args))
            self._moved(ticket, backend)

    # --- end ---------------------------------------------------------------------------------

    def _end_call(self, ticket: Ticket, settlement: Settlement) -> tuple[list[str], list[Any]]:
        keys: list[str] = []
        settle_args: list[Any] = []
        if ticket.hold is not None:
            keys, settle_args = self.limiter.settle_keys_args(
                ticket.hold, token_count(settlement.tokens), month_of(self.limiter.clock())
            )
        ns = len(keys)
        if ticket.backend:
            keys.append(inflight_key(ticket.backend))
        adm = self.admission
        args: list[Any] = [
            ns,
            len(settle_args),
            adm.key if ticket.hold is not None else "",
            ticket.id,
            1 if ticket.admitted else 0,
            ticket.tenant,
            repr(ticket.slot(settlement).cost),
            ticket.capacity,
            adm.lease_ms,
            ticket.lease if ticket.backend else "",
            *settle_args,
        ]
        return keys, args

    def _ended(self, ticket: Ticket) -> None:
        with self._live_lock:
            if ticket in self._live:
                self._live.discard(ticket)
                if not self._live:
                    renewer.remove(self._renewal)
        ticket.uncount()
        ticket.backend = ""

    def end(self, ticket: Ticket, settlement: Settlement, row: UsageRow | None = None) -> None:
        if ticket.ended:
            return
        ticket.ended = True
        try:
            if row is not None:
                usage_rows_write([row])
        finally:
            try:
                keys, args = self._end_call(ticket, settlement)
                self.scripts["end"](keys=keys, args=args)
            finally:
                self._ended(ticket)

    async def aend(
        self, ticket: Ticket, settlement: Settlement, row: UsageRow | None = None
    ) -> None:
        async def end() -> None:
            try:
                if row is not None:
                    await ledger_writer().write(row)  # batched with the other calls' rows
            finally:
                try:
                    keys, args = self._end_call(ticket, settlement)
                    await self._ascript("end", keys, args)
                finally:
                    self._ended(ticket)

        if not ticket.ended:
            ticket.ended = True
            await completing(end())

    # --- renewal -----------------------------------------------------------------------

    def _live_add(self, ticket: Ticket) -> None:
        """The ticket holds leases: renewed with the others until it ends (the renewer
        knows this store while it has tickets)."""
        with self._live_lock:
            if not self._live:
                interval = min(settings.PARLEY_LIMIT_LEASE_TTL_S, LEASE_S) / 3
                self._renewal = renewer.add(self.renew_all, interval)
            self._live.add(ticket)

    def _renew_call(self, ticket: Ticket) -> tuple[list[str], list[Any]]:
        keys: list[str] = []
        renew_args: list[Any] = ["", 0, 0]
        if ticket.hold is not None:
            keys, renew_args = self.limiter.renew_keys_args(ticket.hold)
        nk = len(keys)
        backend, lease = ticket.backend, ticket.lease
        if backend:
            keys.append(inflight_key(backend))
        adm = self.admission
        slot = ticket.id if ticket.hold is not None and ticket.admitted else ""
        args = [adm.key, nk, *renew_args, slot, adm.lease_ms]
        args += [lease if backend else "", repr(time.time() + LEASE_S)]
        return keys, args

    def _renewed(self, ticket: Ticket, reply: Any) -> bool:
        if isinstance(reply, Exception):
            logger.warning("renewing call %s failed: %s", ticket.id, reply)
            return False
        limits_alive, slot_alive = (int(v) for v in reply)
        if not limits_alive:
            logger.warning("call %s outlived its lease: its slot was reclaimed", ticket.id)
        if not slot_alive:
            logger.warning("slot %s outlived its lease and was reclaimed", ticket.id)
        return bool(limits_alive and slot_alive)

    def renew(self, ticket: Ticket) -> bool:
        keys, args = self._renew_call(ticket)
        return self._renewed(ticket, self.scripts["renew"](keys=keys, args=args))

    def renew_all(self) -> None:
        """Renew the leases of every call of this process that is still on, in one
        pipeline (the renewer calls this)."""
        with self._live_lock:
            tickets = [t for t in self._live if not t.ended]
        if not tickets:
            return
        pipe = self.redis.pipeline(transaction=False)
        for ticket in tickets:
            keys, args = self._renew_call(ticket)
            self.scripts["renew"](keys=keys, args=args, client=pipe)
        for ticket, reply in zip(tickets, pipe.execute(raise_on_error=False), strict=True):
            self._renewed(ticket, reply)
