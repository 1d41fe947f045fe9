"""The HTTP API at /api/v1/ (OpenAPI schema at /api/v1/openapi.json, docs at /api/v1/docs).

Errors answer `{"detail": "..."}` with the status: 400 bad input, 401 no or bad
credentials, 403 not allowed for this role or scope, 404 not found (also for
another tenant's objects), 409 conflicts.
"""

from __future__ import annotations

from django.core.exceptions import PermissionDenied, ValidationError
from django.http import HttpRequest, HttpResponse
from ninja import NinjaAPI
from ninja.errors import AuthenticationError

from tenants.access import NotFound
from tenants.api.auth import ApiKeyBearer, MemberSession

api = NinjaAPI(
    title="Parley API",
    version="1",
    urls_namespace="api",
    auth=[ApiKeyBearer(), MemberSession()],
)


@api.exception_handler(NotFound)
def _not_found(request: HttpRequest, exc: NotFound) -> HttpResponse:
    return api.create_response(request, {"detail": "Not found."}, status=404)


@api.exception_handler(ValidationError)
def _invalid(request: HttpRequest, exc: ValidationError) -> HttpResponse:
    return api.create_response(request, {"detail": " ".join(exc.messages)}, status=400)


@api.exception_handler(PermissionDenied)
def _forbidden(request: HttpRequest, exc: PermissionDenied) -> HttpResponse:
    message = str(exc) or "You are not allowed to do this."
    return api.create_response(request, {"detail": message}, status=403)


@api.exception_handler(AuthenticationError)
def _unauthenticated(request: HttpRequest, exc: AuthenticationError) -> HttpResponse:
    detail = getattr(request, "api_key_refusal", None) or "Authentication required."
    return api.create_response(request, {"detail": detail}, status=401)


api.add_router("/tenant", "tenants.api.tenant.router")
api.add_router("/keys", "tenants.api.keys.router")
api.add_router("/audit", "tenants.api.audit.router")
api.add_router("/members", "tenants.api.members.router")
api.add_router("/operator", "tenants.api.operator.router")
api.add_router("/operator/pool", "inference.api.router")
api.add_router("/operator/plugins", "agents.api.router")
api.add_router("/plugins", "agents.api_tenant.router")
api.add_router("/sso", "tenants.api.sso.router")
api.add_router("/conversations", "chat.api.conversations")
api.add_router("/messages", "chat.api.messages")
api.add_router("/runs", "chat.api.runs")
api.add_router("/ws", "chat.api_sockets.router")
