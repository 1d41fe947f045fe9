"""Test settings: the mode the environment chooses (production against real PostgreSQL
and Redis under `make test`), with fast password hashing and a private Redis prefix."""

import os
import tempfile

# `make test` exports these (tests/services.sh); the defaults are the standard local ports.
os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/parley")
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/15")
os.environ.setdefault("DJANGO_SECRET_KEY", "test-only-" + "x" * 50)
os.environ.setdefault("DJANGO_ALLOWED_HOSTS", "testserver,localhost,127.0.0.1")

from config.settings.base import *  # noqa: F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
ALLOWED_HOSTS = ["testserver", "localhost", "127.0.0.1"]
# Keys of concurrent test sessions never meet.
PARLEY_REDIS_PREFIX = f"parleytest{os.getpid()}"
if not EMBEDDED:  # noqa: F405
    CHANNEL_LAYERS["default"]["CONFIG"]["prefix"] = f"{PARLEY_REDIS_PREFIX}:asgi"  # noqa: F405
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        **CELERY_BROKER_TRANSPORT_OPTIONS,  # noqa: F405
        "global_keyprefix": f"{PARLEY_REDIS_PREFIX}:celery:",
    }
PARLEY_TOKEN_COALESCE_MS = 0
# Greedy decoding: the real model's answers are the same on every run.
PARLEY_TEMPERATURE = 0.0
PARLEY_RUN_HEARTBEAT_S = 0.5
if not EMBEDDED:  # noqa: F405
    # Concurrent test sessions (several checkouts on one server) each get their own.
    DATABASES["default"]["TEST"] = {  # noqa: F405
        "NAME": os.environ.get("PARLEY_TEST_DB_NAME", "test_parley")
    }
    CACHES["default"]["KEY_PREFIX"] = f"{PARLEY_REDIS_PREFIX}:cache"  # noqa: F405
    # The tests run on the connection pool, as production does (DATABASE_POOL, on by
    # default; tests/test_db_pool.py); tests/conftest.py's django_db_setup closes the
    # pool the owner migrated through before the tests switch to the application role.
    # Without the pool (DATABASE_POOL=false), worker threads in tests must still not
    # keep connections to the test database open.
    DATABASES["default"]["CONN_MAX_AGE"] = 0  # noqa: F405
# Static files come from the finders; tests never collect them (the embedded server the
# browser tests start collects its own: chat's `serve`).
STATIC_ROOT = None
_plain = "django.contrib.staticfiles.storage.StaticFilesStorage"
STORAGES = {**STORAGES, "staticfiles": {"BACKEND": _plain}}  # noqa: F405
WHITENOISE_USE_FINDERS = True
EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
# Uploaded documents of the tests (and of the workers they start) go to a folder of the
# system's temporary directory, not under var/ (tests/conftest.py empties it).
STORAGES["documents"]["OPTIONS"]["location"] = os.environ.get(
    "PARLEY_DOCUMENTS_DIR", os.path.join(tempfile.gettempdir(), "parley-test-documents")
)
STORAGES["sandbox"]["OPTIONS"]["location"] = os.environ.get(
    "PARLEY_SANDBOX_DIR", os.path.join(tempfile.gettempdir(), "parley-test-sandbox")
)
