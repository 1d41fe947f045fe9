"""Backends as rows: kept in step with the configuration, health-checked into states,
metrics scraped into the shared load store, steered by operators; circuit breakers."""

from __future__ import annotations

import time

import pytest

from inference import pool
from inference.backends import backend_rows, backend_views, backends_refresh
from inference.breaker import CircuitBreaker
from inference.load import MemoryLoadStore, RedisLoadStore, load_store, parse_vllm_metrics
from inference.models import Backend
from inference.types import ChatRequest
from tests.factories import UserFactory
from tests.synthetic import DEFAULT_MODEL, refused_url

pytestmark = pytest.mark.django_db
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture(autouse=True)
def _fresh(settings):
    settings.PARLEY_HEALTH_TTL_S = 60.0
    pool.forget_cache()
    yield
    pool.forget_cache()


def test_rows_follow_the_configuration(settings, synthetic_server):
    one, two = synthetic_server(), synthetic_server(max_model_len=2048)
    settings.PARLEY_BACKENDS = [one.url, two.url]
    rows = {r.base_url: r for r in backend_rows()}
    assert set(rows) == {one.url, two.url}
    assert rows[two.url].max_model_len == 2048
    assert rows[one.url].served_models == [DEFAULT_MODEL]
    assert all(r.state == Backend.State.HEALTHY for r in rows.values())
    Backend.objects.create(base_url="http://operator-added:8000")  # an operator's row stays
    settings.PARLEY_BACKENDS = [two.url]
    assert {r.base_url for r in backend_rows()} == {two.url, "http://operator-added:8000"}


def test_failing_checks_degrade_then_take_down_and_recovery_heals(settings, synthetic_server):
    server = synthetic_server()
    settings.PARLEY_BACKENDS = [server.url]
    (row,) = backend_rows()
    assert row.state == Backend.State.HEALTHY
    server.stop()
    assert backends_refresh()[0].state == Backend.State.DEGRADED
    assert backends_refresh()[0].state == Backend.State.DOWN
    assert "health" in Backend.objects.get().last_error
    with pytest.raises(Exception) as info:
        list(pool.chat_stream(ChatRequest(messages=HELLO, model=DEFAULT_MODEL)))
    assert info.value.code == "no_backend"


def test_operators_drain_a_backend_and_it_gets_no_calls(client, settings, synthetic_server):
    drained, other = synthetic_server(tokens=2), synthetic_server(tokens=2)
    settings.PARLEY_BACKENDS = [drained.url, other.url]
    backend_rows()
    row = Backend.objects.get(base_url=drained.url)
    client.force_login(UserFactory(is_operator=True))
    response = client.put(
        f"/api/v1/operator/pool/backends/{row.id}/state",
        {"state": "draining"},
        content_type="application/json",
    )
    assert response.status_code == 200 and response.json()["state"] == "draining"
    for _ in range(4):
        list(pool.chat_stream(ChatRequest(messages=HELLO, model=DEFAULT_MODEL)))
    assert (drained.request_count, other.request_count) == (0, 4)
    backends_refresh()  # health checks leave a pinned state alone
    assert Backend.objects.get(id=row.id).state == "draining"
    listed = client.get("/api/v1/operator/pool/backends").json()
    assert {b["base_url"]: b["state"] for b in listed}[drained.url] == "draining"
    bad = client.put(
        f"/api/v1/operator/pool/backends/{row.id}/state",
        {"state": "asleep"},
        content_type="application/json",
    )
    assert bad.status_code == 400
    assert (
        client.put(
            f"/api/v1/operator/pool/backends/{row.id}/state",
            {"state": None},
            content_type="application/json",
        ).json()["state_pinned"]
        is False
    )


def test_metrics_are_scraped_into_the_shared_store(settings, synthetic_server):
    server = synthetic_server()
    settings.PARLEY_BACKENDS = [server.url]
    backends_refresh(list(backend_rows()))
    (view,) = backend_views(backend_rows())
    assert view.id == server.url and view.state == "healthy"


def test_vllm_metrics_parse_new_and_old_names():
    text = """# HELP vllm:num_requests_running x
vllm:num_requests_running{model_name="a"} 3.0
vllm:num_requests_running{model_name="b"} 1.0
vllm:num_requests_waiting{model_name="a"} 7.0
vllm:gpu_cache_usage_perc{model_name="a"} 0.5
"""
    metrics = parse_vllm_metrics(text)
    assert (metrics.running, metrics.waiting, metrics.kv_usage) == (4.0, 7.0, 0.5)
    assert parse_vllm_metrics('vllm:kv_cache_usage_perc{model_name="a"} 0.25\n').kv_usage == 0.25


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_inflight_counts_are_shared_and_leases_expire(kind, settings, monkeypatch):
    import inference.load as load

    store = MemoryLoadStore() if kind == "memory" else RedisLoadStore(settings.REDIS_URL)
    backend = f"http://b-{kind}-{time.time_ns()}"
    calls = [store.begin(backend) for _ in range(3)]
    assert store.inflight([backend]) == {backend: 3}
    store.end(backend, calls[0])
    assert store.inflight([backend]) == {backend: 2}
    # A process that died mid-call stops counting once its lease lapses.
    monkeypatch.setattr(load.time, "time", lambda: time.time_ns() / 1e9 + load.LEASE_S + 1)
    assert store.inflight([backend]) == {backend: 0}


