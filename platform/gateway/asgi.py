"""The OpenAI-compatible API as a bare ASGI application, in front of Django.

`config.asgi` routes every HTTP request under `/v1/` here. A call is one coroutine on
the event loop: no Django request or response objects, no middleware chain, no thread
per request; Django serves the settings, and the ORM runs off the loop in the few
blocking steps of `gateway.services` and `inference.apool`. Each chunk of a stream is
one ASGI `send`.

What Django's stack did for these paths is done here: the Host header checked against
ALLOWED_HOSTS (HttpRequest.get_host, with Django's own functions: a 400 otherwise), the
body size limit (DATA_UPLOAD_MAX_MEMORY_SIZE, 413), the HTTPS redirect (to the checked
host) and HSTS of the production settings (SecurityMiddleware),
`X-Content-Type-Options: nosniff`, and a client that disconnects cancels its call (as
Django's ASGI handler does), so the pool gives back its slot and books what the stream
produced.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import suppress
from typing import Any

from django.conf import settings
from django.http.request import split_domain_port, validate_host

from gateway import services
from gateway.errors import ApiError

logger = logging.getLogger(__name__)
# Where Django reports a refused Host (django.core.handlers.exception).
disallowed_host_logger = logging.getLogger("django.security.DisallowedHost")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

PREFIX = "/v1/"
JSON = b"application/json"
SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _header_values(scope: Scope, name: bytes) -> str | None:
    """A header's values joined with commas, as Django's ASGIRequest puts a repeated
    header in META (so two Host headers make no valid host); None without it."""
    values = [value.decode("latin-1") for key, value in scope["headers"] if key == name]
    return ",".join(values) if values else None


def _host(scope: Scope, secure: bool) -> str | None:
    """The request's host as Django's HttpRequest.get_host finds and checks it, or
    None where Django raises DisallowedHost: X-Forwarded-Host (with
    USE_X_FORWARDED_HOST), else Host, else the server's address; split by Django's
    `split_domain_port` and matched against ALLOWED_HOSTS (DEBUG's localhost
    variants when it is empty) by its `validate_host`."""
    raw = _header_values(scope, b"x-forwarded-host") if settings.USE_X_FORWARDED_HOST else None
    if raw is None:
        raw = _header_values(scope, b"host")
    if raw is None:
        server = scope.get("server")
        name, port = (server[0], str(server[1])) if server else ("unknown", "0")
        if settings.USE_X_FORWARDED_PORT:
            port = _header_values(scope, b"x-forwarded-port") or port
        raw = name if port == ("443" if secure else "80") else f"{name}:{port}"
    allowed = settings.ALLOWED_HOSTS
    if settings.DEBUG and not allowed:
        allowed = [".localhost", "127.0.0.1", "[::1]"]
    domain, _ = split_domain_port(raw)
    if domain and validate_host(domain, allowed):
        return raw
    disallowed_host_logger.error(
        "Invalid HTTP_HOST header: %r.%s",
        raw,
        f" You may need to add {domain!r} to ALLOWED_HOSTS." if domain else "",
    )
    return None


def _is_secure(scope: Scope) -> bool:
    if scope.get("scheme") == "https":
        return True
    proxy = getattr(settings, "SECURE_PROXY_SSL_HEADER", None)
    if proxy:
        name, secure_value = proxy
        # HTTP_X_FORWARDED_PROTO -> x-forwarded-proto
        header = name.removeprefix("HTTP_").replace("_", "-").lower().encode("latin-1")
        value = _header(scope, header)
        return value is not None and value.split(",")[0].strip() == secure_value
    return False


def _common_headers(scope: Scope) -> list[tuple[bytes, bytes]]:
    headers = [(b"x-content-type-options", b"nosniff")]
    hsts = getattr(settings, "SECURE_HSTS_SECONDS", 0)
    if hsts and _is_secure(scope):
        value = f"max-age={hsts}"
        if getattr(settings, "SECURE_HSTS_INCLUDE_SUBDOMAINS", False):
            value += "; includeSubDomains"
        if getattr(settings, "SECURE_HSTS_PRELOAD", False):
            value += "; preload"
        headers.append((b"strict-transport-security", value.encode("latin-1")))
    return headers


async def _send_json(
    send: Send,
    scope: Scope,
    status: int,
    body: Any,
    headers: dict[str, str] | None = None,
) -> None:
    content = json.dumps(body).encode()
    out = [
        (b"content-type", JSON),
        (b"content-length", str(len(content)).encode()),
        *_common_headers(scope),
    ]
    for name, value in (headers or {}).items():
        out.append((name.lower().encode("latin-1"), value.encode("latin-1")))
    await send({"type": "http.response.start", "status": status, "headers": out})
    await send({"type": "http.response.body", "body": content})


async def _send_error(send: Send, scope: Scope, error: ApiError) -> None:
    await _send_json(send, scope, error.status, error.body(), error.headers)


async def _read_body(scope: Scope, receive: Receive) -> bytes | None:
    """The request body, or None when the client went away. ApiError 413 past
    DATA_UPLOAD_MAX_MEMORY_SIZE (as Django's `request.body`)."""
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    too_large = ApiError(413, "The request body is too large.", code="body_too_large")
    length = _header(scope, b"content-length")
    if (
        limit is not None
        and length is not None
        and length.isdigit()
        and (len(length) > 18 or int(length) > limit)  # (int() refuses 4300+ digits)
    ):
        raise too_large
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if limit is not None and size > limit:
            raise too_large
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _completion(scope: Scope, send: Send, body: bytes) -> None:
    try:
        completion = await services.completion_start(
            authorization=_header(scope, b"authorization"), body=body
        )
    except ApiError as exc:
        await _send_error(send, scope, exc)
        return
    if not completion.params.stream:
        try:
            answer = await completion.result()
        except ApiError as exc:
            await _send_error(send, scope, exc)
            return
        await _send_json(send, scope, 200, answer)
        return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": SSE_HEADERS + _common_headers(scope),
        }
    )
    async for chunk in completion.sse():
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def _chat_completions(scope: Scope, receive: Receive, send: Send) -> None:
    body = await _read_body(scope, receive)
    if body is None:
        return
    # The call runs while its client is there: a disconnect cancels it (the pool then
    # closes it: its slot and limits given back, what it produced booked).
    call = asyncio.ensure_future(_completion(scope, send, body))
    watch = asyncio.ensure_future(_until_disconnect(receive))
    try:
        await asyncio.wait((call, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not call.done():
            call.cancel()
            with suppress(asyncio.CancelledError):
                await call
        watch.cancel()
    if not call.cancelled():
        call.result()  # an unexpected error propagates to the server (a 500)


async def _models(scope: Scope, send: Send) -> None:
    from inference.blocking import blocking

    answer = await blocking(services.models_answer, authorization=_header(scope, b"authorization"))
    await _send_json(send, scope, 200, answer)


def _redirect_exempt(path: str) -> bool:
    patterns = getattr(settings, "SECURE_REDIRECT_EXEMPT", ())
    return any(re.search(pattern, path.lstrip("/")) for pattern in patterns)


async def application(scope: Scope, receive: Receive, send: Send) -> None:
    """HTTP under /v1/: /v1/chat/completions (POST), /v1/models (GET), and an
    OpenAI-shaped 404 for anything else; a Host that ALLOWED_HOSTS does not allow is
    a 400 before anything else (as Django answers it)."""
    assert scope["type"] == "http"
    path, method = scope["path"], scope["method"]
    secure = _is_secure(scope)
    host = _host(scope, secure)
    if host is None:
        error = ApiError(400, "The Host header does not name this server.", code="invalid_host")
        await _send_error(send, scope, error)
        return
    if (
        getattr(settings, "SECURE_SSL_REDIRECT", False)
        and not secure
        and not _redirect_exempt(path)
    ):
        host = getattr(settings, "SECURE_SSL_HOST", None) or host
        query = scope.get("query_string", b"").decode("latin-1")
        location = f"https://{host}{scope.get('raw_path', path.encode()).decode('latin-1')}"
        location += f"?{query}" if query else ""
        await send(
            {
                "type": "http.response.start",
                "status": 301,
                "headers": [
                    (b"location", location.encode("latin-1")),
                    (b"content-length", b"0"),
                    *_common_headers(scope),
                ],
            }
        )
        await send({"type": "http.response.body", "body": b""})
        return
    try:
        if path == "/v1/chat/completions":
            if method != "POST":
                raise _method_not_allowed(method, "POST")
            await _chat_completions(scope, receive, send)
        elif path == "/v1/models":
            if method != "GET":
                raise _method_not_allowed(method, "GET")
            await _models(scope, send)
        else:
            raise ApiError(404, f"Invalid URL ({method} {path}).", code="unknown_url")
    except ApiError as exc:
        await _send_error(send, scope, exc)


def _method_not_allowed(method: str, allowed: str) -> ApiError:
    return ApiError(
        405,
        f"Method {method} is not allowed here; use {allowed}.",
        code="method_not_allowed",
        headers={"Allow": allowed},
    )
