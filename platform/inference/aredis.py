"""Redis for an event loop's calls: one connection, every command pipelined on it.

The steps of a call (inference.store.redis) are a command each, sent by hundreds of
calls at once. redis-py's asyncio client takes a connection of its pool per command in
flight and spends some 70 µs of CPU on each round trip; here every command of an event
loop goes out on one connection as soon as it is made (RESP packed by hiredis, written
at once) and one reader task reads the replies back in order (parsed by hiredis), so a
command costs its packing, a write and a future, and a burst of commands is a few
segments each way. A caller that is cancelled leaves its reply to be read and dropped:
the connection stays in step.

Blocking commands (BLPOP) do not belong here: every reply behind them would wait.
A connection that fails fails the commands in flight on it; the next command opens a
new one. Like the other asyncio clients of the platform (config.redis_clients), it has
no read timeout (its commands do not block) and TCP keepalive finds a server gone.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import socket
import ssl
from typing import Any

import hiredis
from redis.connection import SSLConnection, UnixDomainSocketConnection, parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from config.redis_clients import ASYNC_REDIS_OPTIONS


class Script:
    """A Lua script, run by its SHA1 (loaded on first use)."""

    __slots__ = ("sha", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()


class _Connection:
    __slots__ = ("broken", "parser", "pending", "reader", "reading", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.parser = hiredis.Reader(encoding="utf-8")
        self.pending: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.broken: BaseException | None = None
        self.reading = asyncio.ensure_future(self._read())

    def send(self, packed: bytes) -> asyncio.Future[Any]:
        if self.broken is not None:
            raise RedisConnectionError(f"Redis connection lost: {self.broken!r}")
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.pending.append(reply)
        self.writer.write(packed)
        return reply

    async def _read(self) -> None:
        try:
            while data := await self.reader.read(1 << 16):
                self.parser.feed(data)
                while (reply := self.parser.gets()) is not False:
                    waiter = self.pending.popleft()
                    if waiter.done():  # its caller was cancelled
                        continue
                    if isinstance(reply, hiredis.ReplyError):
                        message = str(reply)
                        error = NoScriptError if message.startswith("NOSCRIPT") else ResponseError
                        waiter.set_exception(error(message))
                    else:
                        waiter.set_result(reply)
            raise RedisConnectionError("Redis closed the connection")
        except BaseException as exc:
            self.fail(exc)
            if not isinstance(exc, Exception):
                raise

    def fail(self, exc: BaseException) -> None:
        self.broken = exc
        while self.pending:
            waiter = self.pending.popleft()
            if not waiter.done():
                waiter.set_exception(RedisConnectionError(f"Redis connection lost: {exc!r}"))
        self.writer.close()

    def close(self) -> None:
        self.reading.cancel()


class PipelinedRedis:
    """Commands to the Redis at `url` from one event loop (one client per loop)."""

    def __init__(self, url: str) -> None:
        self.options = parse_url(url)
        self._connection: _Connection | None = None
        self._connecting: asyncio.Future[_Connection] | None = None

    async def execute(self, *args: Any) -> Any:
        connection = self._connection
        if connection is None or connection.broken is not None:
            connection = await self._connect()
        return await connection.send(hiredis.pack_command(args))

    async def evalsha(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        try:
            return await self.execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            await self.execute("SCRIPT", "LOAD", script.text)
            return await self.execute("EVALSHA", script.sha, len(keys), *keys, *args)

    async def _connect(self) -> _Connection:
        """The connection, opened by the first command that needs it (the others that
        need it meanwhile wait for that one)."""
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.ensure_future(self._open())
        connecting = self._connecting
        try:
            return await asyncio.shield(connecting)
        finally:
            if connecting.done() and (connecting.cancelled() or connecting.exception()):
                self._connecting = None  # the next command tries again

    async def _open(self) -> _Connection:
        options = self.options
        kind = options.get("connection_class")
        try:
            if kind is UnixDomainSocketConnection:
                reader, writer = await asyncio.open_unix_connection(options["path"])
            else:
                context = ssl.create_default_context() if kind is SSLConnection else None
                reader, writer = await asyncio.open_connection(
                    options.get("host", "localhost"), options.get("port", 6379), ssl=context
                )
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                    for option, value in ASYNC_REDIS_OPTIONS["socket_keepalive_options"].items():
                        sock.setsockopt(socket.IPPROTO_TCP, option, value)
        except OSError as exc:
            raise RedisConnectionError(f"cannot connect to Redis: {exc}") from exc
        connection = _Connection(reader, writer)
        hello: list[tuple[Any, ...]] = []
        if options.get("password"):
            user = options.get("username")
            hello.append(
                ("AUTH", user, options["password"]) if user else ("AUTH", options["password"])
            )
        if options.get("db"):
            hello.append(("SELECT", options["db"]))
        for command in hello:
            await connection.send(hiredis.pack_command(command))
        self._connection = connection
        return connection

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
