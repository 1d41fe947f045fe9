"""Limits on LLM calls: requests and tokens per minute, concurrent calls, and the
tenant's monthly token budget, enforced atomically across every web and worker process.

Three scopes are checked for every call: the tenant (limits from its plan, through
`tenants.quotas.limits_for`), the user within the tenant and the API key (limits from
the PARLEY_USER_* and PARLEY_KEY_* settings; unset is unlimited). A call is admitted
only if every check passes, and then it is recorded everywhere at once; a refused call
changes nothing (it uses no one's quota) and raises `LimitExceeded`, which names the
limit and says when to retry.

    with limits.call_guard(identity=CallIdentity(tenant_id, user_id, api_key_id),
                           limits=limits_for(tenant), estimated_tokens=n) as guard:
        ... stream ...
        guard.commit(prompt_tokens=p, completion_tokens=c, model=m, backend=url,
                     outcome="completed", purpose="chat.run", reference=str(run_id))

- Requests and tokens per minute are sliding windows (a log of the last 60 seconds), so
  no 60-second interval ever admits more than the limit. A call counts its estimated
  tokens when admitted; `commit` corrects the entry to what it used.
- Concurrent calls are leases: ids in a sorted set scored by expiry. One daemon thread
  per process renews the leases of its live calls; when a process dies its leases
  expire (PARLEY_LIMIT_LEASE_TTL_S) and the next check reclaims the slots.
- The budget: before a call its estimate is reserved against the month's budget; a
  reservation is admitted while the month's usage plus the outstanding reservations is
  below the budget, so the budget is overshot by at most one call's reservation (given
  that calls use no more than their estimate). `commit` adds the actual usage to the
  month it is committed in (as the ledger's `created_at` does) and drops the
  reservation; leaving the guard without `commit` (a failure) drops it too. A
  reservation is a lease as well: a dead process's reservations are reclaimed. The
  counter of a month is seeded from the ledger (UsageRecord) the first time it is needed,
  so losing Redis loses no usage that was committed.

Production keeps the state in Redis, changed only by the Lua scripts below; the
embedded mode (no REDIS_URL) keeps the same structures in this process's memory.
Key layout (all ids are server-side UUIDs):

    <prefix>:t:<tenant>:rl:req|tok|conc          the tenant's windows and leases
    <prefix>:t:<tenant>:u:<user>:rl:req|tok|conc  a user's, within the tenant
    <prefix>:t:<tenant>:k:<api_key>:rl:req|tok|conc  an API key's
    <prefix>:t:<tenant>:budget:<YYYY-MM>          hash: used, reserved, h:<call> (amounts)
    <prefix>:t:<tenant>:budget:<YYYY-MM>:holds    reservations: call ids scored by expiry
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from django.conf import settings

from inference.leases import renewer
from inference.singleton import process_singleton
from inference.types import MAX_TOKEN_COUNT, InferenceError

if TYPE_CHECKING:
    from inference.models import UsageRecord
    from tenants.quotas import Limits

logger = logging.getLogger(__name__)

WINDOW_S = 60.0
BUDGET = "tenant.monthly_token_budget"
# A concurrent call ends at a time nobody knows: suggest a short wait.
CONCURRENCY_RETRY_S = 1.0


class LimitExceeded(InferenceError):
    """A call refused by a limit. `limit` names it (`tenant.requests_per_minute`,
    `user.tokens_per_minute`, `api_key.concurrent_runs`, `tenant.monthly_token_budget`,
    ...); `retry_after_s` is when trying again can succeed. HTTP answers 429 with
    Retry-After; a run ends with `run.error` whose code is `code`: `budget_exhausted`
    for the monthly budget, `rate_limited` otherwise."""

    def __init__(self, limit: str, message: str, retry_after_s: float) -> None:
        code = "budget_exhausted" if limit == BUDGET else "rate_limited"
        super().__init__(code, message, status=429)
        self.limit = limit
        self.retry_after_s = retry_after_s


def _uuid_text(value: Any) -> str:
    return str(uuid.UUID(str(value)))


@dataclass(frozen=True)
class CallIdentity:
    """Who makes a call: always a tenant; a user and/or an API key when known.
    Ids are normalised to UUID text (they become parts of Redis keys)."""

    tenant_id: Any
    user_id: Any = None
    api_key_id: Any = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "tenant_id", _uuid_text(self.tenant_id))
        for name in ("user_id", "api_key_id"):
            value = getattr(self, name)
            object.__setattr__(self, name, _uuid_text(value) if value else None)


@dataclass(frozen=True)
class RateLimits:
    """One scope's limits; None is unlimited."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    concurrent_runs: int | None = None


