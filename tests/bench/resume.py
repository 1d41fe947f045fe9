"""Parley resume: how long a newly attached websocket takes to receive a 10,000-token
run replayed from its event log.

    eval "$(bash tests/services.sh)"               # PostgreSQL and Redis
    python tests/bench/resume.py --quick --json    # 5 replays per case, ~1 minute
    python tests/bench/resume.py                   # 30 per case; writes
                                                   # bench-results/resume.json

One web process as production runs it (`uvicorn config.asgi:application`, production
settings, PostgreSQL and Redis; see `parley_server.py`). A finished run of the bench
tenant's owner is written directly: a Run row, and its event log in Redis through
`chat.eventlog` (`token` events, then `run.done`). Two logs of the same 10,000 tokens:

- worst case: one token per event (10,001 events), what the log holds when tokens arrive
  further apart than PARLEY_TOKEN_COALESCE_MS;
- coalesced: 4 tokens per event (2,501 events), what the runner writes at the default
  25 ms when the model streams ~160 tokens/s (a single vLLM stream of an 8B model).

Each replay opens a new socket (API key in `Authorization: Bearer`, permessage-deflate
offered as browsers do, or not), sends `{"type": "run.attach", "run_id": ..., "after": N}`
and times the wait from sending that frame to receiving the terminal event, from the
start (`after` 0) and from the middle of the log. Every replay is checked: sequence
numbers contiguous after the cursor, the token text equal to the log's, `run.done` last.

References, measured in the same run, interleaved with Parley's replays:

- `xrange`: reading the same events straight from Redis (XRANGE, 1,000 at a time as the
  relay reads, JSON-decoded) in this process: the floor for any relay;
- `bare relay`: a bare uvicorn ASGI app (no Django, no Channels, no auth) that reads the
  stream the same way and sends one frame per event, shaped as Parley's, to the same
  client: the floor for one frame per event through uvicorn and this client.

Goal (docs/benchmarks.md): a 10,000-token replay in <= 50 ms (judged on the worst
case's median, replayed from the start with deflate).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as dt
import itertools
import json
import os
import platform as stdlib_platform
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))

from parley_server import Server, bench_stack, helper, raise_nofile
from results import result_write

GOAL_S = 0.050
TOKENS = 10_000
TERMINAL = ("run.done", "run.error")
# How a terminal or error frame starts (json.dumps puts the event's `type` first).
TERMINAL_PREFIXES = (b'{"type": "run.done"', b'{"type": "run.error"', b'{"type": "error"')


class ReplayMismatch(Exception):
    pass


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _summary(seconds: Sequence[float]) -> dict[str, float]:
    return {
        "p50_ms": round(1000 * statistics.median(seconds), 2),
        "p99_ms": round(1000 * _quantile(seconds, 0.99), 2),
        "min_ms": round(1000 * min(seconds), 2),
        "max_ms": round(1000 * max(seconds), 2),
    }


async def xrange_read(client: Any, key: str, after: int) -> list[tuple[int, dict[str, Any]]]:
    """The reference: the events after `after`, straight from Redis, as the relay reads."""
    from chat.eventlog import READ_COUNT, RedisEventLog

    events: list[tuple[int, dict[str, Any]]] = []
    while True:
        entries = await client.xrange(key, min=f"(0-{after}", max="+", count=READ_COUNT)
        if not entries:
            return events
        for after, event in RedisEventLog._decode(entries):
            events.append((after, event))
            if event.get("type") in TERMINAL:
                return events


class ThinSocket:
    """A minimal websocket client for timing: while the clock runs it only splits the
    byte stream into frames (and inflates them when permessage-deflate was agreed); the
    JSON is parsed after. It stands for a client that keeps up (a browser's native
    WebSocket), so the time is the server's; the `websockets` client is timed as well."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.inflater: Any = None
        self.window_bits = 15
        self.reset_each_message = False

    @classmethod
    async def open(cls, url: str, headers: dict[str, str], compression: str) -> ThinSocket:
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 22)
        lines = [
            f"GET {parts.path} HTTP/1.1",
            f"Host: {host}:{port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}",
            "Sec-WebSocket-Version: 13",
            *(f"{name}: {value}" for name, value in headers.items()),
        ]
        if compression == "deflate":
            lines.append("Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin1")
        if not head.startswith("HTTP/1.1 101"):
            writer.close()
            raise ConnectionError(f"handshake refused: {head.splitlines()[0]}")
        socket = cls(reader, writer)
        for line in head.split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip().lower() == "sec-websocket-extensions" and "permessage-deflate" in value:
                params = dict(
                    (p.strip().partition("=")[0], p.strip().partition("=")[2])
                    for p in value.split(";")[1:]
                )
                socket.window_bits = int(params.get("server_max_window_bits") or 15)
                socket.reset_each_message = "server_no_context_takeover" in params
                socket.inflater = zlib.decompressobj(wbits=-socket.window_bits)
        return socket

    def send_text(self, text: str) -> None:
        payload = text.encode()
        mask = os.urandom(4)
        size = len(payload)
        if size < 126:
            header = bytes([0x81, 0x80 | size])
        else:
            header = bytes([0x81, 0x80 | 126]) + size.to_bytes(2, "big")
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.writer.write(header + mask + masked)

    async def messages_until_terminal(self) -> list[bytes]:
        buffer, pos, messages = bytearray(), 0, []
        while True:
            chunk = await self.reader.read(1 << 20)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            if pos:
                del buffer[:pos]
                pos = 0
            buffer += chunk
            while len(buffer) - pos >= 2:
                b0, b1 = buffer[pos], buffer[pos + 1]
                size, start = b1 & 0x7F, pos + 2
                if size == 126:
                    if len(buffer) < start + 2:
                        break
                    size, start = int.from_bytes(buffer[start : start + 2], "big"), start + 2
                elif size == 127:
                    if len(buffer) < start + 8:
                        break
                    size, start = int.from_bytes(buffer[start : start + 8], "big"), start + 8
                if len(buffer) < start + size:
                    break
                payload = bytes(buffer[start : start + size])
                pos = start + size
                opcode = b0 & 0x0F
                if opcode == 8:
                    raise ConnectionError(f"the server closed the socket: {payload[2:]!r}")
                if opcode not in (1, 2):
                    continue  # a keepalive ping: too rare within a replay to answer
                if not b0 & 0x80:
                    raise NotImplementedError("fragmented messages")
                if b0 & 0x40:
                    payload = self.inflater.decompress(payload + b"\x00\x00\xff\xff")
                    if self.reset_each_message:
                        self.inflater = zlib.decompressobj(wbits=-self.window_bits)
                messages.append(payload)
                if payload.startswith(TERMINAL_PREFIXES):
                    return messages

    async def close(self) -> None:
        self.writer.write(bytes([0x88, 0x82]) + b"\0\0\0\0" + (1000).to_bytes(2, "big"))
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


