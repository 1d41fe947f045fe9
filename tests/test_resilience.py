"""Runs survive the processes around them.

A run is an event log with gapless sequence numbers: sockets that reconnect with a
cursor, a second tab, a restarted web process all resume exactly; a worker that dies
mid-run is noticed by the watchdog, which ends the run `failed` with its partial text
(never stuck `running`); a task delivered twice executes once; logs are trimmed once
the run is stored.

Workers, Celery beat and the web server run here as real subprocesses on this test
session's database and Redis keys, and are killed with SIGKILL where the test says so.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from channels.db import database_sync_to_async as sync_to_async
from django.utils import timezone

from chat.chat_turn import chat_turn_execute as run_execute
from chat.eventlog import EventLogError, event_log, run_log_key
from chat.models import Conversation, Message, Run
from chat.protocol import TERMINAL_EVENTS
from chat.services.runs import chat_send
from chat.steps import UNFINISHED
from chat.watchdog import runs_reap
from inference import pool
from inference.local_process import free_port
from tenants.rls import in_tenant, operator_scope, tenant_scope
from tests.conftest import as_operator, session_cookie, ws_connect
from tests.factories import ConversationFactory, MessageFactory, RunFactory
from tests.test_settings import PRODUCTION, manage

ROOT = Path(__file__).resolve().parents[1]
STALL_S = 2.0  # the watchdog's patience in these tests (the heartbeat is 0.5 s)
STORY = "Tell me a long story."
LONG_PROMPT = (
    "Write a long, detailed essay about the history of the Roman Empire, from its "
    "founding to its fall, in at least ten paragraphs."
)


# --- helpers ----------------------------------------------------------------------------


def log_of(run: Run) -> list[tuple[int, dict[str, Any]]]:
    return event_log().read_sync(run_log_key(tenant_id=run.tenant_id, run_id=run.id))


def deltas(frames: list[dict[str, Any]]) -> str:
    return "".join(f["delta"] for f in frames if f["type"] == "token")


def seqs(frames: list[dict[str, Any]]) -> list[int]:
    return [f["seq"] for f in frames]


def as_frames(events: list[tuple[int, dict[str, Any]]]) -> list[dict[str, Any]]:
    return [{**event, "seq": seq} for seq, event in events]


def stored(run_id: Any) -> Run:
    with operator_scope():
        return Run.objects.select_related("assistant_message").get(id=run_id)


def log_ttl(run: Run) -> int:
    import redis
    from django.conf import settings

    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        return int(client.ttl(run_log_key(tenant_id=run.tenant_id, run_id=run.id)))
    finally:
        client.close()


def queued_run(person: Any, content: str = "Say something.") -> Run:
    conversation = ConversationFactory(tenant=person.tenant, user=person.user, title="resilience")
    question = MessageFactory(conversation=conversation, content=content)
    with tenant_scope(tenant_id=person.tenant.id):
        conversation.current_leaf = question
        conversation.save(update_fields=["current_leaf"])
    return RunFactory(user_message=question)


def running_run(person: Any, pieces: list[str], *, heartbeat_age_s: float) -> Run:
    """A run its worker claimed and streamed `pieces` of before it went silent."""
    run = queued_run(person)
    beat = timezone.now() - timedelta(seconds=heartbeat_age_s)
    with tenant_scope(tenant_id=person.tenant.id):
        Run.objects.filter(id=run.id).update(
            state=Run.State.RUNNING, started_at=beat, heartbeat_at=beat
        )
    key = run_log_key(tenant_id=run.tenant_id, run_id=run.id)
    for seq, piece in enumerate(pieces, start=1):
        event_log().append(key, seq, {"type": "token", "delta": piece})
    return stored(run.id)


@pytest.fixture
def redis_only(settings):
    if settings.PARLEY_TASKS_IN_PROCESS or not settings.REDIS_URL:
        pytest.skip("needs Redis and a broker (production mode): processes share them")


@pytest.fixture
def own_keys(settings, prefix, redis_only):
    """This test's event logs under a prefix of its own, dropped afterwards."""
    settings.PARLEY_REDIS_PREFIX = prefix
    return prefix


