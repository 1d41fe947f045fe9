"""Who calls the HTTP API: a signed-in member (session cookie, CSRF-checked) or an
integrator's API key (`Authorization: Bearer prk_...`). Either way the request's
transaction is then scoped to the actor's tenant."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest
from ninja.security import HttpBearer, SessionAuth

from tenants.access import Actor
from tenants.rls import scope_set_tenant


class MemberSession(SessionAuth):
    def authenticate(self, request: HttpRequest, key: str | None) -> Actor | None:
        return getattr(request, "actor", None)


class ApiKeyBearer(HttpBearer):
    def authenticate(self, request: HttpRequest, token: str) -> Actor | None:
        from tenants.services.api_keys import ApiKeyRefused, api_key_authenticate

        try:
            actor = api_key_authenticate(token)
        except ApiKeyRefused as exc:
            request.api_key_refusal = exc.message  # type: ignore[attr-defined]
            return None
        scope_set_tenant(actor.tenant_id)
        request.actor = actor  # type: ignore[attr-defined]
        return actor


def actor_of(request: Any) -> Actor:
    """The authenticated actor of an API request (ninja puts it on request.auth)."""
    return request.auth
