"""Each request runs in one transaction scoped to its actor (see tenants.rls)."""

from __future__ import annotations

from collections.abc import Callable

from django.http import HttpRequest, HttpResponse

from tenants.access import actor_for_request
from tenants.rls import scope_set_tenant, tenant_scope

OPERATOR_PATHS = ("/admin/",)


class TenantScopeMiddleware:
    """After authentication: find the actor under the user's own scope (their
    memberships), then narrow the transaction to the actor's tenant. Operators get
    every tenant's rows only on the operator pages."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        user = request.user
        user_id = user.pk if user.is_authenticated else None
        operator = bool(getattr(user, "is_operator", False)) and request.path.startswith(
            OPERATOR_PATHS
        )
        with tenant_scope(user_id=user_id, operator=operator):
            request.actor = actor_for_request(request)  # type: ignore[attr-defined]
            if request.actor is not None:  # type: ignore[attr-defined]
                scope_set_tenant(request.actor.tenant_id)  # type: ignore[attr-defined]
            # Streaming responses produce their body after this transaction: they scope
            # their own reads.
            return self.get_response(request)
