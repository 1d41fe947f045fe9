"""Each request runs in one transaction scoped to its actor (see tenants.rls)."""

from __future__ import annotations

from collections.abc import Callable

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render

from tenants.access import Unavailable, actor_for_request
from tenants.rls import scope_set_tenant, tenant_scope

OPERATOR_PATHS = ("/admin/", "/api/v1/operator/", "/operator/")
# The OpenAI-compatible API authenticates by API key and scopes each of its reads itself,
# off the request's thread (gateway.services): a request transaction would hold a
# database connection for the whole length of a stream.
SELF_SCOPED_PATHS = ("/v1/",)
# A member of a suspended tenant can still sign out, switch to or join another tenant.
SUSPENDED_ALLOWED = ("/accounts/logout/", "/tenants/", "/invite/", "/static/", "/healthz")


class TenantScopeMiddleware:
    """After authentication: find the actor under the user's own scope (their
    memberships), then narrow the transaction to the actor's tenant. Operators get
    every tenant's rows only on the operator pages."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.path.startswith(SELF_SCOPED_PATHS):
            return self.get_response(request)
        user = request.user
        user_id = user.pk if user.is_authenticated else None
        operator = bool(getattr(user, "is_operator", False)) and request.path.startswith(
            OPERATOR_PATHS
        )
        try:
            return self._scoped(request, user_id=user_id, operator=operator)
        except Unavailable as exc:
            # Raised on commit (after the view answered): the data is stored.
            if request.path.startswith("/api/"):
                return JsonResponse({"detail": str(exc)}, status=503, headers={"Retry-After": "5"})
            return HttpResponse(str(exc), status=503, content_type="text/plain; charset=utf-8")

    def _scoped(self, request: HttpRequest, *, user_id: object, operator: bool) -> HttpResponse:
        with tenant_scope(user_id=user_id, operator=operator):
            request.actor = actor_for_request(request)  # type: ignore[attr-defined]
            actor = request.actor  # type: ignore[attr-defined]
            if actor is not None:
                scope_set_tenant(actor.tenant_id)
                if not actor.tenant.is_active and not request.path.startswith(
                    SUSPENDED_ALLOWED + OPERATOR_PATHS
                ):
                    return _suspended(request, actor.tenant)
            # Streaming responses produce their body after this transaction: they scope
            # their own reads.
            return self.get_response(request)


def _suspended(request: HttpRequest, tenant) -> HttpResponse:
    message = f"{tenant.name} is suspended on this platform."
    if tenant.suspended_reason:
        message += f" Reason: {tenant.suspended_reason}"
    if request.path.startswith("/api/"):
        return JsonResponse({"detail": message}, status=403)
    return render(request, "tenants/suspended.html", {"message": message}, status=403)
