"""One value per process, made on first use: the stores, clients and thread pools of
the pool are each made once, under a lock, and forgotten together by tests.

    @process_singleton
    def limiter() -> Limiter:
        return MemoryLimiter(...) if settings.REDIS_URL is None else RedisLimiter(...)

    limiter()        # made on the first call, the same one afterwards
    limiter.reset()  # the next call makes a new one (tests that change the settings)
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class ProcessSingleton(Generic[T]):
    def __init__(self, make: Callable[[], T]) -> None:
        self._make = make
        self._lock = threading.Lock()
        self._value: T | None = None
        functools.update_wrapper(self, make)

    def __call__(self) -> T:
        value = self._value
        if value is None:
            with self._lock:
                if self._value is None:
                    self._value = self._make()
                value = self._value
        return value

    def reset(self) -> None:
        with self._lock:
            self._value = None


def process_singleton(make: Callable[[], T]) -> ProcessSingleton[T]:
    return ProcessSingleton(make)
