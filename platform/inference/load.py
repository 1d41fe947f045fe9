"""What every process knows of the pool's load, shared through Redis.

- In-flight calls per backend: a sorted set of call ids scored by lease expiry, so a
  process that dies mid-call stops counting once its lease lapses (renewed while the
  call streams).
- Scraped vLLM metrics per backend (running, waiting, KV-cache usage, when scraped),
  written by the scraper, read by every router.

Embedded mode keeps the same in process memory. Keys derive from backend ids only.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

from django.conf import settings

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


class RedisLoadStore:
    def __init__(self, url: str) -> None:
        import redis

        self.redis = redis.Redis.from_url(url)

    def begin(self, backend: str) -> str:
        call = uuid.uuid4().hex
        self.redis.zadd(_key("inflight", backend), {call: time.time() + LEASE_S})
        return call

    def renew(self, backend: str, call: str) -> None:
        self.redis.zadd(_key("inflight", backend), {call: time.time() + LEASE_S}, xx=True)

    def end(self, backend: str, call: str) -> None:
        self.redis.zrem(_key("inflight", backend), call)

    def inflight(self, backends: list[str]) -> dict[str, int]:
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        for backend in backends:
            pipe.zremrangebyscore(_key("inflight", backend), "-inf", now)
            pipe.zcard(_key("inflight", backend))
        counts = pipe.execute()[1::2]
        return {backend: int(count) for backend, count in zip(backends, counts, strict=True)}

    def put_metrics(self, backend: str, metrics: Metrics) -> None:
        self.redis.hset(
            _key("metrics", backend),
            mapping={
                "running": metrics.running,
                "waiting": metrics.waiting,
                "kv_usage": metrics.kv_usage,
                "scraped_at": metrics.scraped_at,
            },
        )
        self.redis.expire(_key("metrics", backend), 300)

    def metrics(self, backends: list[str]) -> dict[str, Metrics]:
        pipe = self.redis.pipeline(transaction=False)
        for backend in backends:
            pipe.hgetall(_key("metrics", backend))
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


_store: LoadStore | None = None
_store_lock = threading.Lock()


def load_store() -> LoadStore:
    global _store
    with _store_lock:
        if _store is None:
            _store = (
                MemoryLoadStore()
                if settings.REDIS_URL is None
                else RedisLoadStore(settings.REDIS_URL)
            )
        return _store


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
