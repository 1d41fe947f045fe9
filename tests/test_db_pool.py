"""Database connections come from one pool per process (DATABASE_POOL): however many
requests, sockets and threads a process serves, it holds at most
DATABASE_POOL_MAX_SIZE connections, and none of them is the owner's.

The load tests run the real web server (uvicorn, the ASGI app) and a real prefork
Celery worker as subprocesses on this session's test database, and count their
connections in pg_stat_activity while they work. Each subprocess connects with an
application_name of its own (libpq's PGAPPNAME), so other processes on the same server
(this pytest process, other test sessions) are never counted.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import uuid
from collections.abc import Iterator

import httpx
import psycopg
import pytest
import websockets
from django.conf import settings as django_settings
from django.core.management import call_command
from django.db import connection, connections

from config import env
from inference.local_process import free_port
from tenants.access import Actor
from tenants.models import Role
from tenants.rls import tenant_scope
from tenants.services.api_keys import api_key_create
from tests.conftest import APP_ROLE, session_cookie
from tests.test_resilience import Processes
from tests.test_settings import PRODUCTION, manage

pytestmark = pytest.mark.skipif(
    not django_settings.DATABASES["default"].get("OPTIONS", {}).get("pool"),
    reason="the tests run without the connection pool (DATABASE_POOL=false)",
)


def current_role_and_database() -> tuple[str, str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_user, current_database()")
        user, database = cursor.fetchone()
    return user, database


# --- the test suite itself runs on the pool, as the application role -----------------------


def test_tests_run_as_the_application_role_through_the_pool(db):
    """conftest's django_db_setup closes the pool the owner migrated through; a pool
    kept from then would hand every test an owner connection past row level security."""
    assert connection.pool is not None
    assert connection.pool.kwargs["user"] == APP_ROLE
    assert current_role_and_database() == (APP_ROLE, connection.settings_dict["NAME"])
    assert connection.settings_dict["NAME"] == connection.settings_dict["TEST"]["NAME"]


def test_other_threads_get_application_role_connections_and_give_them_back(transactional_db):
    pool = connection.pool
    seen: list[tuple[str, str]] = []

    def work() -> None:
        try:
            seen.append(current_role_and_database())
        finally:
            connections.close_all()  # back to the pool

    threads = [threading.Thread(target=work) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert seen == [(APP_ROLE, connection.settings_dict["NAME"])] * 6

    def lent_out() -> int:
        stats = pool.get_stats()
        assert stats["pool_size"] <= stats["pool_max"], stats
        return stats["pool_size"] - stats["pool_available"]

    # Every thread's connection comes back (the pool may still be adding one it began
    # to open while the threads waited): none stays lent out but this thread's own.
    deadline = time.monotonic() + 10
    while lent_out() > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lent_out() <= 1, pool.get_stats()


# --- migrate swaps to the owner's credentials, and back --------------------------------------


def test_migrate_as_the_owner_with_the_pool_and_back_to_the_application_role(
    transactional_db, settings, monkeypatch
):
    """`migrate` with DATABASE_OWNER_URL changes the schema as the owner: the pool,
    made with the application role's credentials, must not serve it; and the owner's
    pool must not outlive the command."""
    from tenants.management.commands import migrate as migrate_command

    owner = env.database("DATABASE_URL")  # this session's owner role (tests/conftest.py)
    assert owner["USER"] != APP_ROLE
    settings.PARLEY_DATABASE_OWNER = {"USER": owner["USER"], "PASSWORD": owner["PASSWORD"]}
    granted_as: list[tuple[str, str]] = []
    real_grant = migrate_command.grant_app_role

    def grant(role: str, using: str = "default") -> None:
        granted_as.append(current_role_and_database())
        real_grant(role, using=using)

    monkeypatch.setattr(migrate_command, "grant_app_role", grant)
    assert current_role_and_database()[0] == APP_ROLE  # the app role's pool is open
    call_command("migrate", verbosity=0, interactive=False)

    assert granted_as == [(owner["USER"], connection.settings_dict["NAME"])]
    assert connection.settings_dict["USER"] == APP_ROLE
    assert current_role_and_database()[0] == APP_ROLE
    assert connection.pool.kwargs["user"] == APP_ROLE


# --- settings ---------------------------------------------------------------------------------

SHOW_DATABASE = (
    "from django.conf import settings as s; d = s.DATABASES['default'];"
    "print(repr((d.get('OPTIONS', {}).get('pool'), d['CONN_MAX_AGE'])))"
)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({}, ({"min_size": 1, "max_size": 10, "timeout": 30.0, "name": "parley"}, 0)),
        (
            {
                "DATABASE_POOL_MIN_SIZE": "0",
                "DATABASE_POOL_MAX_SIZE": "3",
                "DATABASE_POOL_TIMEOUT_S": "2.5",
            },
            ({"min_size": 0, "max_size": 3, "timeout": 2.5, "name": "parley"}, 0),
        ),
        ({"DATABASE_POOL": "false"}, (None, 0)),
        ({"DATABASE_POOL": "false", "DATABASE_CONN_MAX_AGE": "60"}, (None, 60)),
    ],
)
def test_pool_settings_come_from_the_environment(tmp_path, extra, expected):
    result = manage("shell", "-c", SHOW_DATABASE, env={**PRODUCTION, **extra}, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == repr(expected)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"DATABASE_POOL_MIN_SIZE": "5", "DATABASE_POOL_MAX_SIZE": "2"},
            "DATABASE_POOL_MIN_SIZE (5) must not exceed DATABASE_POOL_MAX_SIZE (2)",
        ),
        ({"DATABASE_POOL_MAX_SIZE": "0"}, "DATABASE_POOL_MAX_SIZE must be at least 1"),
        ({"DATABASE_POOL_TIMEOUT_S": "soon"}, "DATABASE_POOL_TIMEOUT_S has an invalid value"),
        ({"DATABASE_CONN_MAX_AGE": "60"}, "DATABASE_CONN_MAX_AGE must be 0 with the connection"),
    ],
)
def test_bad_pool_settings_stop_start_up(tmp_path, extra, message):
    result = manage("check", env={**PRODUCTION, **extra}, tmp_path=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr


def test_the_embedded_mode_has_no_pool(tmp_path):
    result = manage("shell", "-c", SHOW_DATABASE, env={}, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == repr((None, 0))


# --- under load --------------------------------------------------------------------------------


class ConnectionWatch:
    """Samples, from a thread, how many connections of one application_name the test
    database has; `peak` is the most seen at once."""

    def __init__(self, database_url: str, application_name: str) -> None:
        self.application_name = application_name
        self.monitor = psycopg.connect(
            database_url, autocommit=True, application_name=f"{application_name}-watch"
        )
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="connection-watch", daemon=True)

    def count(self) -> int:
        row = self.monitor.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND usename = current_user "
            "AND application_name = %s",
            [self.application_name],
        ).fetchone()
        assert row is not None
        return int(row[0])

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.count())
            self._stop.wait(0.005)

    @property
    def peak(self) -> int:
        return max(self.samples, default=0)

    @property
    def steady_peak(self) -> int:
        """The most seen in three samples running (15 ms and more): a connection a pool
        has closed can stay listed while its backend exits, and a pool reopened at once
        (Celery's fixup, around each task) overlaps it for that moment on a busy host."""
        runs = [min(self.samples[i : i + 3]) for i in range(max(1, len(self.samples) - 2))]
        return max(runs, default=0)

    def __enter__(self) -> ConnectionWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.samples.append(self.count())
        self.monitor.close()


@pytest.fixture
def processes(transactional_db, tmp_path, settings) -> Iterator[Processes]:
    if settings.PARLEY_TASKS_IN_PROCESS or not settings.REDIS_URL:
        pytest.skip("needs PostgreSQL and Redis (production mode)")
    procs = Processes(tmp_path, settings)
    try:
        with procs.shown_on_failure():
            yield procs
    finally:
        procs.close()


def api_key_for(person) -> str:
    actor = Actor(tenant=person.tenant, user=person.user, role=Role.OWNER)
    with tenant_scope(tenant_id=person.tenant.id):
        _, secret = api_key_create(actor=actor, name="load", scopes=["chat"])
    return secret


WEB_POOL_MAX = 4
REQUESTS = 150
SOCKETS = 40
CONCURRENCY = 16


def test_a_web_process_under_load_holds_no_more_connections_than_its_pool(processes, alice):
    """150 HTTP requests (the chat page, the REST API, the OpenAI-compatible gateway)
    and 40 websocket connections, 16 at a time, against one web process whose pool
    has 4 connections: every one succeeds, and the process never holds more than 4."""
    app_name = f"parley-pool-web-{uuid.uuid4().hex[:8]}"
    port = free_port()
    base = f"http://127.0.0.1:{port}"

    def healthy(child) -> bool:
        try:
            return httpx.get(f"{base}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    processes.start(
        "web",
        [
            *(sys.executable, "-m", "uvicorn", "config.asgi:application"),
            *("--host", "127.0.0.1", "--port", str(port), "--lifespan", "off"),
        ],
        healthy,
        port=port,
        DATABASE_POOL_MIN_SIZE="1",
        DATABASE_POOL_MAX_SIZE=str(WEB_POOL_MAX),
        DATABASE_POOL_TIMEOUT_S="30",
        PGAPPNAME=app_name,
    )
    cookie = session_cookie(alice.user, alice.tenant)
    key = api_key_for(alice)
    routes = [
        ("/", {"cookie": f"{django_settings.SESSION_COOKIE_NAME}={cookie}"}),
        ("/api/v1/conversations", {"authorization": f"Bearer {key}"}),
        ("/v1/models", {"authorization": f"Bearer {key}"}),
    ]

    async def load() -> tuple[list[tuple[str, int]], list[str]]:
        gate = asyncio.Semaphore(CONCURRENCY)
        failures: list[tuple[str, int]] = []
        refused: list[str] = []
        async with httpx.AsyncClient(
            base_url=base, timeout=60, limits=httpx.Limits(max_connections=CONCURRENCY)
        ) as client:

            async def request(i: int) -> None:
                path, headers = routes[i % len(routes)]
                async with gate:
                    response = await client.get(path, headers=headers)
                if response.status_code != 200:
                    failures.append((path, response.status_code))

            async def socket(i: int) -> None:
                async with (
                    gate,
                    websockets.connect(
                        f"ws://127.0.0.1:{port}/ws/v1/",
                        additional_headers={"Authorization": f"Bearer {key}"},
                        open_timeout=60,
                    ) as ws,
                ):
                    # Signed in by the key: a refused socket gets an error frame and
                    # a close instead; an accepted one stays open, sending nothing.
                    try:
                        frame = await asyncio.wait_for(ws.recv(), timeout=0.2)
                        refused.append(str(frame))
                    except TimeoutError:
                        pass

            await asyncio.gather(
                *(request(i) for i in range(REQUESTS)), *(socket(i) for i in range(SOCKETS))
            )
        return failures, refused

    with ConnectionWatch(processes.database_url, app_name) as watch:
        failures, refused = asyncio.run(load())
    assert failures == []
    assert refused == []
    assert len(watch.samples) > 20
    # The pool opened (the watch sees the process's connections) and stayed in bounds.
    assert 1 <= watch.peak <= WEB_POOL_MAX, watch.samples


WORKER_CHILDREN = 3
WORKER_POOL_MAX = 2
TASKS = 30


def test_prefork_worker_children_hold_no_more_than_their_pools(processes, monkeypatch):
    """A prefork worker: each child makes a pool of its own (the parent never connects,
    and Celery's Django fixup closes a child's pool around each task). 30 watchdog
    passes (each a query of runs) on 3 children with pools of 2: all succeed, and the
    worker never holds more than 3 x 2 connections."""
    from chat.tasks import runs_reap_task

    app_name = f"parley-pool-worker-{uuid.uuid4().hex[:8]}"
    queue = processes.private_watchdog_queue()
    worker = processes.worker(
        queue,
        pool="prefork",
        concurrency=WORKER_CHILDREN,
        DATABASE_POOL_MIN_SIZE="1",
        DATABASE_POOL_MAX_SIZE=str(WORKER_POOL_MAX),
        PGAPPNAME=app_name,
    )
    with ConnectionWatch(processes.database_url, app_name) as watch:
        for _ in range(TASKS):
            runs_reap_task.apply_async(queue=queue)
        deadline = time.monotonic() + 120
        while worker.output().count("succeeded in") < TASKS:
            assert worker.alive, worker.output()
            assert time.monotonic() < deadline, worker.output()
            time.sleep(0.1)
    assert worker.output().count("succeeded in") == TASKS
    assert "raised unexpected" not in worker.output()
    assert 1 <= watch.steady_peak <= WORKER_CHILDREN * WORKER_POOL_MAX, watch.samples
