"""Production settings: the production mode of `base`, required values, HTTPS hardening.

`manage.py check --deploy` with these settings and a real secret gives no warnings.
"""

from django.core.exceptions import ImproperlyConfigured

from config import env
from config.settings.base import *  # noqa: F403
from config.settings.base import EMBEDDED, PARLEY_BACKENDS

if EMBEDDED:
    raise ImproperlyConfigured(
        "Set the DATABASE_URL and REDIS_URL environment variables: "
        "config.settings.production runs PostgreSQL and Redis, never the embedded mode."
    )
if not PARLEY_BACKENDS:
    raise ImproperlyConfigured(
        "Set the PARLEY_BACKENDS environment variable to the base URLs of the inference "
        "servers (comma-separated), e.g. http://vllm-0:8000."
    )

DEBUG = False

# TLS ends at the load balancer, which sets X-Forwarded-Proto.
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = env.boolean("DJANGO_SECURE_SSL_REDIRECT", default=True)
SECURE_HSTS_SECONDS = env.integer("DJANGO_SECURE_HSTS_SECONDS", default=31536000, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.boolean("DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS", default=True)
SECURE_HSTS_PRELOAD = env.boolean("DJANGO_SECURE_HSTS_PRELOAD", default=True)
SECURE_CONTENT_TYPE_NOSNIFF = True
SESSION_COOKIE_SECURE = True
CSRF_COOKIE_SECURE = True
X_FRAME_OPTIONS = "DENY"
