"""Run Parley's web process; in embedded mode also the local CPU model server.

Embedded mode (no DATABASE_URL / REDIS_URL): starts llama.cpp with SmolLM2 on a
free local port, waits until it is healthy, registers it as the only backend,
serves HTTP and websockets with uvicorn (runs execute on threads of this
process), and stops the model server on exit.
"""

from __future__ import annotations

import atexit
import logging
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from inference import pool
from inference.local_process import LocalModelServer, LocalModelServerError

WS_MAX_SIZE = 1024 * 1024  # above PARLEY_WS_MAX_FRAME_BYTES, so oversize frames get an error frame


def served_url(host: str, port: int) -> str:
    """The address people reach this server at, for links (PARLEY_PUBLIC_URL unset):
    the host it listens on, or this machine's name when it listens on every address."""
    if host in ("0.0.0.0", "::", ""):  # every address: name the machine
        host = socket.getfqdn()
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    return f"http://{host}:{port}"


class Command(BaseCommand):
    help = "Serve Parley (and, in embedded mode, the local model) until interrupted."

    def add_arguments(self, parser):
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument(
            "--backend",
            action="append",
            default=[],
            help="use this inference backend instead of starting the local model server",
        )

    def static_files_ready(self) -> None:
        """The embedded mode collects the static files (hashed names, compressed copies:
        settings' STORAGES); production serves what the deployment collected."""
        from django.contrib.staticfiles.storage import staticfiles_storage

        manifest = getattr(staticfiles_storage, "manifest_name", None)
        if manifest is None or settings.WHITENOISE_USE_FINDERS:
            return
        if settings.EMBEDDED:
            started = time.monotonic()
            call_command("collectstatic", interactive=False, verbosity=0)
            self.stdout.write(f"Static files collected ({time.monotonic() - started:.1f} s)")
        elif not staticfiles_storage.exists(manifest):
            raise CommandError(
                f"No static files in {settings.STATIC_ROOT}: run `manage.py collectstatic` "
                "when deploying (the pages name their files by the manifest it writes)."
            )

    def handle(self, *args, **options):
        import uvicorn

        self.static_files_ready()
        model_server = None
        if options["backend"]:
            settings.PARLEY_BACKENDS = [url.rstrip("/") for url in options["backend"]]
        elif not settings.PARLEY_BACKENDS:
            if not settings.EMBEDDED:
                raise CommandError("Set PARLEY_BACKENDS: production mode starts no local model.")
            self.stdout.write("Starting the local model server (SmolLM2-135M-Instruct)…")
            model_server = LocalModelServer(
                model_path=settings.PARLEY_LOCAL_MODEL_PATH,
                ctx=settings.PARLEY_LOCAL_MODEL_CTX,
                threads=settings.PARLEY_LOCAL_MODEL_THREADS,
                log_path=settings.VAR_DIR / "model-server.log",
            )
            try:
                model_server.start()
            except LocalModelServerError as exc:
                raise CommandError(str(exc)) from None
            atexit.register(model_server.stop)
            settings.PARLEY_BACKENDS = [model_server.url]
            self.stdout.write(f"Local model server healthy at {model_server.url}")
        pool.forget_cache()
        if settings.EMBEDDED:
            # No Celery beat here: threads keep backend health and load fresh, end runs
            # that no worker will finish, such as those a stopped server left running,
            # and delete sandbox workspaces left unused.
            from chat.watchdog import runs_reap
            from documents.watchdog import documents_reap
            from inference.backends import backends_refresh
            from sandbox.services import workspaces_expire

            for name, work, interval_s in (
                ("pool-refresh", backends_refresh, settings.PARLEY_SCRAPE_INTERVAL_S),
                ("run-watchdog", runs_reap, settings.PARLEY_RUN_WATCHDOG_INTERVAL_S),
                ("document-watchdog", documents_reap, settings.PARLEY_RUN_WATCHDOG_INTERVAL_S),
                ("sandbox-expiry", workspaces_expire, settings.PARLEY_SANDBOX_EXPIRE_INTERVAL_S),
            ):
                threading.Thread(
                    target=_repeat, args=(name, work, interval_s), name=name, daemon=True
                ).start()

        from config.asgi import application

        url = f"http://{options['host']}:{options['port']}/"
        if not settings.PARLEY_PUBLIC_URL_SET:
            settings.PARLEY_PUBLIC_URL = served_url(options["host"], options["port"])
        self.stdout.write(self.style.SUCCESS(f"Parley ({settings.PARLEY_MODE} mode) at {url}"))
        if settings.EMBEDDED:
            self.stdout.write("Demo login: demo / parley-demo")
            self.stdout.write("Operator login: operator / parley-operator (/operator/)")
        # uvicorn shuts down gracefully on SIGTERM, then re-raises it to the handler it
        # found: make that one exit through `finally`, so the model server stops too.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            uvicorn.run(
                application,
                host=options["host"],
                port=options["port"],
                ws_max_size=WS_MAX_SIZE,
                ws_per_message_deflate=False,  # no zlib state per idle socket
                lifespan="off",
                log_level="info",
            )
        finally:
            if model_server is not None:
                model_server.stop()


def _repeat(name: str, work: Callable[[], object], interval_s: float) -> None:
    from django.db import connections

    while True:
        try:
            work()
        except Exception:
            logging.getLogger(__name__).exception("%s failed", name)
        finally:
            connections.close_all()
        time.sleep(interval_s)
