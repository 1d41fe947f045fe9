"""The limits' state in this process's memory (the embedded mode): the same structures
as inference.limits.redis keeps in Redis, behind one lock."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from inference.limits import BUDGET, Hold, Limiter, Month, month_of, uuid_text

logger = logging.getLogger(__name__)


@dataclass
class Budget:
    used: int | None = None  # None: not seeded yet
    reserved: int = 0
    holds: dict[str, tuple[float, int]] = field(default_factory=dict)  # call: (expiry, amount)


def window_wait(
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
        self._budgets: dict[str, Budget] = {}

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
                        wait = window_wait(entries, limit, need, now, self.window_s)
                        if wait is not None:
                            return (f"{scope.name}.{what}", wait)
                cc = scope.limits.concurrent_runs
                if cc is not None and len(self._lease_set(scope.conc_key, now)) >= cc:
                    return (f"{scope.name}.concurrent_runs", -1.0)
            budget = None
            if hold.budget is not None:
                budget = self._budgets.setdefault(
                    self.budget_key(hold.identity.tenant_id, hold.month), Budget()
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
            budget = self._budgets.setdefault(self.budget_key(tenant_id, month), Budget())
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
        key = self.budget_key(uuid_text(tenant_id), month_of(moment or self.clock()))
        with self._lock:
            budget = self._budgets.get(key, Budget())
            return budget.used or 0, budget.reserved
