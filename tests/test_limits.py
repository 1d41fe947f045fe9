"""Limits on LLM calls (inference.limits): per-minute windows, concurrency leases and the
monthly budget, in both stores (Redis, the real one of the test settings, and the
in-memory one of the embedded mode), and across processes against the same Redis."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from inference import limits as limits_module
from inference.limits import (
    BUDGET,
    CallIdentity,
    LimitExceeded,
    MemoryLimiter,
    RedisLimiter,
    month_of,
)
from inference.types import InferenceError
from tenants.quotas import Limits

ROOT = Path(__file__).resolve().parents[1]


def no_usage(tenant_id, month):
    return 0


@pytest.fixture
def redis_url(settings):
    if not settings.REDIS_URL:
        pytest.skip("no REDIS_URL: the embedded mode has no Redis")
    return settings.REDIS_URL


@pytest.fixture(params=["memory", "redis"])
def make_limiter(request, settings, prefix):
    if request.param == "redis" and not settings.REDIS_URL:
        pytest.skip("no REDIS_URL: the embedded mode has no Redis")

    def make(**kwargs):
        options = {"prefix": prefix, "lease_ttl_s": 5.0, "seed": no_usage, **kwargs}
        if request.param == "memory":
            return MemoryLimiter(**options)
        return RedisLimiter(settings.REDIS_URL, **options)

    return make


def tenant() -> CallIdentity:
    return CallIdentity(tenant_id=uuid.uuid4())


def refused(limiter, identity, limits, estimated_tokens=10) -> LimitExceeded:
    with pytest.raises(LimitExceeded) as info:
        limiter.acquire(identity=identity, limits=limits, estimated_tokens=estimated_tokens)
    return info.value


def admit(limiter, identity, limits, estimated_tokens=10):
    return limiter.acquire(identity=identity, limits=limits, estimated_tokens=estimated_tokens)


# --- per-minute windows ------------------------------------------------------------------


def test_requests_per_minute(make_limiter):
    limiter, who, limits = make_limiter(), tenant(), Limits(requests_per_minute=3)
    for _ in range(3):
        limiter.settle(admit(limiter, who, limits), used_tokens=5)  # finished calls still count
    error = refused(limiter, who, limits)
    assert error.limit == "tenant.requests_per_minute"
    assert error.code == "rate_limited" and isinstance(error, InferenceError)
    assert 55 < error.retry_after_s <= 60
    assert "3 requests per minute" in error.message and "retry in 60 s" in error.message


def test_window_slides_and_retry_after_is_accurate(make_limiter):
    limiter, who, limits = make_limiter(window_s=0.5), tenant(), Limits(requests_per_minute=2)
    admit(limiter, who, limits)
    time.sleep(0.2)
    admit(limiter, who, limits)
    error = refused(limiter, who, limits)
    # The first call leaves the window first: about 0.3 s from now.
    assert 0.15 < error.retry_after_s <= 0.31
    time.sleep(error.retry_after_s + 0.03)
    admit(limiter, who, limits)
    assert refused(limiter, who, limits).retry_after_s <= 0.2  # now the second call's turn


def test_tokens_per_minute_count_estimates_then_actual_usage(make_limiter):
    limiter, who, limits = make_limiter(), tenant(), Limits(tokens_per_minute=100)
    first = admit(limiter, who, limits, 40)
    admit(limiter, who, limits, 40)
    error = refused(limiter, who, limits, 40)
    assert error.limit == "tenant.tokens_per_minute" and 55 < error.retry_after_s <= 60
    limiter.settle(first, used_tokens=10)  # 10 + 40 in the window now
    admit(limiter, who, limits, 40)
    assert refused(limiter, who, limits, 40).limit == "tenant.tokens_per_minute"
    # A call larger than the whole limit goes alone, into an empty window.
    other = tenant()
    admit(limiter, other, limits, 500)
    assert refused(limiter, other, limits, 1).limit == "tenant.tokens_per_minute"


def test_concurrent_runs(make_limiter):
    limiter, who, limits = make_limiter(), tenant(), Limits(concurrent_runs=2)
    first = admit(limiter, who, limits)
    admit(limiter, who, limits)
    error = refused(limiter, who, limits)
    assert error.limit == "tenant.concurrent_runs" and error.retry_after_s == 1.0
    assert "2 concurrent runs" in error.message
    limiter.settle(first, used_tokens=0)
    admit(limiter, who, limits)


def test_a_refused_call_uses_no_quota_anywhere(make_limiter, settings):
    settings.PARLEY_USER_REQUESTS_PER_MINUTE = 1
    limiter, tenant_id = make_limiter(), uuid.uuid4()
    limits = Limits(requests_per_minute=2)
    first, second = (CallIdentity(tenant_id, user_id=uuid.uuid4()) for _ in range(2))
    admit(limiter, first, limits)
    assert refused(limiter, first, limits).limit == "user.requests_per_minute"
    admit(limiter, second, limits)  # the refusal above took none of the tenant's two
    assert refused(limiter, CallIdentity(tenant_id), limits).limit == "tenant.requests_per_minute"


def test_users_and_keys_are_limited_independently(make_limiter, settings):
    settings.PARLEY_USER_REQUESTS_PER_MINUTE = 1
    settings.PARLEY_KEY_CONCURRENT_RUNS = 1
    limiter, tenant_id, limits = make_limiter(), uuid.uuid4(), Limits()
    users = [CallIdentity(tenant_id, user_id=uuid.uuid4()) for _ in range(2)]
    keys = [CallIdentity(tenant_id, api_key_id=uuid.uuid4()) for _ in range(2)]
    admit(limiter, users[0], limits)
    error = refused(limiter, users[0], limits)
    assert error.limit == "user.requests_per_minute" and "Your user" in error.message
    admit(limiter, users[1], limits)
    admit(limiter, keys[0], limits)
    error = refused(limiter, keys[0], limits)
    assert error.limit == "api_key.concurrent_runs" and "This API key" in error.message
    admit(limiter, keys[1], limits)
    # A user of another tenant is another scope.
    admit(limiter, CallIdentity(uuid.uuid4(), user_id=users[0].user_id), limits)


def test_tenants_are_independent(make_limiter):
    limiter = make_limiter()
    limits = Limits(requests_per_minute=1, concurrent_runs=1, monthly_token_budget=10)
    a, b = tenant(), tenant()
    admit(limiter, a, limits, 10)
    refused(limiter, a, limits)
    admit(limiter, b, limits, 10)


def test_unlimited_records_nothing(make_limiter):
    limiter, who = make_limiter(), tenant()
    for _ in range(50):
        admit(limiter, who, Limits(), 10**6)
    assert limiter.budget_state(who.tenant_id) == (0, 0)


# --- the monthly budget --------------------------------------------------------------------


def test_budget_reservations_and_exhaustion(make_limiter):
    limiter, who = make_limiter(), tenant()
    limits = Limits(monthly_token_budget=250)
    holds = [admit(limiter, who, limits, 100) for _ in range(3)]  # 0, 100, 200 < 250
    assert limiter.budget_state(who.tenant_id) == (0, 300)  # one reservation over, no more
    error = refused(limiter, who, limits, 100)
    assert error.limit == BUDGET and error.code == "budget_exhausted"
    month_end = month_of(limiter.clock()).end
    assert abs(error.retry_after_s - (month_end - limiter.clock()).total_seconds()) < 5
    assert "monthly token budget (250 tokens)" in error.message
    limiter.settle(holds[0], used_tokens=30)
    assert limiter.budget_state(who.tenant_id) == (30, 200)
    admit(limiter, who, limits, 100)  # 230 < 250


def test_failure_releases_everything(make_limiter):
    limiter, who = make_limiter(), tenant()
    limits = Limits(tokens_per_minute=100, concurrent_runs=1, monthly_token_budget=100)
    with (
        pytest.raises(RuntimeError),
        limiter.call_guard(identity=who, limits=limits, estimated_tokens=80),
    ):
        assert limiter.budget_state(who.tenant_id) == (0, 80)
        assert refused(limiter, who, limits, 80).limit == "tenant.tokens_per_minute"
        raise RuntimeError("the backend went away")
    assert limiter.budget_state(who.tenant_id) == (0, 0)
    assert len(limits_module.renewer) == 0
    # No tokens counted, the slot and the reservation are free again.
    with limiter.call_guard(identity=who, limits=limits, estimated_tokens=80):
        pass


# --- leases ----------------------------------------------------------------------------------


def test_leases_of_a_silent_holder_expire(make_limiter):
    limiter, who = make_limiter(lease_ttl_s=0.3), tenant()
    limits = Limits(concurrent_runs=1, monthly_token_budget=100)
    dead = admit(limiter, who, limits, 100)  # nobody renews it: as if its process died
    assert refused(limiter, who, limits).limit == "tenant.concurrent_runs"
    time.sleep(0.35)
    assert limiter.renew(dead) is False
    admit(limiter, who, limits, 100)  # slot and reservation reclaimed
    assert limiter.budget_state(who.tenant_id) == (0, 100)


def test_a_live_call_keeps_its_lease(make_limiter):
    limiter, who = make_limiter(lease_ttl_s=0.3), tenant()
    limits = Limits(concurrent_runs=1, monthly_token_budget=100)
    with limiter.call_guard(identity=who, limits=limits, estimated_tokens=100) as guard:
        time.sleep(0.8)  # well past the lease: renewed in the background
        assert refused(limiter, who, limits).limit == "tenant.concurrent_runs"
        assert limiter.renew(guard.hold) is True
    admit(limiter, who, limits, 100)


# --- settings and the process's limiter ---------------------------------------------------------


def test_call_guard_reads_user_limits_from_settings(settings):
    settings.PARLEY_USER_CONCURRENT_RUNS = 1
    limits_module.limiter.reset()
    try:
        who = CallIdentity(uuid.uuid4(), user_id=uuid.uuid4())
        with limits_module.call_guard(identity=who, limits=Limits(), estimated_tokens=1):
            with (
                pytest.raises(LimitExceeded) as info,
                limits_module.call_guard(identity=who, limits=Limits(), estimated_tokens=1),
            ):
                pass
            assert info.value.limit == "user.concurrent_runs"
        expected = MemoryLimiter if settings.REDIS_URL is None else RedisLimiter
        assert isinstance(limits_module.limiter(), expected)
    finally:
        limits_module.limiter.reset()


def test_identity_ids_must_be_server_side_uuids():
    with pytest.raises(ValueError):
        CallIdentity(tenant_id="t:1:rl:req")
    assert CallIdentity(uuid.UUID(int=1), user_id="").user_id is None


def test_redis_key_layout(redis_url, prefix, settings):
    import redis

    settings.PARLEY_USER_REQUESTS_PER_MINUTE = 5
    settings.PARLEY_KEY_TOKENS_PER_MINUTE = 500
    limiter = RedisLimiter(redis_url, prefix=prefix, lease_ttl_s=5, seed=no_usage)
    who = CallIdentity(uuid.uuid4(), user_id=uuid.uuid4(), api_key_id=uuid.uuid4())
    admit(limiter, who, Limits(concurrent_runs=2, monthly_token_budget=1000), 10)
    t = f"{prefix}:t:{who.tenant_id}"
    month = month_of(limiter.clock()).label
    keys = {k.decode() for k in redis.Redis.from_url(redis_url).scan_iter(match=f"{prefix}:*")}
    assert keys == {
        f"{t}:rl:conc",
        f"{t}:u:{who.user_id}:rl:req",
        f"{t}:k:{who.api_key_id}:rl:tok",
        f"{t}:budget:{month}",
        f"{t}:budget:{month}:holds",
    }


# --- across processes -------------------------------------------------------------------------

WORKER = r"""
import json, os, random, sys, threading, time
sys.path[:0] = ["platform", "."]
os.environ["DJANGO_SETTINGS_MODULE"] = "config.settings.test"
import django
django.setup()
import redis
from inference.limits import BUDGET, CallIdentity, LimitExceeded, RedisLimiter
from tenants.quotas import Limits

