"""Who calls the OpenAI-compatible API: a tenant's API key with the `chat` scope, and
the limits of the tenant's plan, remembered for a few seconds."""

from __future__ import annotations

import hashlib
import threading
import time
from typing import Any

from django.utils import timezone

from gateway.errors import AUTHENTICATION, PERMISSION, ApiError, from_inference_error
from inference.selectors import tenant_limits
from inference.types import InferenceError
from tenants.access import Actor
from tenants.models import ApiKey
from tenants.quotas import Limits


def caller_authenticate(*, authorization: str | None) -> Actor:
    """The actor of an `Authorization: Bearer <key>` header: 401 without a valid key,
    403 for a key without the `chat` scope."""
    from tenants.services.api_keys import ApiKeyRefused, api_key_authenticate

    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(
            401,
            "No API key: send your Parley API key as 'Authorization: Bearer prk_...'.",
            type=AUTHENTICATION,
            code="missing_api_key",
        )
    try:
        actor = api_key_authenticate(token.strip())
    except ApiKeyRefused as exc:
        raise ApiError(401, exc.message, type=AUTHENTICATION, code="invalid_api_key") from None
    if not actor.has_scope(ApiKey.Scope.CHAT):
        raise ApiError(
            403,
            "This API key lacks the 'chat' scope.",
            type=PERMISSION,
            code="insufficient_scope",
        )
    return actor


# A caller (the key's actor and its tenant's limits) is remembered for a few seconds,
# by the SHA-256 of the presented key (never the key itself): a busy integrator's calls
# then skip the key's and the plan's lookups. A key, tenant, plan or membership saved
# or deleted in this process (a revocation, a suspension, a plan change, a key's
# creator demoted or removed) is forgotten at once (`auth_cache_clear`, on their
# post_save and post_delete: gateway.apps); elsewhere (another process, a bulk update)
# within AUTH_CACHE_S. Refusals are never remembered: a new key works at once.
AUTH_CACHE_S = 5.0
AUTH_CACHE_MAX = 10_000
_auth_cache: dict[bytes, tuple[float, Actor, Limits]] = {}
_auth_lock = threading.Lock()


def _forget_keys() -> None:
    with _auth_lock:
        _auth_cache.clear()


def auth_cache_clear(**_: Any) -> None:
    """Forget every remembered key, now and when the transaction that changed a key or
    a tenant commits (a post_save receiver): a call in between cannot keep the old
    state remembered."""
    from django.db import transaction

    _forget_keys()
    transaction.on_commit(_forget_keys)


def _digest(authorization: str | None) -> bytes:
    return hashlib.sha256((authorization or "").encode()).digest()


def caller_remembered(*, authorization: str | None) -> tuple[Actor, Limits] | None:
    """The caller of this header and its tenant's limits, when remembered; no I/O (the
    event loop asks here first)."""
    hit = _auth_cache.get(_digest(authorization))
    if hit is not None and hit[0] > time.monotonic():
        return hit[1], hit[2]
    return None


# One lookup of a key at a time: a burst of calls with a key not remembered (yet, or
# any more) waits for the first one's answer instead of each asking the database.
_lookups = [threading.Lock() for _ in range(64)]


def caller_cached(*, authorization: str | None) -> tuple[Actor, Limits]:
    """`caller_authenticate` and the tenant's limits, remembered for AUTH_CACHE_S."""
    digest = _digest(authorization)
    with _lookups[digest[0] % len(_lookups)]:
        now = time.monotonic()
        hit = _auth_cache.get(digest)
        if hit is not None and hit[0] > now:
            return hit[1], hit[2]
        actor = caller_authenticate(authorization=authorization)
        limits = tenant_limits_of(actor)
        until = now + AUTH_CACHE_S
        expires_at = actor.api_key.expires_at if actor.api_key is not None else None
        if expires_at is not None:  # never remembered past the key's expiry
            until = min(until, now + (expires_at - timezone.now()).total_seconds())
        with _auth_lock:
            if len(_auth_cache) >= AUTH_CACHE_MAX:
                for stale in [d for d, entry in _auth_cache.items() if entry[0] <= now]:
                    del _auth_cache[stale]
                if len(_auth_cache) >= AUTH_CACHE_MAX:
                    _auth_cache.clear()
            _auth_cache[digest] = (until, actor, limits)
        return actor, limits


def tenant_limits_of(actor: Actor) -> Limits:
    """The limits of the actor's tenant (401 when it is gone)."""
    try:
        return tenant_limits(actor.tenant_id)
    except InferenceError as exc:
        raise from_inference_error(exc) from None
