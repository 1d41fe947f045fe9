"""The limits' state in Redis, changed only by these Lua scripts (see inference.limits
for what they keep and the key layout)."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from inference.limits import (
    BUDGET,
    Hold,
    Limiter,
    Month,
    month_of,
    uuid_text,
)

logger = logging.getLogger(__name__)


# Redis' clock in ms, as `now`: the first lines of every script of the limits and the
# admission queue (inference.admission.redis) and of the call scripts (inference.store).
NOW = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
"""

# The operations as Lua functions taking (KEYS, ARGV) as a script of their own would:
# each is a script below, and a part of the call scripts of inference.store.redis.

# Every check first (only expired entries are dropped), then, if all passed, every
# record. Returns {0}: admitted; {1, scope index, what, retry ms}: refused (retry -1:
# unknown); {2}: the month's budget counter needs seeding.
ACQUIRE_FN = """
local function limits_acquire(KEYS, ARGV)
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
end
"""

# KEYS: the leased sorted sets (concurrency, then the budget holds last when `holds`).
# ARGV: call id, lease ms, 1 when the last key is the holds set (its expiry is the month's).
RENEW_FN = """
local function limits_renew(KEYS, ARGV)
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
end
"""

# KEYS: n token windows, n concurrency sets, the reservation month's budget hash and
# holds, the commit month's budget hash. ARGV: call id, estimate, used, n.
SETTLE_FN = """
local function limits_settle(KEYS, ARGV)
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
end
"""

_ACQUIRE = NOW + ACQUIRE_FN + "return limits_acquire(KEYS, ARGV)"
_RENEW = NOW + RENEW_FN + "return limits_renew(KEYS, ARGV)"
_SETTLE = SETTLE_FN + "return limits_settle(KEYS, ARGV)"

# KEYS: the month's budget hash and holds. ARGV: committed usage, expire-at ms.
_SEED = """
redis.call('HSETNX', KEYS[1], 'used', ARGV[1])
redis.call('HSETNX', KEYS[1], 'reserved', 0)
redis.call('PEXPIREAT', KEYS[1], ARGV[2])
return 1
"""


def limit_arg(value: int | None) -> int:
    return -1 if value is None else int(value)


def expire_at_ms(month: Month) -> int:
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

    # --- each script's keys and arguments, and what its answer means (the call
    # --- scripts of inference.store.redis use them too) ------------------------------

    def acquire_keys_args(self, hold: Hold) -> tuple[list[str], list[Any]]:
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
                limit_arg(scope.limits.requests_per_minute),
                limit_arg(scope.limits.tokens_per_minute),
                limit_arg(scope.limits.concurrent_runs),
            ]
        bkey = self.budget_key(hold.identity.tenant_id, hold.month)
        keys += [bkey, f"{bkey}:holds"]
        args += [limit_arg(hold.budget), expire_at_ms(hold.month)]
        return keys, args

    def acquire_result(self, hold: Hold, result: list[Any]) -> tuple[str, float] | None:
        """limits_acquire's answer, as `_acquire` returns it."""
        if int(result[0]) == 0:
            return None
        if int(result[0]) == 2:
            return ("seed", 0.0)
        _, index, what, wait_ms = result
        if what == "monthly_token_budget":
            return (BUDGET, 0.0)
        wait = float(wait_ms) / 1000 if int(wait_ms) >= 0 else -1.0
        return (f"{hold.scopes[int(index)].name}.{what}", wait)

    def renew_keys_args(self, hold: Hold) -> tuple[list[str], list[Any]]:
        """The hold's leased sets (concurrency, then the budget holds) and the
        arguments of limits_renew; no keys when nothing is leased."""
        keys = [s.conc_key for s in hold.scopes if s.limits.concurrent_runs is not None]
        holds = hold.budget is not None
        if holds:
            keys.append(f"{self.budget_key(hold.identity.tenant_id, hold.month)}:holds")
        return keys, [hold.call_id, int(self.lease_ttl_s * 1000), int(holds)]

    def renew_result(self, hold: Hold, alive: Any, leased: int) -> bool:
        if int(alive) < leased:
            logger.warning("call %s outlived its lease: its slot was reclaimed", hold.call_id)
            return False
        return True

    def settle_keys_args(
        self, hold: Hold, used_tokens: int, month: Month
    ) -> tuple[list[str], list[Any]]:
        held_in = self.budget_key(hold.identity.tenant_id, hold.month)
        keys = [s.tok_key for s in hold.scopes] + [s.conc_key for s in hold.scopes]
        keys += [held_in, f"{held_in}:holds", self.budget_key(hold.identity.tenant_id, month)]
        return keys, [hold.call_id, hold.estimated_tokens, used_tokens, len(hold.scopes)]

    # --- the operations ------------------------------------------------------------------

    def _acquire(self, hold: Hold) -> tuple[str, float] | None:
        keys, args = self.acquire_keys_args(hold)
        return self.acquire_result(hold, self._acquire_script(keys=keys, args=args))

    def _seed(self, tenant_id: str, month: Month, used: int) -> None:
        self._seed_script(
            keys=[self.budget_key(tenant_id, month)], args=[used, expire_at_ms(month)]
        )

    def renew(self, hold: Hold) -> bool:
        keys, args = self.renew_keys_args(hold)
        if not keys:
            return True
        return self.renew_result(hold, self._renew_script(keys=keys, args=args), len(keys))

    def _settle(self, hold: Hold, used_tokens: int, month: Month) -> None:
        keys, args = self.settle_keys_args(hold, used_tokens, month)
        self._settle_script(keys=keys, args=args)

    def budget_state(self, tenant_id: Any, moment: datetime | None = None) -> tuple[int, int]:
        key = self.budget_key(uuid_text(tenant_id), month_of(moment or self.clock()))
        used, reserved = self.redis.hmget(key, ["used", "reserved"])
        return int(used or 0), int(reserved or 0)
