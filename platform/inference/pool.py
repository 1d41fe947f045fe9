"""The inference pool: which backends exist, which are healthy, where a call goes.

Every LLM call of the platform goes through `chat_stream`. This is the
foundation version: backends come from PARLEY_BACKENDS (plus the local CPU server
that `manage.py serve` registers in embedded mode), health is checked before use
and cached briefly, and a call that fails before its first token is retried on the
next healthy backend serving the model.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Generator

from django.conf import settings

from inference.client import BackendClient, ModelInfo, Timeouts
from inference.types import ChatRequest, InferenceError, StreamEvent, StreamStarted

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_health: dict[str, tuple[float, bool]] = {}
_models: dict[str, tuple[float, list[ModelInfo]]] = {}
_MODELS_TTL_S = 60.0


def backend_urls() -> list[str]:
    return list(settings.PARLEY_BACKENDS)


def client_for(url: str) -> BackendClient:
    return BackendClient(
        url,
        api_key=settings.PARLEY_BACKEND_API_KEY,
        timeouts=Timeouts(
            connect_s=settings.PARLEY_CONNECT_TIMEOUT_S,
            first_token_s=settings.PARLEY_FIRST_TOKEN_TIMEOUT_S,
            idle_s=settings.PARLEY_STREAM_IDLE_TIMEOUT_S,
        ),
    )


def backend_healthy(url: str) -> bool:
    now = time.monotonic()
    with _lock:
        cached = _health.get(url)
    if cached and now - cached[0] < settings.PARLEY_HEALTH_TTL_S:
        return cached[1]
    healthy = client_for(url).health()
    with _lock:
        _health[url] = (now, healthy)
    return healthy


def backend_models(url: str) -> list[ModelInfo]:
    now = time.monotonic()
    with _lock:
        cached = _models.get(url)
    if cached and now - cached[0] < _MODELS_TTL_S:
        return cached[1]
    models = client_for(url).models()
    with _lock:
        _models[url] = (now, models)
    return models


def _mark_unhealthy(url: str) -> None:
    with _lock:
        _health[url] = (time.monotonic(), False)


def forget_cache() -> None:
    with _lock:
        _health.clear()
        _models.clear()


def models_available() -> list[ModelInfo]:
    """Every model served by a healthy backend, once each."""
    seen: dict[str, ModelInfo] = {}
    for url in backend_urls():
        if not backend_healthy(url):
            continue
        try:
            for info in backend_models(url):
                seen.setdefault(info.id, info)
        except InferenceError:
            _mark_unhealthy(url)
    return list(seen.values())


def default_model() -> str:
    if settings.PARLEY_DEFAULT_MODEL:
        return settings.PARLEY_DEFAULT_MODEL
    models = models_available()
    if not models:
        raise InferenceError("no_backend", "No healthy inference backend is available.")
    return models[0].id


def _candidates(model: str) -> list[str]:
    urls = []
    for url in backend_urls():
        if not backend_healthy(url):
            continue
        try:
            if any(info.id == model for info in backend_models(url)):
                urls.append(url)
        except InferenceError:
            _mark_unhealthy(url)
    return urls


def chat_stream(request: ChatRequest) -> Generator[StreamEvent, None, None]:
    """Stream a chat completion from a healthy backend serving `request.model`.

    Yields StreamStarted (which backend, which model), TextDelta..., StreamFinished.
    Raises InferenceError with a stable code."""
    if not backend_urls():
        raise InferenceError(
            "no_backend", "No inference backend is configured (set PARLEY_BACKENDS)."
        )
    model = request.model or default_model()
    candidates = _candidates(model)
    if not candidates:
        if not any(backend_healthy(url) for url in backend_urls()):
            raise InferenceError("no_backend", "No healthy inference backend is available.")
        raise InferenceError("model_not_found", f"No backend serves the model {model!r}.")

    last_error: InferenceError | None = None
    for attempt, url in enumerate(candidates):
        if attempt:
            time.sleep(min(2.0, 0.1 * 2**attempt))
        produced = False
        try:
            for event in client_for(url).chat_stream(request, model=model):
                if not isinstance(event, StreamStarted):
                    produced = True
                yield event
            return
        except InferenceError as exc:
            if produced or not exc.retryable:
                raise
            logger.warning("backend %s failed before the first token: %s", url, exc)
            _mark_unhealthy(url)
            last_error = exc
    assert last_error is not None
    raise last_error
