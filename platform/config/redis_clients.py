"""Connection options of every asyncio Redis client in Parley's processes.

redis-py wraps each command's send in `asyncio.wait_for` when the connection has a
socket timeout (redis-py 8 sets 5 s by default). On Python 3.11 `wait_for` drops a
cancellation that arrives just as the send completes: the cancelled task goes on as if
nothing happened. A websocket consumer's channel-layer receive then pops Redis every
5 s forever after its socket closed (one leaked task and connection per unlucky
disconnect), a relay replaced by a new cursor keeps sending, and an admission wait
outlives the request that asked for it.

So the asyncio clients run without a socket timeout (every blocking command they send
carries its own server-side timeout), and TCP keepalive plus health checks find a
server that went away.
"""

from __future__ import annotations

import socket
from typing import Any

# Probe an idle connection after 15 s, every 5 s, and drop it after 3 misses.
_KEEPALIVE = {
    name: value
    for name, value in (("TCP_KEEPIDLE", 15), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3))
    if hasattr(socket, name)
}

ASYNC_REDIS_OPTIONS: dict[str, Any] = {
    "socket_timeout": None,
    "socket_keepalive": True,
    "socket_keepalive_options": {getattr(socket, name): v for name, v in _KEEPALIVE.items()},
    "health_check_interval": 30,
}


def async_redis(url: str, **options: Any) -> Any:
    """A `redis.asyncio.Redis` for `url` with `ASYNC_REDIS_OPTIONS` (belongs to the
    running event loop, as every asyncio client does)."""
    import redis.asyncio

    return redis.asyncio.Redis.from_url(url, **{**ASYNC_REDIS_OPTIONS, **options})