# --- processes --------------------------------------------------------------------------


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    port: int = 0

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: no shutdown, no acks, no last words."""
        if self.alive:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)


class Processes:
    """Workers, beat and web servers in subprocesses, on this test's database and Redis
    keys; every one is killed when the test ends, and their logs are shown if it fails."""

    def __init__(self, tmp_path: Path, settings: Any) -> None:
        from django.db import connection

        self.tmp_path = tmp_path
        self.children: list[Child] = []
        self.settings = settings
        db = connection.settings_dict  # the test database, as the application role
        password = f":{quote(db['PASSWORD'], safe='')}" if db.get("PASSWORD") else ""
        host = quote(db.get("HOST") or "127.0.0.1", safe="")
        self.database_url = (
            f"postgres://{quote(db['USER'], safe='')}{password}@{host}:{db.get('PORT') or 5432}"
            f"/{db['NAME']}"
        )
        self.module = f"resilience_settings_{uuid.uuid4().hex[:8]}"
        self.runs_queue = "runs"
        self.watchdog_queue = "default"

    def private_runs_queue(self, monkeypatch: pytest.MonkeyPatch) -> str:
        """Hand this test's runs (and the tasks they queue) to a queue of its own: the
        suite's in-thread worker, which consumes `runs`, must not take them from the
        subprocess workers of this test."""
        import config.celery

        queue = self.runs_queue = f"runs-resilience-{uuid.uuid4().hex[:8]}"

        def enqueue(task: Any, *args: Any, **kwargs: Any) -> None:
            task.apply_async(args=args, kwargs=kwargs, queue=queue)

        monkeypatch.setattr(config.celery, "enqueue", enqueue)
        return queue

    def private_watchdog_queue(self) -> str:
        """Route the beat's watchdog task to a queue of its own: the suite's in-thread
        worker consumes `default` and would otherwise take it from this test's worker."""
        self.watchdog_queue = f"default-resilience-{uuid.uuid4().hex[:8]}"
        return self.watchdog_queue

    def _write_settings(self) -> None:
        """The test settings, on the Redis keys this pytest process uses now (the test
        settings derive them from the process id)."""
        s = self.settings
        layer_prefix = s.CHANNEL_LAYERS["default"]["CONFIG"]["prefix"]
        routes = {
            "chat.tasks.runs_reap": {"queue": self.watchdog_queue},
            "chat.tasks.*": {"queue": self.runs_queue},
        }
        text = "\n".join(
            [
                "from config.settings.test import *  # noqa: F403",
                f"PARLEY_REDIS_PREFIX = {s.PARLEY_REDIS_PREFIX!r}",
                f"CHANNEL_LAYERS['default']['CONFIG']['prefix'] = {layer_prefix!r}",
                f"CACHES['default']['KEY_PREFIX'] = {s.CACHES['default']['KEY_PREFIX']!r}",
                f"CELERY_BROKER_TRANSPORT_OPTIONS = {dict(s.CELERY_BROKER_TRANSPORT_OPTIONS)!r}",
                f"CELERY_TASK_ROUTES = {routes!r}",
                "",
            ]
        )
        (self.tmp_path / f"{self.module}.py").write_text(text)

    def env(self, **extra: str) -> dict[str, str]:
        self._write_settings()
        env = {k: v for k, v in os.environ.items() if k != "DATABASE_OWNER_URL"}
        env.update(
            DJANGO_SETTINGS_MODULE=self.module,
            PYTHONPATH=os.pathsep.join([str(self.tmp_path), str(ROOT / "platform"), str(ROOT)]),
            DATABASE_URL=self.database_url,
            REDIS_URL=self.settings.REDIS_URL,
            PARLEY_RUN_HEARTBEAT_S="0.5",
            PARLEY_RUN_STALL_S=str(self.settings.PARLEY_RUN_STALL_S),
            PARLEY_RUN_WATCHDOG_INTERVAL_S="0.5",
            PARLEY_TEMPERATURE="0",
            PYTHONUNBUFFERED="1",
        )
        if self.settings.PARLEY_BACKENDS:
            env["PARLEY_BACKENDS"] = ",".join(self.settings.PARLEY_BACKENDS)
        env.update(extra)
        return env

    def start(
        self,
        name: str,
        argv: list[str],
        ready: Callable[[Child], bool],
        *,
        port: int = 0,
        timeout_s: float = 120,
        **env: str,
    ) -> Child:
        log_path = self.tmp_path / f"{name}-{len(self.children)}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=self.env(**env),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a signal for this child reaches no one else
            )
        child = Child(name, process, log_path, port)
        self.children.append(child)
        deadline = time.monotonic() + timeout_s
        while not ready(child):
            assert child.alive, f"{name} exited with {process.returncode}:\n{child.output()}"
            assert time.monotonic() < deadline, (
                f"{name} not ready in {timeout_s}s:\n{child.output()}"
            )
            time.sleep(0.2)
        return child

    def worker(self, *queues: str, pool: str = "solo", concurrency: int = 1, **env: str) -> Child:
        argv = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "config",
            "worker",
            "-Q",
            ",".join(queues),
            f"--pool={pool}",
            f"--concurrency={concurrency}",
            "--loglevel=INFO",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "-n",
            f"resilience-{uuid.uuid4().hex[:8]}@%h",
        ]
        return self.start("worker", argv, lambda c: " ready." in c.output(), **env)

    def beat(self, **env: str) -> Child:
        schedule = self.tmp_path / f"beat-schedule-{uuid.uuid4().hex[:8]}"
        argv = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "config",
            "beat",
            "-s",
            str(schedule),
            "--loglevel=INFO",
            "--max-interval=1",
        ]
        return self.start("beat", argv, lambda c: "beat: Starting" in c.output(), **env)

    def web(self) -> Child:
        port = free_port()
        argv = [
            sys.executable,
            "-m",
            "uvicorn",
            "config.asgi:application",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--lifespan",
            "off",
        ]

        def healthy(child: Child) -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        return self.start("web", argv, healthy, port=port)

    def logs(self) -> str:
        return "\n".join(
            f"----- {c.name} (pid {c.process.pid}, exit {c.process.poll()}) -----\n{c.output()}"
            for c in self.children
        )

    @contextmanager
    def shown_on_failure(self) -> Iterator[None]:
        try:
            yield
        except BaseException:
            print(self.logs())  # the captured output of the failing test
            raise

    def close(self) -> None:
        for child in reversed(self.children):
            try:
                child.kill()
            except Exception as exc:  # keep killing the others
                print(f"could not kill {child.name} (pid {child.process.pid}): {exc}")


