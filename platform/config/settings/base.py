"""Parley settings, read from the environment through `config.env`.

Two modes, one code base:

- embedded (neither DATABASE_URL nor REDIS_URL set): SQLite under var/, in-memory
  channel layer and run event log, tasks executed in-process on worker threads,
  the local CPU model server as the only inference backend;
- production (both set): PostgreSQL through psycopg 3, Redis for the channel
  layer, the Celery broker and the run event streams, backends from PARLEY_BACKENDS.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from pathlib import Path
from typing import Any

from django.core.exceptions import ImproperlyConfigured

from config import env
from config.redis_clients import ASYNC_REDIS_OPTIONS

ROOT_DIR = Path(__file__).resolve().parents[3]
PLATFORM_DIR = ROOT_DIR / "platform"
FRONTEND_DIR = ROOT_DIR / "frontend"
VAR_DIR = Path(env.string("PARLEY_VAR_DIR", default=str(ROOT_DIR / "var"))).resolve()

# --- mode -------------------------------------------------------------------
_has_db = env.present("DATABASE_URL")
_has_redis = env.present("REDIS_URL")
if _has_db != _has_redis:
    missing = "REDIS_URL" if _has_db else "DATABASE_URL"
    raise ImproperlyConfigured(
        f"Set the {missing} environment variable: production mode needs both DATABASE_URL "
        "and REDIS_URL (leave both unset for the embedded mode)."
    )
EMBEDDED = not _has_db
PARLEY_MODE = "embedded" if EMBEDDED else "production"

if EMBEDDED:
    VAR_DIR.mkdir(parents=True, exist_ok=True)


def _embedded_secret_key() -> str:
    """Embedded mode keeps a generated key under var/ so sessions survive restarts."""
    path = VAR_DIR / "secret_key"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(50))
        path.chmod(0o600)
    return path.read_text().strip()


DEBUG = env.boolean("DJANGO_DEBUG", default=False)
if env.present("DJANGO_SECRET_KEY") or not EMBEDDED:
    SECRET_KEY = env.string("DJANGO_SECRET_KEY")
else:
    SECRET_KEY = _embedded_secret_key()

ALLOWED_HOSTS = env.strings(
    "DJANGO_ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"] if EMBEDDED else []
)
if not EMBEDDED and not ALLOWED_HOSTS:
    raise ImproperlyConfigured("Set the DJANGO_ALLOWED_HOSTS environment variable.")
CSRF_TRUSTED_ORIGINS = env.strings("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])

# --- applications -----------------------------------------------------------
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "channels",
    "tenants",
    "inference",
    "documents",
    "chat",
    "gateway",
    "agents",
    "sandbox",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "config.middleware.ContentSecurityPolicyMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    # Before anything reads the request: NUL in the path, query, headers or form fields.
    "config.middleware.InputCheckMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "tenants.middleware.TenantScopeMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "config.urls"
ASGI_APPLICATION = "config.asgi.application"
AUTH_USER_MODEL = "tenants.User"
# Every password check goes through the login throttle; ModelBackend stays listed for
# sessions signed in without a password (SSO, sign-up): tenants.services.login_throttle.
AUTHENTICATION_BACKENDS = [
    "tenants.services.login_throttle.ThrottledModelBackend",
    "django.contrib.auth.backends.ModelBackend",
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "chat:home"
LOGOUT_REDIRECT_URL = "login"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [FRONTEND_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- data -------------------------------------------------------------------
DATABASES: dict[str, dict[str, Any]]
if EMBEDDED:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": VAR_DIR / "parley.sqlite3",
            "OPTIONS": {
                # WAL lets the web and the in-process workers read while a run writes.
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
                "transaction_mode": "IMMEDIATE",
                "timeout": 20,
            },
        }
    }
else:
    DATABASES = {"default": env.database("DATABASE_URL")}
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
    # One connection pool per process (psycopg_pool, through Django): a request, a
    # consumer call or a task borrows a connection and gives it back when it ends, so
    # a process never holds more than DATABASE_POOL_MAX_SIZE connections however many
    # threads it runs (under ASGI every request has a thread of its own; persistent
    # per-thread connections piled up). A borrower waits up to DATABASE_POOL_TIMEOUT_S
    # for a free connection. Budget: processes x max size <= PostgreSQL's
    # max_connections (docs/security.md), or put PgBouncer in front.
    if env.boolean("DATABASE_POOL", default=True):
        _pool_min = env.integer("DATABASE_POOL_MIN_SIZE", default=1, minimum=0)
        _pool_max = env.integer("DATABASE_POOL_MAX_SIZE", default=10, minimum=1)
        if _pool_min > _pool_max:
            raise ImproperlyConfigured(
                f"DATABASE_POOL_MIN_SIZE ({_pool_min}) must not exceed "
                f"DATABASE_POOL_MAX_SIZE ({_pool_max})."
            )
        if env.integer("DATABASE_CONN_MAX_AGE", default=0, minimum=0):
            raise ImproperlyConfigured(
                "DATABASE_CONN_MAX_AGE must be 0 with the connection pool (the pool keeps "
                "the connections); set DATABASE_POOL=false for persistent connections."
            )
        DATABASES["default"]["CONN_MAX_AGE"] = 0  # Django's pool requires it
        DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
            "min_size": _pool_min,
            "max_size": _pool_max,
            "timeout": env.floating("DATABASE_POOL_TIMEOUT_S", default=30.0, minimum=0.1),
            "name": "parley",
        }
    else:
        # No pool in the process (e.g. PgBouncer pools instead): a connection per
        # request or task, kept DATABASE_CONN_MAX_AGE seconds by its thread.
        DATABASES["default"]["CONN_MAX_AGE"] = env.integer(
            "DATABASE_CONN_MAX_AGE", default=0, minimum=0
        )
# The application connects as DATABASE_URL's role, which must not own the tables
# (row level security); `migrate` connects as DATABASE_OWNER_URL's role, the owner.
PARLEY_DATABASE_OWNER: dict[str, Any] | None = None
if not EMBEDDED and env.present("DATABASE_OWNER_URL"):
    _owner = env.database("DATABASE_OWNER_URL")
    for _key in ("NAME", "HOST", "PORT"):
        if _owner.get(_key) != DATABASES["default"].get(_key):
            raise ImproperlyConfigured(
                f"DATABASE_OWNER_URL must name the same database as DATABASE_URL ({_key} differs)."
            )
    PARLEY_DATABASE_OWNER = {"USER": _owner["USER"], "PASSWORD": _owner.get("PASSWORD", "")}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = None if EMBEDDED else env.redis_url("REDIS_URL")
# Every Redis key Parley writes starts with this prefix (see chat.eventlog).
PARLEY_REDIS_PREFIX = env.string("PARLEY_REDIS_PREFIX", default="parley")

CHANNEL_LAYERS: dict[str, dict[str, Any]]
if EMBEDDED:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
else:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {
                # No socket timeout: see config.redis_clients (a consumer's receive
                # must end when its socket closes; BZPOPMIN carries its own 5 s).
                "hosts": [{"address": REDIS_URL, **ASYNC_REDIS_OPTIONS}],
                "prefix": f"{PARLEY_REDIS_PREFIX}:asgi",
            },
        }
    }

# --- cache (login throttling, rate counters) ---------------------------------
CACHES: dict[str, dict[str, Any]]
if EMBEDDED:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
else:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": f"{PARLEY_REDIS_PREFIX}:cache",
        }
    }

# --- email (invitations, password reset) -----------------------------------------
# Without EMAIL_URL, mail is written to the console (the embedded default).
if env.present("EMAIL_URL"):
    _email = env.env.email_url("EMAIL_URL")
    EMAIL_BACKEND = _email["EMAIL_BACKEND"]
    EMAIL_HOST, EMAIL_PORT = _email.get("EMAIL_HOST", ""), _email.get("EMAIL_PORT", 25)
    EMAIL_HOST_USER = _email.get("EMAIL_HOST_USER", "")
    EMAIL_HOST_PASSWORD = _email.get("EMAIL_HOST_PASSWORD", "")
    EMAIL_USE_TLS = bool(_email.get("EMAIL_USE_TLS", False))
    EMAIL_USE_SSL = bool(_email.get("EMAIL_USE_SSL", False))
else:
    EMAIL_BACKEND = "django.core.mail.backends.console.EmailBackend"
DEFAULT_FROM_EMAIL = env.string("DEFAULT_FROM_EMAIL", default="Parley <parley@localhost>")
# The public base URL, for links in emails and pages (invitations, password resets, SSO
# callbacks). Unset: `serve` sets the address it serves (PARLEY_PUBLIC_URL_SET says
# whether it was given); behind a proxy or a load balancer, set it.
PARLEY_PUBLIC_URL_SET = env.present("PARLEY_PUBLIC_URL")
PARLEY_PUBLIC_URL = env.string("PARLEY_PUBLIC_URL", default="http://127.0.0.1:8000").rstrip("/")
PARLEY_INVITATION_TTL_DAYS = env.integer("PARLEY_INVITATION_TTL_DAYS", default=7, minimum=1)

# --- tasks ------------------------------------------------------------------
# Embedded mode runs tasks on threads of the web process (config.celery.enqueue);
# production sends them to Celery workers through Redis.
PARLEY_TASKS_IN_PROCESS = EMBEDDED
PARLEY_IN_PROCESS_WORKERS = env.integer("PARLEY_IN_PROCESS_WORKERS", default=4, minimum=1)
CELERY_BROKER_URL = "memory://" if EMBEDDED else REDIS_URL
CELERY_RESULT_BACKEND = None
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_DEFAULT_QUEUE = "default"
CELERY_TASK_ROUTES = {
    # The watchdog must run when every run worker is gone: not on the runs queue.
    "chat.tasks.runs_reap": {"queue": "default"},
    # Agent runs (tool loops, minutes long) have workers of their own.
    "chat.tasks.agent_execute": {"queue": "agents"},
    # So do document reviews (documents.review: many model calls).
    "chat.tasks.review_execute": {"queue": "agents"},
    "chat.tasks.*": {"queue": "runs"},
    # Tools with side effects: each call names its queue (`tools` or `sandbox`, from the
    # tool's scopes, agents.scopes.SCOPE_QUEUES); this is the fallback.
    "agents.tasks.tool_execute": {"queue": "tools"},
    # Document ingestion (parsing, chunking: minutes for a long PDF) has its own queue.
    "documents.tasks.*": {"queue": "documents"},
}
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "global_keyprefix": f"{PARLEY_REDIS_PREFIX}:celery:",
    # A run that outlives this is redelivered; run_execute claims runs once.
    "visibility_timeout": 3600,
}
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True

# --- runs and the event log ---------------------------------------------------
# How long a finished run's event log stays in Redis after the run is persisted.
PARLEY_RUN_LOG_TTL_S = env.integer("PARLEY_RUN_LOG_TTL_S", default=3600, minimum=1)
# Token deltas arriving closer together than this are coalesced into one event.
PARLEY_TOKEN_COALESCE_MS = env.integer("PARLEY_TOKEN_COALESCE_MS", default=25, minimum=0)
PARLEY_RUN_HEARTBEAT_S = env.floating("PARLEY_RUN_HEARTBEAT_S", default=5.0, minimum=0.1)
# The watchdog (chat.watchdog, every PARLEY_RUN_WATCHDOG_INTERVAL_S) fails a running run
# whose heartbeat is older than PARLEY_RUN_STALL_S (its worker died), and a queued run no
# worker took within PARLEY_RUN_QUEUE_TIMEOUT_S (the broker lost it).
PARLEY_RUN_STALL_S = env.floating("PARLEY_RUN_STALL_S", default=20.0, minimum=0.5)
if PARLEY_RUN_STALL_S < 2 * PARLEY_RUN_HEARTBEAT_S:
    raise ImproperlyConfigured(
        f"PARLEY_RUN_STALL_S ({PARLEY_RUN_STALL_S:g}) must be at least twice "
        f"PARLEY_RUN_HEARTBEAT_S ({PARLEY_RUN_HEARTBEAT_S:g}), or live runs are failed."
    )
PARLEY_RUN_QUEUE_TIMEOUT_S = env.floating("PARLEY_RUN_QUEUE_TIMEOUT_S", default=600.0, minimum=1.0)
PARLEY_RUN_WATCHDOG_INTERVAL_S = env.floating(
    "PARLEY_RUN_WATCHDOG_INTERVAL_S", default=10.0, minimum=0.1
)

# --- chat -------------------------------------------------------------------
# Conversation titles: "model" asks the pool for one after the first answer (kept only
# when it is about the question); "first_words" keeps the question's first words. The
# embedded mode's bundled 135M model writes few usable titles (docs/benchmarks.md,
# tests/bench/titles.py): it keeps the first words unless told otherwise.
PARLEY_TITLES = env.string("PARLEY_TITLES", default="first_words" if EMBEDDED else "model")
if PARLEY_TITLES not in ("model", "first_words"):
    raise ImproperlyConfigured("PARLEY_TITLES must be 'model' or 'first_words'.")
PARLEY_SYSTEM_PROMPT = env.string(
    "PARLEY_SYSTEM_PROMPT", default="You are Parley, a helpful and concise assistant."
)
# At most what one call may ask for (inference.types.MAX_TOKEN_COUNT, the 32-bit count).
PARLEY_MAX_TOKENS = env.integer("PARLEY_MAX_TOKENS", default=512, minimum=1, maximum=2**31 - 1)
# Sampling temperature sent with chat turns; unset: the model server's default.
PARLEY_TEMPERATURE = (
    env.floating("PARLEY_TEMPERATURE", minimum=0.0) if env.present("PARLEY_TEMPERATURE") else None
)
PARLEY_WS_MAX_FRAME_BYTES = env.integer("PARLEY_WS_MAX_FRAME_BYTES", default=65536, minimum=1024)
# Per socket: frames per second sustained, and the burst allowed above that; frames
# over the rate get an `error` frame (`rate_limited`), the socket stays open.
PARLEY_WS_FRAMES_PER_S = env.floating("PARLEY_WS_FRAMES_PER_S", default=10.0, minimum=0.1)
PARLEY_WS_FRAME_BURST = env.integer("PARLEY_WS_FRAME_BURST", default=30, minimum=1)
# Lifetime of a single-use websocket ticket (POST /api/v1/ws/tickets).
PARLEY_WS_TICKET_TTL_S = env.integer("PARLEY_WS_TICKET_TTL_S", default=60, minimum=5)
PARLEY_MAX_MESSAGE_CHARS = env.integer("PARLEY_MAX_MESSAGE_CHARS", default=32000, minimum=1)

# --- inference --------------------------------------------------------------
# Production: the pool's base URLs (vLLM's OpenAI-compatible servers). Embedded:
# empty, and `manage.py serve` starts the local CPU model server and adds it.
PARLEY_BACKENDS = env.http_urls("PARLEY_BACKENDS", default=[])
PARLEY_DEFAULT_MODEL = env.string("PARLEY_DEFAULT_MODEL", default="")
PARLEY_BACKEND_API_KEY = env.string("PARLEY_BACKEND_API_KEY", default="")
PARLEY_CONNECT_TIMEOUT_S = env.floating("PARLEY_CONNECT_TIMEOUT_S", default=5.0, minimum=0.1)
PARLEY_FIRST_TOKEN_TIMEOUT_S = env.floating(
    "PARLEY_FIRST_TOKEN_TIMEOUT_S", default=120.0, minimum=0.1
)
PARLEY_STREAM_IDLE_TIMEOUT_S = env.floating(
    "PARLEY_STREAM_IDLE_TIMEOUT_S", default=60.0, minimum=0.1
)
PARLEY_HEALTH_TTL_S = env.floating("PARLEY_HEALTH_TTL_S", default=5.0, minimum=0.0)
# How the pool picks a backend: prefix_load (default), prefix, least_loaded, round_robin.
PARLEY_ROUTING_POLICY = env.string("PARLEY_ROUTING_POLICY", default="prefix_load")
if PARLEY_ROUTING_POLICY not in ("prefix_load", "prefix", "least_loaded", "round_robin"):
    raise ImproperlyConfigured(
        "PARLEY_ROUTING_POLICY must be prefix_load, prefix, least_loaded or round_robin."
    )
# Health checks and the /metrics scrape (beat task; `serve` runs it in a thread).
PARLEY_SCRAPE_INTERVAL_S = env.floating("PARLEY_SCRAPE_INTERVAL_S", default=2.0, minimum=0.2)
PARLEY_BACKEND_DOWN_AFTER = env.integer("PARLEY_BACKEND_DOWN_AFTER", default=2, minimum=1)
# Calls per backend (times its weight) before the pool counts as saturated.
PARLEY_BACKEND_MAX_INFLIGHT = env.integer("PARLEY_BACKEND_MAX_INFLIGHT", default=64, minimum=1)
# Failover before the first token: attempts in all, and the circuit breaker.
PARLEY_FAILOVER_ATTEMPTS = env.integer("PARLEY_FAILOVER_ATTEMPTS", default=3, minimum=1)
PARLEY_BREAKER_THRESHOLD = env.integer("PARLEY_BREAKER_THRESHOLD", default=3, minimum=1)
PARLEY_BREAKER_COOLDOWN_S = env.floating("PARLEY_BREAKER_COOLDOWN_S", default=15.0, minimum=0.1)
CELERY_BEAT_SCHEDULE = {
    "pool-refresh": {
        "task": "inference.tasks.pool_refresh",
        "schedule": PARLEY_SCRAPE_INTERVAL_S,
        "options": {"expires": PARLEY_SCRAPE_INTERVAL_S},
    },
    "runs-reap": {
        "task": "chat.tasks.runs_reap",
        "schedule": PARLEY_RUN_WATCHDOG_INTERVAL_S,
        "options": {"expires": PARLEY_RUN_WATCHDOG_INTERVAL_S},
    },
    "documents-reap": {
        "task": "documents.tasks.documents_reap",
        "schedule": PARLEY_RUN_WATCHDOG_INTERVAL_S,
        "options": {"expires": PARLEY_RUN_WATCHDOG_INTERVAL_S},
    },
}


# Limits per user (within a tenant) and per API key, on top of the tenant's plan
# (inference.limits); unset is unlimited.
def _optional_limit(name: str) -> int | None:
    return env.integer(name, minimum=1) if env.present(name) else None


PARLEY_USER_REQUESTS_PER_MINUTE = _optional_limit("PARLEY_USER_REQUESTS_PER_MINUTE")
PARLEY_USER_TOKENS_PER_MINUTE = _optional_limit("PARLEY_USER_TOKENS_PER_MINUTE")
PARLEY_USER_CONCURRENT_RUNS = _optional_limit("PARLEY_USER_CONCURRENT_RUNS")
PARLEY_KEY_REQUESTS_PER_MINUTE = _optional_limit("PARLEY_KEY_REQUESTS_PER_MINUTE")
PARLEY_KEY_TOKENS_PER_MINUTE = _optional_limit("PARLEY_KEY_TOKENS_PER_MINUTE")
PARLEY_KEY_CONCURRENT_RUNS = _optional_limit("PARLEY_KEY_CONCURRENT_RUNS")
# Concurrency slots, budget reservations and admission slots are leases renewed while a
# call lives; a process that dies frees them after this long.
PARLEY_LIMIT_LEASE_TTL_S = env.floating("PARLEY_LIMIT_LEASE_TTL_S", default=30.0, minimum=1.0)
# How long a call waits for a slot of a saturated pool (fair admission) before failing.
PARLEY_ADMISSION_TIMEOUT_S = env.floating("PARLEY_ADMISSION_TIMEOUT_S", default=120.0, minimum=0.0)
# The local CPU model server (embedded mode and tests).
PARLEY_LOCAL_MODEL_PATH = env.string("PARLEY_LOCAL_MODEL_PATH", default="")
PARLEY_LOCAL_MODEL_CTX = env.integer("PARLEY_LOCAL_MODEL_CTX", default=8192, minimum=512)
PARLEY_LOCAL_MODEL_THREADS = env.integer("PARLEY_LOCAL_MODEL_THREADS", default=0, minimum=0)

# --- plugins ------------------------------------------------------------------
# Which installed plugins (entry points of `parley.plugins`) load: comma-separated
# names; unset, all of them (agents.registry).
PARLEY_PLUGINS: list[str] | None = (
    env.strings("PARLEY_PLUGINS") if env.present("PARLEY_PLUGINS") else None
)
# An agent run's limits (agents.runtime.AgentLimits): model calls, wall time (tools
# included) and tokens (prompt + completion over all its model calls).
PARLEY_AGENT_MAX_STEPS = env.integer("PARLEY_AGENT_MAX_STEPS", default=8, minimum=1)
PARLEY_AGENT_MAX_SECONDS = env.floating("PARLEY_AGENT_MAX_SECONDS", default=300.0, minimum=1.0)
PARLEY_AGENT_MAX_TOKENS = env.integer("PARLEY_AGENT_MAX_TOKENS", default=50000, minimum=1)
# How long an agent waits for a tool with side effects on its worker (the `tools` or
# `sandbox` queue, agents.tool_queue) before the call ends with an error to the model.
PARLEY_TOOL_TIMEOUT_S = env.floating("PARLEY_TOOL_TIMEOUT_S", default=120.0, minimum=1.0)

# --- the code sandbox (sandbox.jail) ---------------------------------------------
# bubblewrap, and the Python environment code runs with (a virtual environment made
# from a Python every user may read, with numpy, pandas and matplotlib: `make
# sandbox`).
PARLEY_SANDBOX_BWRAP = env.string("PARLEY_SANDBOX_BWRAP", default="bwrap")
# (Where `make sandbox` makes it: in the checkout, whatever PARLEY_VAR_DIR says.)
PARLEY_SANDBOX_PYTHON = env.string(
    "PARLEY_SANDBOX_PYTHON", default=str(ROOT_DIR / "var" / "sandbox-python")
)
# Limits of one call. The wall limit is kept below PARLEY_TOOL_TIMEOUT_S.
PARLEY_SANDBOX_WALL_S = env.floating("PARLEY_SANDBOX_WALL_S", default=30.0, minimum=1.0)
PARLEY_SANDBOX_CPU_S = env.integer("PARLEY_SANDBOX_CPU_S", default=20, minimum=1)
PARLEY_SANDBOX_MEMORY_MB = env.integer("PARLEY_SANDBOX_MEMORY_MB", default=2048, minimum=64)
PARLEY_SANDBOX_PROCESSES = env.integer("PARLEY_SANDBOX_PROCESSES", default=64, minimum=4)
PARLEY_SANDBOX_OPEN_FILES = env.integer("PARLEY_SANDBOX_OPEN_FILES", default=256, minimum=16)
PARLEY_SANDBOX_FILE_MB = env.integer("PARLEY_SANDBOX_FILE_MB", default=64, minimum=1)
PARLEY_SANDBOX_OUTPUT_KB = env.integer("PARLEY_SANDBOX_OUTPUT_KB", default=1024, minimum=1)
PARLEY_SANDBOX_WORKSPACE_MB = env.integer("PARLEY_SANDBOX_WORKSPACE_MB", default=256, minimum=1)
# A worker running as root runs each concurrent call as its own host user, from this
# id up (PARLEY_SANDBOX_SLOTS of them); ids no account on the host uses.
PARLEY_SANDBOX_UID_BASE = env.integer("PARLEY_SANDBOX_UID_BASE", default=2_000_000, minimum=1000)
PARLEY_SANDBOX_SLOTS = env.integer("PARLEY_SANDBOX_SLOTS", default=32, minimum=1)
# A cgroup v2 directory delegated to the worker, for memory, process and CPU limits over
# a call's whole process tree; empty: none.
PARLEY_SANDBOX_CGROUP = env.string("PARLEY_SANDBOX_CGROUP", default="")

# --- auth -------------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
# Password login throttling (tenants.services.login_throttle, counted in CACHES): after
# this many failures within the window, further attempts for that username (or from that
# address) are refused for a window without checking the password.
PARLEY_LOGIN_MAX_FAILURES = env.integer("PARLEY_LOGIN_MAX_FAILURES", default=5, minimum=1)
PARLEY_LOGIN_MAX_FAILURES_PER_IP = env.integer(
    "PARLEY_LOGIN_MAX_FAILURES_PER_IP", default=20, minimum=1
)
PARLEY_LOGIN_WINDOW_S = env.integer("PARLEY_LOGIN_WINDOW_S", default=900, minimum=1)
# Secrets kept in the database (SSO client secrets) are encrypted with Fernet
# (tenants.crypto). Comma-separated keys: the first encrypts, all decrypt (rotation).
# Unset: a key derived from SECRET_KEY (then changing SECRET_KEY loses those secrets).
PARLEY_ENCRYPTION_KEY = env.strings("PARLEY_ENCRYPTION_KEY", default=[])
for _fernet_key in PARLEY_ENCRYPTION_KEY:
    try:
        _fernet_ok = len(base64.urlsafe_b64decode(_fernet_key.encode())) == 32
    except (ValueError, binascii.Error):
        _fernet_ok = False
    if not _fernet_ok:
        raise ImproperlyConfigured(
            "PARLEY_ENCRYPTION_KEY must be comma-separated Fernet keys (32 bytes, url-safe "
            "base64); make one with: python -c 'from cryptography.fernet import Fernet; "
            "print(Fernet.generate_key().decode())'"
        )
# OpenID Connect issuers must use https; http only where allowed (local providers, tests).
PARLEY_SSO_ALLOW_HTTP = env.boolean("PARLEY_SSO_ALLOW_HTTP", default=False)
PARLEY_SSO_TIMEOUT_S = env.floating("PARLEY_SSO_TIMEOUT_S", default=10.0, minimum=0.1)

# --- i18n, static -------------------------------------------------------------
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "/static/"
_static_root = Path(env.string("PARLEY_STATIC_ROOT", default=str(VAR_DIR / "static")))
if EMBEDDED:
    _static_root.mkdir(parents=True, exist_ok=True)
STATIC_ROOT: Path | None = _static_root
STATICFILES_DIRS = [FRONTEND_DIR / "static", FRONTEND_DIR / "dist"]
# Static files are collected (`manage.py collectstatic`; `serve` collects them itself in
# the embedded mode) under names that carry a hash of their content, with compressed
# copies beside them: WhiteNoise serves them compressed and cached for a year (a new
# build has new names). DEBUG serves them from the frontend folders as they are.
STORAGES: dict[str, dict[str, Any]] = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "config.storage.StaticFilesStorage"},
}
WHITENOISE_USE_FINDERS = DEBUG

# --- documents ----------------------------------------------------------------
# Uploaded files live in the `documents` storage (documents.storage): a folder (under
# PARLEY_VAR_DIR unless PARLEY_DOCUMENTS_DIR says where), or an S3-compatible bucket
# when PARLEY_DOCUMENTS_S3_BUCKET is set (needs `pip install "django-storages[s3]"`;
# credentials from boto3's usual sources, e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY).
# Production with more than one machine needs the bucket, or a folder they all share.
if env.present("PARLEY_DOCUMENTS_S3_BUCKET"):
    try:
        import storages.backends.s3  # noqa: F401
    except ImportError as _exc:
        raise ImproperlyConfigured(
            'PARLEY_DOCUMENTS_S3_BUCKET needs django-storages: pip install "django-storages[s3]"'
        ) from _exc
    STORAGES["documents"] = {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {
            "bucket_name": env.string("PARLEY_DOCUMENTS_S3_BUCKET"),
            "endpoint_url": env.string("PARLEY_DOCUMENTS_S3_ENDPOINT_URL", default="") or None,
            "region_name": env.string("PARLEY_DOCUMENTS_S3_REGION", default="") or None,
            "location": env.string("PARLEY_DOCUMENTS_S3_PREFIX", default="documents"),
            "default_acl": "private",
            "file_overwrite": False,
        },
    }
else:
    STORAGES["documents"] = {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {
            "location": env.string("PARLEY_DOCUMENTS_DIR", default=str(VAR_DIR / "documents")),
            "base_url": None,  # never served by URL: read through the API only
            "file_permissions_mode": 0o600,
            "directory_permissions_mode": 0o700,
        },
    }
# Storage a tenant's documents may take in all (bytes; unset: unlimited). Each upload
# is limited by the plan's `max_upload_bytes`, and by PARLEY_DOCUMENT_MAX_BYTES whatever
# the plan (a file is checked whole, in memory).
PARLEY_TENANT_STORAGE_BYTES = _optional_limit("PARLEY_TENANT_STORAGE_BYTES")
PARLEY_DOCUMENT_MAX_BYTES = env.integer("PARLEY_DOCUMENT_MAX_BYTES", default=200 * 2**20, minimum=1)
# Refused at upload: PDFs with more pages than this, or a page tree nested deeper; DOCX
# files (zips) that unpack to more than this, or any member compressed more than this.
PARLEY_DOCUMENT_MAX_PAGES = env.integer("PARLEY_DOCUMENT_MAX_PAGES", default=5000, minimum=1)
PARLEY_DOCUMENT_MAX_PAGE_TREE_DEPTH = env.integer(
    "PARLEY_DOCUMENT_MAX_PAGE_TREE_DEPTH", default=32, minimum=2
)
PARLEY_DOCUMENT_MAX_UNZIPPED_BYTES = env.integer(
    "PARLEY_DOCUMENT_MAX_UNZIPPED_BYTES", default=256 * 2**20, minimum=1
)
PARLEY_DOCUMENT_MAX_ZIP_RATIO = env.integer("PARLEY_DOCUMENT_MAX_ZIP_RATIO", default=100, minimum=1)
# Repositories (zip, tar, tar.gz; documents.archives), read in memory at upload and into
# sandbox workspaces: refused with more entries than this, more bytes unpacked in all, a
# file over the per-file size, or compressed more than this ratio (a bomb).
PARLEY_ARCHIVE_MAX_FILES = env.integer("PARLEY_ARCHIVE_MAX_FILES", default=10_000, minimum=1)
PARLEY_ARCHIVE_MAX_BYTES = env.integer("PARLEY_ARCHIVE_MAX_BYTES", default=100 * 2**20, minimum=1)
PARLEY_ARCHIVE_MAX_FILE_BYTES = env.integer(
    "PARLEY_ARCHIVE_MAX_FILE_BYTES", default=20 * 2**20, minimum=1
)
PARLEY_ARCHIVE_MAX_RATIO = env.integer("PARLEY_ARCHIVE_MAX_RATIO", default=100, minimum=1)
# Ingestion (documents.ingest): chunks of about this many tokens, each overlapping the
# one before by about this many; pages and chunks are stored (and progress reported)
# this many at a time, so a job cut short resumes after its last stored batch.
PARLEY_DOCUMENT_CHUNK_TOKENS = env.integer("PARLEY_DOCUMENT_CHUNK_TOKENS", default=400, minimum=1)
PARLEY_DOCUMENT_CHUNK_OVERLAP_TOKENS = env.integer(
    "PARLEY_DOCUMENT_CHUNK_OVERLAP_TOKENS", default=50, minimum=0
)
if PARLEY_DOCUMENT_CHUNK_OVERLAP_TOKENS >= PARLEY_DOCUMENT_CHUNK_TOKENS:
    raise ImproperlyConfigured(
        "PARLEY_DOCUMENT_CHUNK_OVERLAP_TOKENS must be less than PARLEY_DOCUMENT_CHUNK_TOKENS."
    )
PARLEY_DOCUMENT_INGEST_BATCH = env.integer("PARLEY_DOCUMENT_INGEST_BATCH", default=50, minimum=1)
# Chunks' embeddings (documents.embeddings): all-MiniLM-L6-v2 on this machine's CPU
# (`local`, the default: onnxruntime, PARLEY_EMBEDDING_THREADS threads, 0 for one per
# core), or an OpenAI-compatible `/v1/embeddings` server (`openai`: vLLM serving an
# embedding model) at PARLEY_EMBEDDING_URL serving PARLEY_EMBEDDING_MODEL. Texts are
# embedded PARLEY_EMBEDDING_BATCH at a time. Changing the model makes the stored vectors
# stale: the documents watchdog embeds them again (documents.watchdog).
PARLEY_EMBEDDING_BACKEND = env.string("PARLEY_EMBEDDING_BACKEND", default="local").strip()
if PARLEY_EMBEDDING_BACKEND not in ("local", "openai"):
    raise ImproperlyConfigured(
        f"PARLEY_EMBEDDING_BACKEND must be local or openai, not {PARLEY_EMBEDDING_BACKEND!r}."
    )
PARLEY_EMBEDDING_URL = ""
PARLEY_EMBEDDING_MODEL = ""
if PARLEY_EMBEDDING_BACKEND == "openai":
    if not env.present("PARLEY_EMBEDDING_URL") or not env.present("PARLEY_EMBEDDING_MODEL"):
        raise ImproperlyConfigured(
            "PARLEY_EMBEDDING_BACKEND=openai needs PARLEY_EMBEDDING_URL (the server's base URL, "
            "e.g. http://vllm-embed:8000) and PARLEY_EMBEDDING_MODEL (the model it serves)."
        )
    _embedding_urls = env.http_urls("PARLEY_EMBEDDING_URL")
    if len(_embedding_urls) != 1:
        raise ImproperlyConfigured("PARLEY_EMBEDDING_URL must be one http(s) base URL.")
    PARLEY_EMBEDDING_URL = _embedding_urls[0]
    PARLEY_EMBEDDING_MODEL = env.string("PARLEY_EMBEDDING_MODEL").strip()
PARLEY_EMBEDDING_API_KEY = env.string("PARLEY_EMBEDDING_API_KEY", default="")
PARLEY_EMBEDDING_BATCH = env.integer("PARLEY_EMBEDDING_BATCH", default=32, minimum=1)
PARLEY_EMBEDDING_THREADS = env.integer("PARLEY_EMBEDDING_THREADS", default=0, minimum=0)
PARLEY_EMBEDDING_TIMEOUT_S = env.floating("PARLEY_EMBEDDING_TIMEOUT_S", default=120.0, minimum=1.0)
# The watchdog (documents.watchdog, with the run watchdog's interval) starts again an
# ingestion that recorded no progress for this long (its worker was lost), at most
# PARLEY_DOCUMENT_INGEST_RESTARTS times, then fails it with the reason; a document no
# worker took within PARLEY_RUN_QUEUE_TIMEOUT_S is queued again the same way.
PARLEY_DOCUMENT_STALL_S = env.floating("PARLEY_DOCUMENT_STALL_S", default=300.0, minimum=1.0)
PARLEY_DOCUMENT_INGEST_RESTARTS = env.integer(
    "PARLEY_DOCUMENT_INGEST_RESTARTS", default=3, minimum=0
)
# A chat turn over documents (documents.context): whole documents in the prompt when
# they fit in this share of the model's context left after the conversation and the
# answer, else the best PARLEY_DOCUMENT_PASSAGES passages that fit. A model whose
# context length the pool does not know counts as PARLEY_DOCUMENT_CONTEXT_TOKENS.
PARLEY_DOCUMENT_CONTEXT_SHARE = env.floating(
    "PARLEY_DOCUMENT_CONTEXT_SHARE", default=0.9, minimum=0.1, maximum=1.0
)
PARLEY_DOCUMENT_PASSAGES = env.integer("PARLEY_DOCUMENT_PASSAGES", default=8, minimum=1)
PARLEY_DOCUMENT_CONTEXT_TOKENS = env.integer(
    "PARLEY_DOCUMENT_CONTEXT_TOKENS", default=8192, minimum=512
)
# Reviews (documents.review): each model call may write up to PARLEY_REVIEW_MAX_TOKENS;
# a long document's sections are reviewed at most PARLEY_REVIEW_PARALLEL at a time (and
# never more than the tenant's concurrent runs).
PARLEY_REVIEW_MAX_TOKENS = env.integer("PARLEY_REVIEW_MAX_TOKENS", default=1024, minimum=64)
PARLEY_REVIEW_PARALLEL = env.integer("PARLEY_REVIEW_PARALLEL", default=4, minimum=1)
# The function plugins start reviews with (plugins never import chat: the docreview
# plugin's `review_start` tool calls it by this name, as Django names its backends).
PARLEY_REVIEW_START = "chat.services.runs.review_start"
# At most this many tokens of document per review call (0: as the model's context
# allows). The embedded default's small model on a CPU reads shorter sections faster
# and better.
PARLEY_REVIEW_SECTION_TOKENS = env.integer(
    "PARLEY_REVIEW_SECTION_TOKENS", default=2048 if EMBEDDED else 0, minimum=0
)

# --- sandbox: workspaces and artifacts ----------------------------------------
# A conversation's workspace (its files between sandboxed runs, one tar archive) and
# the files runs produce (artifacts) live in the `sandbox` storage (sandbox.storage):
# a folder (under PARLEY_VAR_DIR unless PARLEY_SANDBOX_DIR says where), or, when
# PARLEY_DOCUMENTS_S3_BUCKET is set, that bucket under PARLEY_SANDBOX_S3_PREFIX.
if env.present("PARLEY_DOCUMENTS_S3_BUCKET"):
    STORAGES["sandbox"] = {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {
            **STORAGES["documents"]["OPTIONS"],
            "location": env.string("PARLEY_SANDBOX_S3_PREFIX", default="sandbox"),
        },
    }
else:
    STORAGES["sandbox"] = {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {
            "location": env.string("PARLEY_SANDBOX_DIR", default=str(VAR_DIR / "sandbox")),
            "base_url": None,  # never served by URL: read through the API only
            "file_permissions_mode": 0o600,
            "directory_permissions_mode": 0o700,
        },
    }
# Bytes a tenant's workspaces and artifacts may take in all (a save past it is refused
# with the reason, which the tool tells the model); the largest one artifact; how long
# a workspace no run used is kept (then the expiry sweep, every
# PARLEY_SANDBOX_EXPIRE_INTERVAL_S, deletes it: its file and its row).
PARLEY_SANDBOX_TENANT_BYTES = env.integer(
    "PARLEY_SANDBOX_TENANT_BYTES", default=1024 * 2**20, minimum=1
)
PARLEY_SANDBOX_ARTIFACT_BYTES = env.integer(
    "PARLEY_SANDBOX_ARTIFACT_BYTES", default=20 * 2**20, minimum=1
)
PARLEY_SANDBOX_WORKSPACE_TTL_S = env.integer(
    "PARLEY_SANDBOX_WORKSPACE_TTL_S", default=7 * 86400, minimum=60
)
PARLEY_SANDBOX_EXPIRE_INTERVAL_S = env.floating(
    "PARLEY_SANDBOX_EXPIRE_INTERVAL_S", default=300.0, minimum=1.0
)
# The sweep runs where the other watchdogs do (never on the `sandbox` queue's workers).
CELERY_TASK_ROUTES["sandbox.tasks.workspaces_expire"] = {"queue": "default"}
CELERY_BEAT_SCHEDULE["sandbox-workspaces-expire"] = {
    "task": "sandbox.tasks.workspaces_expire",
    "schedule": PARLEY_SANDBOX_EXPIRE_INTERVAL_S,
    "options": {"expires": PARLEY_SANDBOX_EXPIRE_INTERVAL_S},
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    # uvicorn logs request paths with their query strings: no websocket ticket in them.
    "filters": {"redact_tickets": {"()": "config.log_redact.TicketRedactFilter"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env.string("PARLEY_LOG_LEVEL", default="INFO")},
    "loggers": {
        "httpx": {"level": "WARNING"},
        "httpcore": {"level": "WARNING"},
        "uvicorn.access": {"filters": ["redact_tickets"]},
        "uvicorn.error": {"filters": ["redact_tickets"]},
    },
}
