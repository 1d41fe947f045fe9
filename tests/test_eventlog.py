"""The run event log, both implementations: Redis Streams (the real Redis of the test
settings) and the in-memory one of the embedded mode."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from chat.eventlog import EventLogError, MemoryEventLog, RedisEventLog, run_log_key


@pytest.fixture(params=["memory", "redis"])
def log(request, settings):
    if request.param == "memory":
        yield MemoryEventLog()
        return
    if not settings.REDIS_URL:
        pytest.skip("no REDIS_URL: the embedded mode has no Redis")
    import redis

    log = RedisEventLog(settings.REDIS_URL)
    yield log
    # Drop every key this test made, and the asyncio clients it opened.
    admin = redis.Redis.from_url(settings.REDIS_URL)
    for key in admin.scan_iter(match=f"{settings.PARLEY_REDIS_PREFIX}:t:evtest-*"):
        admin.delete(key)
    admin.close()
    log._sync.close()


@pytest.fixture
async def alog(log):
    """`log` for async tests: the asyncio Redis clients it opens are closed in this
    test's own event loop."""
    yield log
    if isinstance(log, RedisEventLog):
        for client in list(log._async.values()):
            await client.aclose()


@pytest.fixture
def key(settings) -> str:
    return run_log_key(tenant_id=f"evtest-{uuid.uuid4().hex}", run_id=uuid.uuid4())


def event(n: int) -> dict:
    return {"type": "token", "delta": f"d{n}", "n": n, "nested": {"ok": [n, "é"]}}


def fill(log, key: str, n: int) -> None:
    for seq in range(1, n + 1):
        log.append(key, seq, event(seq))


def test_run_log_key_is_built_from_server_side_ids(settings):
    assert (
        run_log_key(tenant_id="T", run_id="R") == f"{settings.PARLEY_REDIS_PREFIX}:t:T:run:R:events"
    )


@pytest.mark.parametrize("after", [0, 1, 3, 5])
def test_read_sync_returns_exactly_the_events_after_the_cursor(log, key, after):
    fill(log, key, 5)
    assert log.read_sync(key, after=after) == [(seq, event(seq)) for seq in range(after + 1, 6)]


def test_read_sync_of_an_unknown_log_is_empty(log, key):
    assert log.read_sync(key) == []


def test_logs_are_independent(log, key):
    other = key.replace(":events", "-other:events")
    fill(log, key, 2)
    log.append(other, 1, {"type": "x"})
    assert [seq for seq, _ in log.read_sync(key)] == [1, 2]
    assert log.read_sync(other) == [(1, {"type": "x"})]


def test_a_duplicate_seq_is_refused(log, key):
    fill(log, key, 3)
    with pytest.raises(EventLogError):
        log.append(key, 3, {"type": "again"})
    with pytest.raises(EventLogError):
        log.append(key, 2, {"type": "older"})
    assert log.read_sync(key) == [(seq, event(seq)) for seq in (1, 2, 3)]
    log.append(key, 4, event(4))
    assert [seq for seq, _ in log.read_sync(key)] == [1, 2, 3, 4]


def test_a_skipped_seq_is_refused(log, key):
    fill(log, key, 2)
    with pytest.raises(EventLogError):
        log.append(key, 4, {"type": "gap"})
    assert [seq for seq, _ in log.read_sync(key)] == [1, 2]


def test_the_first_event_must_be_one(log, key):
    with pytest.raises(EventLogError):
        log.append(key, 2, {"type": "gap"})
    assert log.read_sync(key) == []


async def test_read_returns_at_once_when_events_exist(alog, key):
    fill(alog, key, 3)
    started = time.monotonic()
    got = await alog.read(key, after=1, timeout_s=5)
    assert time.monotonic() - started < 1
    assert got == [(2, event(2)), (3, event(3))]


