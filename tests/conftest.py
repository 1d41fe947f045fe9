"""Shared fixtures: people in two tenants, a real model server, a real Celery worker,
and websocket connections authenticated like a browser."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from channels.db import database_sync_to_async as sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.test import Client

from inference import pool
from inference.local_process import LocalModelServer, free_port
from tenants.access import Actor
from tenants.models import Role
from tenants.rls import operator_scope
from tests.asyncapi import check_server_frame
from tests.factories import MembershipFactory, TenantFactory
from tests.synthetic import synthetic_server  # noqa: F401 - a fixture for every test module

APP_ROLE = "parley_app"


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup, django_db_blocker):
    """pytest-django created and migrated the test database as the owner (as `migrate`
    does in production); the tests then run as the application role, which owns no
    table and has no BYPASSRLS, so row level security applies to everything."""
    from django.db import connections

    from tenants.rls import grant_app_role

    connection = connections["default"]
    if connection.vendor != "postgresql":
        yield
        return
    owner = connection.settings_dict["USER"]

    def close_pool() -> None:
        # The connection pool (DATABASE_POOL) is made once per alias, with the
        # credentials of its time; the next connection makes a new one.
        if connection.settings_dict.get("OPTIONS", {}).get("pool"):
            connection.close_pool()

    with django_db_blocker.unblock(), connection.cursor() as cursor:
        cursor.execute(
            "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = %s) THEN "
            f"CREATE ROLE {APP_ROLE} LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB; END IF; END $$",
            [APP_ROLE],
        )
        grant_app_role(APP_ROLE)
        # Test-only: pytest-django empties tables between transactional tests.
        cursor.execute(f"GRANT TRUNCATE ON ALL TABLES IN SCHEMA public TO {APP_ROLE}")
    connection.close()
    # The pool the owner migrated through would go on handing out owner connections,
    # and every test would bypass row level security.
    close_pool()
    connection.settings_dict["USER"] = APP_ROLE
    settings.DATABASES["default"]["USER"] = APP_ROLE
    try:
        yield
    finally:
        for conn in connections.all():
            conn.close()
        # The application role's pool must not serve the owner's terminating query
        # below (it would end its own backend).
        close_pool()
        connection.settings_dict["USER"] = owner
        settings.DATABASES["default"]["USER"] = owner
        # Worker and executor threads keep their own connections; end them so the
        # test database can be dropped.
        with django_db_blocker.unblock(), connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND usename = %s",
                [APP_ROLE],
            )
        connection.close()


@dataclass
class Person:
    membership: Any

    @property
    def user(self):
        return self.membership.user

    @property
    def tenant(self):
        return self.membership.tenant

    @property
    def actor(self) -> Actor:
        return Actor(tenant=self.tenant, user=self.user, role=self.membership.role)


@pytest.fixture
def alice(db) -> Person:
    """Owner of tenant A."""
    return Person(MembershipFactory(role=Role.OWNER, user__username="alice"))


@pytest.fixture
def bob(db, alice) -> Person:
    """Member of tenant A."""
    return Person(MembershipFactory(tenant=alice.tenant, user__username="bob"))


@pytest.fixture
def charlie(db) -> Person:
    """Owner of tenant B: should have no access to anything of tenant A."""
    return Person(
        MembershipFactory(role=Role.OWNER, tenant=TenantFactory(), user__username="charlie")
    )


@pytest.fixture(scope="session")
def model_server(tmp_path_factory) -> Iterator[LocalModelServer]:
    """The real local CPU model server (SmolLM2-135M-Instruct), one per test session."""
    server = LocalModelServer(log_path=tmp_path_factory.mktemp("model") / "server.log")
    with server:
        yield server


@pytest.fixture
def backend(model_server, settings) -> str:
    """Make the local model server the pool's only backend for this test."""
    settings.PARLEY_BACKENDS = [model_server.url]
    pool.forget_cache()
    yield model_server.url
    pool.forget_cache()


