"""Leases renewed while their holder lives: one daemon thread per process.

What a call holds in Redis (its concurrency slots and budget reservation, its
admission slot, its in-flight lease on a backend) is a lease that expires unless
renewed, so a process that dies holds nothing for long. A live holder registers a
renewal here; `renewer` calls each at its interval until it is removed.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)


class LeaseRenewer:
    """One daemon thread per process calls every registered renewal at its interval. A
    process that dies renews nothing more, so its leases expire."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._entries: dict[int, tuple[Callable[[], object], float, float]] = {}
        self._next = 0
        self._thread: threading.Thread | None = None
        self._pid = 0

    def add(self, renew: Callable[[], object], interval_s: float) -> int:
        with self._cond:
            if self._pid != os.getpid():  # a forked child starts afresh
                self._pid, self._thread, self._entries = os.getpid(), None, {}
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="parley-lease-renewer", daemon=True
                )
                self._thread.start()
            self._next += 1
            self._entries[self._next] = (renew, interval_s, time.monotonic() + interval_s)
            self._cond.notify()
            return self._next

    def remove(self, token: int) -> None:
        with self._cond:
            self._entries.pop(token, None)

    def __len__(self) -> int:
        with self._cond:
            return len(self._entries)

    def _run(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                due = []
                for token, (renew, interval, next_at) in list(self._entries.items()):
                    if next_at <= now:
                        due.append(renew)
                        self._entries[token] = (renew, interval, now + interval)
                if not due:
                    wait = min((e[2] for e in self._entries.values()), default=now + 60) - now
                    self._cond.wait(timeout=max(0.01, wait))
                    continue
            for renew in due:
                try:
                    renew()
                except Exception:
                    logger.exception("renewing a lease failed")


renewer = LeaseRenewer()
