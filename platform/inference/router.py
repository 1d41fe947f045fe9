"""Choosing a backend for one LLM call: pure decision logic, no I/O.

The same classes route real calls (inference.pool builds the views from backend rows,
scraped metrics and shared in-flight counters) and simulated ones (tests/bench/poolsim.py
builds them from a simulated vLLM pool on a simulated clock), so what the simulator
measures is what production runs.

Policies:
- `round_robin`: each routable backend in turn, by weight.
- `least_loaded`: the lowest load score.
- `prefix`: the backend holding the longest cached prefix of the prompt, load ignored
  (the known failure: hot prefixes pile onto one server).
- `prefix_load` (default): the longest cached prefix, unless that backend is overloaded
  relative to the least-loaded one; then the least-loaded (preferring any that holds a
  shorter prefix). The shape llm-d, SGLang and Dynamo converge on.

Prefix affinity works on chained block hashes of the prompt's stable start (system
prompt, documents, earlier turns; the tenant's cache salt first, since vLLM keys its
cache by it). An approximate, bounded LRU index remembers which backends recently
served which blocks.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

HEALTHY, DEGRADED, DOWN, DRAINING = "healthy", "degraded", "down", "draining"
ROUTABLE_STATES = (HEALTHY, DEGRADED)

# Characters per prefix block: about 64 tokens of English text. Coarse on purpose: the
# index is approximate, and a block is only worth routing for when it is long.
BLOCK_CHARS = 256


@dataclass
class BackendView:
    """What the router knows of one backend at decision time (metrics may be stale)."""

    id: str
    state: str = HEALTHY
    weight: float = 1.0
    models: frozenset[str] = frozenset()
    max_model_len: int | None = None
    inflight: int = 0  # calls this platform has open on it, across processes
    running: float = 0.0  # vllm:num_requests_running, as last scraped
    waiting: float = 0.0  # vllm:num_requests_waiting, as last scraped
    kv_usage: float = 0.0  # vllm:kv_cache_usage_perc, 0..1
    circuit_open: bool = False

    @property
    def routable(self) -> bool:
        return self.state in ROUTABLE_STATES and not self.circuit_open

    def serves(self, model: str) -> bool:
        return not self.models or model in self.models

    def load(self) -> float:
        """Queueing pressure per unit of weight. Our own in-flight count is exact and
        current; the scraped queue adds work other clients put there; a nearly full KV
        cache means preemption, so it weighs heavily; degraded counts double."""
        pressure = max(self.inflight, self.running) + 2.0 * self.waiting
        if self.kv_usage > 0.9:
            pressure += 10.0 * (self.kv_usage - 0.9) * 10
        if self.state == DEGRADED:
            pressure = pressure * 2 + 1
        return pressure / max(self.weight, 1e-6)


@dataclass(frozen=True)
class RouteRequest:
    model: str
    prefix_blocks: tuple[int, ...] = ()
    tenant_id: str = ""
    prompt_tokens: int = 0  # an estimate
    exclude: frozenset[str] = frozenset()  # backends that already failed this call


def _content(message: dict[str, Any]) -> str:
    content = message.get("content", "")
    return content if isinstance(content, str) else json.dumps(content)


def _stable_text(messages: Sequence[dict[str, Any]]) -> str:
    """Everything but the final user turn: the part later calls share."""
    stable = list(messages[:-1]) if len(messages) > 1 else list(messages)
    return "".join(f"\x1e{m.get('role', '')}\x1f{_content(m)}" for m in stable)


def prefix_blocks(
    messages: Sequence[dict[str, Any]], *, salt: str = "", block_chars: int = BLOCK_CHARS
) -> tuple[int, ...]:
    """Chained hashes of the prompt's stable start in whole blocks: block i's hash
    covers blocks 0..i, so one hash names a whole prefix."""
    text = _stable_text(messages)
    blocks = []
    previous = hashlib.blake2b(salt.encode(), digest_size=8).digest()
    for start in range(0, len(text) - block_chars + 1, block_chars):
        digest = hashlib.blake2b(
            previous + text[start : start + block_chars].encode("utf-8", "surrogatepass"),
            digest_size=8,
        ).digest()
        blocks.append(int.from_bytes(digest, "big"))
        previous = digest
    return tuple(blocks)


class PrefixIndex:
    """Approximate, bounded LRU map: prefix block hash -> backends that served it."""

    def __init__(self, capacity: int = 200_000) -> None:
        self.capacity = capacity
        self._blocks: OrderedDict[int, set[str]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._blocks)

    def matches(self, blocks: Sequence[int]) -> dict[str, int]:
        """For each backend, how many leading blocks of `blocks` it recently served."""
        found: dict[str, int] = {}
        with self._lock:
            for depth, block in enumerate(blocks, start=1):
                holders = self._blocks.get(block)
                if not holders:
                    break  # chained: nothing deeper can match either
                for backend in holders:
                    found[backend] = depth
        return found

    def record(self, blocks: Sequence[int], backend: str) -> None:
        with self._lock:
            for block in blocks:
                holders = self._blocks.get(block)
                if holders is None:
                    self._blocks[block] = {backend}
                else:
                    holders.add(backend)
                    self._blocks.move_to_end(block)
            while len(self._blocks) > self.capacity:
                self._blocks.popitem(last=False)

    def forget_backend(self, backend: str) -> None:
        """A backend restarted or left: its cache is gone."""
        with self._lock:
            for block in [b for b, holders in self._blocks.items() if backend in holders]:
                holders = self._blocks[block]
                holders.discard(backend)
                if not holders:
                    del self._blocks[block]


class Policy(Protocol):
    name: str

    def choose(self, request: RouteRequest, backends: Sequence[BackendView]) -> BackendView | None:
        """The backend for this call, or None when none can take it."""


def candidates(request: RouteRequest, backends: Iterable[BackendView]) -> list[BackendView]:
    return [
        b
        for b in backends
        if b.routable
        and b.serves(request.model)
        and b.id not in request.exclude
        and (b.max_model_len is None or request.prompt_tokens < b.max_model_len)
    ]


@dataclass
class RoundRobin:
    name: str = "round_robin"
    _counter: itertools.count = field(default_factory=itertools.count)

    def choose(self, request: RouteRequest, backends: Sequence[BackendView]) -> BackendView | None:
        pool = candidates(request, backends)
        if not pool:
            return None
        # Weighted: a backend of weight 2 appears twice in the rotation.
        slots = [
            b for b in sorted(pool, key=lambda b: b.id) for _ in range(max(1, round(b.weight)))
        ]
        return slots[next(self._counter) % len(slots)]


@dataclass
class LeastLoaded:
    name: str = "least_loaded"

    def choose(self, request: RouteRequest, backends: Sequence[BackendView]) -> BackendView | None:
        pool = candidates(request, backends)
        return min(pool, key=lambda b: (b.load(), b.id)) if pool else None


@dataclass
class PrefixOnly:
    index: PrefixIndex = field(default_factory=PrefixIndex)
    name: str = "prefix"

    def choose(self, request: RouteRequest, backends: Sequence[BackendView]) -> BackendView | None:
        pool = candidates(request, backends)
        if not pool:
            return None
        matched = self.index.matches(request.prefix_blocks)
        best = max(pool, key=lambda b: (matched.get(b.id, 0), -b.load(), b.id))
        if matched.get(best.id, 0) == 0:
            best = min(pool, key=lambda b: (b.load(), b.id))
        self.index.record(request.prefix_blocks, best.id)
        return best


@dataclass
class PrefixAffinityLoadAware:
    """Longest cached prefix unless its backend is overloaded relative to the others:
    load(affine) > overload_factor * load(least) + overload_slack spills over."""

    index: PrefixIndex = field(default_factory=PrefixIndex)
    overload_factor: float = 1.5
    overload_slack: float = 4.0
    name: str = "prefix_load"

    def choose(self, request: RouteRequest, backends: Sequence[BackendView]) -> BackendView | None:
        pool = candidates(request, backends)
        if not pool:
            return None
        matched = self.index.matches(request.prefix_blocks)
        least = min(pool, key=lambda b: (b.load(), b.id))
        affine = max(pool, key=lambda b: (matched.get(b.id, 0), -b.load(), b.id))
        threshold = self.overload_factor * least.load() + self.overload_slack
        if matched.get(affine.id, 0) > 0 and affine.load() <= threshold:
            chosen = affine
        else:
            # Spill over: among backends not overloaded, prefer a partial prefix holder.
            fine = [b for b in pool if b.load() <= threshold] or [least]
            chosen = max(fine, key=lambda b: (matched.get(b.id, 0), -b.load(), b.id))
        self.index.record(request.prefix_blocks, chosen.id)
        return chosen


POLICIES = {
    "round_robin": RoundRobin,
    "least_loaded": LeastLoaded,
    "prefix": PrefixOnly,
    "prefix_load": PrefixAffinityLoadAware,
}
DEFAULT_POLICY = "prefix_load"


def make_policy(name: str, index: PrefixIndex | None = None) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown routing policy {name!r}; choose one of {', '.join(POLICIES)}")
    cls = POLICIES[name]
    if cls in (PrefixOnly, PrefixAffinityLoadAware):
        return cls(index=index if index is not None else PrefixIndex())
    return cls()
