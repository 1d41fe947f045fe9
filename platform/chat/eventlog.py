"""The event log of a run: append-only, gapless sequence numbers, readable from a cursor.

One writer (the worker executing the run) appends events with sequence numbers
1, 2, 3, ...; any number of readers (websocket consumers) read everything after
their cursor, then wait for more. Production keeps each log in a Redis Stream
whose entry ids are `0-<seq>`, so Redis itself refuses a duplicate or
out-of-order append. Embedded mode keeps the logs in this process's memory.

Keys are built from server-side ids only (tenant and run), never from client input.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from django.conf import settings

from config.inputs import InvalidInput
from config.redis_clients import async_redis
from config.singleton import process_singleton

Event = dict[str, Any]

# The largest sequence number, and so the largest cursor a reader may give: a signed
# 64-bit integer (Redis stream ids take 64-bit parts; databases and JSON clients
# keep 63 bits exactly).
MAX_SEQ = 2**63 - 1


class EventLogError(Exception):
    pass


def cursor_parse(value: Any, *, name: str = "after") -> int:
    """A reader's cursor (the last sequence number it has; 0 for everything) as the
    client gave it: an integer, or its decimal digits (a query string or the SSE
    `Last-Event-ID` header), from 0 to MAX_SEQ. Else InvalidInput, saying so as `name`.
    The one check of a cursor for the REST API, its Server-Sent Events and the socket."""
    if isinstance(value, str):
        digits = value.strip()
        # ASCII digits only: int() would also take "٣", "1_0" and "+5".
        if digits.isascii() and digits.isdigit() and len(digits) <= len(str(MAX_SEQ)):
            value = int(digits)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEQ:
        raise InvalidInput(
            f"{name} must be an event's sequence number: an integer from 0 to {MAX_SEQ}."
        )
    return value


def run_log_key(*, tenant_id: Any, run_id: Any) -> str:
    return f"{settings.PARLEY_REDIS_PREFIX}:t:{tenant_id}:run:{run_id}:events"


class EventLog(Protocol):
    def append(self, key: str, seq: int, event: Mapping[str, Any]) -> None:
        """Append `event` as number `seq`; `seq` must be one more than the last."""

    def expire(self, key: str, ttl_s: int) -> None:
        """Drop the log `ttl_s` seconds from now (after the run is persisted)."""

    def read_sync(self, key: str, after: int = 0) -> list[tuple[int, Event]]:
        """Every event after `after`, without waiting."""

    async def read(self, key: str, after: int, timeout_s: float) -> list[tuple[int, Event]]:
        """Events after `after`; waits up to `timeout_s` for the first one."""

    def last_seq(self, key: str) -> int:
        """The sequence number of the last event (0 for an empty or trimmed log)."""

    def cancel_request(self, key: str, ttl_s: int) -> None:
        """Flag the run of this log for cancellation (the writer polls the flag)."""

    def cancel_requested(self, key: str) -> bool:
        """Whether `cancel_request` was called for this log (cheap: polled while streaming)."""


# --- Redis Streams ------------------------------------------------------------


MAX_BLOCK_S = 60.0  # the longest a reader blocks in one XREAD
READ_COUNT = 4096  # the most entries one XREAD returns (a replay reads a few times)


class RedisEventLog:
    """Entry `0-<seq>` holds the event: a plain token event as its delta alone (field
    `d`: a replay decodes no JSON for the bulk of a run), any other as JSON (`e`)."""

    # XADD alone refuses a duplicate or smaller id but accepts a gap (0-1, then 0-3):
    # check in the server, atomically, that `seq` follows the last entry.
    _APPEND = """
    local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
    local top = 0
    if #last > 0 then top = tonumber(string.match(last[1][1], '-(%d+)$')) end
    if tonumber(ARGV[1]) ~= top + 1 then
        return redis.error_reply('ERR out of sequence: the last event is ' .. top)
    end
    return redis.call('XADD', KEYS[1], '0-' .. ARGV[1], ARGV[3], ARGV[2])
    """

    def __init__(self, url: str) -> None:
        import redis

        self.url = url
        self._sync = redis.Redis.from_url(url)
        self._append = self._sync.register_script(self._APPEND)
        # redis.asyncio clients belong to the event loop that created them.
        self._async: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = (
            weakref.WeakKeyDictionary()
        )

    def _aclient(self) -> Any:
        loop = asyncio.get_running_loop()
        client = self._async.get(loop)
        if client is None:
            # No socket timeout (config.redis_clients): XREAD BLOCK carries its own,
            # at most MAX_BLOCK_S, and a cancelled reader must stop reading.
            client = async_redis(self.url)
            # The reply as the parser built it: redis-py's reshaping of every entry
            # (a dict per entry, in Python) would double the cost of a replay.
            client.response_callbacks["XREAD"] = _raw_reply
            self._async[loop] = client
        return client

    def append(self, key: str, seq: int, event: Mapping[str, Any]) -> None:
        import redis

        if event.keys() == {"type", "delta"} and event["type"] == "token":
            args = [seq, event["delta"], "d"]
        else:
            args = [seq, json.dumps(event), "e"]
        try:
            self._append(keys=[key], args=args)
        except redis.ResponseError as exc:
            raise EventLogError(f"cannot append event {seq} to {key}: {exc}") from exc

    def expire(self, key: str, ttl_s: int) -> None:
        self._sync.expire(key, ttl_s)
        self._sync.expire(f"{key}:cancel", ttl_s)

    def last_seq(self, key: str) -> int:
        last: Any = self._sync.xrevrange(key, "+", "-", count=1)
        return self._decode(last)[0][0] if last else 0

    def cancel_request(self, key: str, ttl_s: int) -> None:
        self._sync.set(f"{key}:cancel", 1, ex=ttl_s)

    def cancel_requested(self, key: str) -> bool:
        return bool(self._sync.exists(f"{key}:cancel"))

    @staticmethod
    def _decode(entries: list[Any]) -> list[tuple[int, Event]]:
        """Stream entries (`[id, {field: value}]`, or `[id, [field, value]]` as the
        raw reply has them; one field each) as (seq, event)."""
        out = []
        for entry_id, fields in entries:
            seq = int(entry_id[entry_id.index(b"-") + 1 :])
            name, value = next(iter(fields.items())) if isinstance(fields, dict) else fields
            if name == b"d":
                out.append((seq, {"type": "token", "delta": value.decode()}))
            else:
                out.append((seq, json.loads(value)))
        return out

    def read_sync(self, key: str, after: int = 0) -> list[tuple[int, Event]]:
        entries: Any = self._sync.xrange(key, min=f"(0-{after}", max="+")
        return self._decode(entries)

    async def read(self, key: str, after: int, timeout_s: float) -> list[tuple[int, Event]]:
        client = self._aclient()
        block_ms = max(1, int(min(timeout_s, MAX_BLOCK_S) * 1000))
        result = await client.xread({key: f"0-{after}"}, block=block_ms, count=READ_COUNT)
        if not result:
            return []
        # One stream: RESP2 replies [[key, entries]], RESP3 {key: entries}.
        entries = next(iter(result.values())) if isinstance(result, dict) else result[0][1]
        return self._decode(entries)


def _raw_reply(response: Any, **options: Any) -> Any:
    return response


# --- in memory (embedded mode) --------------------------------------------------


@dataclass
class _MemoryStream:
    events: list[Event] = field(default_factory=list)
    expires_at: float | None = None
    waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = field(
        default_factory=list
    )


class MemoryEventLog:
    """Thread-safe: the writer is a worker thread, readers are asyncio tasks."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._streams: dict[str, _MemoryStream] = {}
        self._cancels: dict[str, float] = {}  # key -> when the flag expires

    def _stream(self, key: str, *, reader: bool = False) -> _MemoryStream:
        stream = self._streams.get(key)
        if stream is not None and stream.expires_at is not None and stream.expires_at < time.time():
            del self._streams[key]
            stream = None
        if stream is None:
            stream = self._streams[key] = _MemoryStream()
            if reader:
                # A reader waiting on a log nobody writes must not keep it forever.
                stream.expires_at = time.time() + _READER_STREAM_TTL_S
        return stream

    def append(self, key: str, seq: int, event: Mapping[str, Any]) -> None:
        with self._lock:
            stream = self._stream(key)
            if not stream.events:
                stream.expires_at = None  # a live run: kept until expire()
            if seq != len(stream.events) + 1:
                raise EventLogError(
                    f"cannot append event {seq} to {key}: the last event is {len(stream.events)}"
                )
            stream.events.append(json.loads(json.dumps(event)))
            waiters, stream.waiters = stream.waiters, []
        for loop, future in waiters:
            loop.call_soon_threadsafe(_resolve, future)

    def expire(self, key: str, ttl_s: int) -> None:
        with self._lock:
            self._stream(key).expires_at = time.time() + ttl_s
            now = time.time()
            for stale in [
                k for k, s in self._streams.items() if s.expires_at and s.expires_at < now
            ]:
                del self._streams[stale]

    def last_seq(self, key: str) -> int:
        with self._lock:
            stream = self._streams.get(key)
            if stream is None or (
                stream.expires_at is not None and stream.expires_at < time.time()
            ):
                return 0
            return len(stream.events)

    def cancel_request(self, key: str, ttl_s: int) -> None:
        with self._lock:
            now = time.time()
            self._cancels = {k: t for k, t in self._cancels.items() if t > now}
            self._cancels[key] = now + ttl_s

    def cancel_requested(self, key: str) -> bool:
        with self._lock:
            return self._cancels.get(key, 0.0) > time.time()

    def read_sync(self, key: str, after: int = 0) -> list[tuple[int, Event]]:
        with self._lock:
            stream = self._streams.get(key)
            if stream is None or (
                stream.expires_at is not None and stream.expires_at < time.time()
            ):
                return []
            return [(i + 1, e) for i, e in enumerate(stream.events) if i + 1 > after]

    async def read(self, key: str, after: int, timeout_s: float) -> list[tuple[int, Event]]:
        loop = asyncio.get_running_loop()
        with self._lock:
            stream = self._stream(key, reader=True)
            if len(stream.events) > after:
                return [(i + 1, e) for i, e in enumerate(stream.events) if i + 1 > after]
            future: asyncio.Future[None] = loop.create_future()
            stream.waiters.append((loop, future))
        try:
            await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            with self._lock:
                if (loop, future) in stream.waiters:
                    stream.waiters.remove((loop, future))
        return self.read_sync(key, after)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


_READER_STREAM_TTL_S = 3600.0


@process_singleton
def event_log() -> EventLog:
    """Redis where there is one, this process's memory in the embedded mode."""
    return MemoryEventLog() if settings.REDIS_URL is None else RedisEventLog(settings.REDIS_URL)
