"""Parley's web process for the websocket benchmarks: a throwaway database, a tenant
with an API key, and `uvicorn config.asgi:application` in a subprocess.

Used by `idle_sockets.py` and `resume.py`; it also runs as a script for the steps
that need Django in a process of their own (the bench processes never load Django):

    python tests/bench/parley_server.py serve --app config.asgi:application --port 8123
    python tests/bench/parley_server.py serve --app echo --port 8124
    python tests/bench/parley_server.py seed
    python tests/bench/parley_server.py write-run --tokens 10000 --tokens-per-event 1

The server runs in production settings (`config.settings.production`) against
PostgreSQL and Redis as the test suite finds them (`eval "$(bash tests/services.sh)"`
sets DATABASE_URL and REDIS_URL): `bench_stack` creates a database and an application
role of its own (the role owns no table, so row level security applies as in
production), migrates it as the owner, uses a Redis key prefix of its own, and drops
all of it afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve()
# As deploy/README.md runs the web process (minus the proxy flags, no proxy here).
WS_MAX_SIZE = 1_048_576


def raise_nofile() -> int:
    """Lift the soft limit on open files to the hard one; returns the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


def nofile_hard() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def services() -> tuple[str, str]:
    """DATABASE_URL and REDIS_URL, or a clear message on how to get them."""
    database_url = os.environ.get("DATABASE_URL", "").strip()
    redis_url = os.environ.get("REDIS_URL", "").strip()
    if not database_url or not redis_url:
        raise SystemExit(
            "Set DATABASE_URL (PostgreSQL, a role that may create databases and roles) and "
            'REDIS_URL, e.g. with: eval "$(bash tests/services.sh)"'
        )
    if urlsplit(database_url).scheme not in ("postgres", "postgresql"):
        raise SystemExit("DATABASE_URL must be a postgres:// URL.")
    return database_url, redis_url


def _with_db(url: str, *, dbname: str, user: str | None = None, password: str | None = None) -> str:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    user = user if user is not None else unquote(parts.username or "")
    password = password if password is not None else unquote(parts.password or "")
    if user:
        netloc = (
            quote(user, safe="")
            + (f":{quote(password, safe='')}" if password else "")
            + ("@" + netloc)
        )
    return urlunsplit((parts.scheme, netloc, "/" + dbname, parts.query, ""))


@dataclass
class Stack:
    """What a bench's Parley processes share: their environment and the seeded tenant."""

    env: dict[str, str]
    prefix: str
    redis_url: str
    seed: dict[str, Any] = field(default_factory=dict)
    logs: Path | None = None

    @property
    def api_key(self) -> str:
        return str(self.seed["api_key"])


def _admin(url: str) -> Any:
    import psycopg

    return psycopg.connect(_with_db(url, dbname="postgres"), autocommit=True)


@contextlib.contextmanager
def bench_stack(*, log_dir: Path) -> Iterator[Stack]:
    """A migrated throwaway database, an application role, a Redis prefix and a seeded
    tenant with an API key; all of it dropped on the way out."""
    from psycopg import sql

    database_url, redis_url = services()
    tag = uuid.uuid4().hex[:10]
    dbname, role, password = f"parley_bench_{tag}", f"parley_bench_{tag}", secrets.token_hex(16)
    prefix = f"parley-bench-{tag}"
    with _admin(database_url) as admin:
        admin.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} NOSUPERUSER NOBYPASSRLS NOCREATEDB").format(
                sql.Identifier(role), sql.Literal(password)
            )
        )
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "PARLEY_"))}
    env.update(
        DJANGO_SETTINGS_MODULE="config.settings.production",
        DATABASE_URL=_with_db(database_url, dbname=dbname, user=role, password=password),
        DATABASE_OWNER_URL=_with_db(database_url, dbname=dbname),
        REDIS_URL=redis_url,
        DJANGO_SECRET_KEY=secrets.token_urlsafe(50),
        DJANGO_ALLOWED_HOSTS="127.0.0.1,localhost",
        # Required by the production settings; no run is executed, nothing calls it.
        PARLEY_BACKENDS="http://127.0.0.1:9",
        PARLEY_REDIS_PREFIX=prefix,
        PARLEY_LOG_LEVEL="WARNING",
        PARLEY_STATIC_ROOT=str(log_dir / "static"),
        PYTHONUNBUFFERED="1",
    )
    (log_dir / "static").mkdir(parents=True, exist_ok=True)
    stack = Stack(env=env, prefix=prefix, redis_url=redis_url, logs=log_dir)
    try:
        manage(stack, "migrate", "--noinput", "-v", "0")
        stack.seed = helper(stack, "seed")
        yield stack
    finally:
        _drop(database_url, dbname, role)
        _drop_redis(redis_url, prefix)