args = json.loads(sys.argv[1])
limiter = RedisLimiter(args["url"], prefix=args["prefix"], lease_ttl_s=args["ttl"],
                       seed=lambda tenant, month: 0)
who = CallIdentity(args["tenant"])
limits = Limits(**args["limits"])
barrier = redis.Redis.from_url(args["url"])
barrier.incr(args["barrier"])
while int(barrier.get(args["barrier"])) < args["processes"]:
    time.sleep(0.002)
out = {"calls": [], "refused": {}}
deadline = time.time() + 0.6
if args["mode"] == "hold":
    with limiter.call_guard(identity=who, limits=limits, estimated_tokens=args["estimate"]):
        print("held", flush=True)
        time.sleep(60)

def hammer():
    while time.time() < deadline:
        estimate = random.randint(50, 150)
        try:
            hold = limiter.acquire(identity=who, limits=limits, estimated_tokens=estimate)
        except LimitExceeded as exc:
            out["refused"][exc.limit] = out["refused"].get(exc.limit, 0) + 1
            if exc.limit == BUDGET:
                return
            time.sleep(0.002)
            continue
        start = time.time()
        time.sleep(random.uniform(0.002, 0.01))
        end = time.time()
        limiter.settle(hold, used_tokens=estimate)
        out["calls"].append([start, end, estimate])