def settings_limits(kind: str) -> RateLimits:
    """Per-user (`USER`) or per-API-key (`KEY`) limits from the settings."""
    return RateLimits(
        requests_per_minute=getattr(settings, f"PARLEY_{kind}_REQUESTS_PER_MINUTE", None),
        tokens_per_minute=getattr(settings, f"PARLEY_{kind}_TOKENS_PER_MINUTE", None),
        concurrent_runs=getattr(settings, f"PARLEY_{kind}_CONCURRENT_RUNS", None),
    )


@dataclass(frozen=True)
class Scope:
    name: str  # "tenant", "user", "api_key": the first part of a limit's name
    base: str  # the Redis key stem
    limits: RateLimits

    @property
    def req_key(self) -> str:
        return f"{self.base}:rl:req"

    @property
    def tok_key(self) -> str:
        return f"{self.base}:rl:tok"

    @property
    def conc_key(self) -> str:
        return f"{self.base}:rl:conc"


@dataclass(frozen=True)
class Month:
    label: str  # YYYY-MM, UTC
    start: datetime
    end: datetime  # the next month's start


def month_of(moment: datetime) -> Month:
    moment = moment.astimezone(UTC)
    start = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = (start + timedelta(days=32)).replace(day=1)
    return Month(label=start.strftime("%Y-%m"), start=start, end=end)


@dataclass(frozen=True)
class Hold:
    """What an admitted call holds until it is settled."""

    call_id: str
    identity: CallIdentity
    estimated_tokens: int
    scopes: tuple[Scope, ...]
    month: Month  # the month the budget reservation (if any) was made in
    budget: int | None


def _ledger_month_usage(tenant_id: str, month: Month) -> int:
    from inference.ledger import usage_month_total

    return usage_month_total(tenant_id=tenant_id, start=month.start, end=month.end)


def _describe(limit: str, value: int | None) -> str:
    scope, _, what = limit.partition(".")
    who = {"tenant": "This workspace", "user": "Your user", "api_key": "This API key"}[scope]
    return f"{who} has reached its limit of {value} {what.replace('_', ' ')}"