def test_inflight_is_counted_while_a_call_streams(settings, synthetic_server):
    server = synthetic_server(tokens=3)
    settings.PARLEY_BACKENDS = [server.url]
    stream = pool.chat_stream(ChatRequest(messages=HELLO, model=DEFAULT_MODEL))
    next(stream)
    assert load_store().inflight([server.url]) == {server.url: 1}
    list(stream)
    assert load_store().inflight([server.url]) == {server.url: 0}


@pytest.mark.django_db(transaction=True)
def test_calls_routed_at_once_see_each_others_leases(settings, synthetic_server):
    """A burst of calls is routed from one view of the load, read once: each sees the
    leases this process took for the calls before it, so the burst spreads out."""
    import asyncio

    from inference import apool

    one, two = synthetic_server(tokens=2, delay_s=0.3), synthetic_server(tokens=2, delay_s=0.3)
    settings.PARLEY_BACKENDS = [one.url, two.url]
    settings.PARLEY_ROUTING_POLICY = "least_loaded"
    backend_rows()  # (checked once, here)

    async def burst() -> list[str]:
        streams = [apool.chat_stream(ChatRequest(messages=HELLO)) for _ in range(10)]
        started = await asyncio.gather(*(anext(stream) for stream in streams))
        counts = load_store().inflight([one.url, two.url])
        for stream in streams:
            await stream.aclose()
        assert counts == {one.url: 5, two.url: 5}
        return [event.backend for event in started]

    backends = asyncio.run(burst())
    assert sorted(backends) == sorted([one.url] * 5 + [two.url] * 5)
    assert load_store().inflight([one.url, two.url]) == {one.url: 0, two.url: 0}


def test_the_circuit_breaker_opens_after_repeated_failures_and_half_opens():
    breaker = CircuitBreaker(threshold=3, window_s=10, cooldown_s=5)
    for t in (0.0, 1.0):
        breaker.record_failure("b", now=t)
    assert not breaker.is_open("b", now=1.5)
    breaker.record_failure("b", now=2.0)
    assert breaker.is_open("b", now=3.0)
    assert not breaker.is_open("b", now=7.5)  # the one trial call after the cooldown
    assert breaker.is_open("b", now=7.6)  # others wait for it
    breaker.record_failure("b", now=8.0)  # the trial failed: open again
    assert breaker.is_open("b", now=12.0)
    assert not breaker.is_open("b", now=13.5)
    breaker.record_success("b")
    assert not breaker.is_open("b", now=13.6)


def test_an_open_circuit_keeps_calls_away_until_it_half_opens(settings, synthetic_server):
    flaky, good = synthetic_server(fail="http500"), synthetic_server(tokens=1)
    settings.PARLEY_BACKENDS = [flaky.url, good.url]
    settings.PARLEY_BREAKER_THRESHOLD = 1
    backend_rows()
    for _ in range(3):
        list(pool.chat_stream(ChatRequest(messages=HELLO, model=DEFAULT_MODEL)))
    assert flaky.request_count <= 1  # after its one failure the circuit is open
    assert good.request_count == 3


def test_no_backend_reachable_at_all(settings):
    settings.PARLEY_BACKENDS = [refused_url()]
    with pytest.raises(Exception) as info:
        list(pool.chat_stream(ChatRequest(messages=HELLO, model=DEFAULT_MODEL)))
    assert info.value.code == "no_backend"


def test_first_token_timeout_fails_over_and_idle_timeout_ends_the_stream(
    settings, synthetic_server
):
    from inference.client import Timeouts
    from inference.types import InferenceError, TextDelta

    slow = synthetic_server(tokens=3, delay_s=2.0)
    client = pool.client_for(slow.url)
    client.timeouts = Timeouts(connect_s=1, first_token_s=0.5, idle_s=30)
    started = time.monotonic()
    with pytest.raises(InferenceError) as info:
        list(client.chat_stream(ChatRequest(messages=HELLO), model=DEFAULT_MODEL))
    assert info.value.code == "first_token_timeout" and info.value.retryable
    assert time.monotonic() - started < 1.8  # the watchdog, not the server, ended it

    gappy = synthetic_server(tokens=5, delay_s=0.6)
    client = pool.client_for(gappy.url)
    client.timeouts = Timeouts(connect_s=1, first_token_s=5, idle_s=0.3)
    events: list = []
    with pytest.raises(InferenceError) as info:
        for event in client.chat_stream(ChatRequest(messages=HELLO), model=DEFAULT_MODEL):
            events.append(event)
    assert info.value.code == "stream_timeout" and not info.value.retryable
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["tok0 "]