threads = [threading.Thread(target=hammer) for _ in range(args["threads"])]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(json.dumps(out), flush=True)
"""


def run_workers(
    redis_url, prefix, tenant_id, limits, *, processes=2, threads=2, mode="hammer", ttl=5.0
):
    args = {
        "url": redis_url,
        "prefix": prefix,
        "tenant": str(tenant_id),
        "limits": limits,
        "barrier": f"{prefix}:barrier",
        "processes": processes,
        "threads": threads,
        "mode": mode,
        "ttl": ttl,
        "estimate": 100,
    }
    return [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, json.dumps(args)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]


def results(procs) -> list[dict]:
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    return outputs


def max_overlap(intervals) -> int:
    events = sorted([(s, 1) for s, _e, *_ in intervals] + [(e, -1) for _s, e, *_ in intervals])
    peak = level = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


def test_limits_hold_across_processes(redis_url, prefix):
    tenant_id = uuid.uuid4()
    procs = run_workers(
        redis_url, prefix, tenant_id, {"requests_per_minute": 40, "concurrent_runs": 2}
    )
    outputs = results(procs)
    calls = [c for out in outputs for c in out["calls"]]
    assert len(calls) == 40  # no more than the limit in the window, and the limit was used
    assert all(out["calls"] for out in outputs)  # both processes got some
    assert max_overlap(calls) == 2  # contention happened; the limit held at every instant
    refusals = {}
    for out in outputs:
        for limit, n in out["refused"].items():
            refusals[limit] = refusals.get(limit, 0) + n
    assert refusals.get("tenant.requests_per_minute", 0) > 0


def test_budget_holds_under_concurrent_reservations(redis_url, prefix):
    tenant_id = uuid.uuid4()
    budget = 3000
    outputs = results(run_workers(redis_url, prefix, tenant_id, {"monthly_token_budget": budget}))
    limiter = RedisLimiter(redis_url, prefix=prefix, lease_ttl_s=5, seed=no_usage)
    used, reserved = limiter.budget_state(tenant_id)
    assert reserved == 0
    assert used == sum(c[2] for out in outputs for c in out["calls"])
    # Calls used what they reserved: the budget is spent, overshot by one call at most.
    assert budget <= used < budget + 150
    assert all(out["refused"].get(BUDGET) for out in outputs)


def test_a_killed_process_frees_its_slot(redis_url, prefix):
    tenant_id = uuid.uuid4()
    limits = {"concurrent_runs": 1, "monthly_token_budget": 100}
    (proc,) = run_workers(redis_url, prefix, tenant_id, limits, processes=1, mode="hold", ttl=0.5)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "held"
        limiter = RedisLimiter(redis_url, prefix=prefix, lease_ttl_s=5, seed=no_usage)
        who, held = CallIdentity(tenant_id), Limits(**limits)
        time.sleep(1.2)  # more than twice the lease: the holder's renewals keep it
        assert refused(limiter, who, held, 100).limit == "tenant.concurrent_runs"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        killed_at = time.monotonic()
        while True:
            try:
                admit(limiter, who, held, 100)
                break
            except LimitExceeded:
                assert time.monotonic() - killed_at < 2.0, "the dead process's lease never expired"
                time.sleep(0.05)
        assert limiter.budget_state(tenant_id) == (0, 100)  # its reservation is gone too
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()
        if proc.stderr:
            proc.stderr.close()


def test_the_reservation_counts_tool_schemas_and_tool_calls():
    from inference.tokens import estimate_tokens

    question = [{"role": "user", "content": "What is 6 times 7?"}]
    plain = estimate_tokens(messages=question, max_tokens=10)
    schema = {
        "type": "function",
        "function": {"name": "calculate", "description": "x" * 400, "parameters": {}},
    }
    assert estimate_tokens(messages=question, max_tokens=10, tools=[schema]) >= plain + 100
    history = [
        *question,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "calculate", "arguments": "{" + "1" * 400 + "}"},
                }
            ],
        },
    ]
    with_call = estimate_tokens(messages=history, max_tokens=10)
    assert with_call >= plain + 100
