"""A circuit breaker per backend, per process: after `threshold` failures within
`window_s`, the backend gets no calls for `cooldown_s`; then one trial call (half-open)
closes the circuit on success or reopens it on failure."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field


@dataclass
class _Circuit:
    failures: deque[float] = field(default_factory=deque)
    open_until: float = 0.0
    trial_in_flight: bool = False


class CircuitBreaker:
    def __init__(self, threshold: int = 3, window_s: float = 30.0, cooldown_s: float = 15.0):
        self.threshold = threshold
        self.window_s = window_s
        self.cooldown_s = cooldown_s
        self._circuits: dict[str, _Circuit] = {}
        self._lock = threading.Lock()

    def is_open(self, backend: str, now: float | None = None) -> bool:
        """True while calls must avoid the backend. After the cooldown, the first
        caller to ask gets False once (the trial call); others still see it open."""
        now = time.monotonic() if now is None else now
        with self._lock:
            circuit = self._circuits.get(backend)
            if circuit is None or circuit.open_until == 0.0:
                return False
            if now < circuit.open_until or circuit.trial_in_flight:
                return True
            circuit.trial_in_flight = True
            return False

    def record_failure(self, backend: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            circuit = self._circuits.setdefault(backend, _Circuit())
            circuit.failures.append(now)
            while circuit.failures and circuit.failures[0] < now - self.window_s:
                circuit.failures.popleft()
            if circuit.trial_in_flight or len(circuit.failures) >= self.threshold:
                circuit.open_until = now + self.cooldown_s
                circuit.trial_in_flight = False

    def record_success(self, backend: str) -> None:
        with self._lock:
            self._circuits.pop(backend, None)

    def reset(self) -> None:
        with self._lock:
            self._circuits.clear()
