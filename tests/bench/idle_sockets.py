"""Parley idle sockets: how many idle websockets one web process holds, and the memory
each one costs it.

    eval "$(bash tests/services.sh)"                     # PostgreSQL and Redis
    python tests/bench/idle_sockets.py --quick --json    # 1,000 sockets, ~1 minute
    python tests/bench/idle_sockets.py                   # 5,000, then 10,000 and 15,000;
                                                         # writes bench-results/idle_sockets.json

One web process as production runs it (`uvicorn config.asgi:application`, one worker,
production settings, PostgreSQL and Redis; see `parley_server.py`) and client processes
(the `websockets` library, asyncio) that open sockets to `/ws/v1/`, authenticated with a
tenant API key (`Authorization: Bearer`), and then leave them idle. RLIMIT_NOFILE's soft
limit is raised to the hard limit in the server and the clients.

The server process's memory is read from /proc (VmRSS, and Pss from smaps_rollup) after a
warm-up (a few sockets opened, pinged and closed, so lazy imports, the database
connection and the Redis pools are already there) and again after each level of open
sockets has settled; bytes per connection = the growth over the sockets held. Sockets
are opened cumulatively in levels (5,000, 10,000, 15,000 by default, capped by the file
limit); the step between two levels gives the marginal cost. After each level a random
sample of the sockets sends `{"type": "ping"}` and must get its `pong`.

Reference, measured in the same run on the same machine: a bare uvicorn websocket echo
app (no Django, no Channels) held at the same levels, so the ratio shows what Parley
adds per connection over uvicorn's own socket.

Both with and without permessage-deflate: browsers always offer it and uvicorn accepts
it by default, and each compressed connection keeps zlib state for its whole life. The
goal is judged on the browser-like case (deflate).

Goal (docs/benchmarks.md): >= 5,000 idle sockets per web process at <= 50 KB
(50,000 bytes) each.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import multiprocessing as mp
import os
import platform as stdlib_platform
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from parley_server import (
    Server,
    Stack,
    bench_stack,
    nofile_hard,
    raise_nofile,
)
from results import result_write

GOAL_SOCKETS = 5_000
GOAL_BYTES = 50_000
FD_RESERVE = 300  # the server's own files: the interpreter, sockets to Redis and PostgreSQL


# --------------------------------------------------------------------- client processes


def _error_name(exc: BaseException) -> str:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status is not None:
        return f"{type(exc).__name__} {status}"
    errno = getattr(exc, "errno", None)
    return f"{type(exc).__name__}" + (f" errno {errno}" if errno else "")


def _quantile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _client(conn: Connection, url: str, headers: dict[str, str], compression: str) -> None:
    from websockets.asyncio.client import connect
    from websockets.protocol import State

    loop = asyncio.get_running_loop()
    sockets: list[Any] = []
    rng = random.Random(os.getpid())

    async def open_one(
        semaphore: asyncio.Semaphore, latencies: list[float], errors: Counter
    ) -> None:
        async with semaphore:
            started = time.perf_counter()
            try:
                ws = await connect(
                    url,
                    additional_headers=headers,
                    compression="deflate" if compression == "deflate" else None,
                    ping_interval=None,  # idle: only the server's keepalive pings
                    open_timeout=60,
                    proxy=None,
                )
            except Exception as exc:
                errors[_error_name(exc)] += 1
                return
            latencies.append(time.perf_counter() - started)
            sockets.append(ws)

    async def open_many(count: int, concurrency: int) -> dict[str, Any]:
        semaphore = asyncio.Semaphore(concurrency)
        latencies: list[float] = []
        errors: Counter = Counter()
        started = time.perf_counter()
        await asyncio.gather(*(open_one(semaphore, latencies, errors) for _ in range(count)))
        return {
            "opened": len(latencies),
            "failed": sum(errors.values()),
            "errors": dict(errors),
            "seconds": time.perf_counter() - started,
            "connect_p50_s": _quantile(latencies, 0.5),
            "connect_p99_s": _quantile(latencies, 0.99),
        }

    async def ping_one(ws: Any, tag: str, expect: str) -> float | str:
        started = time.perf_counter()
        try:
            await ws.send(json.dumps({"type": "ping", "client_id": tag}))
            reply = json.loads(await asyncio.wait_for(ws.recv(), 15))
        except Exception as exc:
            return _error_name(exc)
        if reply.get("type") != expect or reply.get("client_id") != tag:
            return f"unexpected reply {str(reply)[:80]}"
        return time.perf_counter() - started

    async def ping_sample(sample: int, expect: str) -> dict[str, Any]:
        chosen = rng.sample(sockets, min(sample, len(sockets)))
        results = await asyncio.gather(
            *(ping_one(ws, f"bench-{i}", expect) for i, ws in enumerate(chosen))
        )
        latencies = [r for r in results if isinstance(r, float)]
        return {
            "sampled": len(chosen),
            "answered": len(latencies),
            "failures": dict(Counter(r for r in results if isinstance(r, str))),
            "latencies": latencies,
        }

    def status() -> dict[str, int]:
        return {"open": sum(1 for ws in sockets if ws.state is State.OPEN)}

    async def close_all() -> dict[str, int]:
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
        sockets.clear()
        return {"open": 0}

    while True:
        command, arg = await loop.run_in_executor(None, conn.recv)
        if command == "open":
            result: dict[str, Any] = await open_many(arg["count"], arg["concurrency"])
        elif command == "ping":
            result = await ping_sample(arg["sample"], arg["expect"])
        elif command == "status":
            result = status()
        elif command == "close":
            result = await close_all()
        else:
            conn.send({})
            return
        conn.send(result)


def client_main(conn: Connection, url: str, headers: dict[str, str], compression: str) -> None:
    raise_nofile()
    try:
        import uvloop

        uvloop.run(_client(conn, url, headers, compression))
    except ImportError:
        asyncio.run(_client(conn, url, headers, compression))


class Clients:
    """K client processes, each holding its share of the sockets."""

    def __init__(self, count: int, url: str, headers: dict[str, str], compression: str) -> None:
        context = mp.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs = []
        for _ in range(count):
            parent, child = context.Pipe()
            proc = context.Process(
                target=client_main, args=(child, url, headers, compression), daemon=True
            )
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)

    def call(self, command: str, args: Sequence[dict[str, Any]] | dict[str, Any]) -> list[Any]:
        per_client = args if isinstance(args, list) else [args] * len(self.conns)
        for conn, arg in zip(self.conns, per_client, strict=True):
            conn.send((command, arg))
        return [conn.recv() for conn in self.conns]

    def stop(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(("exit", {}))
        for proc in self.procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


# --------------------------------------------------------------------------- one server


def measure(
    *,
    target: str,
    compression: str,
    levels: Sequence[int],
    stack: Stack,
    clients: int,
    concurrency: int,
    ping_sample: int,
    settle_s: float,
    log_dir: Path,
    progress: bool,
    ws: str = "auto",
) -> dict[str, Any]:
    """Hold `levels` sockets (cumulative) on one fresh server; memory at each level."""
    app = "config.asgi:application" if target == "parley" else "echo"
    expect = "pong" if target == "parley" else "ping"
    headers = {"Authorization": f"Bearer {stack.api_key}"}
    name = f"{target}-{compression}"
    with Server(app=app, env=stack.env, log_path=log_dir / f"{name}.log", ws=ws) as server:
        pool = Clients(clients, server.url, headers, compression)
        try:
            warm = pool.call("open", {"count": 5, "concurrency": 5})
            if sum(r["opened"] for r in warm) == 0:
                raise RuntimeError(
                    f"{name}: no socket opened: {[r['errors'] for r in warm]}\n{server.log_tail()}"
                )
            pool.call("ping", {"sample": 5, "expect": expect})
            pool.call("close", {})
            time.sleep(settle_s)
            base = server.memory()
            base_fds = server.open_fds()
            rows = []
            held = 0
            for level in levels:
                want = level - held
                cpu0, started = server.cpu_s(), time.perf_counter()
                opened = pool.call(
                    "open",
                    [{"count": n, "concurrency": concurrency} for n in _split(want, clients)],
                )
                seconds = time.perf_counter() - started
                cpu = server.cpu_s() - cpu0
                time.sleep(settle_s)
                memory = server.memory()
                pings = pool.call(
                    "ping",
                    [{"sample": n, "expect": expect} for n in _split(ping_sample, clients)],
                )
                open_now = sum(r["open"] for r in pool.call("status", {}))
                new = sum(r["opened"] for r in opened)
                errors: Counter = Counter()
                for r in opened:
                    errors.update(r["errors"])
                for r in pings:
                    errors.update({f"ping: {k}": v for k, v in r["failures"].items()})
                latencies = [x for r in pings for x in r["latencies"]]
                previous = rows[-1] if rows else None
                row = {
                    "level": level,
                    "held": open_now,
                    "opened": new,
                    "failed": sum(r["failed"] for r in opened),
                    "errors": dict(errors),
                    "connect_s": round(seconds, 3),
                    "connect_rate_per_s": round(new / seconds, 1) if seconds else None,
                    "connect_p99_ms": _ms(max((r["connect_p99_s"] or 0) for r in opened)),
                    "server_cpu_ms_per_connect": round(1000 * cpu / new, 3) if new else None,
                    "rss": memory["rss"],
                    "pss": memory["pss"],
                    "server_fds": server.open_fds() - base_fds,
                    "bytes_per_connection_rss": _per(memory["rss"] - base["rss"], open_now),
                    "bytes_per_connection_pss": _per(memory["pss"] - base["pss"], open_now),
                    "marginal_bytes_per_connection_rss": (
                        _per(memory["rss"] - previous["rss"], open_now - previous["held"])
                        if previous
                        else None
                    ),
                    "ping_sampled": sum(r["sampled"] for r in pings),
                    "ping_answered": sum(r["answered"] for r in pings),
                    "ping_p50_ms": _ms(_quantile(latencies, 0.5)),
                    "ping_p99_ms": _ms(_quantile(latencies, 0.99)),
                }
                rows.append(row)
                held = open_now
                if progress:
                    print(f"  {name} {level}: {_row_text(row)}", file=sys.stderr, flush=True)
                if row["failed"] > 0.05 * want or open_now < 0.95 * level:
                    break  # the limit: later levels would only repeat the failure
            pool.call("close", {})
            time.sleep(settle_s)
            after_close = server.memory()
        finally:
            pool.stop()
        return {
            "target": target,
            "compression": compression,
            "baseline": base,
            "levels": rows,
            "after_close": after_close,
        }


def _per(delta: int, count: int) -> int | None:
    return round(delta / count) if count > 0 else None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def _row_text(row: dict[str, Any]) -> str:
    return (
        f"held {row['held']}, {row['bytes_per_connection_rss']} B/conn (RSS), "
        f"{row['connect_rate_per_s']}/s, ping {row['ping_answered']}/{row['ping_sampled']}"
        + (f", errors {row['errors']}" if row["errors"] else "")
    )


# --------------------------------------------------------------------------- the bench


def run(
    *,
    quick: bool,
    levels: Sequence[int],
    clients: int,
    concurrency: int,
    ping_sample: int,
    settle_s: float,
    compressions: Sequence[str],
    progress: bool,
    ws: str,
) -> dict[str, Any]:
    soft = raise_nofile()
    started = time.perf_counter()
    runs: dict[str, Any] = {}
    with (
        tempfile.TemporaryDirectory(prefix="parley-bench-") as tmp,
        bench_stack(log_dir=Path(tmp)) as stack,
    ):
        for compression in compressions:
            for target in ("parley", "echo"):
                runs[f"{target}/{compression}"] = measure(
                    target=target,
                    compression=compression,
                    levels=levels,
                    stack=stack,
                    clients=clients,
                    concurrency=concurrency,
                    ping_sample=ping_sample,
                    settle_s=settle_s,
                    log_dir=Path(tmp),
                    progress=progress,
                    ws=ws,
                )
    ratios = {}
    for compression in compressions:
        parley = runs[f"parley/{compression}"]["levels"]
        echo = runs[f"echo/{compression}"]["levels"]
        ratios[compression] = [
            {
                "level": p["level"],
                "parley_over_echo_rss": (
                    round(p["bytes_per_connection_rss"] / e["bytes_per_connection_rss"], 2)
                    if p["bytes_per_connection_rss"] and e["bytes_per_connection_rss"]
                    else None
                ),
                "parley_minus_echo_bytes": (
                    p["bytes_per_connection_rss"] - e["bytes_per_connection_rss"]
                    if p["bytes_per_connection_rss"] is not None
                    and e["bytes_per_connection_rss"] is not None
                    else None
                ),
            }
            for p, e in zip(parley, echo, strict=False)
        ]
    judged = "deflate" if "deflate" in compressions else compressions[0]
    parley_rows = runs[f"parley/{judged}"]["levels"]
    answering = [r for r in parley_rows if r["ping_answered"] == r["ping_sampled"]]
    most = max(answering, key=lambda r: r["held"]) if answering else None
    at_goal = next((r for r in parley_rows if r["held"] >= GOAL_SOCKETS), None)
    judged_row = at_goal or most
    enough = max(levels) >= GOAL_SOCKETS
    goals = {
        "sockets_held": {
            "value": most["held"] if most else 0,
            "goal": f">= {GOAL_SOCKETS}",
            "met": bool(most and most["held"] >= GOAL_SOCKETS) if enough else None,
            "note": f"{judged}; the largest level held with every sampled socket answering"
            + ("" if enough else f"; not judged: fewer than {GOAL_SOCKETS} sockets asked"),
        },
        "bytes_per_connection": {
            "value": judged_row["bytes_per_connection_rss"] if judged_row else None,
            "goal": f"<= {GOAL_BYTES}",
            "met": bool(
                judged_row
                and judged_row["bytes_per_connection_rss"] is not None
                and judged_row["bytes_per_connection_rss"] <= GOAL_BYTES
            ),
            "note": f"{judged}; RSS growth over the sockets held, at "
            + (
                f"the first level >= {GOAL_SOCKETS} sockets"
                if at_goal
                else f"{judged_row['held'] if judged_row else 0} sockets (fewer than the goal)"
            ),
        },
    }
    return {
        "benchmark": "idle_sockets",
        "quick": quick,
        "date": dt.date.today().isoformat(),
        "machine": {
            "cpus": os.cpu_count(),
            "python": stdlib_platform.python_version(),
            "nofile_limit": soft,
        },
        "settings": {
            "levels": list(levels),
            "client_processes": clients,
            "connect_concurrency": concurrency,
            "ping_sample": ping_sample,
            "settle_s": settle_s,
            "server": "uvicorn config.asgi:application, 1 worker, production settings, "
            "--ws-max-size 1048576",
            "ws": ws,
        },
        "runs": runs,
        "ratios": ratios,
        "goals": goals,
        "wall_s": round(time.perf_counter() - started, 1),
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        f"{'run':<16}{'level':>7}{'held':>7}{'B/conn':>9}{'marg.':>9}{'PSS B/c':>9}"
        f"{'conn/s':>8}{'cpu ms':>8}{'ping ok':>10}{'p99 ms':>8}"
    ]
    for name, run_ in result["runs"].items():
        for r in run_["levels"]:
            lines.append(
                f"{name:<16}{r['level']:>7}{r['held']:>7}{_num(r['bytes_per_connection_rss']):>9}"
                f"{_num(r['marginal_bytes_per_connection_rss']):>9}"
                f"{_num(r['bytes_per_connection_pss']):>9}{_num(r['connect_rate_per_s']):>8}"
                f"{_num(r['server_cpu_ms_per_connect']):>8}"
                f"{r['ping_answered']:>5}/{r['ping_sampled']:<4}{_num(r['ping_p99_ms']):>8}"
            )
            if r["errors"]:
                lines.append(f"{'':<16}errors: {r['errors']}")
    for compression, rows in result["ratios"].items():
        for r in rows:
            lines.append(
                f"ratio {compression} @ {r['level']}: Parley / echo = {r['parley_over_echo_rss']} "
                f"(+{r['parley_minus_echo_bytes']} B per connection)"
            )
    for goal, g in result["goals"].items():
        verdict = "not judged" if g["met"] is None else "met" if g["met"] else "MISSED"
        lines.append(f"goal {goal}: {g['value']} (goal {g['goal']}) {verdict}; {g['note']}")
    return "\n".join(lines)


def _num(value: Any) -> str:
    return "-" if value is None else f"{value:,}" if isinstance(value, int) else f"{value:,.1f}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,000 sockets")
    parser.add_argument("--json", action="store_true", help="print the JSON result on stdout")
    parser.add_argument(
        "--out",
        help="write the JSON here (default for a full run: bench-results/idle_sockets.json)",
    )
    parser.add_argument(
        "--sockets",
        type=int,
        nargs="+",
        help="cumulative levels of open sockets (default 1000 with --quick, else 5000 10000 "
        "15000), capped by the file limit",
    )
    parser.add_argument("--clients", type=int, default=1, help="client processes")
    parser.add_argument("--concurrency", type=int, default=64, help="connects in flight per client")
    parser.add_argument("--ping-sample", type=int, default=200, help="sockets pinged per level")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds before measuring")
    parser.add_argument(
        "--compression",
        choices=["both", "deflate", "none"],
        default="both",
        help="permessage-deflate offered by the clients (browsers always offer it)",
    )
    parser.add_argument(
        "--ws",
        default="auto",
        help="the servers' websocket implementation: uvicorn's --ws (default auto: "
        "websockets-sansio), or module:Class of a protocol to try",
    )
    parser.add_argument("--progress", action="store_true", help="a line per level on stderr")
    args = parser.parse_args(argv)
    levels = args.sockets or ([1000] if args.quick else [5000, 10000, 15000])
    if any(n < 1 for n in levels) or list(levels) != sorted(set(levels)):
        parser.error("--sockets must be increasing positive numbers")
    if args.clients < 1 or args.concurrency < 1 or args.ping_sample < 1:
        parser.error("--clients, --concurrency and --ping-sample must be at least 1")
    cap = nofile_hard() - FD_RESERVE
    capped = [n for n in levels if n <= cap]
    if len(capped) < len(levels):
        capped.append(cap)
        print(
            f"levels capped at {cap} sockets by the open-files limit ({nofile_hard()})",
            file=sys.stderr,
        )
    if args.clients > 1 and max(capped) // args.clients > cap:
        parser.error("too many sockets per client process for the open-files limit")
    compressions = ["deflate", "none"] if args.compression == "both" else [args.compression]
    result = run(
        quick=args.quick,
        levels=capped,
        clients=args.clients,
        concurrency=args.concurrency,
        ping_sample=args.ping_sample,
        settle_s=args.settle,
        compressions=compressions,
        progress=args.progress,
        ws=args.ws,
    )
    return result_write(
        "idle_sockets", result, out=args.out, quick=args.quick, as_json=args.json, table=table
    )


if __name__ == "__main__":
    sys.exit(main())
