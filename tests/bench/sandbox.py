"""What the sandbox costs: start-to-exit time of code inside it against the same
interpreter outside it, and sandboxed calls per second with both cores busy.

Cases, each run through `sandbox.jail.sandbox_run` (the product path: prlimit and an
unprivileged user, bubblewrap with every namespace, the seccomp filter, the workspace
packed in and out) and, as the reference, as a plain subprocess of the same
interpreter (the sandbox's Python environment), interleaved call by call so that load
drifting during the run moves both alike:

- `print`: `python -c 'print(1)'`;
- `numpy`: a 20-line numpy script (arrays, a matrix product, statistics).

Then the throughput: `print` calls in the sandbox from as many threads as cores, for
a fixed time, with every core busy (the calls themselves plus a busy loop per core).
Goals (issue 14): added p50 at most 20 ms; at least 20 sandboxed `print` calls per
second.

    .venv/bin/python tests/bench/sandbox.py --json
    .venv/bin/python tests/bench/sandbox.py --quick     # a few calls, a short throughput
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
if str(ROOT / "platform") not in sys.path:
    sys.path.insert(0, str(ROOT / "platform"))

from results import result_write  # noqa: E402

NUMPY_SCRIPT = """
import numpy as np

rng = np.random.default_rng(7)
a = rng.standard_normal((200, 200))
b = rng.standard_normal((200, 200))
c = a @ b
values = rng.integers(0, 100, size=10_000)
counts = np.bincount(values)
mean = float(values.mean())
spread = float(values.std())
top = int(np.argmax(counts))
norms = np.linalg.norm(c, axis=1)
ranked = np.argsort(norms)[::-1][:5]
frame = np.column_stack([values[:100], values[100:200]])
totals = frame.sum(axis=0)
print(round(mean, 2), round(spread, 2), top)
print([int(i) for i in ranked])
print(totals.tolist())
assert c.shape == (200, 200)
"""

CASES = {
    "print": ["-c", "print(1)"],
    "numpy": ["-c", NUMPY_SCRIPT],
}


def django_setup() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.test")
    import django

    django.setup()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def latency(calls: int) -> dict[str, Any]:
    from django.conf import settings

    from sandbox.jail import PYTHON, sandbox_run

    host_python = str(Path(settings.PARLEY_SANDBOX_PYTHON) / "bin" / "python")
    env = {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    results: dict[str, Any] = {}
    for name, args in CASES.items():
        inside: list[float] = []
        outside: list[float] = []
        for index in range(calls + 2):  # the first two of each warm the caches
            started = time.perf_counter()
            result = sandbox_run(argv=[PYTHON, *args])
            took_in = time.perf_counter() - started
            assert result.exit_code == 0, result.stderr
            started = time.perf_counter()
            subprocess.run([host_python, *args], env=env, check=True, capture_output=True)
            took_out = time.perf_counter() - started
            if index >= 2:
                inside.append(took_in * 1000)
                outside.append(took_out * 1000)
        added = [a - b for a, b in zip(inside, outside, strict=True)]
        results[name] = {
            "calls": calls,
            "inside_ms": {"p50": statistics.median(inside), "p90": percentile(inside, 0.9)},
            "outside_ms": {"p50": statistics.median(outside), "p90": percentile(outside, 0.9)},
            "added_ms": {"p50": statistics.median(added), "p90": percentile(added, 0.9)},
            "ratio_p50": statistics.median(inside) / statistics.median(outside),
        }
    return results


def _spin(stop: Any) -> None:
    while not stop.is_set():
        pass


def throughput(seconds: float) -> dict[str, Any]:
    from sandbox.jail import PYTHON, sandbox_run

    cores = os.cpu_count() or 1
    stop = multiprocessing.Event()
    spinners = [multiprocessing.Process(target=_spin, args=(stop,)) for _ in range(cores)]
    for spinner in spinners:
        spinner.start()
    done = []
    failures = []
    lock = threading.Lock()
    until = time.monotonic() + seconds

    def worker() -> None:
        while time.monotonic() < until:
            result = sandbox_run(argv=[PYTHON, "-c", "print(1)"])
            with lock:
                (done if result.exit_code == 0 and result.stdout == "1\n" else failures).append(1)

    started = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(cores)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    stop.set()
    for spinner in spinners:
        spinner.join()
    return {
        "cores": cores,
        "threads": cores,
        "busy_loops": cores,
        "seconds": round(elapsed, 2),
        "calls": len(done),
        "failures": len(failures),
        "calls_per_s": len(done) / elapsed,
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        f"load average at start {result['load_start']}, at end {result['load_end']}",
        "case    inside p50/p90 ms   outside p50/p90 ms   added p50/p90 ms   ratio",
    ]
    for name, row in result["latency"].items():
        lines.append(
            f"{name:7} {row['inside_ms']['p50']:7.1f} /{row['inside_ms']['p90']:6.1f}    "
            f"{row['outside_ms']['p50']:7.1f} /{row['outside_ms']['p90']:6.1f}     "
            f"{row['added_ms']['p50']:6.1f} /{row['added_ms']['p90']:6.1f}   "
            f"{row['ratio_p50']:.2f}"
        )
    t = result["throughput"]
    lines.append(
        f"throughput: {t['calls_per_s']:.1f} sandboxed print(1) calls/s "
        f"({t['calls']} in {t['seconds']} s, {t['threads']} threads, {t['busy_loops']} busy "
        f"loops, {t['failures']} failures)"
    )
    goals = result["goals"]
    lines.append(
        f"goals: added p50 <= 20 ms: {goals['added_p50_met']}; >= 20 calls/s: "
        f"{goals['throughput_met']}"
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out")
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=15.0)
    args = parser.parse_args()
    django_setup()
    from sandbox.jail import sandbox_problem

    problem = sandbox_problem()
    if problem:
        print(f"the sandbox does not work here: {problem}", file=sys.stderr)
        return 1
    calls = 5 if args.quick else args.calls
    seconds = 2.0 if args.quick else args.seconds
    load_start = os.getloadavg()[0]
    result: dict[str, Any] = {"latency": latency(calls), "throughput": throughput(seconds)}
    result["load_start"] = round(load_start, 2)
    result["load_end"] = round(os.getloadavg()[0], 2)
    result["goals"] = {
        "added_p50_met": result["latency"]["print"]["added_ms"]["p50"] <= 20,
        "throughput_met": result["throughput"]["calls_per_s"] >= 20,
    }
    return result_write(
        "sandbox", result, out=args.out, quick=args.quick, as_json=args.json, table=table
    )


if __name__ == "__main__":
    sys.exit(main())