@pytest.fixture
def procs(transactional_db, redis_only, tmp_path, settings) -> Iterator[Processes]:
    processes = Processes(tmp_path, settings)
    try:
        yield processes
    finally:
        processes.close()  # before the database is emptied for the next test


def answers_asked(server: Any, question: str) -> int:
    """Chat completions the backend was asked for this question (not titles)."""
    return sum(1 for body in server.bodies if body["messages"][-1]["content"] == question)


# --- the watchdog -------------------------------------------------------------------------


def test_watchdog_ends_a_stalled_run_with_its_logged_text_at_the_next_seq(
    alice, own_keys, settings
):
    settings.PARLEY_RUN_STALL_S = 20
    settings.PARLEY_RUN_LOG_TTL_S = 120
    run = running_run(alice, ["Hel", "lo, ", "wör", "ld"], heartbeat_age_s=21)

    assert runs_reap() == 1

    run = stored(run.id)
    events = log_of(run)
    assert run.state == Run.State.FAILED
    assert run.error_code == "worker_lost"
    assert "stopped responding" in run.error_message
    assert run.finished_at is not None
    assert run.assistant_message.content == "Hello, wörld" == deltas(as_frames(events))
    assert run.assistant_message.role == Message.Role.ASSISTANT
    assert run.assistant_message.parent_id == run.user_message_id
    with operator_scope():
        assert Conversation.objects.get(id=run.conversation_id).current_leaf_id == (
            run.assistant_message.id
        )
    assert [seq for seq, _ in events] == [1, 2, 3, 4, 5]
    assert events[-1][1] == {
        "type": "run.error",
        "code": "worker_lost",
        "message": run.error_message,
        "message_id": str(run.assistant_message.id),
    }
    assert run.last_seq == 5
    assert 0 < log_ttl(run) <= 120  # trimmed once stored
    # Ended once: later passes find nothing, the log keeps one end.
    assert runs_reap() == 0
    assert runs_reap(now=timezone.now() + timedelta(hours=1)) == 0
    assert log_of(run) == events


def test_watchdog_keeps_an_agents_tool_calls_from_the_log(alice, own_keys, settings):
    """The worker died during a tool call: the stored answer keeps the finished call
    and the unfinished one, marked so."""
    settings.PARLEY_RUN_STALL_S = 20
    run = running_run(alice, ["Looking up. "], heartbeat_age_s=30)
    key = run_log_key(tenant_id=run.tenant_id, run_id=run.id)
    for seq, event in enumerate(
        [
            {"type": "tool.start", "call_id": "c1", "name": "lookup", "arguments": {"q": "KE"}},
            {"type": "tool.end", "call_id": "c1", "name": "lookup", "result": "Nairobi"},
            {"type": "tool.start", "call_id": "c2", "name": "fetch", "arguments": {"u": "x"}},
        ],
        start=2,
    ):
        event_log().append(key, seq, event)

    assert runs_reap() == 1
    message = stored(run.id).assistant_message
    assert message.content == "Looking up. "
    assert message.steps == [
        {
            "call_id": "c1",
            "name": "lookup",
            "arguments": {"q": "KE"},
            "result": "Nairobi",
            "error": None,
            "truncated": False,
        },
        {
            "call_id": "c2",
            "name": "fetch",
            "arguments": {"u": "x"},
            "result": None,
            "error": UNFINISHED,
            "truncated": False,
        },
    ]


