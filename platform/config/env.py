"""The one reader of the environment.

Every setting that comes from the environment goes through `env` here, so that a
bad or missing value stops start-up with a message naming the variable.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlparse

import environ
from django.core.exceptions import ImproperlyConfigured

T = TypeVar("T")

env = environ.Env()

_MISSING = object()


def _read(name: str, reader: Callable[..., T], default: Any = _MISSING) -> T:
    try:
        if default is _MISSING:
            return reader(name)
        return reader(name, default=default)
    except ImproperlyConfigured:
        raise ImproperlyConfigured(f"Set the {name} environment variable.") from None
    except (ValueError, TypeError, KeyError) as exc:
        raise ImproperlyConfigured(
            f"{name} has an invalid value {os.environ.get(name)!r}: {exc}"
        ) from None


def present(name: str) -> bool:
    """An integration is configured only when its variable is set and not empty."""
    return bool(os.environ.get(name, "").strip())


def string(name: str, default: Any = _MISSING) -> str:
    """A string; without a default the variable is required and must not be empty."""
    if default is _MISSING and not present(name):
        raise ImproperlyConfigured(f"Set the {name} environment variable.")
    return _read(name, env.str, default)


def boolean(name: str, default: Any = _MISSING) -> bool:
    value = os.environ.get(name)
    if value is not None and value.strip().lower() not in {
        "1",
        "0",
        "true",
        "false",
        "yes",
        "no",
        "on",
        "off",
        "",
    }:
        raise ImproperlyConfigured(f"{name} must be true or false, not {value!r}.")
    return _read(name, env.bool, default)


def integer(
    name: str, default: Any = _MISSING, *, minimum: int | None = None, maximum: int | None = None
) -> int:
    value = _read(name, env.int, default)
    if minimum is not None and value < minimum:
        raise ImproperlyConfigured(f"{name} must be at least {minimum}, not {value}.")
    if maximum is not None and value > maximum:
        raise ImproperlyConfigured(f"{name} must be at most {maximum}, not {value}.")
    return value


def floating(
    name: str,
    default: Any = _MISSING,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
) -> float:
    value = _read(name, env.float, default)
    if minimum is not None and value < minimum:
        raise ImproperlyConfigured(f"{name} must be at least {minimum}, not {value}.")
    if maximum is not None and value > maximum:
        raise ImproperlyConfigured(f"{name} must be at most {maximum}, not {value}.")
    return value


def strings(name: str, default: Any = _MISSING) -> list[str]:
    return [item.strip() for item in _read(name, env.list, default) if item.strip()]


def database(name: str) -> dict[str, Any]:
    url = string(name)
    scheme = urlparse(url).scheme
    if scheme not in {"postgres", "postgresql", "pgsql"}:
        raise ImproperlyConfigured(
            f"{name} must be a postgres:// URL (Parley's production database is "
            f"PostgreSQL), not a {scheme or 'schemeless'} URL."
        )
    config = _read(name, env.db_url)
    if not config.get("NAME"):
        raise ImproperlyConfigured(f"{name} must name a database: postgres://user@host/NAME.")
    config["ENGINE"] = "django.db.backends.postgresql"
    return config


def redis_url(name: str) -> str:
    url = string(name)
    parsed = urlparse(url)
    if parsed.scheme not in {"redis", "rediss", "unix"}:
        raise ImproperlyConfigured(
            f"{name} must be a redis://, rediss:// or unix:// URL, not {url!r}."
        )
    if parsed.scheme != "unix" and not parsed.hostname:
        raise ImproperlyConfigured(f"{name} must name a host: redis://host:6379/0.")
    return url


def http_urls(name: str, default: Any = _MISSING) -> list[str]:
    urls = strings(name, default)
    for url in urls:
        parsed = urlparse(url)
        if parsed.scheme not in {"http", "https"} or not parsed.netloc:
            raise ImproperlyConfigured(
                f"{name} must be a comma-separated list of http(s) base URLs; {url!r} is not one."
            )
    return [url.rstrip("/") for url in urls]
