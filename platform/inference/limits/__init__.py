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

Production keeps the state in Redis, changed only by the Lua scripts of
inference.limits.redis; the embedded mode (no REDIS_URL) keeps the same structures in
this process's memory (inference.limits.memory). This module is the API.
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
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from django.conf import settings

from config.singleton import process_singleton
from inference.leases import renewer
from inference.types import InferenceError, token_count

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


def uuid_text(value: Any) -> str:
    return str(uuid.UUID(str(value)))


@dataclass(frozen=True)
class CallIdentity:
    """Who makes a call: always a tenant; a user and/or an API key when known.
    Ids are normalised to UUID text (they become parts of Redis keys)."""

    tenant_id: Any
    user_id: Any = None
    api_key_id: Any = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "tenant_id", uuid_text(self.tenant_id))
        for name in ("user_id", "api_key_id"):
            value = getattr(self, name)
            object.__setattr__(self, name, uuid_text(value) if value else None)


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


def ledger_month_usage(tenant_id: str, month: Month) -> int:
    from inference.ledger import usage_month_total

    return usage_month_total(tenant_id=tenant_id, start=month.start, end=month.end)


def describe(limit: str, value: int | None) -> str:
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
        seed: Callable[[str, Month], int] = ledger_month_usage,
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

    def hold_for(
        self, *, identity: CallIdentity, limits: Limits, estimated_tokens: int, call_id: str = ""
    ) -> Hold:
        """What a call of `identity` will hold (nothing is taken yet)."""
        return Hold(
            call_id=call_id or uuid.uuid4().hex,
            identity=identity,
            estimated_tokens=token_count(estimated_tokens),
            scopes=self.scopes(identity, limits),
            month=month_of(self.clock()),
            budget=limits.monthly_token_budget,
        )

    def acquire(self, *, identity: CallIdentity, limits: Limits, estimated_tokens: int) -> Hold:
        """Admit a call or raise LimitExceeded. The caller must `settle` the hold."""
        hold = self.hold_for(identity=identity, limits=limits, estimated_tokens=estimated_tokens)
        for _ in range(3):
            refused = self._acquire(hold)
            if refused is None:
                return hold
            limit, retry_after_s = refused
            if limit != "seed":
                raise self.exceeded(hold, limit, retry_after_s)
            self.seed_budget(hold)
        raise RuntimeError("the budget counter could not be seeded")

    def seed_budget(self, hold: Hold) -> None:
        """The month's budget counter of the hold's tenant was missing: seed it with the
        month's committed usage (the ledger's sum, by default)."""
        tenant = hold.identity.tenant_id
        self._seed(tenant, hold.month, self.seed(tenant, hold.month))

    def settle(self, hold: Hold, *, used_tokens: int) -> None:
        """The call is over: free its leases and reservation, count what it used."""
        self._settle(hold, token_count(used_tokens), month_of(self.clock()))

    def exceeded(self, hold: Hold, limit: str, retry_after_s: float) -> LimitExceeded:
        """The LimitExceeded of a refusal by `limit` (a store's answer)."""
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
            f"{describe(limit, getattr(scope.limits, what))}; "
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


# The stores (they import the API above).
from inference.limits.memory import MemoryLimiter  # noqa: E402
from inference.limits.redis import RedisLimiter  # noqa: E402


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
