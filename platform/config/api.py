"""The HTTP API at /api/v1/ (OpenAPI schema at /api/v1/openapi.json, docs at /api/v1/docs).

Errors answer `{"detail": "..."}` with the status: 400 bad input, 401 no or bad
credentials, 403 not allowed for this role or scope, 404 not found (also for
another tenant's objects), 413 a body over DATA_UPLOAD_MAX_MEMORY_SIZE, 503 briefly
unavailable (retry after Retry-After); 422 (a body
or parameter that does not fit the schema) answers `{"detail": [...]}`, one item per
problem. The schema documents these for every operation (ParleyAPI).

Input is checked before any view reads it (config.inputs): bodies are parsed by
`json_loads` (NUL, lone surrogates and deep nesting refused), query and form fields
are text-checked, and config.middleware.InputCheckMiddleware refuses a NUL in the
path, the query string or a header before the request reaches sessions or views.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import PermissionDenied, RequestDataTooBig, ValidationError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils.datastructures import MultiValueDict
from ninja import NinjaAPI
from ninja.errors import AuthenticationError, HttpError
from ninja.openapi.docs import Swagger
from ninja.parser import Parser

from chat.schemas import ErrorOut, ValidationErrorOut
from config.inputs import InvalidInput, json_loads, text_check
from config.middleware import too_large_detail
from tenants.access import NotFound
from tenants.api.auth import ApiKeyBearer, MemberSession


class InputParser(Parser):
    """Bodies through `json_loads`; query and form fields text-checked."""

    def parse_body(self, request: HttpRequest) -> Any:
        return json_loads(request.body)

    def parse_querydict(
        self, data: MultiValueDict, list_fields: list[str], request: HttpRequest
    ) -> dict[str, Any]:
        for key, values in data.lists():
            text_check(key, name="A parameter's name")
            for value in values:
                if isinstance(value, str):  # (files are not text)
                    text_check(value, name=f"The parameter {key!r}")
        return super().parse_querydict(data, list_fields, request)


# The error responses every operation may answer (ParleyAPI documents them).
ERRORS: dict[int, str] = {
    400: "Bad input: a value the operation refuses (the detail says which and why).",
    401: "No credentials, or bad ones.",
    403: "Not allowed for this role or API key scope, or the tenant is suspended.",
    404: "No such object, or it belongs to someone else (indistinguishable).",
    503: "Briefly unavailable (the database or the task queue): retry after Retry-After.",
}
BODY_TOO_LARGE = "The request body is over DATA_UPLOAD_MAX_MEMORY_SIZE."
SCHEMA_MISMATCH = "A body or parameter that does not fit the schema: one item per problem."


class ParleyAPI(NinjaAPI):
    """The NinjaAPI whose schema documents, for every operation, the error responses
    any of them may give (ERRORS; 413 where there is a body; 422), so generated
    clients know them. An operation's own documentation of a status is kept."""

    def get_openapi_schema(self, **kwargs: Any) -> Any:
        schema = super().get_openapi_schema(**kwargs)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        ref_template = "#/components/schemas/{model}"
        for model in (ErrorOut, ValidationErrorOut):
            found = model.model_json_schema(ref_template=ref_template)
            components.update(found.pop("$defs", {}))
            components.setdefault(model.__name__, found)

        def response(description: str, model: type) -> dict[str, Any]:
            ref = {"$ref": ref_template.format(model=model.__name__)}
            return {"description": description, "content": {"application/json": {"schema": ref}}}

        for methods in schema.get("paths", {}).values():
            for operation in methods.values():
                # ninja keys an operation's own statuses by int (`response={202: ...}`):
                # as text, so a status it documents is not given a second time (JSON
                # would hold the key twice, which Swagger UI refuses to parse).
                responses = {str(k): v for k, v in operation.get("responses", {}).items()}
                operation["responses"] = responses
                errors = dict(ERRORS)
                if "requestBody" in operation:
                    errors[413] = BODY_TOO_LARGE
                for status, description in errors.items():
                    responses.setdefault(str(status), response(description, ErrorOut))
                responses.setdefault("422", response(SCHEMA_MISMATCH, ValidationErrorOut))
        return schema


class OfflineSwagger(Swagger):
    """The docs page (/api/v1/docs) with Swagger UI served by Parley: the npm package
    swagger-ui-dist, copied into frontend/dist by the frontend build, and started by
    frontend/src/docs.ts. ninja's own page loads it from a CDN with an inline script,
    which the Content Security Policy (config.middleware) blocks and which needs the
    internet; this one loads only Parley's own static files."""

    template = "api/docs.html"

    def render_page(self, request: HttpRequest, api: Any, **kwargs: Any) -> HttpResponse:
        settings = {**self.settings, "url": self.get_openapi_url(api, kwargs)}
        context = {
            "swagger_settings": settings,  # (json_script in the template)
            "api": api,
            "add_csrf": any(getattr(auth, "csrf", False) for auth in api.auth or ()),
        }
        return render(request, self.template, context)


api = ParleyAPI(
    title="Parley API",
    version="1",
    urls_namespace="api",
    auth=[ApiKeyBearer(), MemberSession()],
    parser=InputParser(),
    docs=OfflineSwagger(),
)


@api.exception_handler(NotFound)
def _not_found(request: HttpRequest, exc: NotFound) -> HttpResponse:
    return api.create_response(request, {"detail": "Not found."}, status=404)


@api.exception_handler(ValidationError)
def _invalid(request: HttpRequest, exc: ValidationError) -> HttpResponse:
    return api.create_response(request, {"detail": " ".join(exc.messages)}, status=400)


@api.exception_handler(InvalidInput)
def _invalid_input(request: HttpRequest, exc: InvalidInput) -> HttpResponse:
    return api.create_response(request, {"detail": exc.message}, status=400)


@api.exception_handler(RequestDataTooBig)
def _too_large(request: HttpRequest, exc: RequestDataTooBig) -> HttpResponse:
    return api.create_response(request, {"detail": too_large_detail()}, status=413)


@api.exception_handler(HttpError)
def _http_error(request: HttpRequest, exc: HttpError) -> HttpResponse:
    # ninja wraps what the parser raised ("Cannot parse request body"): say what it was.
    cause = exc.__cause__
    if isinstance(cause, InvalidInput):
        return _invalid_input(request, cause)
    if isinstance(cause, RequestDataTooBig):
        return _too_large(request, cause)
    return api.create_response(request, {"detail": str(exc)}, status=exc.status_code)


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
api.add_router("/documents", "documents.api.router")
api.add_router("/artifacts", "sandbox.api.router")
api.add_router("/review-templates", "documents.api.templates")
api.add_router("/reviews", "chat.api.reviews")
api.add_router("/conversations", "chat.api.conversations")
api.add_router("/messages", "chat.api.messages")
api.add_router("/runs", "chat.api.runs")
api.add_router("/models", "chat.api_models.router")
api.add_router("/ws", "chat.api_sockets.router")