async def replay_thin(
    url: str, headers: dict[str, str], compression: str, request: dict[str, Any]
) -> dict[str, Any]:
    started = time.perf_counter()
    socket = await ThinSocket.open(url, headers, compression)
    try:
        connected = time.perf_counter()
        cpu0 = time.process_time()
        sent = time.perf_counter()
        socket.send_text(json.dumps(request))
        messages = await asyncio.wait_for(socket.messages_until_terminal(), 60)
        done = time.perf_counter()
        cpu = time.process_time() - cpu0
    finally:
        await socket.close()
    return {
        "seconds": done - sent,
        "connect_s": connected - started,
        "client_cpu_s": cpu,
        "frames": [json.loads(m) for m in messages],
    }


async def replay_websockets(
    url: str, headers: dict[str, str], compression: str, request: dict[str, Any]
) -> dict[str, Any]:
    """The same with the `websockets` library, as a Python integrator's client would."""
    from websockets.asyncio.client import connect

    started = time.perf_counter()
    async with connect(
        url,
        additional_headers=headers,
        compression="deflate" if compression == "deflate" else None,
        ping_interval=None,
        max_size=None,
        proxy=None,
    ) as ws:
        connected = time.perf_counter()
        cpu0 = time.process_time()
        sent = time.perf_counter()
        await ws.send(json.dumps(request))
        frames: list[dict[str, Any]] = []
        while True:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 60))
            frames.append(frame)
            if frame.get("type") in TERMINAL or frame.get("type") == "error":
                break
        done = time.perf_counter()
        cpu = time.process_time() - cpu0
    return {
        "seconds": done - sent,
        "connect_s": connected - started,
        "client_cpu_s": cpu,
        "frames": frames,
    }


