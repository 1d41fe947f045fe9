"""Throttling of failed password logins, counted in the Django cache (Redis in
production, so every web process sees the same counts).

Failures are counted per username (normalised as the login forms read it, then
case-folded, whether or not the user exists, so the answers reveal nothing about
which usernames exist) and per client address, each in a window of
PARLEY_LOGIN_WINDOW_S from its first failure. Reaching the limit
(PARLEY_LOGIN_MAX_FAILURES for a username, PARLEY_LOGIN_MAX_FAILURES_PER_IP for an
address) locks it for one window: attempts are then refused without checking the
password. A successful login clears the username's count.

The throttle sits in the authentication backend (`ThrottledModelBackend`, first in
AUTHENTICATION_BACKENDS): every `authenticate()` with a password goes through it,
whichever form asked (the product's login page, the Django admin's, any later one).
"""

from __future__ import annotations

import hashlib
import math
import time
import unicodedata
from dataclasses import dataclass
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth.backends import ModelBackend
from django.core.cache import cache
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest

USERNAME_MAX_CHARS = 254  # longer input is no username; it is not normalised further
REFUSAL_ATTRIBUTE = "parley_login_refusal"  # on the request whose attempt was refused


@dataclass(frozen=True)
class LoginRefusal:
    retry_after_s: int
    message: str


def _key(kind: str, what: str, value: str) -> str:
    # Hashed: keys stay short and safe for any input, and usernames are not kept in clear.
    digest = hashlib.sha256(value.encode()).hexdigest()[:32]
    return f"login:{what}:{kind}:{digest}"


def username_normalize(value: Any) -> str:
    """A username as typed, as every login form reads it and the throttle counts it:
    surrounding whitespace (Unicode spaces too) stripped, NFKC-normalised (as Django's
    UsernameField does). " alice", "alice\u00a0" and "\talice" are all "alice"."""
    text = str(value or "").strip()[:USERNAME_MAX_CHARS]
    return unicodedata.normalize("NFKC", text).strip()


def _user_subject(username: str) -> str:
    return username_normalize(username).casefold()


def client_ip(request: HttpRequest | None) -> str | None:
    # Behind a proxy, the ASGI server must put the client's address here
    # (uvicorn --forwarded-allow-ips): else every client shares the proxy's count.
    if request is None:
        return None
    return request.META.get("REMOTE_ADDR") or None


def _subjects(*, username: str, ip: str | None) -> list[tuple[str, str, int]]:
    subjects = []
    user = _user_subject(username)
    if user:
        subjects.append(("user", user, settings.PARLEY_LOGIN_MAX_FAILURES))
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
    cache.delete(_key("user", "fail", _user_subject(username)))


def login_throttle_reset(*, username: str = "", ip: str | None = None) -> None:
    """Forget the counts and locks (after a password reset; in tests)."""
    for kind, value, _limit in _subjects(username=username, ip=ip):
        cache.delete_many([_key(kind, "fail", value), _key(kind, "lock", value)])


def login_refusal_of(request: HttpRequest | None) -> LoginRefusal | None:
    """The refusal of the request's latest sign-in attempt, if the throttle refused it
    (for the form to say why and when to try again)."""
    return getattr(request, REFUSAL_ATTRIBUTE, None)


class ThrottledModelBackend(ModelBackend):
    """Django's password check behind the throttle. A locked username or address is
    refused without checking the password; a wrong password is counted; a right one
    clears the username's count. Either refusal ends `authenticate()` (PermissionDenied):
    no later backend checks the password again. (ModelBackend stays listed after this
    one only so that sessions signed in without a password, by SSO or at sign-up, keep
    their backend.)"""

    def authenticate(
        self,
        request: HttpRequest | None,
        username: str | None = None,
        password: str | None = None,
        **kwargs: Any,
    ) -> Any:
        if username is None:
            username = kwargs.get(self._username_field())
        if username is None or password is None:
            return None
        username = username_normalize(username)
        ip = client_ip(request)
        refusal = login_throttle_check(username=username, ip=ip)
        if refusal is not None:
            if request is not None:
                setattr(request, REFUSAL_ATTRIBUTE, refusal)
            raise PermissionDenied(refusal.message)
        user = super().authenticate(request, username=username, password=password, **kwargs)
        if user is None:
            if username and password:
                login_throttle_failure(username=username, ip=ip)
            raise PermissionDenied
        login_throttle_success(username=username)
        return user

    async def aauthenticate(
        self,
        request: HttpRequest | None,
        username: str | None = None,
        password: str | None = None,
        **kwargs: Any,
    ) -> Any:
        # One code path: the throttle's cache calls are synchronous anyway.
        return await sync_to_async(self.authenticate)(
            request, username=username, password=password, **kwargs
        )

    @staticmethod
    def _username_field() -> str:
        from django.contrib.auth import get_user_model

        return get_user_model().USERNAME_FIELD