class Limiter:
    """The interface and the shared logic; RedisLimiter and MemoryLimiter store the state.

    `seed(tenant_id, month)` gives a month's committed usage when its budget counter is
    missing (default: the ledger's sum); `clock` gives the time that chooses the budget
    month. Windows and leases use the store's own clock (Redis' TIME in production)."""

    def __init__(
        self,
        *,
        prefix: str,
        lease_ttl_s: float,
        window_s: float = WINDOW_S,
        seed: Callable[[str, Month], int] = _ledger_month_usage,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.prefix = prefix
        self.lease_ttl_s = lease_ttl_s
        self.window_s = window_s
        self.seed = seed
        self.clock = clock

    # --- keys -----------------------------------------------------------------------

    def scopes(self, identity: CallIdentity, limits: Limits) -> tuple[Scope, ...]:
        tenant = f"{self.prefix}:t:{identity.tenant_id}"
        scopes = [
            Scope(
                "tenant",
                tenant,
                RateLimits(
                    limits.requests_per_minute, limits.tokens_per_minute, limits.concurrent_runs
                ),
            )
        ]
        if identity.user_id:
            scopes.append(Scope("user", f"{tenant}:u:{identity.user_id}", settings_limits("USER")))
        if identity.api_key_id:
            scopes.append(
                Scope("api_key", f"{tenant}:k:{identity.api_key_id}", settings_limits("KEY"))
            )
        return tuple(scopes)

    def budget_key(self, tenant_id: str, month: Month) -> str:
        return f"{self.prefix}:t:{tenant_id}:budget:{month.label}"

    # --- the store: implemented by the subclasses ----------------------------------------

    def _acquire(self, hold: Hold) -> tuple[str, float] | None:
        """Check and record atomically. None: admitted; ("seed", 0): the month's budget
        counter is missing; (limit, retry_after_s): refused, nothing recorded."""
        raise NotImplementedError

    def _seed(self, tenant_id: str, month: Month, used: int) -> None:
        raise NotImplementedError

    def renew(self, hold: Hold) -> bool:
        """Extend the hold's leases; False if any had already expired and was reclaimed."""
        raise NotImplementedError

    def _settle(self, hold: Hold, used_tokens: int, month: Month) -> None:
        raise NotImplementedError

    def budget_state(self, tenant_id: Any, moment: datetime | None = None) -> tuple[int, int]:
        """(used, reserved) tokens of the tenant's month (this month by default)."""
        raise NotImplementedError

    # --- the operations ---------------------------------------------------------------

    def acquire(self, *, identity: CallIdentity, limits: Limits, estimated_tokens: int) -> Hold:
        """Admit a call or raise LimitExceeded. The caller must `settle` the hold."""
        hold = Hold(
            call_id=uuid.uuid4().hex,
            identity=identity,
            estimated_tokens=_token_count(estimated_tokens),
            scopes=self.scopes(identity, limits),
            month=month_of(self.clock()),
            budget=limits.monthly_token_budget,
        )
        for _ in range(3):
            refused = self._acquire(hold)
            if refused is None:
                return hold
            limit, retry_after_s = refused
            if limit != "seed":
                raise self._exceeded(hold, limit, retry_after_s)
            self._seed(identity.tenant_id, hold.month, self.seed(identity.tenant_id, hold.month))
        raise RuntimeError("the budget counter could not be seeded")

    def settle(self, hold: Hold, *, used_tokens: int) -> None:
        """The call is over: free its leases and reservation, count what it used."""
        self._settle(hold, _token_count(used_tokens), month_of(self.clock()))

    def _exceeded(self, hold: Hold, limit: str, retry_after_s: float) -> LimitExceeded:
        if limit == BUDGET:
            retry_after_s = max(1.0, (hold.month.end - self.clock()).total_seconds())
            message = (
                f"This workspace has used its monthly token budget ({hold.budget} tokens); "
                f"it renews on {hold.month.end:%Y-%m-%d} (UTC)."
            )
            return LimitExceeded(limit, message, retry_after_s)
        scope_name, _, what = limit.partition(".")
        scope = next(s for s in hold.scopes if s.name == scope_name)
        if retry_after_s < 0:
            retry_after_s = CONCURRENCY_RETRY_S
        retry_after_s = max(0.001, retry_after_s)
        message = (
            f"{_describe(limit, getattr(scope.limits, what))}; "
            f"retry in {math.ceil(retry_after_s)} s."
        )
        return LimitExceeded(limit, message, retry_after_s)

    @contextmanager
    def call_guard(
        self, *, identity: CallIdentity, limits: Limits, estimated_tokens: int
    ) -> Iterator[CallGuard]:
        """Hold the call's place under every limit for the block (leases renewed in the
        background); `guard.commit(...)` records the usage. Leaving the block without a
        commit (an exception) releases everything and counts no usage."""
        hold = self.acquire(identity=identity, limits=limits, estimated_tokens=estimated_tokens)
        guard = CallGuard(self, hold)
        # (A call settled meanwhile needs no renewal: don't report its lease as lost.)
        token = renewer.add(lambda: guard.settled or self.renew(hold), self.lease_ttl_s / 3)
        guard._renewal = token
        try:
            yield guard
        finally:
            renewer.remove(token)
            if not guard.settled:
                guard.settled = True
                self.settle(hold, used_tokens=0)


@dataclass
class CallGuard:
    limiter: Limiter
    hold: Hold
    settled: bool = False
    _renewal: int = 0

    def commit(
        self,
        *,
        prompt_tokens: int,
        completion_tokens: int,
        model: str,
        outcome: str,
        backend: str = "",
        purpose: str = "",
        reference: str = "",
    ) -> UsageRecord:
        """Record what the call used (a UsageRecord in the tenant's scope) and settle
        its limits and reservation. `outcome`: completed, partial (failed or cancelled
        mid-stream: count what was produced) or failed (nothing produced). Once."""
        from inference.ledger import usage_record_create

        if self.settled:
            raise RuntimeError("this call's usage is already committed")
        self.settled = True
        renewer.remove(self._renewal)
        identity = self.hold.identity
        try:
            return usage_record_create(
                tenant_id=identity.tenant_id,
                user_id=identity.user_id,
                api_key_id=identity.api_key_id,
                model=model,
                backend=backend,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                reserved_tokens=self.hold.estimated_tokens,
                outcome=outcome,
                purpose=purpose,
                reference=reference,
            )
        finally:
            # The tokens were used whether or not the row could be written.
            self.limiter.settle(self.hold, used_tokens=prompt_tokens + completion_tokens)


# --- Redis ----------------------------------------------------------------------------

_NOW = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
"""

# Every check first (only expired entries are dropped), then, if all passed, every
# record. Returns {0}: admitted; {1, scope index, what, retry ms}: refused (retry -1:
# unknown); {2}: the month's budget counter needs seeding.
_ACQUIRE = (
    _NOW
    + """
local id, est = ARGV[1], tonumber(ARGV[2])
local lease, window, n = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local budget, budget_expire_at = tonumber(ARGV[6 + 3 * n]), ARGV[7 + 3 * n]
local bkey, holds = KEYS[3 * n + 1], KEYS[3 * n + 2]

local function amount(member) return tonumber(string.match(member, ':(%d+)$')) end

for i = 0, n - 1 do
    local req, tok, conc = KEYS[3 * i + 1], KEYS[3 * i + 2], KEYS[3 * i + 3]
    local rpm = tonumber(ARGV[6 + 3 * i])
    local tpm, cc = tonumber(ARGV[7 + 3 * i]), tonumber(ARGV[8 + 3 * i])
    if rpm >= 0 then
        redis.call('ZREMRANGEBYSCORE', req, '-inf', now - window)
        local count = redis.call('ZCARD', req)
        if count >= rpm then
            local wait = window
            if rpm > 0 then
                -- the oldest (count - rpm + 1) entries must leave the window
                local entry = redis.call('ZRANGE', req, count - rpm, count - rpm, 'WITHSCORES')
                wait = tonumber(entry[2]) + window - now
            end
            return {1, i, 'requests_per_minute', wait}
        end
    end
    if tpm >= 0 then
        redis.call('ZREMRANGEBYSCORE', tok, '-inf', now - window)
        local entries = redis.call('ZRANGE', tok, 0, -1, 'WITHSCORES')
        local total = 0
        for j = 1, #entries, 2 do total = total + amount(entries[j]) end
        local need = math.min(est, tpm)  -- a call larger than the limit needs an empty window
        if total >= tpm or total + need > tpm then
            local wait, freed = window, 0
            for j = 1, #entries, 2 do
                freed = freed + amount(entries[j])
                if total - freed < tpm and total - freed + need <= tpm then
                    wait = tonumber(entries[j + 1]) + window - now
                    break
                end
            end
            return {1, i, 'tokens_per_minute', wait}
        end
    end
    if cc >= 0 then
        redis.call('ZREMRANGEBYSCORE', conc, '-inf', now)
        if redis.call('ZCARD', conc) >= cc then return {1, i, 'concurrent_runs', -1} end
    end
end
if budget >= 0 then
    if redis.call('HEXISTS', bkey, 'used') == 0 then return {2} end
    -- reservations whose holder died (their lease expired) are given back
    for _, dead in ipairs(redis.call('ZRANGEBYSCORE', holds, '-inf', now)) do
        local held = tonumber(redis.call('HGET', bkey, 'h:' .. dead) or '0')
        redis.call('HINCRBY', bkey, 'reserved', -held)
        redis.call('HDEL', bkey, 'h:' .. dead)
        redis.call('ZREM', holds, dead)
    end
    local used = tonumber(redis.call('HGET', bkey, 'used'))
    local reserved = tonumber(redis.call('HGET', bkey, 'reserved') or '0')
    if used + reserved >= budget then return {1, 0, 'monthly_token_budget', -1} end
end

for i = 0, n - 1 do
    local req, tok, conc = KEYS[3 * i + 1], KEYS[3 * i + 2], KEYS[3 * i + 3]
    if tonumber(ARGV[6 + 3 * i]) >= 0 then
        redis.call('ZADD', req, now, id)
        redis.call('PEXPIRE', req, window)
    end
    if tonumber(ARGV[7 + 3 * i]) >= 0 then
        redis.call('ZADD', tok, now, id .. ':' .. est)
        redis.call('PEXPIRE', tok, window)
    end
    if tonumber(ARGV[8 + 3 * i]) >= 0 then
        redis.call('ZADD', conc, now + lease, id)
        redis.call('PEXPIRE', conc, lease)
    end
end
if budget >= 0 then
    redis.call('HINCRBY', bkey, 'reserved', est)
    redis.call('HSET', bkey, 'h:' .. id, est)
    redis.call('ZADD', holds, now + lease, id)
    redis.call('PEXPIREAT', bkey, budget_expire_at)
    redis.call('PEXPIREAT', holds, budget_expire_at)
end
return {0}
"""
)

# KEYS: the month's budget hash and holds. ARGV: committed usage, expire-at ms.
_SEED = """
redis.call('HSETNX', KEYS[1], 'used', ARGV[1])
redis.call('HSETNX', KEYS[1], 'reserved', 0)
redis.call('PEXPIREAT', KEYS[1], ARGV[2])
return 1
"""

# KEYS: the leased sorted sets (concurrency, then the budget holds last when `holds`).
# ARGV: call id, lease ms, 1 when the last key is the holds set (its expiry is the month's).
_RENEW = (
    _NOW
    + """
local alive = 0
for i, key in ipairs(KEYS) do
    local expiry = redis.call('ZSCORE', key, ARGV[1])
    if expiry and tonumber(expiry) > now then  -- an expired lease is not revived
        redis.call('ZADD', key, 'XX', now + tonumber(ARGV[2]), ARGV[1])
        alive = alive + 1
        if not (i == #KEYS and ARGV[3] == '1') then redis.call('PEXPIRE', key, ARGV[2]) end
    end
end
return alive
"""
)

# KEYS: n token windows, n concurrency sets, the reservation month's budget hash and
# holds, the commit month's budget hash. ARGV: call id, estimate, used, n.
_SETTLE = """
local id, est, used, n = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
for i = 1, n do
    local estimated = id .. ':' .. est
    local at = redis.call('ZSCORE', KEYS[i], estimated)
    if at then
        redis.call('ZREM', KEYS[i], estimated)
        if used > 0 then redis.call('ZADD', KEYS[i], at, id .. ':' .. used) end
    end
    redis.call('ZREM', KEYS[n + i], id)
end
local held_in, holds, used_in = KEYS[2 * n + 1], KEYS[2 * n + 2], KEYS[2 * n + 3]
if redis.call('ZREM', holds, id) == 1 then
    local held = tonumber(redis.call('HGET', held_in, 'h:' .. id) or '0')
    redis.call('HINCRBY', held_in, 'reserved', -held)
    redis.call('HDEL', held_in, 'h:' .. id)
end
-- an unseeded month is seeded from the ledger, which already holds this call
if used > 0 and redis.call('HEXISTS', used_in, 'used') == 1 then
    redis.call('HINCRBY', used_in, 'used', used)
end
return 1
"""


def _token_count(value: int) -> int:
    """One call's tokens as the stores hold them: within [0, MAX_TOKEN_COUNT], so the
    Lua scripts read and write them exactly (a larger number would be written with an
    exponent, which the window entries `<call>:<tokens>` and HINCRBY cannot take)."""
    return min(max(0, int(value)), MAX_TOKEN_COUNT)


def _limit_arg(value: int | None) -> int:
    return -1 if value is None else int(value)


def _expire_at_ms(month: Month) -> int:
    # Kept a week past the month: a call reserved at its end may settle after it.
    return int((month.end + timedelta(days=7)).timestamp() * 1000)


class RedisLimiter(Limiter):
    def __init__(self, url: str, **kwargs: Any) -> None:
        import redis

        super().__init__(**kwargs)
        self.redis = redis.Redis.from_url(url, decode_responses=True)
        self._acquire_script = self.redis.register_script(_ACQUIRE)
        self._seed_script = self.redis.register_script(_SEED)
        self._renew_script = self.redis.register_script(_RENEW)
        self._settle_script = self.redis.register_script(_SETTLE)

    def _acquire(self, hold: Hold) -> tuple[str, float] | None:
        keys: list[str] = []
        args: list[Any] = [
            hold.call_id,
            hold.estimated_tokens,
            int(self.lease_ttl_s * 1000),
            int(self.window_s * 1000),
            len(hold.scopes),
        ]
        for scope in hold.scopes:
            keys += [scope.req_key, scope.tok_key, scope.conc_key]
            args += [
                _limit_arg(scope.limits.requests_per_minute),
                _limit_arg(scope.limits.tokens_per_minute),
                _limit_arg(scope.limits.concurrent_runs),
            ]
        bkey = self.budget_key(hold.identity.tenant_id, hold.month)
        keys += [bkey, f"{bkey}:holds"]
        args += [_limit_arg(hold.budget), _expire_at_ms(hold.month)]
        result = self._acquire_script(keys=keys, args=args)
        if result[0] == 0:
            return None
        if result[0] == 2:
            return ("seed", 0.0)
        _, index, what, wait_ms = result
        if what == "monthly_token_budget":
            return (BUDGET, 0.0)
        wait = float(wait_ms) / 1000 if int(wait_ms) >= 0 else -1.0
        return (f"{hold.scopes[int(index)].name}.{what}", wait)

    def _seed(self, tenant_id: str, month: Month, used: int) -> None:
        self._seed_script(
            keys=[self.budget_key(tenant_id, month)], args=[used, _expire_at_ms(month)]
        )

    def _leased_keys(self, hold: Hold) -> tuple[list[str], bool]:
        keys = [s.conc_key for s in hold.scopes if s.limits.concurrent_runs is not None]
        if hold.budget is None:
            return keys, False
        return [*keys, f"{self.budget_key(hold.identity.tenant_id, hold.month)}:holds"], True

    def renew(self, hold: Hold) -> bool:
        keys, holds = self._leased_keys(hold)
        if not keys:
            return True
        alive = self._renew_script(
            keys=keys, args=[hold.call_id, int(self.lease_ttl_s * 1000), int(holds)]
        )
        if int(alive) < len(keys):
            logger.warning("call %s outlived its lease: its slot was reclaimed", hold.call_id)
            return False
        return True

    def _settle(self, hold: Hold, used_tokens: int, month: Month) -> None:
        held_in = self.budget_key(hold.identity.tenant_id, hold.month)
        keys = [s.tok_key for s in hold.scopes] + [s.conc_key for s in hold.scopes]
        keys += [held_in, f"{held_in}:holds", self.budget_key(hold.identity.tenant_id, month)]
        self._settle_script(
            keys=keys,
            args=[hold.call_id, hold.estimated_tokens, used_tokens, len(hold.scopes)],
        )

    def budget_state(self, tenant_id: Any, moment: datetime | None = None) -> tuple[int, int]:
        key = self.budget_key(_uuid_text(tenant_id), month_of(moment or self.clock()))
        used, reserved = self.redis.hmget(key, ["used", "reserved"])
        return int(used or 0), int(reserved or 0)


# --- in memory (embedded mode) ------------------------------------------------------------


@dataclass
class _Budget:
    used: int | None = None  # None: not seeded yet
    reserved: int = 0
    holds: dict[str, tuple[float, int]] = field(default_factory=dict)  # call: (expiry, amount)


def _window_wait(
    entries: list[tuple[float, int]], limit: int, need: int, now: float, window: float
) -> float | None:
    """None when `need` more fits under `limit` in the window; else the seconds until
    enough of the (time, amount) entries have left it."""
    total = sum(amount for _, amount in entries)
    need = min(need, limit)
    if total < limit and total + need <= limit:
        return None
    freed = 0
    for at, amount in sorted(entries):
        freed += amount
        if total - freed < limit and total - freed + need <= limit:
            return at + window - now
    return window


class MemoryLimiter(Limiter):
    """The same structures in this process's memory, behind one lock."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._lock = threading.Lock()
        self._logs: dict[str, dict[str, tuple[float, int]]] = {}  # key: call: (time, amount)
        self._leases: dict[str, dict[str, float]] = {}  # key: call: expiry
        self._budgets: dict[str, _Budget] = {}

    def _log(self, key: str, now: float) -> dict[str, tuple[float, int]]:
        log = self._logs.setdefault(key, {})
        for call, (at, _) in list(log.items()):
            if at <= now - self.window_s:
                del log[call]
        return log

    def _lease_set(self, key: str, now: float) -> dict[str, float]:
        leases = self._leases.setdefault(key, {})
        for call, expiry in list(leases.items()):
            if expiry <= now:
                del leases[call]
        return leases

    def _acquire(self, hold: Hold) -> tuple[str, float] | None:
        now, est = time.time(), hold.estimated_tokens
        with self._lock:
            for scope in hold.scopes:
                checks = (
                    ("requests_per_minute", scope.req_key, scope.limits.requests_per_minute, 1),
                    ("tokens_per_minute", scope.tok_key, scope.limits.tokens_per_minute, est),
                )
                for what, key, limit, need in checks:
                    if limit is not None:
                        entries = list(self._log(key, now).values())
                        wait = _window_wait(entries, limit, need, now, self.window_s)
                        if wait is not None:
                            return (f"{scope.name}.{what}", wait)
                cc = scope.limits.concurrent_runs
                if cc is not None and len(self._lease_set(scope.conc_key, now)) >= cc:
                    return (f"{scope.name}.concurrent_runs", -1.0)
            budget = None
            if hold.budget is not None:
                budget = self._budgets.setdefault(
                    self.budget_key(hold.identity.tenant_id, hold.month), _Budget()
                )
                if budget.used is None:
                    return ("seed", 0.0)
                for call, (expiry, amount) in list(budget.holds.items()):
                    if expiry <= now:
                        budget.reserved -= amount
                        del budget.holds[call]
                if budget.used + budget.reserved >= hold.budget:
                    return (BUDGET, 0.0)
            for scope in hold.scopes:
                if scope.limits.requests_per_minute is not None:
                    self._log(scope.req_key, now)[hold.call_id] = (now, 1)
                if scope.limits.tokens_per_minute is not None:
                    self._log(scope.tok_key, now)[hold.call_id] = (now, est)
                if scope.limits.concurrent_runs is not None:
                    self._lease_set(scope.conc_key, now)[hold.call_id] = now + self.lease_ttl_s
            if budget is not None:
                budget.reserved += est
                budget.holds[hold.call_id] = (now + self.lease_ttl_s, est)
            return None

    def _seed(self, tenant_id: str, month: Month, used: int) -> None:
        with self._lock:
            budget = self._budgets.setdefault(self.budget_key(tenant_id, month), _Budget())
            if budget.used is None:
                budget.used = used

    def renew(self, hold: Hold) -> bool:
        now, alive = time.time(), True
        with self._lock:
            for scope in hold.scopes:
                if scope.limits.concurrent_runs is not None:
                    leases = self._lease_set(scope.conc_key, now)
                    alive = alive and hold.call_id in leases
                    if hold.call_id in leases:
                        leases[hold.call_id] = now + self.lease_ttl_s
            if hold.budget is not None:
                budget = self._budgets.get(self.budget_key(hold.identity.tenant_id, hold.month))
                held = budget.holds.get(hold.call_id) if budget else None
                if held is not None and held[0] <= now:
                    held = None  # an expired lease is not revived
                alive = alive and held is not None
                if budget is not None and held is not None:
                    budget.holds[hold.call_id] = (now + self.lease_ttl_s, held[1])
        if not alive:
            logger.warning("call %s outlived its lease: its slot was reclaimed", hold.call_id)
        return alive

    def _settle(self, hold: Hold, used_tokens: int, month: Month) -> None:
        with self._lock:
            for scope in hold.scopes:
                log = self._logs.get(scope.tok_key, {})
                if hold.call_id in log:
                    at, _ = log.pop(hold.call_id)
                    if used_tokens > 0:
                        log[hold.call_id] = (at, used_tokens)
                self._leases.get(scope.conc_key, {}).pop(hold.call_id, None)
            tenant = hold.identity.tenant_id
            held_in = self._budgets.get(self.budget_key(tenant, hold.month))
            if held_in is not None and hold.call_id in held_in.holds:
                held_in.reserved -= held_in.holds.pop(hold.call_id)[1]
            used_in = self._budgets.get(self.budget_key(tenant, month))
            if used_in is not None and used_in.used is not None:
                used_in.used += used_tokens

    def budget_state(self, tenant_id: Any, moment: datetime | None = None) -> tuple[int, int]:
        key = self.budget_key(_uuid_text(tenant_id), month_of(moment or self.clock()))
        with self._lock:
            budget = self._budgets.get(key, _Budget())
            return budget.used or 0, budget.reserved


# --- the process's limiter --------------------------------------------------------------


@process_singleton
def limiter() -> Limiter:
    """Redis in production, memory in the embedded mode."""
    options: dict[str, Any] = {
        "prefix": settings.PARLEY_REDIS_PREFIX,
        "lease_ttl_s": settings.PARLEY_LIMIT_LEASE_TTL_S,
    }
    if settings.REDIS_URL is None:
        return MemoryLimiter(**options)
    return RedisLimiter(settings.REDIS_URL, **options)


def call_guard(
    *, identity: CallIdentity, limits: Limits, estimated_tokens: int
) -> AbstractContextManager[CallGuard]:
    """`limiter().call_guard(...)`: see Limiter.call_guard."""
    return limiter().call_guard(identity=identity, limits=limits, estimated_tokens=estimated_tokens)
