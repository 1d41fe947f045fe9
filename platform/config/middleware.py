"""Middleware of every request: a strict Content Security Policy (model output is
untrusted, so pages run only Parley's own scripts, load nothing remote and talk only
to their own origin), and the input check of config.inputs at the door."""

from __future__ import annotations

from collections.abc import Callable

from django.conf import settings
from django.core.exceptions import RequestDataTooBig, SuspiciousOperation
from django.http import HttpRequest, HttpResponse, JsonResponse

from config.inputs import InvalidInput, text_check

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
        "form-action 'self'",
    ]
)


class ContentSecurityPolicyMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        return response


class InputCheckMiddleware:
    """Refuses, before sessions, CSRF, authentication or a view read it, a request
    whose path, query string, headers or form fields hold a NUL or a lone surrogate
    (config.inputs: not text), and an API request whose body is over
    DATA_UPLOAD_MAX_MEMORY_SIZE (a document upload: PARLEY_DOCUMENT_MAX_BYTES). The API
    (/api/) answers JSON `{"detail": ...}`, as all its errors; pages answer a plain 400.
    JSON bodies are checked by the API's parser (config.api), which knows the operation
    reads one."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        api = request.path_info.startswith(API_PREFIX)
        try:
            self.check(request, api=api)
        except RequestDataTooBig:
            return _refusal(api, 413, too_large_detail())
        except InvalidInput as exc:
            return _refusal(api, 400, exc.message)
        except SuspiciousOperation as exc:  # too many fields, a malformed form
            return _refusal(api, 400, str(exc) or "The request is malformed.")
        return self.get_response(request)

    @staticmethod
    def check(request: HttpRequest, *, api: bool) -> None:
        text_check(request.path, name="The path")
        for name, value in request.META.items():
            if name.startswith("HTTP_") and isinstance(value, str):
                text_check(value, name=f"The header {name[5:].replace('_', '-').title()}")
        for key, values in request.GET.lists():
            text_check(key, name="A query parameter's name")
            for value in values:
                text_check(value, name=f"The query parameter {key!r}")
        if api and _content_length(request) > _upload_limit(request):
            raise RequestDataTooBig(too_large_detail(request))
        if request.method == "POST" and request.content_type in FORM_TYPES:
            for key, values in request.POST.lists():
                text_check(key, name="A form field's name")
                for value in values:
                    text_check(value, name=f"The form field {key!r}")


API_PREFIX = "/api/"
# Form posts whose fields are checked here. (Not multipart: parsing it here would
# leave views no raw body; Django's form fields refuse NUL themselves.)
FORM_TYPES = ("application/x-www-form-urlencoded",)


def _content_length(request: HttpRequest) -> int:
    # The server has checked the header's form; a value that is not a number is
    # Django's to refuse, not this check's to crash on.
    try:
        return int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return 0


# File uploads (multipart POSTs to these paths) may be as large as a document may be,
# plus the multipart framing; the documents API checks the plan's own limit.
UPLOAD_PATHS = ("/api/v1/documents",)
MULTIPART_OVERHEAD = 64 * 1024


def _upload_limit(request: HttpRequest | None = None) -> int:
    if (
        request is not None
        and request.method == "POST"
        and request.path_info.rstrip("/") in UPLOAD_PATHS
        and request.content_type == "multipart/form-data"
    ):
        return int(settings.PARLEY_DOCUMENT_MAX_BYTES) + MULTIPART_OVERHEAD
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    return limit if limit is not None else 2**63


def too_large_detail(request: HttpRequest | None = None) -> str:
    return f"The request body is over the limit of {_upload_limit(request)} bytes."


def _refusal(api: bool, status: int, detail: str) -> HttpResponse:
    if api:
        return JsonResponse({"detail": detail}, status=status)
    return HttpResponse(detail, status=status, content_type="text/plain; charset=utf-8")
