"""The ledger rows of an event loop's calls, written in batches by one thread.

The OpenAI-compatible API ends hundreds of calls at once; a scoped transaction per row
on the bookkeeping threads cost each call a few milliseconds of CPU taken from the
event loop. Here a call hands its row to `writer().write(row)` and awaits it: one
thread takes every row queued meanwhile and writes them in one transaction per tenant
(`ledger.usage_rows_write`); the call's wait ends once its row is durable (a group
commit), so the row is in the ledger before the call's limits are settled, as
inference.store wants.

Never lost: a batch PostgreSQL refuses is appended to a spool in Redis
(`<prefix>:ledger:spool`, one JSON row per entry), which the writer of any process
drains into the ledger once it accepts rows again (under a lock, so one process drains
at a time); without Redis (the embedded mode) the rows stay queued and are retried.
Rows still queued when the process exits are written on the way out (atexit). (A
process that dies between writing a spooled batch and trimming it from the spool has
the batch written twice: the spool serves only while PostgreSQL refuses rows.)
"""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import json
import logging
import threading
import time
import uuid
from concurrent.futures import Future
from typing import Any

from django.conf import settings
from django.db import close_old_connections

from config.singleton import process_singleton
from inference.ledger import UsageRow, usage_rows_write

logger = logging.getLogger(__name__)

MAX_BATCH = 500
RETRY_S = 5.0  # how often rows that could not be written (nor spooled) are tried again
DRAIN_EVERY_S = 5.0  # how often an idle writer looks at the spool
DRAIN_LOCK_S = 60


class LedgerWriter:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: list[tuple[UsageRow, Future[None]]] = []
        self._thread: threading.Thread | None = None
        self.batches = 0  # transactions written (for tests and benchmarks)
        self.rows = 0

    def submit(self, row: UsageRow) -> Future[None]:
        """Queue `row`; the future is done once the row is durable (in the ledger, or in
        the spool when the ledger refused it)."""
        done: Future[None] = Future()
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="parley-ledger", daemon=True)
                self._thread.start()
            self._queue.append((row, done))
            self._cond.notify()
        return done

    async def write(self, row: UsageRow) -> None:
        await asyncio.wrap_future(self.submit(row))

    def flush(self) -> None:
        """Write what is queued now, in the calling thread (at exit, and for tests)."""
        try:
            while True:
                with self._cond:
                    batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                if not batch:
                    return
                self._write(batch)
        finally:
            close_old_connections()

    def _run(self) -> None:
        drained_at = 0.0
        while True:
            with self._cond:
                idle = not self._queue
            if idle:
                # The database connection goes back while there is nothing to write; a
                # burst's batches keep it.
                close_old_connections()
                with self._cond:
                    if not self._queue:
                        self._cond.wait(timeout=DRAIN_EVERY_S)
            with self._cond:
                batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
            if batch:
                self._write(batch)
            if time.monotonic() - drained_at >= DRAIN_EVERY_S:
                drained_at = time.monotonic()
                self.drain()

    def _write(self, batch: list[tuple[UsageRow, Future[None]]]) -> None:
        by_tenant: dict[str, list[UsageRow]] = {}
        for row, _ in batch:
            by_tenant.setdefault(str(row.tenant_id), []).append(row)
        for rows in by_tenant.values():
            self._write_tenant(rows)
        for _, done in batch:
            if not done.done():
                done.set_result(None)

    def _write_tenant(self, rows: list[UsageRow]) -> None:
        try:
            usage_rows_write(rows)  # one transaction
            self.batches += 1
            self.rows += len(rows)
        except Exception:
            logger.exception("the ledger refused %d rows: spooling them", len(rows))
            close_old_connections()  # a broken connection is dropped
            if not self._spool(rows):
                # Neither PostgreSQL nor Redis took them: keep them and try again.
                logger.error("%d ledger rows kept in memory until they can be written", len(rows))
                threading.Timer(RETRY_S, self._requeue, args=(rows,)).start()

    def _requeue(self, rows: list[UsageRow]) -> None:
        with self._cond:
            self._queue.extend((row, Future()) for row in rows)
            self._cond.notify()

    # --- the spool ------------------------------------------------------------------------

    def _spool(self, rows: list[UsageRow]) -> bool:
        if not settings.REDIS_URL:
            return False
        try:
            spool_redis().rpush(spool_key(), *(json.dumps(encode(row)) for row in rows))
        except Exception:
            logger.exception("the ledger spool refused %d rows", len(rows))
            return False
        return True

    def drain(self) -> None:
        """Write the spooled rows into the ledger, a batch at a time, under a lock."""
        if not settings.REDIS_URL:
            return
        client, key = spool_redis(), spool_key()
        token = uuid.uuid4().hex
        try:
            if not client.llen(key) or not client.set(
                f"{key}:lock", token, nx=True, ex=DRAIN_LOCK_S
            ):
                return
            try:
                while raw := client.lrange(key, 0, MAX_BATCH - 1):
                    close_old_connections()
                    usage_rows_write([decode(json.loads(item)) for item in raw])
                    client.ltrim(key, len(raw), -1)
                    logger.warning("wrote %d spooled ledger rows", len(raw))
            finally:
                close_old_connections()
                if client.get(f"{key}:lock") == token:
                    client.delete(f"{key}:lock")
        except Exception:
            logger.exception("draining the ledger spool failed; trying again later")


def spool_key() -> str:
    return f"{settings.PARLEY_REDIS_PREFIX}:ledger:spool"


def encode(row: UsageRow) -> dict[str, Any]:
    return {
        k: (str(v) if v is not None and k.endswith("_id") else v)
        for k, v in dataclasses.asdict(row).items()
    }


def decode(data: dict[str, Any]) -> UsageRow:
    return UsageRow(**data)


@process_singleton
def spool_redis() -> Any:
    import redis

    return redis.Redis.from_url(str(settings.REDIS_URL), decode_responses=True)


@process_singleton
def writer() -> LedgerWriter:
    made = LedgerWriter()
    atexit.register(made.flush)
    return made