CLIENTS = {"thin": replay_thin, "websockets": replay_websockets}


def check(frames: list[dict[str, Any]], expected: list[tuple[int, dict[str, Any]]]) -> None:
    """The replay is the log after the cursor: the same token text, in frames whose
    sequence numbers rise through the log's and end at its terminal event. (One frame
    per event is what Parley sends; the check also admits frames that carry several
    token events under the last one's number, a batching relay's variant.)"""
    if frames and frames[-1].get("type") == "error":
        raise ReplayMismatch(f"the server answered an error: {frames[-1]}")
    seqs = [f.get("seq") for f in frames]
    known = {seq for seq, _ in expected}
    if (
        not frames
        or seqs[-1] != expected[-1][0]
        or any(seq not in known for seq in seqs)
        or any(b <= a for a, b in itertools.pairwise(seqs))
    ):
        raise ReplayMismatch(
            f"sequence numbers differ: got {len(seqs)} frames {seqs[:3]}..{seqs[-3:]}, "
            f"expected {len(expected)} events ending at {expected[-1][0]}"
        )
    got = "".join(f.get("delta", "") for f in frames if f.get("type") == "token")
    want = "".join(e.get("delta", "") for _, e in expected if e.get("type") == "token")
    if got != want:
        raise ReplayMismatch(f"token text differs ({len(got)} vs {len(want)} characters)")
    if frames[-1].get("type") != expected[-1][1].get("type"):
        raise ReplayMismatch(f"last frame {frames[-1].get('type')}, expected run.done")


async def bench_case(
    *,
    parley_url: str,
    relay_url: str,
    headers: dict[str, str],
    redis_url: str,
    run: dict[str, Any],
    after: int,
    compressions: Sequence[str],
    clients: Sequence[str],
    reps: int,
) -> dict[str, Any]:
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(redis_url)
    # Replies as the parser built them, as Parley's event log reads them.
    client.response_callbacks["XRANGE"] = lambda response, **options: response
    attach = {"type": "run.attach", "run_id": run["run_id"], "after": after}
    ask = {"key": run["key"], "run_id": run["run_id"], "after": after}
    samples: dict[str, list[dict[str, Any]]] = {"xrange": []}
    try:
        expected = await xrange_read(client, run["key"], after)
        for rep in range(reps + 1):  # the first round warms up and is not counted
            started = time.perf_counter()
            events = await xrange_read(client, run["key"], after)
            xrange_s = time.perf_counter() - started
            if events != expected:
                raise ReplayMismatch("the log changed during the bench")
            if rep:
                samples["xrange"].append({"seconds": xrange_s})
            for kind in clients:
                for compression in compressions:
                    for target, url, request in (
                        ("parley", parley_url, attach),
                        # The fast catch-up the protocol offers: token events share frames.
                        ("parley_coalesce", parley_url, {**attach, "coalesce": True}),
                        ("bare_relay", relay_url, ask),
                    ):
                        result = await CLIENTS[kind](url, headers, compression, request)
                        frames = result.pop("frames")
                        check(frames, expected)
                        result["frames"] = len(frames)
                        if rep:
                            samples.setdefault(f"{target}/{kind}/{compression}", []).append(result)
    finally:
        await client.aclose()
    out: dict[str, Any] = {"after": after, "events": len(expected)}
    for name, rows in samples.items():
        summary: dict[str, Any] = _summary([r["seconds"] for r in rows])
        summary["per_event_us"] = round(
            1e6 * statistics.median(r["seconds"] for r in rows) / len(expected), 2
        )
        if name != "xrange":
            summary["frames"] = rows[0]["frames"]
            summary["client_cpu_p50_ms"] = round(
                1000 * statistics.median(r["client_cpu_s"] for r in rows), 2
            )
            summary["connect_p50_ms"] = round(
                1000 * statistics.median(r["connect_s"] for r in rows), 2
            )
        out[name] = summary
    for kind in clients:
        for compression in compressions:
            parley = out[f"parley/{kind}/{compression}"]["p50_ms"]
            coalesce = out[f"parley_coalesce/{kind}/{compression}"]["p50_ms"]
            out[f"ratios/{kind}/{compression}"] = {
                "parley_coalesce_over_xrange": round(coalesce / out["xrange"]["p50_ms"], 2),
                "parley_over_xrange": round(parley / out["xrange"]["p50_ms"], 2),
                "parley_over_bare_relay": round(
                    parley / out[f"bare_relay/{kind}/{compression}"]["p50_ms"], 2
                ),
            }
    return out


