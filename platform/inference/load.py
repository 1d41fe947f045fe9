"""What every process knows of the pool's load, shared through Redis.

- In-flight calls per backend: a sorted set of call ids scored by lease expiry, so a
  process that dies mid-call stops counting once its lease lapses (renewed while the
  call streams).
- Scraped vLLM metrics per backend (running, waiting, KV-cache usage, when scraped),
  written by the scraper, read by every router.

Embedded mode keeps the same in process memory. Keys derive from backend ids only.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from django.conf import settings

from config.singleton import process_singleton

LEASE_S = 60.0


@dataclass(frozen=True)
class Metrics:
    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float = 0.0
    scraped_at: float = 0.0


class LoadStore(Protocol):
    def begin(self, backend: str) -> str: ...
    def renew(self, backend: str, call: str) -> None: ...
    def end(self, backend: str, call: str) -> None: ...
    def inflight(self, backends: list[str]) -> dict[str, int]: ...
    def put_metrics(self, backend: str, metrics: Metrics) -> None: ...
    def metrics(self, backends: list[str]) -> dict[str, Metrics]: ...


def _key(*parts: Any) -> str:
    return ":".join([settings.PARLEY_REDIS_PREFIX, "pool", *map(str, parts)])


def inflight_key(backend: str) -> str:
    """The Redis sorted set of a backend's calls in flight (ids scored by lease expiry,
    in Unix seconds of the caller's clock)."""
    return _key("inflight", backend)


def metrics_key(backend: str) -> str:
    """The Redis hash of a backend's scraped metrics (METRIC_FIELDS)."""
    return _key("metrics", backend)


METRIC_FIELDS = ("running", "waiting", "kv_usage", "scraped_at")


def metrics_of(values: Sequence[Any]) -> Metrics | None:
    """A backend's Metrics from its hash's METRIC_FIELDS values (None where missing);
    None when it has none."""
    if all(v is None for v in values):
        return None
    return Metrics(*(float(v) if v is not None else 0.0 for v in values))


class RedisLoadStore:
    def __init__(self, url: str) -> None:
        import redis

        self.redis = redis.Redis.from_url(url)

    def begin(self, backend: str) -> str:
        call = uuid.uuid4().hex
        self.redis.zadd(inflight_key(backend), {call: time.time() + LEASE_S})
        return call

    def renew(self, backend: str, call: str) -> None:
        self.redis.zadd(inflight_key(backend), {call: time.time() + LEASE_S}, xx=True)

    def end(self, backend: str, call: str) -> None:
        self.redis.zrem(inflight_key(backend), call)

    def inflight(self, backends: list[str]) -> dict[str, int]:
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        for backend in backends:
            pipe.zremrangebyscore(inflight_key(backend), "-inf", now)
            pipe.zcard(inflight_key(backend))
        counts = pipe.execute()[1::2]
        return {backend: int(count) for backend, count in zip(backends, counts, strict=True)}

    def put_metrics(self, backend: str, metrics: Metrics) -> None:
        self.redis.hset(
            metrics_key(backend),
            mapping={
                "running": metrics.running,
                "waiting": metrics.waiting,
                "kv_usage": metrics.kv_usage,
                "scraped_at": metrics.scraped_at,
            },
        )
        self.redis.expire(metrics_key(backend), 300)

    def metrics(self, backends: list[str]) -> dict[str, Metrics]:
        pipe = self.redis.pipeline(transaction=False)
        for backend in backends:
            pipe.hgetall(metrics_key(backend))
        out = {}
        for backend, raw in zip(backends, pipe.execute(), strict=True):
            if raw:
                values = {k.decode(): float(v) for k, v in raw.items()}
                out[backend] = Metrics(**values)
        return out