@contextmanager
def _celery_worker(django_db_blocker, queues: list[str], **options: Any) -> Iterator[Any]:
    """A real Celery worker, a thread of this process, consuming `queues` through the
    Redis broker."""
    if settings.PARLEY_TASKS_IN_PROCESS:
        pytest.skip("the embedded mode runs tasks in-process; no broker to consume")
    from celery.contrib.testing.worker import start_worker

    from config.celery import app

    with (
        django_db_blocker.unblock(),
        start_worker(
            app,
            pool="solo",
            concurrency=1,
            perform_ping_check=False,
            queues=queues,
            loglevel="WARNING",
            shutdown_timeout=30,
            **options,
        ) as worker,
    ):
        yield worker


@pytest.fixture(scope="session")
def celery_tool_worker_session(django_db_setup, django_db_blocker):
    """A second worker for the `tools` and `sandbox` queues: an agent run holds the
    first worker while its tool runs here."""
    with _celery_worker(
        django_db_blocker,
        ["tools", "sandbox"],
        hostname="tools@parley-tests",
        # Its own blocking loop: two workers of one process cannot share kombu's hub.
        use_eventloop=False,
    ) as worker:
        yield worker


@pytest.fixture(scope="session")
def celery_worker_session(django_db_setup, django_db_blocker, celery_tool_worker_session):
    """The worker for the `runs`, `agents`, `documents` and `default` queues (and, with
    it, the tool worker above)."""
    with _celery_worker(django_db_blocker, ["runs", "agents", "documents", "default"]) as worker:
        yield worker


@pytest.fixture
def worker(celery_worker_session, transactional_db):
    """The session's workers, for a test on a database that is emptied after it. The
    test ends once the tasks it queued have finished (within a bound): a task still in
    a transaction (a conversation's title, after the run) would deadlock the emptying."""
    from celery import signals

    pending: set[str] = set()
    lock = threading.Lock()

    def published(headers=None, **kwargs):
        with lock:
            pending.add((headers or {}).get("id"))

    def finished(task_id=None, request=None, **kwargs):
        with lock:
            pending.discard(task_id or getattr(request, "id", None))

    signals.before_task_publish.connect(published, weak=False)
    signals.task_postrun.connect(finished, weak=False)
    signals.task_revoked.connect(finished, weak=False)
    try:
        yield celery_worker_session
        deadline = time.monotonic() + 15
        while pending and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        signals.before_task_publish.disconnect(published)
        signals.task_postrun.disconnect(finished)
        signals.task_revoked.disconnect(finished)


def session_cookie(user, tenant=None) -> str:
    from tenants.access import SESSION_TENANT_KEY

    client = Client()
    client.force_login(user)
    if tenant is not None:
        session = client.session
        session[SESSION_TENANT_KEY] = str(tenant.id)
        session.save()
    return client.cookies[settings.SESSION_COOKIE_NAME].value


class Socket:
    """A websocket client of the app, in-process, with JSON helpers."""

    def __init__(self, communicator: WebsocketCommunicator) -> None:
        self.communicator = communicator

    async def send(self, frame: Any) -> None:
        await self.communicator.send_to(
            text_data=frame if isinstance(frame, str) else json.dumps(frame)
        )

    async def receive(self, timeout: float = 10) -> dict[str, Any]:
        frame = json.loads(await self.communicator.receive_from(timeout=timeout))
        check_server_frame(frame)  # every frame the server sends is in docs/asyncapi.yaml
        return frame

    async def receive_until(
        self, types: tuple[str, ...], timeout: float = 120
    ) -> list[dict[str, Any]]:
        """Every frame up to and including the first whose type is in `types`."""
        frames: list[dict[str, Any]] = []
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            assert remaining > 0, f"no {types} frame within {timeout}s; got {frames}"
            frame = await self.receive(timeout=remaining)
            frames.append(frame)
            if frame["type"] in types:
                return frames

    async def nothing_pending(self) -> bool:
        return await self.communicator.receive_nothing(timeout=0.2)

    async def close(self) -> None:
        await self.communicator.disconnect()


