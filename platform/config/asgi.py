"""The ASGI application: Django for HTTP (but the OpenAI-compatible API under /v1/,
served by gateway.asgi without Django's request cycle), Channels for the websocket API.

Browser sockets are authenticated by the session cookie and must come from an
allowed origin (AllowedHostsOriginValidator), so another site cannot ride a
member's cookie. Integrators' sockets carry an API key in the Authorization
header, which browsers cannot set, or a single-use ticket their backend obtained
with such a key (`?ticket=`, for pages on the integrator's own site): neither rides
on ambient credentials, so their origin is not checked. Which kind a socket is, is
decided once, by `chat.tickets.socket_credentials`, for this router and for the
consumer alike: a socket that skipped the origin check is authenticated by its
ticket or key alone, never by its cookie.
"""

import gc
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.base")
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402

from chat.routing import websocket_urlpatterns  # noqa: E402
from chat.tickets import socket_credentials  # noqa: E402
from gateway.asgi import PREFIX as GATEWAY_PREFIX  # noqa: E402
from gateway.asgi import application as gateway_app  # noqa: E402

websocket_app = AuthMiddlewareStack(URLRouter(websocket_urlpatterns))
browser_websocket_app = AllowedHostsOriginValidator(websocket_app)


async def websocket_entry(scope, receive, send):
    presented = socket_credentials(scope).presented
    app = websocket_app if presented else browser_websocket_app
    return await app(scope, receive, send)


async def http_entry(scope, receive, send):
    # The OpenAI-compatible API is a lean ASGI app of its own (gateway.asgi).
    app = gateway_app if scope["path"].startswith(GATEWAY_PREFIX) else django_asgi_app
    return await app(scope, receive, send)


application = ProtocolTypeRouter({"http": http_entry, "websocket": websocket_entry})

# The loaded app's ~100k objects live as long as the process: take them out of the
# collector's reach, so that a full collection (which a burst of allocations, such as
# replaying a long run, sets off) scans only what came after them; otherwise such a
# collection pauses the event loop for ~100 ms (docs/benchmarks.md, Resume).
gc.collect()
gc.freeze()