async def test_read_waits_and_wakes_when_another_thread_appends(alog, key):
    fill(alog, key, 2)
    timer = threading.Timer(0.2, alog.append, args=(key, 3, event(3)))
    started = time.monotonic()
    timer.start()
    try:
        got = await alog.read(key, after=2, timeout_s=5)
    finally:
        timer.join()
    elapsed = time.monotonic() - started
    assert got == [(3, event(3))]
    assert 0.15 <= elapsed < 2, elapsed


async def test_read_of_an_empty_log_wakes_on_the_first_event(alog, key):
    timer = threading.Timer(0.2, alog.append, args=(key, 1, event(1)))
    started = time.monotonic()
    timer.start()
    try:
        got = await alog.read(key, after=0, timeout_s=5)
    finally:
        timer.join()
    assert got == [(1, event(1))]
    assert time.monotonic() - started < 2


async def test_read_returns_nothing_after_the_timeout(alog, key):
    fill(alog, key, 2)
    started = time.monotonic()
    got = await alog.read(key, after=2, timeout_s=0.3)
    elapsed = time.monotonic() - started
    assert got == []
    assert 0.25 <= elapsed < 2, elapsed
    # The log is still usable afterwards, and a later read sees later events.
    alog.append(key, 3, event(3))
    assert await alog.read(key, after=2, timeout_s=1) == [(3, event(3))]


def test_expire_drops_the_log_after_its_ttl(log, key, settings):
    fill(log, key, 3)
    log.expire(key, 1)
    # Not at once.
    assert [seq for seq, _ in log.read_sync(key)] == [1, 2, 3]
    if isinstance(log, RedisEventLog):
        import redis

        admin = redis.Redis.from_url(settings.REDIS_URL)
        assert 0 < admin.pttl(key) <= 1000
    time.sleep(1.5)
    assert log.read_sync(key) == []
    if isinstance(log, RedisEventLog):
        assert admin.exists(key) == 0
        admin.close()
    # An expired log starts afresh from 1.
    log.append(key, 1, event(1))
    assert log.read_sync(key) == [(1, event(1))]


async def test_a_redis_read_may_block_longer_than_the_client_socket_timeout(settings):
    """redis-py's default socket timeout is 5 s; a reader waiting 7 s for the next event
    (a long prefill, a busy pool) must get it, not a TimeoutError."""
    if not settings.REDIS_URL:
        pytest.skip("Redis only")
    log = RedisEventLog(settings.REDIS_URL)
    key = f"{settings.PARLEY_REDIS_PREFIX}:test:slow:{uuid.uuid4()}"
    timer = threading.Timer(6.0, lambda: log.append(key, 1, {"type": "late"}))
    timer.start()
    try:
        assert await log.read(key, 0, timeout_s=10) == [(1, {"type": "late"})]
    finally:
        timer.cancel()
        log._sync.delete(key)


async def test_token_events_are_stored_as_their_text_and_read_back_unchanged(alog, key):
    """A plain token event is kept as its delta (no JSON to decode on a replay); any
    other event, or a token event with more fields, as JSON. Both read back as written."""
    events = [
        {"type": "token", "delta": 'wörld "quoted" \\ 🙂'},
        {"type": "token", "delta": ""},
        {"type": "tool.start", "call_id": "c", "name": "n", "arguments": {"a": [1, "ü"]}},
        {"type": "token", "delta": "x", "first_seq": 1},
        {"type": "run.done", "message_id": None, "finish_reason": "stop", "usage": {}},
    ]
    for seq, event in enumerate(events, start=1):
        alog.append(key, seq, event)
    expected = list(enumerate(events, start=1))
    assert alog.read_sync(key) == expected
    assert await alog.read(key, 0, timeout_s=1) == expected
    if isinstance(alog, RedisEventLog):
        fields = [sorted(f) for _, f in alog._sync.xrange(key)]
        assert fields == [[b"d"], [b"d"], [b"e"], [b"e"], [b"e"]]
