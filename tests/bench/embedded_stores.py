"""Should the embedded mode run the pool's Redis scripts (under fakeredis with Lua)
instead of their in-memory twins? The cost of one call's limits, measured three ways in
one run: the in-memory twin (inference.limits.memory, the embedded mode today), the
Redis scripts (inference.limits.redis) against a fakeredis server with Lua in this
process, and the same scripts against the real Redis.

Each round is a call's two limit steps: `acquire` (requests, tokens and concurrency of
the tenant, its user and its key, atomically) and `settle`. Reported per round:
wall-clock and CPU microseconds of each store, and their ratios to the twin.

    eval "$(bash tests/services.sh)"
    .venv/bin/python tests/bench/embedded_stores.py --quick
    .venv/bin/python tests/bench/embedded_stores.py --rounds 20000

fakeredis and lupa are development dependencies (pyproject's `dev` extra); the real
Redis is REDIS_URL (skipped, and said so, when it does not answer).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
if str(ROOT / "platform") not in sys.path:
    sys.path.insert(0, str(ROOT / "platform"))

from results import result_write  # noqa: E402

STORES = ("memory", "fakeredis_lua", "redis")


def setup_django() -> str | None:
    """The embedded settings (the limiter needs only its own settings); the real
    Redis' URL, taken from the environment before the settings forget it."""
    redis_url = os.environ.pop("REDIS_URL", None) or "redis://127.0.0.1:6379/15"
    os.environ.pop("DATABASE_URL", None)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.base")
    import django

    django.setup()
    return redis_url


def make_limiter(store: str, redis_url: str | None) -> Any:
    from inference.limits.memory import MemoryLimiter
    from inference.limits.redis import RedisLimiter

    options: dict[str, Any] = {"prefix": f"bench:{uuid.uuid4().hex[:8]}", "lease_ttl_s": 30.0}
    if store == "memory":
        return MemoryLimiter(**options)
    if store == "redis":
        import redis

        try:
            redis.Redis.from_url(redis_url or "").ping()
        except (redis.RedisError, ValueError):
            return None
        return RedisLimiter(redis_url or "", **options)
    import fakeredis

    limiter = RedisLimiter("redis://127.0.0.1:1/0", **options)  # never connected
    limiter.redis = fakeredis.FakeRedis(decode_responses=True)
    for name in ("acquire", "seed", "renew", "settle"):
        script = getattr(limiter, f"_{name}_script").script
        setattr(limiter, f"_{name}_script", limiter.redis.register_script(script))
    return limiter


def measure(limiter: Any, rounds: int) -> dict[str, float]:
    from inference.limits import CallIdentity
    from tenants.quotas import Limits

    limits = Limits(requests_per_minute=10**9, tokens_per_minute=10**12, concurrent_runs=1000)

    def one() -> None:
        # A caller per round: its windows stay as short as a real minute's (one caller's
        # thousands of calls would measure the length of its window instead).
        identity = CallIdentity(
            tenant_id=uuid.uuid4(), user_id=uuid.uuid4(), api_key_id=uuid.uuid4()
        )
        hold = limiter.acquire(identity=identity, limits=limits, estimated_tokens=500)
        limiter.settle(hold, used_tokens=480)

    for _ in range(min(200, rounds)):  # warm: scripts loaded, keys made
        one()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(rounds):
        one()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"wall_us": round(wall / rounds * 1e6, 1), "cpu_us": round(cpu / rounds * 1e6, 1)}


def table(result: dict[str, Any]) -> str:
    lines = [f"{'store':<15}{'wall us':>10}{'cpu us':>10}{'x twin':>9}"]
    for store in STORES:
        row = result["stores"].get(store)
        if row is None:
            lines.append(f"{store:<15}{'(not measured: no Redis answered)':>29}")
            continue
        lines.append(f"{store:<15}{row['wall_us']:>10}{row['cpu_us']:>10}{row['wall_ratio']:>9}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5000)
    parser.add_argument("--quick", action="store_true", help="1,000 rounds")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--out", type=Path, help="write the results JSON here")
    args = parser.parse_args(argv)
    rounds = 1000 if args.quick else args.rounds
    redis_url = setup_django()
    stores: dict[str, dict[str, float]] = {}
    for store in STORES:
        limiter = make_limiter(store, redis_url)
        if limiter is not None:
            stores[store] = measure(limiter, rounds)
    twin = stores["memory"]["wall_us"]
    for row in stores.values():
        row["wall_ratio"] = round(row["wall_us"] / twin, 2)
    result = {"rounds": rounds, "stores": stores}
    return result_write(
        "embedded_stores", result, out=args.out, quick=args.quick, as_json=args.json, table=table
    )


if __name__ == "__main__":
    sys.exit(main())
