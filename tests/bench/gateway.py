"""Gateway overhead: the OpenAI-compatible API's streams, direct and through Parley.

One run measures the same load twice, side by side: N concurrent streaming clients
(closed loop: each starts its next completion when the last one ends, starts
staggered over one stream's length so arrivals are even) against a synthetic
OpenAI-compatible token server (tests/bench/tokenserver.py: a fixed number of tokens
per completion at a fixed rate per stream), first directly, then through Parley's
`/v1/chat/completions` with a tenant's API key (phases alternate over `--rounds`).

Parley runs as in production: `uvicorn config.asgi:application` (one process, or
`--workers N`; CPU is then summed over the workers) with
`config.settings.production` against PostgreSQL and Redis, a throwaway database
and application role (row level security applies), a tenant with an API key
(tests/bench/parley_server.py sets these up and drops them afterwards), and the
token server as its only backend. Every call goes through the product path: key
authentication, the plan, limits and budget reservation in Redis, fair admission,
routing, the backend stream, the usage ledger row.

Measured in the window after the warm-up: tokens received per second (from the
arrival time of each chunk), and time to first token (the first content delta, not
the role chunk) of the completions started in the window. Reported:

    direct_tok_s, parley_tok_s, throughput_ratio (parley / direct),
    added_ttft_p50_ms, added_ttft_p99_ms (Parley's percentile minus the direct one)

plus both sides' percentiles, request and error counts, and CPU time per 1,000
tokens of Parley, the token server and the client.

    eval "$(bash tests/services.sh)"
    .venv/bin/python tests/bench/gateway.py --quick --json
    .venv/bin/python tests/bench/gateway.py --concurrency 200 --out var/bench/gateway.json
    .venv/bin/python tests/bench/gateway.py --quick --json --workers 2

The machine's cores are shared by the client, the token server, Parley, PostgreSQL
and Redis: that is the point (a gateway's overhead is also the CPU it takes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from parley_server import ROOT, bench_stack, free_port, raise_nofile
from results import result_write

HERE = Path(__file__).resolve().parent
# A content delta, as the token server and as Parley encode it (never the role chunk).
MARKERS = (b'"delta": {"content"', b'"delta":{"content"')
GOALS = {"throughput_ratio": 0.9, "added_ttft_p50_ms": 15.0, "added_ttft_p99_ms": 50.0}
BURST_GOALS = {"throughput_ratio": 0.95, "added_ttft_p99_ms": 150.0, "cpu_ms_per_call_start": 2.0}


@dataclass
class Phase:
    name: str
    ttft_ms: list[float] = field(default_factory=list)
    tokens_in_window: int = 0
    window_s: float = 0.0
    requests: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    short: int = 0  # completions with fewer tokens than asked
    cpu_s: dict[str, float] = field(default_factory=dict)
    # Bursts: the server's CPU from the bursts' starts until every stream had its first
    # token, the calls started meanwhile, and its CPU over the whole bursts.
    start_cpu_s: float = 0.0
    start_calls: int = 0
    burst_cpu_s: float = 0.0

    @property
    def tok_s(self) -> float:
        return self.tokens_in_window / self.window_s if self.window_s else 0.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_s(pid: int) -> float:
    """CPU time of a process and its live children (uvicorn --workers)."""
    total = proc_cpu_s(pid)
    for child in Path(f"/proc/{pid}/task").glob("*/children"):
        for child_pid in child.read_text().split():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                total += tree_cpu_s(int(child_pid))
    return total


def self_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Connection:
    """One keep-alive HTTP/1.1 connection of a client, spoken by hand: httpx costs more
    CPU per chunk than the servers it measures, on the same cores."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.reader is None or self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self.reader, self.writer

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def request_bytes(*, url: str, headers: dict[str, str], body: bytes) -> tuple[str, int, bytes]:
    parts = urlsplit(url)
    lines = [
        f"POST {parts.path} HTTP/1.1",
        f"Host: {parts.netloc}",
        f"Content-Length: {len(body)}",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    return (
        parts.hostname or "127.0.0.1",
        parts.port or 80,
        "\r\n".join(lines).encode() + (b"\r\n\r\n" + body),
    )


@dataclass
class Stream:
    """One completion as the client saw it."""

    status: int = 0
    first: float | None = None  # when the first content delta arrived (loop time)
    received: int = 0  # content deltas
    error: str = ""


async def stream_once(
    connection: Connection,
    request: bytes,
    *,
    bins: dict[int, int],
    t0: float,
    on_first: Any = None,
) -> Stream:
    """Send one completion request on the connection and read its stream to the end,
    counting content deltas per second since `t0` into `bins`."""
    loop = asyncio.get_running_loop()
    keep = max(len(m) for m in MARKERS) + 8
    out = Stream()
    tail = b""
    try:
        reader, writer = await connection.open()
        writer.write(request)
        head = (await reader.readuntil(b"\r\n\r\n")).lower()
        out.status = int(head[9:12])
        if b"transfer-encoding: chunked" not in head:
            length = int(head.split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            out.error = f"http_{out.status}"
            if b"connection: close" in head:
                connection.close()
            return out
        while True:
            data = await reader.read(65536)
            if not data:
                raise ConnectionError("the server closed the connection")
            now = loop.time()
            buffer = tail + data
            count = sum(buffer.count(m) for m in MARKERS)
            tail = buffer[-keep:]
            if count:
                if out.first is None:
                    out.first = now
                    if on_first is not None:
                        on_first()
                out.received += count
                second = int(now - t0)
                bins[second] = bins.get(second, 0) + count
            if tail.endswith(b"\r\n0\r\n\r\n"):
                break
        if out.status != 200:
            out.error = f"http_{out.status}"
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
        connection.close()
        out.error = type(exc).__name__
    return out


async def run_phase(
    phase: Phase,
    *,
    url: str,
    headers: dict[str, str],
    body: bytes,
    concurrency: int,
    tokens: int,
    stream_s: float,
    warmup_s: float,
    duration_s: float,
) -> None:
    """Closed loop: each client starts its next completion when the last one ends,
    the clients' first starts staggered over one stream's length."""
    loop = asyncio.get_running_loop()
    host, port, request = request_bytes(url=url, headers=headers, body=body)
    bins: dict[int, int] = {}
    t0 = loop.time()
    window = (t0 + warmup_s, t0 + warmup_s + duration_s)

    async def one(connection: Connection) -> None:
        start = loop.time()
        got = await stream_once(connection, request, bins=bins, t0=t0)
        if got.error:
            phase.errors[got.error] = phase.errors.get(got.error, 0) + 1
            return
        if window[0] <= start < window[1]:
            phase.requests += 1
            if got.first is not None:
                phase.ttft_ms.append((got.first - start) * 1000)
            if got.received < tokens:
                phase.short += 1

    async def worker(index: int) -> None:
        await asyncio.sleep(index * stream_s / concurrency)
        connection = Connection(host, port)
        try:
            while loop.time() < window[1]:
                await one(connection)
        finally:
            connection.close()

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    first_bin, last_bin = int(warmup_s), int(warmup_s + duration_s)
    phase.tokens_in_window += sum(bins.get(s, 0) for s in range(first_bin, last_bin))
    phase.window_s += last_bin - first_bin


async def run_bursts(
    phase: Phase,
    *,
    url: str,
    headers: dict[str, str],
    body: bytes,
    concurrency: int,
    tokens: int,
    bursts: int,
    cpu_s: Any,
    settle_s: float = 1.0,
) -> None:
    """Bursts: every client starts its completion at the same instant; the next burst
    starts `settle_s` after the last stream of this one ended (so that a burst's
    bookkeeping is not the next one's). The first burst warms up and is not counted.

    Per burst: TTFT from the burst's start; throughput as the tokens over the time from
    the burst's start to its last stream's end; `cpu_s()` (the server's CPU time) read
    at the start, when every stream has had its first token, and after the pause."""
    loop = asyncio.get_running_loop()
    host, port, request = request_bytes(url=url, headers=headers, body=body)
    connections = [Connection(host, port) for _ in range(concurrency)]
    try:
        marks: dict[str, float] = {}
        firsts = [0]

        def on_first() -> None:
            firsts[0] += 1
            if firsts[0] == concurrency:
                marks["cpu_first"] = cpu_s()

        for burst in range(bursts + 1):
            bins: dict[int, int] = {}
            marks.clear()
            firsts[0] = 0
            marks["cpu_start"] = cpu_s()
            t0 = loop.time()
            got = await asyncio.gather(
                *(stream_once(c, request, bins=bins, t0=t0, on_first=on_first) for c in connections)
            )
            elapsed = loop.time() - t0
            await asyncio.sleep(settle_s)
            marks["cpu_end"] = cpu_s()
            if burst == 0:
                continue
            for stream in got:
                if stream.error:
                    phase.errors[stream.error] = phase.errors.get(stream.error, 0) + 1
                    continue
                phase.requests += 1
                if stream.first is not None:
                    phase.ttft_ms.append((stream.first - t0) * 1000)
                if stream.received < tokens:
                    phase.short += 1
            phase.tokens_in_window += sum(s.received for s in got)
            phase.window_s += elapsed
            if "cpu_first" in marks:
                phase.start_cpu_s += marks["cpu_first"] - marks["cpu_start"]
                phase.start_calls += concurrency
            phase.burst_cpu_s += marks["cpu_end"] - marks["cpu_start"]
    finally:
        for connection in connections:
            connection.close()


def chat_body(*, tokens: int) -> bytes:
    return json.dumps(
        {
            "model": "bench-model",
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Tell me a story about a gateway."},
            ],
            "max_tokens": tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()


class TokenServerProcess:
    def __init__(self, *, tokens: int, rate: float, log_path: Path) -> None:
        self.port = free_port()
        self.args = [
            sys.executable,
            str(HERE / "tokenserver.py"),
            "--port",
            str(self.port),
            "--tokens",
            str(tokens),
            "--rate",
            str(rate),
        ]
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> TokenServerProcess:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the token server did not start:\n{self.log_path.read_text()}")
            time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


class ParleyProcess:
    """`uvicorn config.asgi:application`, as deploy/README.md runs the web process (one
    worker unless asked for more, no proxy flags: the client sends X-Forwarded-Proto as
    the proxy would)."""

    def __init__(self, *, env: dict[str, str], log_path: Path, workers: int = 1) -> None:
        self.port = free_port()
        self.env = {**env, "PYTHONPATH": os.pathsep.join([str(ROOT / "platform"), str(ROOT)])}
        self.workers = workers
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def cpu_s(self) -> float:
        return tree_cpu_s(self.pid)

    def __enter__(self) -> ParleyProcess:
        command = [
            sys.executable,
            "-m",
            "uvicorn",
            "config.asgi:application",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--lifespan",
            "off",
            "--log-level",
            "warning",
            "--no-access-log",
            "--backlog",
            "4096",
        ]
        if self.workers > 1:
            command += ["--workers", str(self.workers)]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=1).status_code:
                    return self
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"Parley did not start:\n{self.log_path.read_text()[-4000:]}")
            time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


class RefresherProcess:
    """What Celery beat does in a deployment: `inference.tasks.pool_refresh` (health,
    models and load of every backend) every PARLEY_SCRAPE_INTERVAL_S, so the web
    process finds its backend rows fresh and never checks them inline."""

    CODE = (
        "import time\n"
        "from django.conf import settings\n"
        "from inference.tasks import pool_refresh\n"
        "while True:\n"
        "    pool_refresh()\n"
        "    time.sleep(settings.PARLEY_SCRAPE_INTERVAL_S)\n"
    )

    def __init__(self, *, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> RefresherProcess:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "manage.py", "shell", "-c", self.CODE],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


def summarise(args: argparse.Namespace, phases: dict[str, Phase]) -> dict[str, Any]:
    direct, parley = phases["direct"], phases["parley"]
    out: dict[str, Any] = {
        "benchmark": "gateway",
        "quick": args.quick,
        "parley_workers": args.workers,
        "concurrency": args.concurrency,
        "tokens_per_completion": args.tokens,
        "tokens_per_s_per_stream": args.rate,
        "rounds": args.rounds,
        "window_s_per_side": direct.window_s,
        "direct_tok_s": round(direct.tok_s, 1),
        "parley_tok_s": round(parley.tok_s, 1),
        "throughput_ratio": round(parley.tok_s / direct.tok_s, 4) if direct.tok_s else None,
    }
    for side in (direct, parley):
        for q in (50, 90, 99):
            out[f"{side.name}_ttft_p{q}_ms"] = round(percentile(side.ttft_ms, q), 2)
    for q in (50, 99):
        out[f"added_ttft_p{q}_ms"] = round(
            out[f"parley_ttft_p{q}_ms"] - out[f"direct_ttft_p{q}_ms"], 2
        )
    for side in (direct, parley):
        out[f"{side.name}_requests"] = side.requests
        out[f"{side.name}_errors"] = side.errors
        out[f"{side.name}_short_completions"] = side.short
        tokens = max(1, side.tokens_in_window)
        out[f"{side.name}_cpu_ms_per_1k_tokens"] = {
            who: round(seconds * 1000 / tokens * 1000, 1) for who, seconds in side.cpu_s.items()
        }
    if args.burst:
        out["bursts"] = args.bursts
        out["mode"] = "burst"
        calls = max(1, parley.start_calls)
        out["parley_cpu_ms_per_call_start"] = round(parley.start_cpu_s * 1000 / calls, 3)
        out["parley_cpu_ms_per_call"] = round(
            parley.burst_cpu_s * 1000 / max(1, parley.requests), 3
        )
        out["goals"] = {
            "throughput_ratio >= 0.95": bool(
                out["throughput_ratio"]
                and out["throughput_ratio"] >= BURST_GOALS["throughput_ratio"]
            ),
            "added_ttft_p99_ms <= 150": out["added_ttft_p99_ms"]
            <= BURST_GOALS["added_ttft_p99_ms"],
            "parley_cpu_ms_per_call_start <= 2": out["parley_cpu_ms_per_call_start"]
            <= BURST_GOALS["cpu_ms_per_call_start"],
        }
    else:
        out["mode"] = "steady"
        out["goals"] = {
            "throughput_ratio >= 0.9": bool(
                out["throughput_ratio"] and out["throughput_ratio"] >= GOALS["throughput_ratio"]
            ),
            "added_ttft_p50_ms <= 15": out["added_ttft_p50_ms"] <= GOALS["added_ttft_p50_ms"],
            "added_ttft_p99_ms <= 50": out["added_ttft_p99_ms"] <= GOALS["added_ttft_p99_ms"],
        }
    out["cpus"] = os.cpu_count()
    out["python"] = sys.version.split()[0]
    return out


async def measure(
    args: argparse.Namespace, *, token_server: TokenServerProcess, parley: ParleyProcess, key: str
) -> dict[str, Phase]:
    body = chat_body(tokens=args.tokens)
    stream_s = args.tokens / args.rate
    # Behind the TLS-terminating proxy of a deployment (production settings redirect
    # plain http otherwise).
    parley_headers = {
        "Authorization": f"Bearer {key}",
        "Content-Type": "application/json",
        "X-Forwarded-Proto": "https",
    }
    sides = {
        "direct": (f"{token_server.url}/v1/chat/completions", {"Content-Type": "application/json"}),
        "parley": (f"http://127.0.0.1:{parley.port}/v1/chat/completions", parley_headers),
    }
    # Warm up both paths (connections, backend rows, caches) with a few calls.
    async with httpx.AsyncClient(timeout=60) as client:
        for url, headers in sides.values():
            for _ in range(3):
                response = await client.post(url, content=body, headers=headers)
                if response.status_code != 200:
                    raise RuntimeError(f"warm-up call to {url} failed: {response.text[:500]}")
    phases = {name: Phase(name) for name in sides}
    assert token_server.process is not None
    for _ in range(args.rounds):
        for name, (url, headers) in sides.items():
            phase = phases[name]
            before = {
                "parley": parley.cpu_s(),
                "token_server": proc_cpu_s(token_server.process.pid),
                "client": self_cpu_s(),
            }
            if args.burst:
                server_pid = parley.pid if name == "parley" else token_server.process.pid
                await run_bursts(
                    phase,
                    url=url,
                    headers=headers,
                    body=body,
                    concurrency=args.concurrency,
                    tokens=args.tokens,
                    bursts=args.bursts,
                    cpu_s=(lambda pid=server_pid: tree_cpu_s(pid)),
                )
            else:
                await run_phase(
                    phase,
                    url=url,
                    headers=headers,
                    body=body,
                    concurrency=args.concurrency,
                    tokens=args.tokens,
                    stream_s=stream_s,
                    warmup_s=args.warmup,
                    duration_s=args.duration,
                )
            after = {
                "parley": parley.cpu_s(),
                "token_server": proc_cpu_s(token_server.process.pid),
                "client": self_cpu_s(),
            }
            for who in before:
                phase.cpu_s[who] = phase.cpu_s.get(who, 0.0) + after[who] - before[who]
            await asyncio.sleep(1.0)  # let the last streams' bookkeeping settle
    return phases


def run_async(coroutine: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short streams and windows")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--out", type=Path, help="write the results JSON here")
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes of Parley")
    parser.add_argument("--tokens", type=int, help="tokens per completion")
    parser.add_argument("--rate", type=float, default=25.0, help="tokens per second per stream")
    parser.add_argument("--warmup", type=float, help="seconds before the window, per phase")
    parser.add_argument("--duration", type=float, help="seconds of the window, per phase")
    parser.add_argument("--rounds", type=int, help="direct/Parley phase pairs")
    parser.add_argument(
        "--burst", action="store_true", help="every stream starts at once, burst after burst"
    )
    parser.add_argument("--bursts", type=int, help="measured bursts per phase (with --burst)")
    args = parser.parse_args(argv)
    defaults = (
        {"tokens": 64, "warmup": 4.0, "duration": 10.0, "rounds": 1, "bursts": 3}
        if args.quick
        else {"tokens": 200, "warmup": 10.0, "duration": 30.0, "rounds": 2, "bursts": 5}
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.concurrency < 1 or args.tokens < 1 or args.rate <= 0 or args.rounds < 1:
        parser.error("--concurrency, --tokens and --rounds must be at least 1, --rate positive")
    if args.duration < 1 or args.warmup < 0:
        parser.error("--duration must be at least 1 s and --warmup not negative")

    raise_nofile()
    log_dir = ROOT / "var" / "bench" / "gateway"
    log_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with (
        TokenServerProcess(
            tokens=args.tokens, rate=args.rate, log_path=log_dir / "tokenserver.log"
        ) as token_server,
        bench_stack(log_dir=log_dir) as stack,
    ):
        env = {
            **stack.env,
            "PARLEY_BACKENDS": token_server.url,
            # Room for every stream: the pool is not saturated, admission never waits.
            "PARLEY_BACKEND_MAX_INFLIGHT": str(max(64, 2 * args.concurrency)),
        }
        with (
            RefresherProcess(env=env, log_path=log_dir / "refresher.log"),
            ParleyProcess(env=env, log_path=log_dir / "parley.log", workers=args.workers) as parley,
        ):
            phases = run_async(
                measure(args, token_server=token_server, parley=parley, key=stack.api_key)
            )
    result = summarise(args, phases)
    result["wall_s"] = round(time.monotonic() - started, 1)
    return result_write(
        "gateway", result, out=args.out, quick=args.quick, as_json=args.json, table=table
    )


def table(result: dict[str, Any]) -> str:
    """The result as a person reads it: the JSON, then each goal met or missed."""
    lines = [json.dumps(result, indent=2)]
    lines += [f"{goal}: {'met' if met else 'MISSED'}" for goal, met in result["goals"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
