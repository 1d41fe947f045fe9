"""The pool applies a tenant's limits and writes the ledger on every call."""

from __future__ import annotations

import pytest

from inference import pool
from inference.limits import LimitExceeded
from inference.models import UsageRecord
from inference.types import ChatRequest, InferenceError
from tenants.models import Plan, Tenant
from tenants.rls import operator_scope, tenant_scope
from tests.synthetic import DEFAULT_MODEL

pytestmark = pytest.mark.django_db(transaction=True)
HELLO = [{"role": "user", "content": "hello there"}]


@pytest.fixture
def backend(settings, synthetic_server):
    server = synthetic_server(tokens=4, prompt_tokens=9)
    settings.PARLEY_BACKENDS = [server.url]
    pool.forget_cache()
    yield server
    pool.forget_cache()


def call(person, **kwargs):
    request = ChatRequest(
        messages=HELLO,
        model=DEFAULT_MODEL,
        tenant_id=str(person.tenant.id),
        user_id=str(person.user.id),
        purpose="test",
        reference="r1",
        **kwargs,
    )
    return list(pool.chat_stream(request))


def on_plan(person, **limits):
    with operator_scope():
        plan = Plan.objects.create(name=f"plan-{person.tenant.slug}", **limits)
        Tenant.objects.filter(id=person.tenant.id).update(plan=plan)


def test_every_call_is_written_to_the_ledger_of_its_tenant(alice, charlie, backend):
    call(alice)
    with tenant_scope(tenant_id=alice.tenant.id):
        (record,) = UsageRecord.objects.all()
    assert (record.prompt_tokens, record.completion_tokens, record.outcome) == (9, 4, "completed")
    assert (record.user_id, record.purpose, record.reference) == (alice.user.id, "test", "r1")
    assert record.backend == backend.url and record.model == DEFAULT_MODEL
    with tenant_scope(tenant_id=charlie.tenant.id):
        assert not UsageRecord.objects.exists()


def test_requests_per_minute_refuse_with_which_limit_and_when(alice, charlie, backend):
    on_plan(alice, requests_per_minute=1)
    call(alice)
    with pytest.raises(LimitExceeded) as info:
        call(alice)
    assert info.value.code == "rate_limited"
    assert info.value.limit == "tenant.requests_per_minute"
    assert 0 < info.value.retry_after_s <= 60
    assert "retry in" in info.value.message
    call(charlie)  # another tenant is not affected
    assert backend.request_count == 2


def test_a_plan_without_the_model_refuses_it(alice, backend):
    on_plan(alice, enabled_models=["some-other-model"])
    with pytest.raises(InferenceError) as info:
        call(alice)
    assert info.value.code == "model_not_allowed"
    assert backend.request_count == 0


def test_a_broken_stream_counts_what_it_produced(alice, settings, synthetic_server):
    server = synthetic_server(tokens=6, fail="drop_after_n", drop_after=3)
    settings.PARLEY_BACKENDS = [server.url]
    pool.forget_cache()
    with pytest.raises(InferenceError):
        call(alice)
    with tenant_scope(tenant_id=alice.tenant.id):
        (record,) = UsageRecord.objects.all()
    assert (record.outcome, record.completion_tokens) == ("partial", 3)
    assert record.prompt_tokens > 0


def test_a_run_over_its_limit_ends_with_a_clear_run_error(alice, backend, worker):
    import asyncio

    from tests.conftest import ws_connect

    on_plan(alice, requests_per_minute=1)

    async def turns():
        connected, _, socket = await ws_connect(alice.user)
        assert connected
        ends = []
        for text in ("one", "two"):
            await socket.send({"type": "chat.send", "content": text})
            frames = await socket.receive_until(("run.done", "run.error"))
            ends.append(frames[-1])
        await socket.close()
        return ends

    first, second = asyncio.run(turns())
    assert first["type"] == "run.done"
    assert second["type"] == "run.error" and second["code"] == "rate_limited"
    assert "requests per minute" in second["message"] or "retry in" in second["message"]
