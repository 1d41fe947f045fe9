"""Errors of the OpenAI-compatible API, in OpenAI's shape:

    {"error": {"message": "...", "type": "...", "param": null | "...", "code": "..."}}

`ApiError` carries the status, the body's fields and extra headers (`Retry-After` on
429 and 503); `from_inference_error` maps the pool's stable error codes onto it.
"""

from __future__ import annotations

import json
import math
from typing import Any

from inference.admission import AdmissionTimeout
from inference.limits import LimitExceeded
from inference.types import InferenceError

INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
PERMISSION = "permission_error"
RATE_LIMIT = "rate_limit_error"
INSUFFICIENT_QUOTA = "insufficient_quota"
SERVER = "server_error"


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID_REQUEST,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def _retry_after(seconds: float) -> dict[str, str]:
    # Retry-After takes whole seconds; never 0, which would invite a busy loop.
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


# The pool's error codes that are not the backend's doing, and how they answer.
_STATUS = {
    "model_not_allowed": (404, INVALID_REQUEST),
    "model_not_found": (404, INVALID_REQUEST),
    "no_backend": (503, SERVER),
    "tenant_not_found": (401, AUTHENTICATION),
    "first_token_timeout": (504, SERVER),
    "stream_timeout": (504, SERVER),
    "cancelled": (499, SERVER),
}


def from_inference_error(exc: InferenceError) -> ApiError:
    """The HTTP answer to a failed pool call. Over a limit: 429 with Retry-After
    (`rate_limited`, or `budget_exhausted` for the monthly budget); a saturated pool:
    503 with Retry-After (`pool_busy`); a backend that refused the request (say, a
    prompt over its context length): 400 with its message; backends that failed: 502
    (504 for timeouts)."""
    if isinstance(exc, LimitExceeded):
        kind = INSUFFICIENT_QUOTA if exc.code == "budget_exhausted" else RATE_LIMIT
        return ApiError(
            429, exc.message, type=kind, code=exc.code, headers=_retry_after(exc.retry_after_s)
        )
    if isinstance(exc, AdmissionTimeout):
        return ApiError(
            503, exc.message, type=SERVER, code=exc.code, headers=_retry_after(exc.retry_after_s)
        )
    if exc.code == "backend_rejected" and 400 <= exc.status < 500 and exc.status != 429:
        return ApiError(400, exc.message, type=INVALID_REQUEST, code=exc.code)
    status, kind = _STATUS.get(exc.code, (502, SERVER))
    return ApiError(status, exc.message, type=kind, code=exc.code)


def error_event(exc: ApiError) -> bytes:
    """An error after the stream began: an SSE event with the error object, as vLLM
    and OpenAI send it (the OpenAI SDK raises it as an APIError)."""
    return b"data: " + json.dumps(exc.body()).encode() + b"\n\n"
