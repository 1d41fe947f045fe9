"""One value per process, made on first use: the stores, clients and thread pools of
the pool are each made once, under a lock (and again in a forked child: its parent's
threads and connections are not its own).

    @process_singleton
    def limiter() -> Limiter:
        return MemoryLimiter(...) if settings.REDIS_URL is None else RedisLimiter(...)

    limiter()        # made on the first call, the same one afterwards
    limiter.reset()  # the next call makes a new one (tests that change the settings)
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class ProcessSingleton(Generic[T]):
    def __init__(self, make: Callable[[], T]) -> None:
        self._make = make
        self._lock = threading.Lock()
        self._made: tuple[int, T] | None = None  # (the process it was made in, the value)
        functools.update_wrapper(self, make)

    def __call__(self) -> T:
        made = self._made
        if made is None or made[0] != os.getpid():
            with self._lock:
                made = self._made
                if made is None or made[0] != os.getpid():
                    made = self._made = (os.getpid(), self._make())
        return made[1]

    def reset(self) -> None:
        with self._lock:
            self._made = None


def process_singleton(make: Callable[[], T]) -> ProcessSingleton[T]:
    return ProcessSingleton(make)