def test_watchdog_leaves_live_runs_and_fresh_queued_runs_alone(alice, own_keys, settings):
    settings.PARLEY_RUN_STALL_S = 20
    settings.PARLEY_RUN_QUEUE_TIMEOUT_S = 600
    live = running_run(alice, ["still ", "going"], heartbeat_age_s=5)
    queued = queued_run(alice)
    finished = running_run(alice, ["done"], heartbeat_age_s=3600)
    with operator_scope():
        Run.objects.filter(id=finished.id).update(state=Run.State.SUCCEEDED, last_seq=2)

    assert runs_reap() == 0
    assert stored(live.id).state == Run.State.RUNNING
    assert stored(queued.id).state == Run.State.QUEUED
    assert [e["type"] for _, e in log_of(live)] == ["token", "token"]

    # Ten minutes later the same runs are stuck: both are ended, the finished one is not.
    assert runs_reap(now=timezone.now() + timedelta(seconds=601)) == 2
    assert stored(live.id).error_code == "worker_lost"
    queued = stored(queued.id)
    assert (queued.state, queued.error_code) == (Run.State.FAILED, "queue_timeout")
    assert "No worker took this run" in queued.error_message
    assert queued.assistant_message is None  # it never produced anything
    assert log_of(queued) == [
        (
            1,
            {
                "type": "run.error",
                "code": "queue_timeout",
                "message": queued.error_message,
                "message_id": None,
            },
        )
    ]
    assert queued.last_seq == 1
    assert stored(finished.id).state == Run.State.SUCCEEDED


def test_watchdog_ends_a_run_whose_cancel_was_requested_as_cancelled(alice, own_keys, settings):
    settings.PARLEY_RUN_STALL_S = 20
    run = running_run(alice, ["part"], heartbeat_age_s=30)
    with operator_scope():
        Run.objects.filter(id=run.id).update(cancel_requested_at=timezone.now())

    assert runs_reap() == 1
    run = stored(run.id)
    assert (run.state, run.error_code) == (Run.State.CANCELLED, "worker_lost")
    assert run.assistant_message.content == "part"
    seq, end = log_of(run)[-1]
    assert (seq, end["type"], end["code"]) == (2, "run.error", "worker_lost")
    assert end["message_id"] == str(run.assistant_message.id)


def test_watchdog_closes_a_suspension_cancelled_run_whose_worker_died(alice, own_keys, settings):
    """A suspension marks running runs cancelled and lets their worker write the end; if
    that worker is dead, the watchdog writes it, keeping the suspension's reason."""
    settings.PARLEY_RUN_STALL_S = 20
    run = running_run(alice, ["half ", "an answer"], heartbeat_age_s=30)
    with operator_scope():
        Run.objects.filter(id=run.id).update(
            state=Run.State.CANCELLED, error_code="cancelled", error_message="Cancelled: audit"
        )

    assert runs_reap() == 1
    run = stored(run.id)
    assert (run.state, run.error_code, run.error_message) == (
        Run.State.CANCELLED,
        "cancelled",
        "Cancelled: audit",
    )
    assert run.assistant_message.content == "half an answer"
    assert log_of(run)[-1][1]["code"] == "cancelled"
    assert run.last_seq == 3
    assert runs_reap() == 0