async def ws_connect(
    user=None,
    *,
    tenant=None,
    origin: str | None = "http://testserver",
    cookie: str | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
    path: str = "/ws/v1/",
) -> tuple[bool, Any, Socket]:
    from config.asgi import application

    headers = [(b"host", b"testserver"), *(headers or [])]
    if origin is not None:
        headers.append((b"origin", origin.encode()))
    if user is not None:
        cookie = await sync_to_async(session_cookie)(user, tenant)
    if cookie is not None:
        headers.append((b"cookie", f"{settings.SESSION_COOKIE_NAME}={cookie}".encode()))
    communicator = WebsocketCommunicator(application, path, headers=headers)
    connected, code = await communicator.connect(timeout=10)
    return connected, code, Socket(communicator)


EMBEDDED_STRIP = (
    "DATABASE_URL",
    "REDIS_URL",
    "DJANGO_SETTINGS_MODULE",
    "DJANGO_SECRET_KEY",
    "DJANGO_ALLOWED_HOSTS",
    "PARLEY_BACKENDS",
)


def embedded_env(var: Path) -> dict[str, str]:
    """The environment of Parley on its embedded default, its data under `var`."""
    env = {k: v for k, v in os.environ.items() if k not in EMBEDDED_STRIP}
    env["PARLEY_VAR_DIR"] = str(var)
    env["PARLEY_TEMPERATURE"] = "0"  # greedy: the same answer on every run
    return env