def _drop(database_url: str, dbname: str, role: str) -> None:
    from psycopg import sql

    with _admin(database_url) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", [dbname]
        )
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(dbname)))
        admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def _drop_redis(redis_url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i : i + 500])
    finally:
        client.close()


def manage(stack: Stack, *args: str) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), *args],
        cwd=ROOT,
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{result.stderr[-4000:]}")


def helper(stack: Stack, *args: str) -> dict[str, Any]:
    """Run this file's `seed` / `write-run` step in a Django process; its JSON result."""
    result = subprocess.run(
        [sys.executable, str(HERE), *args],
        cwd=ROOT,
        env={**stack.env, "PARLEY_BENCH_TENANT": json.dumps(stack.seed)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{result.stderr[-4000:]}")
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


# --- the server process ---------------------------------------------------------


class Server:
    """`uvicorn <app>` in a subprocess, one worker: the process whose memory is measured."""

    def __init__(self, *, app: str, env: dict[str, str], log_path: Path, ws: str = "auto") -> None:
        self.app = app
        self.ws = ws
        self.port = free_port()
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/v1/"

    def __enter__(self) -> Server:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    *(sys.executable, str(HERE), "serve", "--app", self.app),
                    *("--port", str(self.port), "--ws", self.ws),
                ],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited:\n{self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"the server did not listen:\n{self.log_tail()}") from None
                time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def memory(self) -> dict[str, int]:
        """Resident and proportional set size of the server process, in bytes."""
        return process_memory(self.pid)

    def cpu_s(self) -> float:
        """User plus system CPU seconds the server process has used."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))


def process_memory(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0].lower()] = int(line.split()[1]) * 1024
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                out["pss"] = int(line.split()[1]) * 1024
    return {"rss": out["vmrss"], "pss": out.get("pss", out["vmrss"]), "hwm": out["vmhwm"]}


async def echo_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The reference: a bare ASGI websocket echo app, no Django, no Channels."""
    if scope["type"] != "websocket":
        return
    while True:
        message = await receive()
        if message["type"] == "websocket.connect":
            await send({"type": "websocket.accept"})
        elif message["type"] == "websocket.receive":
            if message.get("text") is not None:
                await send({"type": "websocket.send", "text": message["text"]})
            else:
                await send({"type": "websocket.send", "bytes": message.get("bytes") or b""})
        elif message["type"] == "websocket.disconnect":
            return


_TERMINAL = ("run.done", "run.error")
_redis_client: Any = None


async def relay_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The reference relay: no Django, no Channels, no auth. On
    `{"key": ..., "run_id": ..., "after": n}` it sends every event of the Redis Stream
    `key` after `n` as one frame each, shaped as Parley's (`run_id` and `seq` added),
    read and decoded as Parley's log does (XRANGE, READ_COUNT at a time), up to the
    terminal event."""
    from chat.eventlog import READ_COUNT, RedisEventLog

    global _redis_client
    if scope["type"] != "websocket":
        return
    if _redis_client is None:
        import redis.asyncio

        _redis_client = redis.asyncio.Redis.from_url(os.environ["REDIS_URL"])
        _redis_client.response_callbacks["XRANGE"] = lambda response, **options: response
    while True:
        message = await receive()
        if message["type"] == "websocket.connect":
            await send({"type": "websocket.accept"})
        elif message["type"] == "websocket.disconnect":
            return
        elif message["type"] == "websocket.receive":
            ask = json.loads(message.get("text") or "{}")
            after, done = int(ask["after"]), False
            while not done:
                entries = await _redis_client.xrange(
                    ask["key"], min=f"(0-{after}", max="+", count=READ_COUNT
                )
                if not entries:
                    break
                for after, event in RedisEventLog._decode(entries):
                    frame = {**event, "run_id": ask["run_id"], "seq": after}
                    await send({"type": "websocket.send", "text": json.dumps(frame)})
                    if event.get("type") in _TERMINAL:
                        done = True
                        break


def _serve(app: str, port: int, ws: str) -> None:
    import uvicorn
    from uvicorn.importer import import_from_string

    raise_nofile()
    for path in (ROOT / "platform", ROOT):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    target: Any = {"echo": echo_app, "relay": relay_app}.get(app, app)
    uvicorn.run(
        target,
        # uvicorn's own names (auto, websockets, websockets-sansio, wsproto), or
        # module:Class of a protocol to try.
        ws=import_from_string(ws) if ":" in ws else ws,
        host="127.0.0.1",
        port=port,
        ws_max_size=WS_MAX_SIZE,
        lifespan="off",
        log_level="warning",
        backlog=4096,
    )


# --- steps that need Django ----------------------------------------------------------


def _django() -> None:
    for path in (ROOT / "platform", ROOT):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    import django

    django.setup()


def _seed() -> dict[str, Any]:
    """A tenant, its owner and an API key with the chat scope (shown once, here)."""
    _django()
    from tenants.access import Actor
    from tenants.models import Role
    from tenants.rls import tenant_scope
    from tenants.services.api_keys import api_key_create
    from tenants.services.tenants import tenant_create

    tenant, owner = tenant_create(
        name="Bench Company",
        slug="bench",
        owner_username="bench-owner",
        owner_password=secrets.token_urlsafe(16),
        validate=False,
    )
    actor = Actor(tenant=tenant, user=owner, role=Role.OWNER)
    with tenant_scope(tenant_id=tenant.id, user_id=owner.pk):
        _key, raw = api_key_create(actor=actor, name="bench", scopes=["chat"])
    return {"tenant_id": str(tenant.id), "user_id": str(owner.pk), "api_key": raw}


# Short words, about one token each, as a model streams them.
_VOCABULARY = (
    "the of and to in is that for it as with was on be by this are or an at from but not "
    "have which one all were can there been if more when will would who so no code data run "
    "model token stream value function return class import test server client"
)
_WORDS = [f" {word}" for word in _VOCABULARY.split()]


def _token_text(i: int) -> str:
    return _WORDS[(i * 7 + i // 13) % len(_WORDS)]


def _write_run(tokens: int, tokens_per_event: int) -> dict[str, Any]:
    """A finished run of `tokens` tokens, `tokens_per_event` per token event, then
    `run.done`: a real Run row of the bench tenant's owner and its event log in Redis."""
    _django()
    from chat.eventlog import event_log, run_log_key
    from chat.models import Conversation, Message, Run
    from tenants.rls import tenant_scope

    seed = json.loads(os.environ["PARLEY_BENCH_TENANT"])
    tenant_id, user_id = seed["tenant_id"], seed["user_id"]
    deltas = [
        "".join(_token_text(i) for i in range(start, min(start + tokens_per_event, tokens)))
        for start in range(0, tokens, tokens_per_event)
    ]
    text = "".join(deltas)
    with tenant_scope(tenant_id=tenant_id, user_id=user_id):
        conversation = Conversation.objects.create(
            tenant_id=tenant_id, user_id=user_id, title="bench"
        )
        question = Message.objects.create(
            tenant_id=tenant_id, conversation=conversation, role="user", content="Go on."
        )
        answer = Message.objects.create(
            tenant_id=tenant_id,
            conversation=conversation,
            parent=question,
            role="assistant",
            content=text,
        )
        run = Run.objects.create(
            tenant_id=tenant_id,
            conversation=conversation,
            user_id=user_id,
            user_message=question,
            assistant_message=answer,
            state=Run.State.SUCCEEDED,
            completion_tokens=tokens,
            finish_reason="length",
            last_seq=len(deltas) + 1,
        )
    log, key = event_log(), run_log_key(tenant_id=tenant_id, run_id=run.id)
    for seq, delta in enumerate(deltas, start=1):
        log.append(key, seq, {"type": "token", "delta": delta})
    log.append(
        key,
        len(deltas) + 1,
        {
            "type": "run.done",
            "message_id": str(answer.id),
            "finish_reason": "length",
            "usage": {"prompt_tokens": 3, "completion_tokens": tokens, "total_tokens": tokens + 3},
        },
    )
    return {"run_id": str(run.id), "key": key, "events": len(deltas) + 1, "chars": len(text)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="step", required=True)
    serve = sub.add_parser("serve", help="run uvicorn with one app (raises RLIMIT_NOFILE)")
    serve.add_argument(
        "--app", required=True, help="config.asgi:application, echo or relay (references)"
    )
    serve.add_argument("--port", type=int, required=True)
    serve.add_argument("--ws", default="auto", help="uvicorn --ws, or module:Class")
    sub.add_parser("seed", help="create the bench tenant, owner and API key; print JSON")
    write = sub.add_parser("write-run", help="write a finished run and its event log; print JSON")
    write.add_argument("--tokens", type=int, required=True)
    write.add_argument("--tokens-per-event", type=int, default=1)
    args = parser.parse_args(argv)
    if args.step == "serve":
        _serve(args.app, args.port, args.ws)
        return 0
    if args.step == "seed":
        print(json.dumps(_seed()))
        return 0
    if args.tokens < 1 or args.tokens_per_event < 1:
        parser.error("--tokens and --tokens-per-event must be at least 1")
    print(json.dumps(_write_run(args.tokens, args.tokens_per_event)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