class MemoryLoadStore:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[str, dict[str, float]] = {}
        self._metrics: dict[str, Metrics] = {}

    def begin(self, backend: str) -> str:
        call = uuid.uuid4().hex
        with self._lock:
            self._calls.setdefault(backend, {})[call] = time.time() + LEASE_S
        return call

    def renew(self, backend: str, call: str) -> None:
        with self._lock:
            calls = self._calls.get(backend, {})
            if call in calls:
                calls[call] = time.time() + LEASE_S

    def end(self, backend: str, call: str) -> None:
        with self._lock:
            self._calls.get(backend, {}).pop(call, None)

    def inflight(self, backends: list[str]) -> dict[str, int]:
        now = time.time()
        with self._lock:
            return {
                b: sum(1 for expiry in self._calls.get(b, {}).values() if expiry > now)
                for b in backends
            }

    def put_metrics(self, backend: str, metrics: Metrics) -> None:
        with self._lock:
            self._metrics[backend] = metrics

    def metrics(self, backends: list[str]) -> dict[str, Metrics]:
        with self._lock:
            return {b: self._metrics[b] for b in backends if b in self._metrics}


@process_singleton
def load_store() -> LoadStore:
    """Redis in production, memory in the embedded mode."""
    return MemoryLoadStore() if settings.REDIS_URL is None else RedisLoadStore(settings.REDIS_URL)


class LoadBoard:
    """This process's view of the pool's load, for the router: the last snapshot of the
    shared load (every process's calls in flight per backend, the scraped metrics),
    corrected by the calls this process began and ended since, so that calls routed
    between two snapshots see each other. A snapshot older than `max_age_s` is read
    again before a call is routed (`stale`)."""

    def __init__(self, max_age_s: float) -> None:
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._others: dict[str, int] = {}  # other processes' calls in flight, as of `_at`
        self._metrics: dict[str, Metrics] = {}
        self._at = -math.inf
        self._own: dict[str, int] = {}  # this process's calls in flight, now

    def stale(self) -> bool:
        return time.monotonic() - self._at >= self.max_age_s

    def own(self) -> dict[str, int]:
        """This process's calls in flight, taken just before a snapshot is read: what
        the snapshot will count of them."""
        with self._lock:
            return dict(self._own)

    def update(
        self, inflight: dict[str, int], metrics: dict[str, Metrics], own_then: dict[str, int]
    ) -> None:
        """A snapshot was read: every process's calls in flight per backend (ours as
        they were in `own_then`) and the metrics."""
        with self._lock:
            self._others = {b: max(0, n - own_then.get(b, 0)) for b, n in inflight.items()}
            self._metrics = dict(metrics)
            self._at = time.monotonic()

    def inflight(self) -> dict[str, int]:
        with self._lock:
            counts = dict(self._others)
            for backend, n in self._own.items():
                counts[backend] = counts.get(backend, 0) + n
            return counts

    def metrics(self) -> dict[str, Metrics]:
        with self._lock:
            return self._metrics

    def took(self, backend: str) -> None:
        with self._lock:
            self._own[backend] = self._own.get(backend, 0) + 1

    def gave(self, backend: str) -> None:
        with self._lock:
            left = self._own.get(backend, 0) - 1
            if left > 0:
                self._own[backend] = left
            else:
                self._own.pop(backend, None)


# How old the board's snapshot may be when a call is routed.
LOAD_SNAPSHOT_MAX_AGE_S = 1.0


@process_singleton
def load_board() -> LoadBoard:
    return LoadBoard(max_age_s=LOAD_SNAPSHOT_MAX_AGE_S)


def parse_vllm_metrics(text: str) -> Metrics:
    """Prometheus text from vLLM's /metrics: sum over model labels; the KV-cache usage
    is `vllm:kv_cache_usage_perc`, or `vllm:gpu_cache_usage_perc` on older versions."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_part, _, value = line.rpartition(" ")
        name = name_part.split("{", 1)[0].strip()
        try:
            number = float(value)
        except ValueError:
            continue
        if name in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"):
            values["kv_usage"] = max(values.get("kv_usage", 0.0), number)
        elif name == "vllm:num_requests_running":
            values["running"] = values.get("running", 0.0) + number
        elif name == "vllm:num_requests_waiting":
            values["waiting"] = values.get("waiting", 0.0) + number
    return Metrics(scraped_at=time.time(), **values)