def test_two_watchdogs_end_a_run_once(alice, own_keys, settings, transactional_db):
    from django.db import connections

    settings.PARLEY_RUN_STALL_S = 20
    runs = [running_run(alice, [f"run {i}"], heartbeat_age_s=30) for i in range(5)]
    counts: list[int] = []
    barrier = threading.Barrier(3)

    def watchdog() -> None:
        try:
            barrier.wait()
            counts.append(runs_reap())
        finally:
            connections.close_all()

    threads = [threading.Thread(target=watchdog) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert sum(counts) == 5 and len(counts) == 3
    for run in runs:
        events = log_of(run)
        assert [e["type"] for _, e in events] == ["token", "run.error"]
        with operator_scope():
            assert Message.objects.filter(conversation_id=run.conversation_id).count() == 2


def test_watchdog_runs_as_a_celery_task_on_the_default_queue(
    alice, own_keys, settings, transactional_db
):
    from chat.tasks import run_execute_task, runs_reap_task
    from config.celery import app

    entry = settings.CELERY_BEAT_SCHEDULE["runs-reap"]
    assert entry["task"] == runs_reap_task.name == "chat.tasks.runs_reap"
    assert entry["schedule"] == settings.PARLEY_RUN_WATCHDOG_INTERVAL_S
    router = app.amqp.router
    # Not the runs queue: the watchdog must run when every run worker is gone.
    assert router.route({}, runs_reap_task.name)["queue"].name == "default"
    assert router.route({}, run_execute_task.name)["queue"].name == "runs"

    settings.PARLEY_RUN_STALL_S = 20
    run = running_run(alice, ["x"], heartbeat_age_s=30)
    assert runs_reap_task.apply().get() == 1
    assert stored(run.id).state == Run.State.FAILED


@pytest.mark.parametrize(
    ("stall", "heartbeat", "message"),
    [
        ("3", "2", "PARLEY_RUN_STALL_S (3) must be at least twice PARLEY_RUN_HEARTBEAT_S (2)"),
        ("soon", "2", "PARLEY_RUN_STALL_S has an invalid value"),
        ("0.1", "0.1", "PARLEY_RUN_STALL_S must be at least 0.5"),
    ],
)
def test_watchdog_settings_are_checked_at_start(tmp_path, stall, heartbeat, message):
    env = {**PRODUCTION, "PARLEY_RUN_STALL_S": stall, "PARLEY_RUN_HEARTBEAT_S": heartbeat}
    result = manage("check", env=env, tmp_path=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr


# --- a worker that stalls, comes back, or waits ---------------------------------------------


def _execute_in_thread(run: Run) -> tuple[threading.Thread, list[BaseException]]:
    from django.db import connections

    errors: list[BaseException] = []

    def execute() -> None:
        try:
            run_execute(run_id=run.id, tenant_id=run.tenant_id)
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    thread = threading.Thread(target=execute, name="stalled-worker")
    thread.start()
    return thread, errors


@pytest.mark.parametrize("notices_by", ["refused_append", "heartbeat"])
def test_a_stalled_worker_that_comes_back_stops_without_overwriting_the_watchdog(
    alice, own_keys, settings, synthetic_server, monkeypatch, caplog, transactional_db, notices_by
):
    """The worker's heartbeats stop reaching the database (a stalled process, a network
    partition) while it keeps streaming. The watchdog ends the run; the worker then
    finds its appends refused (or its run closed at its next heartbeat) and stops."""
    import chat.execution

    server = synthetic_server(tokens=300, delay_s=0.01)
    settings.PARLEY_BACKENDS = [server.url]
    settings.PARLEY_RUN_STALL_S = 1.0
    pool.forget_cache()

    def beat_lost(run: Run, **fields: Any) -> bool:
        if notices_by == "refused_append":
            return True  # believes it is alive: only the log can stop it
        with tenant_scope(tenant_id=run.tenant_id):  # sees the row, writes nothing
            return Run.objects.filter(id=run.id, state=Run.State.RUNNING).exists()

    monkeypatch.setattr(chat.execution, "run_heartbeat", beat_lost)
    run = queued_run(alice)
    thread, errors = _execute_in_thread(run)
    reaped, deadline = 0, time.monotonic() + 30
    while not reaped and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
        reaped = runs_reap()
    thread.join(timeout=30)

    assert reaped == 1, "the watchdog did not end the run while its worker streamed"
    assert not thread.is_alive() and errors == []
    run = stored(run.id)
    events = log_of(run)
    assert [seq for seq, _ in events] == list(range(1, len(events) + 1))
    assert [e["type"] for _, e in events if e["type"] in TERMINAL_EVENTS] == ["run.error"]
    assert events[-1][1].get("code") == "worker_lost", events[-4:]
    assert (run.state, run.error_code, run.last_seq) == (
        Run.State.FAILED,
        "worker_lost",
        events[-1][0],
    )
    text = deltas(as_frames(events))
    assert text and run.assistant_message.content == text
    assert len(text) < len("".join(server.pieces))  # it really was cut short
    with operator_scope():
        assert Message.objects.filter(role=Message.Role.ASSISTANT).count() == 1
    assert not [r for r in caplog.records if r.name == "chat.execution" and r.levelname == "ERROR"]


def test_a_run_waiting_for_its_first_token_keeps_beating(
    alice, own_keys, settings, synthetic_server, transactional_db
):
    """No stream event arrives while the pool makes a run wait (admission, a long
    prefill): the worker still beats, so the watchdog leaves it alone."""
    server = synthetic_server(tokens=2, delay_s=1.6)
    settings.PARLEY_BACKENDS = [server.url]
    settings.PARLEY_RUN_STALL_S = 1.2
    pool.forget_cache()
    run = queued_run(alice)
    thread, errors = _execute_in_thread(run)
    reaped = []
    while thread.is_alive():
        reaped.append(runs_reap())
        time.sleep(0.1)
    thread.join()

    assert errors == [] and len(reaped) > 10
    assert sum(reaped) == 0
    run = stored(run.id)
    assert run.state == Run.State.SUCCEEDED
    assert run.assistant_message.content == "".join(server.pieces)


def test_the_runner_trims_the_log_once_the_run_is_stored(
    alice, own_keys, settings, synthetic_server, transactional_db
):
    server = synthetic_server(tokens=4)
    settings.PARLEY_BACKENDS = [server.url]
    settings.PARLEY_RUN_LOG_TTL_S = 90
    pool.forget_cache()
    run = queued_run(alice)
    key = run_log_key(tenant_id=run.tenant_id, run_id=run.id)
    seen: list[tuple[str, int]] = []
    real_append = type(event_log()).append

    def append(log: Any, k: str, seq: int, event: Any) -> None:
        if k == key and event["type"] in TERMINAL_EVENTS:
            # The answer is stored before its end is logged; the log is still untrimmed.
            with operator_scope():
                assert Run.objects.get(id=run.id).assistant_message_id is not None
            seen.append(("ttl before the end", log_ttl(run)))
        real_append(log, k, seq, event)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(event_log()), "append", append)
        run_execute(run_id=run.id, tenant_id=run.tenant_id)

    assert seen == [("ttl before the end", -1)]  # no expiry while live
    assert log_of(run)[-1][1]["type"] == "run.done"
    assert 0 < log_ttl(run) <= 90


# --- a worker killed mid-run ------------------------------------------------------------------


async def _tokens(socket: Any, count: int, *, timeout: float = 120) -> list[dict[str, Any]]:
    frames: list[dict[str, Any]] = []
    while len(frames) < count:
        frame = await socket.receive(timeout=timeout)
        assert frame["type"] == "token", frame
        frames.append(frame)
    return frames


@pytest.mark.llm
@pytest.mark.parametrize("watchdog", ["called", "beat"])
async def test_a_worker_killed_mid_run_ends_failed_with_its_partial_text(
    alice, backend, own_keys, settings, procs, monkeypatch, watchdog
):
    settings.PARLEY_RUN_STALL_S = STALL_S
    settings.PARLEY_MAX_TOKENS = 512
    queue = procs.private_runs_queue(monkeypatch)
    worker = await asyncio.to_thread(procs.worker, queue)
    if watchdog == "beat":
        # The real schedule: beat sends chat.tasks.runs_reap to the watchdog's queue.
        watcher = await asyncio.to_thread(procs.worker, procs.private_watchdog_queue())
        await asyncio.to_thread(procs.beat)
    connected, _, socket = await ws_connect(alice.user)
    assert connected
    with procs.shown_on_failure():
        await socket.send({"type": "chat.send", "content": LONG_PROMPT})
        started = await socket.receive(timeout=15)
        assert started["type"] == "run.started", started
        before = await _tokens(socket, 8)
        worker.kill()
        killed_at = time.monotonic()
        if watchdog == "called":
            # Its heartbeat is fresh: not yet.
            assert await sync_to_async(runs_reap)() == 0
            while not await sync_to_async(runs_reap)():
                assert time.monotonic() - killed_at < STALL_S + 15, "never reaped"
                await asyncio.sleep(0.25)
        after = await socket.receive_until(("run.done", "run.error"), timeout=STALL_S + 30)
        elapsed = time.monotonic() - killed_at
        frames = before + after
        end = frames[-1]

        assert end["type"] == "run.error" and end["code"] == "worker_lost", end
        assert elapsed >= STALL_S - 0.6  # ended by the watchdog, after the stall interval
        assert seqs(frames) == list(range(1, len(frames) + 1))  # no gap, no duplicate
        assert all(f["run_id"] == started["run_id"] for f in frames)
        run = await as_operator(
            lambda: Run.objects.select_related("assistant_message").get(id=started["run_id"])
        )
        assert run.state == Run.State.FAILED
        assert run.error_code == "worker_lost" and end["message"] == run.error_message
        assert run.last_seq == end["seq"]
        partial = deltas(frames)
        assert partial and run.assistant_message.content == partial
        assert end["message_id"] == str(run.assistant_message.id)
        assert await sync_to_async(log_of)(run) == [
            (f["seq"], {k: v for k, v in f.items() if k not in ("seq", "run_id")}) for f in frames
        ]
        assert 0 < await sync_to_async(log_ttl)(run) <= settings.PARLEY_RUN_LOG_TTL_S
        if watchdog == "beat":
            assert f"run {run.id}" in watcher.output()  # ended by the beat's task

        # The dead worker's task is delivered again (acks_late): the run stays as it is.
        await sync_to_async(run_execute)(run_id=run.id, tenant_id=run.tenant_id)
        assert await sync_to_async(log_of)(run) == [
            (f["seq"], {k: v for k, v in f.items() if k not in ("seq", "run_id")}) for f in frames
        ]
        again = await as_operator(lambda: Run.objects.get(id=run.id))
        assert (again.state, again.last_seq) == (Run.State.FAILED, run.last_seq)
    await socket.close()


def test_a_task_delivered_twice_executes_the_run_once(
    alice, own_keys, settings, synthetic_server, procs, monkeypatch
):
    from chat.tasks import run_execute_task

    server = synthetic_server(tokens=40, delay_s=0.02)
    settings.PARLEY_BACKENDS = [server.url]
    queue = procs.private_runs_queue(monkeypatch)
    # Two deliveries at once: a worker that runs two tasks side by side.
    worker = procs.worker(queue, pool="threads", concurrency=2)
    with procs.shown_on_failure():
        run = in_tenant(
            alice.tenant.id, chat_send, actor=alice.actor, content="Say something."
        )  # the first delivery, on commit
        run_execute_task.apply_async(args=(str(run.id), str(run.tenant_id)), queue=queue)

        deadline = time.monotonic() + 60
        while "is not queued (already claimed or gone); skipping" not in worker.output() or (
            stored(run.id).state != Run.State.SUCCEEDED
        ):
            assert time.monotonic() < deadline, "both deliveries were not handled"
            time.sleep(0.2)
        time.sleep(0.5)

        run = stored(run.id)
        events = log_of(run)
        assert answers_asked(server, "Say something.") == 1
        assert [seq for seq, _ in events] == list(range(1, len(events) + 1))
        assert [e["type"] for _, e in events].count("run.done") == 1
        assert run.assistant_message.content == "".join(server.pieces) == deltas(as_frames(events))
        with operator_scope():
            assert Message.objects.filter(role=Message.Role.ASSISTANT).count() == 1
        assert worker.output().count("is not queued (already claimed or gone)") == 1


# --- reconnecting with a cursor ------------------------------------------------------------


async def test_a_socket_that_reconnects_with_a_cursor_resumes_exactly(
    alice, charlie, own_keys, settings, synthetic_server, worker
):
    server = synthetic_server(tokens=150, delay_s=0.02)
    settings.PARLEY_BACKENDS = [server.url]
    pool.forget_cache()

    connected, _, first = await ws_connect(alice.user)
    assert connected
    await first.send({"type": "chat.send", "content": STORY})
    started = await first.receive(timeout=15)
    assert started["type"] == "run.started", started
    run_id = started["run_id"]
    seen = await _tokens(first, 5)
    await first.close()  # a network drop: the run goes on
    cursor = seen[-1]["seq"]

    connected, _, again = await ws_connect(alice.user)
    connected_tab, _, tab = await ws_connect(alice.user)
    assert connected and connected_tab
    await again.send({"type": "run.attach", "run_id": run_id, "after": cursor})
    await tab.send({"type": "run.attach", "run_id": run_id})  # a second tab: from the start
    assert (await as_operator(lambda: Run.objects.get(id=run_id))).state == Run.State.RUNNING
    resumed = await again.receive_until(("run.done", "run.error"), timeout=60)
    whole = await tab.receive_until(("run.done", "run.error"), timeout=60)

    assert resumed[-1]["type"] == whole[-1]["type"] == "run.done"
    end = resumed[-1]["seq"]
    assert seqs(seen) == list(range(1, cursor + 1))
    assert seqs(resumed) == list(range(cursor + 1, end + 1))  # no gap, no duplicate
    assert seqs(whole) == list(range(1, end + 1))
    assert all(f["run_id"] == run_id for f in seen + resumed + whole)
    run = await as_operator(lambda: Run.objects.select_related("assistant_message").get(id=run_id))
    answer = run.assistant_message.content
    assert deltas(seen) + deltas(resumed) == deltas(whole) == answer == "".join(server.pieces)
    assert resumed[-1]["message_id"] == str(run.assistant_message.id)
    assert await again.nothing_pending() and await tab.nothing_pending()

    # Attaching again after the end replays from the cursor, then stops.
    await again.send({"type": "run.attach", "run_id": run_id, "after": end - 2})
    assert seqs(await again.receive_until(("run.done",), timeout=10)) == [end - 1, end]

    # Another tenant's member cannot attach: the run does not exist for them.
    connected, _, outsider = await ws_connect(charlie.user)
    assert connected
    for ref in (run_id, str(uuid.uuid4())):
        await outsider.send({"type": "run.attach", "run_id": ref, "after": 0, "client_id": "o"})
        reply = await outsider.receive()
        assert (reply["type"], reply["code"], reply["client_id"]) == ("error", "not_found", "o")
    assert await outsider.nothing_pending()
    for socket in (again, tab, outsider):
        await socket.close()


# --- restarting the web server -------------------------------------------------------------


async def test_a_web_server_restart_loses_no_event_of_a_run(
    alice, own_keys, settings, synthetic_server, worker, procs
):
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    server = synthetic_server(tokens=300, delay_s=0.03)
    settings.PARLEY_BACKENDS = [server.url]  # the worker of this test process streams
    pool.forget_cache()
    cookie = await sync_to_async(session_cookie)(alice.user)
    headers = {"Cookie": f"{settings.SESSION_COOKIE_NAME}={cookie}"}

    def url(web: Child) -> tuple[str, str]:
        return f"ws://127.0.0.1:{web.port}/ws/v1/", f"http://127.0.0.1:{web.port}"

    with procs.shown_on_failure():
        web = await asyncio.to_thread(procs.web)
        address, origin = url(web)
        seen: list[dict[str, Any]] = []
        async with connect(address, origin=origin, additional_headers=headers) as socket:
            await socket.send(json.dumps({"type": "chat.send", "content": STORY}))
            started = json.loads(await asyncio.wait_for(socket.recv(), 15))
            assert started["type"] == "run.started", started
            while len(seen) < 5:
                seen.append(json.loads(await asyncio.wait_for(socket.recv(), 30)))
            web.kill()  # the web process dies mid-stream
            try:  # frames that were on their way before it died
                while True:
                    seen.append(json.loads(await asyncio.wait_for(socket.recv(), 10)))
            except ConnectionClosed:
                pass
        assert all(f["type"] == "token" for f in seen), seen
        cursor = seen[-1]["seq"]

        web = await asyncio.to_thread(procs.web)  # a new process (and port)
        address, origin = url(web)
        async with connect(address, origin=origin, additional_headers=headers) as socket:
            await socket.send(
                json.dumps({"type": "run.attach", "run_id": started["run_id"], "after": cursor})
            )
            resumed: list[dict[str, Any]] = []
            while not resumed or resumed[-1]["type"] not in TERMINAL_EVENTS:
                resumed.append(json.loads(await asyncio.wait_for(socket.recv(), 60)))

        run = await as_operator(
            lambda: Run.objects.select_related("assistant_message").get(id=started["run_id"])
        )
        assert resumed[-1]["type"] == "run.done", resumed[-1]
        assert seqs(seen) == list(range(1, cursor + 1))
        assert seqs(resumed) == list(range(cursor + 1, resumed[-1]["seq"] + 1))
        assert all(f["run_id"] == started["run_id"] for f in seen + resumed)
        # The run went on unaffected: one generation, stored exactly as streamed.
        assert run.state == Run.State.SUCCEEDED and answers_asked(server, STORY) == 1
        assert deltas(seen) + deltas(resumed) == run.assistant_message.content
        assert run.assistant_message.content == "".join(server.pieces)


def test_log_refuses_the_append_of_a_worker_the_watchdog_overtook(alice, own_keys, settings):
    """What the stalled worker meets: the watchdog's end took its next number."""
    settings.PARLEY_RUN_STALL_S = 20
    run = running_run(alice, ["a", "b"], heartbeat_age_s=30)
    assert runs_reap() == 1
    with pytest.raises(EventLogError, match=r"out of sequence|last event"):
        event_log().append(
            run_log_key(tenant_id=run.tenant_id, run_id=run.id), 3, {"type": "token", "delta": "c"}
        )