def run_bench(
    *,
    quick: bool,
    reps: int,
    coalesced: int,
    compressions: Sequence[str],
    clients: Sequence[str],
    app: str,
    progress: bool,
) -> dict[str, Any]:
    raise_nofile()
    started = time.perf_counter()
    cases: dict[str, Any] = {}
    with (
        tempfile.TemporaryDirectory(prefix="parley-bench-") as tmp,
        bench_stack(log_dir=Path(tmp)) as stack,
    ):
        runs = {
            "worst_case": helper(stack, "write-run", "--tokens", str(TOKENS)),
            "coalesced": helper(
                stack, "write-run", "--tokens", str(TOKENS), "--tokens-per-event", str(coalesced)
            ),
        }
        headers = {"Authorization": f"Bearer {stack.api_key}"}
        with (
            Server(app=app, env=stack.env, log_path=Path(tmp) / "parley.log") as parley,
            Server(app="relay", env=stack.env, log_path=Path(tmp) / "relay.log") as relay,
        ):
            for name, run in runs.items():
                for cursor, after in (("from_start", 0), ("from_middle", run["events"] // 2)):
                    try:
                        case = asyncio.run(
                            bench_case(
                                parley_url=parley.url,
                                relay_url=relay.url,
                                headers=headers,
                                redis_url=stack.redis_url,
                                run=run,
                                after=after,
                                compressions=compressions,
                                clients=clients,
                                reps=reps,
                            )
                        )
                    except Exception as exc:
                        raise RuntimeError(f"{name} {cursor}: {exc}\n{parley.log_tail()}") from exc
                    case["tokens_per_event"] = 1 if name == "worst_case" else coalesced
                    cases[f"{name}/{cursor}"] = case
                    if progress:
                        print(f"  {name}/{cursor}: {_case_text(case)}", file=sys.stderr, flush=True)
    judged = (
        f"parley_coalesce/{'thin' if 'thin' in clients else clients[0]}/"
        f"{'deflate' if 'deflate' in compressions else compressions[0]}"
    )
    worst = cases["worst_case/from_start"][judged]
    coalesced_case = cases["coalesced/from_start"][judged]
    goals = {
        "replay_10k_tokens_worst_case": {
            "value_ms": worst["p50_ms"],
            "p99_ms": worst["p99_ms"],
            "goal_ms": GOAL_S * 1000,
            "met": worst["p50_ms"] <= GOAL_S * 1000,
            "note": f"{judged}, one event per token, from the start; median",
        },
        "replay_10k_tokens_coalesced": {
            "value_ms": coalesced_case["p50_ms"],
            "p99_ms": coalesced_case["p99_ms"],
            "goal_ms": GOAL_S * 1000,
            "met": coalesced_case["p50_ms"] <= GOAL_S * 1000,
            "note": f"{judged}, {coalesced} tokens per event, from the start; median",
        },
    }
    return {
        "benchmark": "resume",
        "quick": quick,
        "date": dt.date.today().isoformat(),
        "machine": {"cpus": os.cpu_count(), "python": stdlib_platform.python_version()},
        "settings": {
            "tokens": TOKENS,
            "coalesced_tokens_per_event": coalesced,
            "reps": reps,
            "compressions": list(compressions),
            "clients": list(clients),
            "app": app,
            "runs": {k: {"events": v["events"], "chars": v["chars"]} for k, v in runs.items()},
        },
        "cases": cases,
        "goals": goals,
        "wall_s": round(time.perf_counter() - started, 1),
    }


def _case_text(case: dict[str, Any]) -> str:
    parts = [f"{case['events']} events"]
    for name, value in case.items():
        if isinstance(value, dict) and "p50_ms" in value:
            parts.append(f"{name} {value['p50_ms']} ms")
    return ", ".join(parts)


def table(result: dict[str, Any]) -> str:
    lines = [
        f"{'case':<24}{'events':>7}  {'measure':<30}{'frames':>7}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'us/event':>9}{'client cpu':>11}"
    ]
    for name, case in result["cases"].items():
        for measure, value in case.items():
            if not isinstance(value, dict) or "p50_ms" not in value:
                continue
            lines.append(
                f"{name:<24}{case['events']:>7}  {measure:<30}{value.get('frames', '-'):>7}"
                f"{value['p50_ms']:>9.2f}{value['p99_ms']:>9.2f}"
                f"{value['per_event_us']:>9.2f}{value.get('client_cpu_p50_ms', 0):>11.2f}"
            )
        for measure, value in case.items():
            if measure.startswith("ratios/"):
                lines.append(
                    f"{'':<24}{'':>7}  {measure}: Parley / xrange {value['parley_over_xrange']}, "
                    f"Parley / bare relay {value['parley_over_bare_relay']}"
                )
    for goal, g in result["goals"].items():
        lines.append(
            f"goal {goal}: {g['value_ms']} ms p50, {g['p99_ms']} ms p99 "
            f"(goal <= {g['goal_ms']:g} ms) {'met' if g['met'] else 'MISSED'}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 replays per case")
    parser.add_argument("--json", action="store_true", help="print the JSON result on stdout")
    parser.add_argument(
        "--out", help="write the JSON here (default for a full run: bench-results/resume.json)"
    )
    parser.add_argument("--reps", type=int, help="replays per case (default 5 quick, 30 full)")
    parser.add_argument(
        "--coalesced", type=int, default=4, help="tokens per event of the coalesced run"
    )
    parser.add_argument(
        "--compression",
        choices=["both", "deflate", "none"],
        default="both",
        help="permessage-deflate offered by the client (browsers always offer it)",
    )
    parser.add_argument(
        "--clients",
        nargs="+",
        choices=sorted(CLIENTS),
        default=["thin", "websockets"],
        help="timing clients: thin (splits frames only; the server's time) and websockets "
        "(the library, as a Python integrator's client)",
    )
    parser.add_argument(
        "--app",
        default="config.asgi:application",
        help="the ASGI app served as Parley (module:attribute), to try a variant",
    )
    parser.add_argument("--progress", action="store_true", help="a line per case on stderr")
    args = parser.parse_args(argv)
    reps = args.reps or (5 if args.quick else 30)
    if reps < 1 or args.coalesced < 2:
        parser.error("--reps must be at least 1 and --coalesced at least 2")
    compressions = ["deflate", "none"] if args.compression == "both" else [args.compression]
    result = run_bench(
        quick=args.quick,
        reps=reps,
        coalesced=args.coalesced,
        compressions=compressions,
        clients=args.clients,
        app=args.app,
        progress=args.progress,
    )
    return result_write(
        "resume", result, out=args.out, quick=args.quick, as_json=args.json, table=table
    )


if __name__ == "__main__":
    sys.exit(main())
