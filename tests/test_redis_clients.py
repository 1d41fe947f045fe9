"""Cancelling a task that waits on Redis ends it (config.redis_clients).

With a socket timeout, redis-py sends each command under `asyncio.wait_for`, which on
Python 3.11 drops a cancellation arriving as the send completes: the task goes on.
A closed websocket's channel-layer receive then polled Redis forever, and a test's
event loop could not close. Cancelling at many points of the first round trips
catches that within a few tries.
"""

from __future__ import annotations

import asyncio
import random
import uuid

import pytest
from channels.layers import get_channel_layer

from chat.eventlog import RedisEventLog

TRIES = 150


@pytest.fixture
def redis_url(settings):
    if not settings.REDIS_URL:
        pytest.skip("no REDIS_URL: the embedded mode has no Redis")
    return settings.REDIS_URL


async def _cancelled_at_random_points(start) -> None:
    rng = random.Random(7)
    for attempt in range(TRIES):
        task = asyncio.ensure_future(start())
        await asyncio.sleep(rng.random() * 0.004)
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=3)
        assert done, f"try {attempt}: the cancelled task is still waiting on Redis"
        assert task.cancelled()


async def test_a_cancelled_channel_layer_receive_ends(redis_url):
    layer = get_channel_layer()

    async def receive():
        return await layer.receive(await layer.new_channel())

    await _cancelled_at_random_points(receive)


async def test_a_cancelled_event_log_read_ends(redis_url, settings):
    log = RedisEventLog(redis_url)
    key = f"{settings.PARLEY_REDIS_PREFIX}:test:cancel:{uuid.uuid4()}"
    try:
        await _cancelled_at_random_points(lambda: log.read(key, 0, timeout_s=30))
    finally:
        for client in list(log._async.values()):
            await client.aclose()
        log._sync.close()
