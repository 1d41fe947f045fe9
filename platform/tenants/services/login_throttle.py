"""Throttling of failed password logins, counted in the Django cache (Redis in
production, so every web process sees the same counts).

Failures are counted per username (case-folded, whether or not the user exists, so
the answers reveal nothing about which usernames exist) and per client address, each
in a window of PARLEY_LOGIN_WINDOW_S from its first failure. Reaching the limit
(PARLEY_LOGIN_MAX_FAILURES for a username, PARLEY_LOGIN_MAX_FAILURES_PER_IP for an
address) locks it for one window: attempts are then refused without checking the
password. A successful login clears the username's count.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass

from django.conf import settings
from django.core.cache import cache


@dataclass(frozen=True)
class LoginRefusal:
    retry_after_s: int
    message: str


def _key(kind: str, what: str, value: str) -> str:
    # Hashed: keys stay short and safe for any input, and usernames are not kept in clear.
    digest = hashlib.sha256(value.encode()).hexdigest()[:32]
    return f"login:{what}:{kind}:{digest}"


def _subjects(*, username: str, ip: str | None) -> list[tuple[str, str, int]]:
    subjects = []
    if username:
        subjects.append(("user", username.casefold(), settings.PARLEY_LOGIN_MAX_FAILURES))
    if ip:
        subjects.append(("ip", ip, settings.PARLEY_LOGIN_MAX_FAILURES_PER_IP))
    return subjects


def _now() -> float:
    return time.time()


def _in_words(seconds: int) -> str:
    if seconds < 60:
        return f"{seconds} second{'s' if seconds != 1 else ''}"
    minutes = math.ceil(seconds / 60)
    return f"{minutes} minute{'s' if minutes != 1 else ''}"


def login_throttle_check(*, username: str, ip: str | None) -> LoginRefusal | None:
    """A refusal if the username or the address is locked now, else None."""
    now = _now()
    refusal: LoginRefusal | None = None
    for kind, value, _limit in _subjects(username=username, ip=ip):
        until = cache.get(_key(kind, "lock", value))
        if until is None or until <= now:
            continue
        wait = max(1, math.ceil(until - now))
        if refusal is None or wait > refusal.retry_after_s:
            who = "for this account" if kind == "user" else "from your network"
            advice = " or reset your password" if kind == "user" else ""
            refusal = LoginRefusal(
                retry_after_s=wait,
                message=f"Too many failed sign-in attempts {who}. "
                f"Try again in {_in_words(wait)}{advice}.",
            )
    return refusal


def _increment(key: str, timeout: int) -> int:
    cache.add(key, 0, timeout)  # starts the window; keeps an existing count and its expiry
    try:
        return cache.incr(key)
    except ValueError:  # expired between add and incr
        cache.set(key, 1, timeout)
        return 1


def login_throttle_failure(*, username: str, ip: str | None) -> None:
    """Count a failed attempt; lock what reached its limit for one window."""
    window = settings.PARLEY_LOGIN_WINDOW_S
    for kind, value, limit in _subjects(username=username, ip=ip):
        if _increment(_key(kind, "fail", value), window) >= limit:
            cache.set(_key(kind, "lock", value), _now() + window, window)
            cache.delete(_key(kind, "fail", value))  # after the lock, a fresh count


def login_throttle_success(*, username: str) -> None:
    cache.delete(_key("user", "fail", username.casefold()))


def login_throttle_reset(*, username: str = "", ip: str | None = None) -> None:
    """Forget the counts and locks (after a password reset; in tests)."""
    for kind, value, _limit in _subjects(username=username, ip=ip):
        cache.delete_many([_key(kind, "fail", value), _key(kind, "lock", value)])