def embedded_manage(var: Path, *command: str) -> str:
    """Run `manage.py <command>` on the embedded default's data; its stdout."""
    result = subprocess.run(
        [sys.executable, "manage.py", *command],
        cwd=Path(__file__).resolve().parents[1],
        env=embedded_env(var),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@contextmanager
def embedded_serving(var: Path, *args: str, timeout_s: float = 180) -> Iterator[tuple[str, Path]]:
    """`migrate`, `seed_demo`, then `manage.py serve <args>` on the embedded default's
    data under `var`, in a process of its own, until it answers `/healthz`: the base URL
    and serve's log. Stopped on the way out."""
    for command in (["migrate", "--noinput"], ["seed_demo"]):
        embedded_manage(var, *command)
    port = free_port()
    log_path = var / "serve.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "manage.py", "serve", "--port", str(port), *args],
            cwd=Path(__file__).resolve().parents[1],
            env=embedded_env(var),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        yield base, log_path
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture
def documents_storage(settings, tmp_path) -> Path:
    """This test's uploaded files in a folder of its own; the folder."""
    folder = tmp_path / "documents"
    settings.STORAGES = {
        **settings.STORAGES,
        "documents": {
            "BACKEND": "django.core.files.storage.FileSystemStorage",
            "OPTIONS": {"location": str(folder), "base_url": None},
        },
    }
    return folder


@pytest.fixture
def sandbox_storage(settings, tmp_path) -> Path:
    """This test's workspaces and artifacts in a folder of its own; the folder."""
    folder = tmp_path / "sandbox"
    settings.STORAGES = {
        **settings.STORAGES,
        "sandbox": {
            "BACKEND": "django.core.files.storage.FileSystemStorage",
            "OPTIONS": {"location": str(folder), "base_url": None},
        },
    }
    return folder


@pytest.fixture(scope="session")
def embedded_server(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """Parley on its embedded default in a fresh process, as `make run` starts it:
    migrate, seed_demo, serve (which starts the local model server). Yields the base
    URL and the var/ folder; checks on the way out that the model server stopped too."""
    var = tmp_path_factory.mktemp("embedded") / "var"
    with embedded_serving(var) as (base, log_path):
        yield base, var
    output = log_path.read_text()
    assert "Parley (embedded mode)" in output
    assert "Demo login: demo / parley-demo" in output
    # The model server that `serve` started is gone with it.
    match = re.search(r"Local model server healthy at (http://\S+)", output)
    assert match, output
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{match.group(1)}/health", timeout=2)


async def as_operator(fn, *args, **kwargs):
    """Call `fn` (ORM reads a test asserts on) past row level security, in a thread."""

    def call():
        with operator_scope():
            return fn(*args, **kwargs)

    return await sync_to_async(call)()


@pytest.fixture(autouse=True)
def _fresh_channel_layer():
    """Each test's event loop gets its own channel layer: a Redis layer's connection
    pools belong to the loop that opened them, and pytest-asyncio makes a new loop for
    every test (a recycled loop id could otherwise hand a test a dead pool)."""
    from channels.layers import channel_layers

    channel_layers.backends.clear()
    yield
    channel_layers.backends.clear()


@pytest.fixture
def prefix(settings):
    """A Redis key prefix of this test's own; every key under it is dropped afterwards."""
    import uuid

    value = f"{settings.PARLEY_REDIS_PREFIX}-t{uuid.uuid4().hex[:8]}"
    yield value
    if settings.REDIS_URL:
        import redis

        admin = redis.Redis.from_url(settings.REDIS_URL)
        for key in admin.scan_iter(match=f"{value}:*"):
            admin.delete(key)
        admin.close()


def chat_page_data(response) -> dict:
    """The JSON the chat page carries for its client (`json_script`)."""
    match = re.search(
        r'<script id="parley-chat" type="application/json">(.*?)</script>',
        response.content.decode(),
        re.S,
    )
    assert match, "the page carries no chat data"
    return json.loads(match.group(1))


@pytest.fixture
def all_plugins(settings):
    """Every installed plugin loads (no allowlist), in a registry fresh for this test."""
    from agents.registry import registry_reset

    settings.PARLEY_PLUGINS = None
    registry_reset()
    yield
    registry_reset()


def plugin_install(tmp_path, monkeypatch, *, name: str, source: str) -> None:
    """Make the module `pp_<name>` with `source` the only plugin the registry finds
    (entry point `name`), for this test."""
    from importlib import metadata

    from agents import registry as registry_module

    (tmp_path / f"pp_{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    entry_point = metadata.EntryPoint(
        name=name, value=f"pp_{name}", group=registry_module.ENTRY_POINT_GROUP
    )
    # This process's registry (config.singleton) is one that finds only this plugin.
    monkeypatch.setattr(
        registry_module.registry,
        "_made",
        (os.getpid(), registry_module.PluginRegistry(entry_points=lambda: [entry_point])),
    )


@pytest.fixture
def fresh_pool(settings):
    """An inference pool with no configured backend, short timeouts and empty caches."""
    from inference import pool

    settings.PARLEY_BACKENDS = []
    settings.PARLEY_DEFAULT_MODEL = ""
    settings.PARLEY_BACKEND_API_KEY = ""
    settings.PARLEY_CONNECT_TIMEOUT_S = 2.0
    settings.PARLEY_FIRST_TOKEN_TIMEOUT_S = 10.0
    settings.PARLEY_STREAM_IDLE_TIMEOUT_S = 10.0
    pool.forget_cache()
    yield
    pool.forget_cache()


@pytest.fixture(scope="session", autouse=True)
def documents_folder_emptied():
    """The tests' uploaded files and sandbox files (config.settings.test puts them in
    temporary folders) are gone after the run."""
    yield
    from django.conf import settings as django_settings

    for alias in ("documents", "sandbox"):
        options = django_settings.STORAGES[alias].get("OPTIONS", {})
        if django_settings.STORAGES[alias]["BACKEND"].endswith("FileSystemStorage"):
            shutil.rmtree(options["location"], ignore_errors=True)
