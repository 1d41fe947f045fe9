"""Fair sharing of a saturated pool between tenants: the Virtual Token Counter.

VTC (Sheng et al., "Fairness in Serving Large Language Models", OSDI'24): keep, per
tenant, a counter of the weighted service it has received (prompt tokens and, dearer,
completion tokens, divided by the tenant's plan weight). When calls must wait, admit
the waiting call of the backlogged tenant with the smallest counter. A tenant that
becomes backlogged is lifted to the smallest counter among the backlogged ones, so
idleness earns no credit to flood with later. A flooding tenant then gets its fair
share and no more; a quiet one is served almost as if alone.

`FairQueue` is the in-process form (the simulator uses it as the pool's admission
queue); inference.admission keeps the same counters in Redis across processes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")

# Relative cost of a prompt token and a completion token (decoding is the dearer).
INPUT_COST = 1.0
OUTPUT_COST = 2.0


@dataclass
class VirtualTokenCounter:
    weight_of: Callable[[str], float] = lambda tenant: 1.0
    counters: dict[str, float] = field(default_factory=dict)

    def counter(self, tenant: str) -> float:
        return self.counters.get(tenant, 0.0)

    def lift(self, tenant: str, backlogged: set[str]) -> None:
        """`tenant` just became backlogged: no credit for the time it was idle."""
        others = [self.counter(t) for t in backlogged if t != tenant]
        if others:
            self.counters[tenant] = max(self.counter(tenant), min(others))

    def charge(self, tenant: str, *, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        weight = max(self.weight_of(tenant), 1e-6)
        cost = INPUT_COST * prompt_tokens + OUTPUT_COST * completion_tokens
        self.counters[tenant] = self.counter(tenant) + cost / weight

    def pick(self, tenants: set[str]) -> str:
        return min(tenants, key=lambda t: (self.counter(t), t))


@dataclass
class FairQueue(Generic[T]):
    """Waiting calls, first-in first-out per tenant, tenants served by VTC."""

    vtc: VirtualTokenCounter = field(default_factory=VirtualTokenCounter)
    _queues: dict[str, deque[T]] = field(default_factory=dict)

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def backlogged(self) -> set[str]:
        return {t for t, q in self._queues.items() if q}

    def push(self, tenant: str, item: T) -> None:
        backlogged = self.backlogged()
        if tenant not in backlogged:
            self.vtc.lift(tenant, backlogged)
        self._queues.setdefault(tenant, deque()).append(item)

    def pop(self) -> tuple[str, T] | None:
        backlogged = self.backlogged()
        if not backlogged:
            return None
        tenant = self.vtc.pick(backlogged)
        return tenant, self._queues[tenant].popleft()
