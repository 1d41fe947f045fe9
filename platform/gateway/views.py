"""The OpenAI-compatible HTTP API at /v1/: thin async views over gateway.services.

Async views, and an async iterator for the event stream: Django's ASGI handler relays
an async iterator as it produces, where it would drain a sync one first.
"""

from __future__ import annotations

from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, JsonResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase
from django.views.decorators.csrf import csrf_exempt

from gateway import services
from gateway.errors import ApiError
from inference import apool


def _method_not_allowed(request: HttpRequest, allowed: str) -> HttpResponseBase:
    error = ApiError(
        405,
        f"Method {request.method} is not allowed here; use {allowed}.",
        code="method_not_allowed",
        headers={"Allow": allowed},
    )
    return error.response()


@csrf_exempt  # an API key authenticates, never a cookie
async def chat_completions(request: HttpRequest) -> HttpResponseBase:
    if request.method != "POST":
        return _method_not_allowed(request, "POST")
    try:
        try:
            body = request.body
        except RequestDataTooBig:
            raise ApiError(413, "The request body is too large.", code="body_too_large") from None
        completion = await services.completion_start(
            authorization=request.headers.get("Authorization"), body=body
        )
        if completion.params.stream:
            return StreamingHttpResponse(
                completion.sse(),
                content_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return JsonResponse(await completion.result())
    except ApiError as exc:
        return exc.response()


@csrf_exempt
async def models(request: HttpRequest) -> HttpResponseBase:
    if request.method != "GET":
        return _method_not_allowed(request, "GET")
    try:
        answer = await apool.blocking(
            services.models_answer, authorization=request.headers.get("Authorization")
        )
    except ApiError as exc:
        return exc.response()
    return JsonResponse(answer)


@csrf_exempt
async def unknown(request: HttpRequest) -> HttpResponseBase:
    return ApiError(
        404, f"Invalid URL ({request.method} {request.path}).", code="unknown_url"
    ).response()
