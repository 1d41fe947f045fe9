"""The usage ledger (inference.ledger) and the budget it feeds: `CallGuard.commit` writes a
UsageRecord in the call's tenant (row level security hides it from everyone else) and
settles the call; budgets are counted per month and seeded from the ledger."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from datetime import UTC, datetime

import pytest
from django.db import OperationalError

from inference.ledger import UsageRow, usage_month_total, usage_record_create, usage_rows_write
from inference.ledger_writer import LedgerWriter
from inference.limits import (
    BUDGET,
    CallIdentity,
    LimitExceeded,
    MemoryLimiter,
    RedisLimiter,
    month_of,
)
from inference.models import UsageRecord
from inference.types import MAX_TOKEN_COUNT
from tenants.models import ApiKey
from tenants.quotas import Limits
from tenants.rls import operator_scope, tenant_scope


@pytest.fixture
def prefix(settings):
    value = f"{settings.PARLEY_REDIS_PREFIX}-ledger{uuid.uuid4().hex[:8]}"
    yield value
    if settings.REDIS_URL:
        import redis

        admin = redis.Redis.from_url(settings.REDIS_URL)
        for key in admin.scan_iter(match=f"{value}:*"):
            admin.delete(key)
        admin.close()


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture(params=["memory", "redis"])
def make_limiter(request, settings, prefix):
    """Limiters whose budgets are seeded from the real ledger."""
    if request.param == "redis" and not settings.REDIS_URL:
        pytest.skip("no REDIS_URL: the embedded mode has no Redis")

    def make(**kwargs):
        options = {"prefix": prefix, "lease_ttl_s": 5.0, **kwargs}
        if request.param == "memory":
            return MemoryLimiter(**options)
        return RedisLimiter(settings.REDIS_URL, **options)

    return make


def api_key_for(person) -> ApiKey:
    with operator_scope():
        return ApiKey.objects.create(
            tenant=person.tenant,
            name="integration",
            prefix=uuid.uuid4().hex[:12],
            secret_hash="0" * 64,
            created_by=person.user,
        )


def test_commit_writes_a_usage_record_in_the_tenant(make_limiter, alice, charlie):
    limiter, key = make_limiter(), api_key_for(alice)
    who = CallIdentity(alice.tenant.id, user_id=alice.user.id, api_key_id=key.id)
    limits = Limits(monthly_token_budget=10_000)
    with limiter.call_guard(identity=who, limits=limits, estimated_tokens=500) as guard:
        assert limiter.budget_state(alice.tenant.id) == (0, 500)
        record = guard.commit(
            prompt_tokens=12,
            completion_tokens=30,
            model="synthetic-model",
            backend="http://backend-1",
            outcome="completed",
            purpose="chat.run",
            reference="run-1",
        )
    assert limiter.budget_state(alice.tenant.id) == (42, 0)
    with tenant_scope(tenant_id=alice.tenant.id):
        (row,) = UsageRecord.objects.all()
    assert row.id == record.id
    assert (row.tenant_id, row.user_id, row.api_key_id) == (alice.tenant.id, alice.user.id, key.id)
    assert (row.prompt_tokens, row.completion_tokens, row.reserved_tokens) == (12, 30, 500)
    assert (row.model, row.backend, row.outcome) == (
        "synthetic-model",
        "http://backend-1",
        "completed",
    )
    assert (row.purpose, row.reference, row.total_tokens) == ("chat.run", "run-1", 42)
    # Row level security: another tenant, and no tenant at all, see nothing.
    with tenant_scope(tenant_id=charlie.tenant.id):
        assert not UsageRecord.objects.exists()
    assert not UsageRecord.objects.exists()
    with operator_scope():
        assert UsageRecord.objects.get().tenant_id == alice.tenant.id


def test_a_partial_stream_counts_what_it_produced(make_limiter, bob):
    limiter = make_limiter()
    who = CallIdentity(bob.tenant.id, user_id=bob.user.id)
    limits = Limits(tokens_per_minute=100, monthly_token_budget=1000)
    with limiter.call_guard(identity=who, limits=limits, estimated_tokens=90) as guard:
        with pytest.raises(LimitExceeded):
            limiter.acquire(identity=who, limits=limits, estimated_tokens=70)
        guard.commit(
            prompt_tokens=20, completion_tokens=3, model="m", outcome=UsageRecord.Outcome.PARTIAL
        )
    assert limiter.budget_state(bob.tenant.id) == (23, 0)
    # The minute's window now holds the 23 tokens used, not the 90 estimated.
    limiter.acquire(identity=who, limits=limits, estimated_tokens=70)
    with operator_scope():
        row = UsageRecord.objects.get()
    assert (row.outcome, row.total_tokens, row.user_id) == ("partial", 23, bob.user.id)


def test_a_failure_without_commit_writes_nothing(make_limiter, alice):
    limiter = make_limiter()
    who = CallIdentity(alice.tenant.id)
    with (
        pytest.raises(ConnectionError),
        limiter.call_guard(
            identity=who, limits=Limits(monthly_token_budget=1000), estimated_tokens=300
        ),
    ):
        raise ConnectionError("no backend")
    assert limiter.budget_state(alice.tenant.id) == (0, 0)
    with operator_scope():
        assert not UsageRecord.objects.exists()


def test_commit_once_and_only_known_outcomes(make_limiter, alice):
    limiter = make_limiter()
    who = CallIdentity(alice.tenant.id)
    with limiter.call_guard(identity=who, limits=Limits(), estimated_tokens=10) as guard:
        with pytest.raises(ValueError, match="outcome"):
            guard.commit(prompt_tokens=1, completion_tokens=1, model="m", outcome="great")
        with pytest.raises(RuntimeError, match="already committed"):
            guard.commit(prompt_tokens=1, completion_tokens=1, model="m", outcome="completed")
    with operator_scope():
        assert not UsageRecord.objects.exists()


def test_the_budget_is_seeded_from_the_ledger(make_limiter, alice, charlie):
    for tokens in (400, 500):
        usage_record_create(
            tenant_id=alice.tenant.id,
            model="m",
            prompt_tokens=tokens,
            completion_tokens=0,
            outcome="completed",
        )
    usage_record_create(
        tenant_id=charlie.tenant.id,
        model="m",
        prompt_tokens=5000,
        completion_tokens=0,
        outcome="completed",
    )
    limiter, limits = make_limiter(), Limits(monthly_token_budget=1000)
    who = CallIdentity(alice.tenant.id)
    limiter.acquire(identity=who, limits=limits, estimated_tokens=200)  # 900 < 1000
    assert limiter.budget_state(alice.tenant.id) == (900, 200)
    with pytest.raises(LimitExceeded) as info:
        limiter.acquire(identity=who, limits=limits, estimated_tokens=1)
    assert info.value.limit == BUDGET
    # Charlie's usage is Charlie's.
    with pytest.raises(LimitExceeded):
        limiter.acquire(identity=CallIdentity(charlie.tenant.id), limits=limits, estimated_tokens=1)
    assert limiter.budget_state(charlie.tenant.id) == (5000, 0)


def test_usage_month_total_counts_the_month(alice):
    records = [
        usage_record_create(
            tenant_id=alice.tenant.id,
            model="m",
            prompt_tokens=tokens,
            completion_tokens=1,
            outcome="partial",
        )
        for tokens in (10, 20, 40)
    ]
    moments = [
        datetime(2031, 1, 1, 0, 0, tzinfo=UTC),  # the first instant of January
        datetime(2031, 1, 31, 23, 59, 59, tzinfo=UTC),
        datetime(2031, 2, 1, 0, 0, tzinfo=UTC),  # February
    ]
    with operator_scope():
        for record, moment in zip(records, moments, strict=True):
            UsageRecord.objects.filter(id=record.id).update(created_at=moment)
    january = month_of(datetime(2031, 1, 10, tzinfo=UTC))
    assert (january.label, january.end) == ("2031-01", datetime(2031, 2, 1, tzinfo=UTC))
    assert usage_month_total(tenant_id=alice.tenant.id, start=january.start, end=january.end) == 32


def test_month_rollover(make_limiter, alice, settings):
    clock = Clock(datetime(2031, 1, 31, 23, 59, 30, tzinfo=UTC))
    limiter, limits = make_limiter(clock=clock), Limits(monthly_token_budget=1000)
    who = CallIdentity(alice.tenant.id)

    def call(tokens):
        with limiter.call_guard(identity=who, limits=limits, estimated_tokens=tokens) as guard:
            guard.commit(prompt_tokens=tokens, completion_tokens=0, model="m", outcome="completed")

    call(600)
    late = limiter.acquire(identity=who, limits=limits, estimated_tokens=500)  # 600 < 1000
    with pytest.raises(LimitExceeded) as info:
        limiter.acquire(identity=who, limits=limits, estimated_tokens=1)
    assert info.value.limit == BUDGET and 29 <= info.value.retry_after_s <= 31
    assert "2031-02-01" in info.value.message

    clock.now = datetime(2031, 2, 1, 0, 0, 10, tzinfo=UTC)
    call(700)  # a new month, a new budget
    # The call reserved in January ends in February: counted in February, as its record.
    limiter.settle(late, used_tokens=250)
    january, february = datetime(2031, 1, 15, tzinfo=UTC), datetime(2031, 2, 15, tzinfo=UTC)
    assert limiter.budget_state(alice.tenant.id, january) == (600, 0)
    assert limiter.budget_state(alice.tenant.id, february) == (950, 0)
    if isinstance(limiter, RedisLimiter):
        import redis

        base = f"{limiter.prefix}:t:{alice.tenant.id}:budget"
        client = redis.Redis.from_url(settings.REDIS_URL)
        assert client.exists(f"{base}:2031-01", f"{base}:2031-02") == 2
        # Kept a week past its month, for calls that settle late; then gone.
        assert client.pexpiretime(f"{base}:2031-01") == int(
            datetime(2031, 2, 8, tzinfo=UTC).timestamp() * 1000
        )


# --- numbers out of range ------------------------------------------------------------


def test_the_ledger_keeps_a_row_whatever_its_numbers(alice, caplog):
    """A call's row is written even when a count is out of range (a bug, a backend
    reporting nonsense): clamped to [0, MAX_TOKEN_COUNT], and logged."""
    largest = usage_record_create(
        tenant_id=alice.tenant.id,
        model="m",
        prompt_tokens=MAX_TOKEN_COUNT,
        completion_tokens=MAX_TOKEN_COUNT,
        reserved_tokens=MAX_TOKEN_COUNT,
        outcome="completed",
    )
    beyond = usage_record_create(
        tenant_id=alice.tenant.id,
        model="m",
        prompt_tokens=2**31,
        completion_tokens=-5,
        reserved_tokens=10**30,
        outcome="partial",
    )
    with tenant_scope(tenant_id=alice.tenant.id):
        rows = {r.id: r for r in UsageRecord.objects.all()}
    assert (rows[largest.id].total_tokens, rows[largest.id].reserved_tokens) == (
        2 * MAX_TOKEN_COUNT,
        MAX_TOKEN_COUNT,
    )
    assert (rows[beyond.id].prompt_tokens, rows[beyond.id].completion_tokens) == (
        MAX_TOKEN_COUNT,
        0,
    )
    assert rows[beyond.id].reserved_tokens == MAX_TOKEN_COUNT
    assert "reserved_tokens=" in caplog.text and "completion_tokens=-5" in caplog.text
    # A row's total, and the month's, are summed in SQL without overflowing.
    month = month_of(datetime.now(UTC))
    assert usage_month_total(tenant_id=alice.tenant.id, start=month.start, end=month.end) == (
        3 * MAX_TOKEN_COUNT
    )


def test_a_huge_reservation_is_held_and_settled_exactly(make_limiter, alice):
    """An estimate or a usage beyond MAX_TOKEN_COUNT (a max_tokens the edge did not
    bound) is clamped: the stores, Redis' Lua numbers included, hold it exactly, and
    the tenant's next calls are counted as before."""
    limiter = make_limiter()
    who = CallIdentity(alice.tenant.id)
    limits = Limits(tokens_per_minute=10**12, monthly_token_budget=10**12)
    with limiter.call_guard(identity=who, limits=limits, estimated_tokens=10**20) as guard:
        assert limiter.budget_state(alice.tenant.id) == (0, MAX_TOKEN_COUNT)
        record = guard.commit(
            prompt_tokens=10**20, completion_tokens=3, model="m", outcome="completed"
        )
    assert (record.prompt_tokens, record.completion_tokens) == (MAX_TOKEN_COUNT, 3)
    assert record.reserved_tokens == MAX_TOKEN_COUNT
    assert limiter.budget_state(alice.tenant.id) == (MAX_TOKEN_COUNT, 0)
    with limiter.call_guard(identity=who, limits=limits, estimated_tokens=100) as guard:
        guard.commit(prompt_tokens=60, completion_tokens=40, model="m", outcome="completed")
    assert limiter.budget_state(alice.tenant.id) == (MAX_TOKEN_COUNT + 100, 0)


# --- the ledger writer of event loops ---------------------------------------------------


def ledger_rows(person) -> list[UsageRecord]:
    with tenant_scope(tenant_id=person.tenant.id):
        return list(UsageRecord.objects.order_by("reference"))


def usage_row(person, reference: str, **fields) -> UsageRow:
    return UsageRow(
        tenant_id=str(person.tenant.id),
        model="m",
        prompt_tokens=fields.pop("prompt_tokens", 3),
        completion_tokens=4,
        outcome="completed",
        reference=reference,
        **fields,
    )


@pytest.mark.django_db(transaction=True)
def test_the_ledger_writer_books_a_burst_in_few_transactions_each_row_in_its_tenant(alice, charlie):
    writer = LedgerWriter()
    rows = [usage_row(alice, f"a-{i:03}") for i in range(120)]
    rows += [usage_row(charlie, f"c-{i:03}") for i in range(80)]

    async def burst() -> None:
        await asyncio.gather(*(writer.write(row) for row in rows))

    asyncio.run(burst())
    # Every call's wait ended with its row in the ledger, in its tenant only.
    assert [r.reference for r in ledger_rows(alice)] == [f"a-{i:03}" for i in range(120)]
    assert [r.reference for r in ledger_rows(charlie)] == [f"c-{i:03}" for i in range(80)]
    assert writer.rows == 200 and writer.batches < 20
    # The rows are checked and clamped as one row at a time is.
    huge = usage_row(alice, "z-huge", prompt_tokens=MAX_TOKEN_COUNT + 5)
    asyncio.run(writer.write(huge))
    assert ledger_rows(alice)[-1].prompt_tokens == MAX_TOKEN_COUNT
    with pytest.raises(ValueError, match="outcome"):
        usage_rows_write([dataclasses.replace(huge, outcome="great")])


@pytest.mark.django_db(transaction=True)
def test_rows_the_database_refuses_are_spooled_and_written_later(alice, settings, monkeypatch):
    if not settings.REDIS_URL:
        pytest.skip("no REDIS_URL: the embedded mode keeps refused rows in memory")
    import inference.ledger_writer as ledger_writer

    settings.PARLEY_REDIS_PREFIX = f"ledger-spool-{uuid.uuid4().hex[:8]}"
    writer = LedgerWriter()

    def down(rows):
        raise OperationalError("the database is down")

    monkeypatch.setattr(ledger_writer, "usage_rows_write", down)
    asyncio.run(writer.write(usage_row(alice, "spooled")))  # durable: the wait ends
    assert ledger_rows(alice) == []
    spool = ledger_writer.spool_redis()
    assert spool.llen(ledger_writer.spool_key()) == 1
    monkeypatch.undo()
    writer.drain()  # what an idle writer does every few seconds
    assert [r.reference for r in ledger_rows(alice)] == ["spooled"]
    assert spool.llen(ledger_writer.spool_key()) == 0
    writer.drain()
    assert len(ledger_rows(alice)) == 1  # written once
