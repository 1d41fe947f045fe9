"""The usage ledger: one UsageRecord per LLM call, written in its tenant's scope.

The ledger is the source of truth for billing and for the monthly budget: the budget
counters of inference.limits are seeded from `usage_month_total` and kept current by
each settled call. The pool writes a call's row as the call ends, before it settles
the call's limits (inference.store); `limits.CallGuard.commit` does the same for a
caller that holds limits itself.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import connection
from django.db.models import F, Sum
from django.utils import timezone

from inference.models import UsageRecord
from inference.types import MAX_TOKEN_COUNT
from tenants.rls import SCOPE_SQL, rls_enforced, scope_params, tenant_only, tenant_scope

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class UsageRow:
    """One call's usage, as the ledger records it (see UsageRecord)."""

    tenant_id: Any
    model: str
    prompt_tokens: int
    completion_tokens: int
    outcome: str
    user_id: Any = None
    api_key_id: Any = None
    backend: str = ""
    reserved_tokens: int = 0
    purpose: str = ""
    reference: str = ""


def usage_record_create(
    *,
    tenant_id: Any,
    user_id: Any = None,
    api_key_id: Any = None,
    model: str,
    backend: str = "",
    prompt_tokens: int,
    completion_tokens: int,
    reserved_tokens: int = 0,
    outcome: str,
    purpose: str = "",
    reference: str = "",
) -> UsageRecord:
    """Record one call's usage. `outcome` is completed, partial (failed or cancelled
    mid-stream: the tokens it produced count) or failed (nothing produced). The token
    counts are clamped to [0, MAX_TOKEN_COUNT] (`_count`): billing never loses a row
    to a number."""
    row = UsageRow(
        tenant_id=tenant_id,
        user_id=user_id,
        api_key_id=api_key_id,
        model=model,
        backend=backend,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        reserved_tokens=reserved_tokens,
        outcome=outcome,
        purpose=purpose,
        reference=reference,
    )
    record = _record(row)
    with tenant_scope(tenant_id=tenant_id):
        record.save(force_insert=True)
    return record


# The columns a batch writes, in UsageRow's terms (the id is the database's).
_COLUMNS = (
    "tenant_id",
    "user_id",
    "api_key_id",
    "purpose",
    "reference",
    "model",
    "backend",
    "prompt_tokens",
    "completion_tokens",
    "reserved_tokens",
    "outcome",
    "created_at",
)


def usage_rows_write(rows: Sequence[UsageRow]) -> None:
    """Record many calls' usage (the pool's ledger writer): per tenant, one multi-row
    INSERT in the tenant's scope, the rows checked and clamped as `usage_record_create`
    does. Plain SQL, not the ORM's bulk_create: a burst's ends write hundreds of rows,
    and the ORM spent ~0.1 ms of CPU on each. On PostgreSQL, outside a transaction, the
    scope (tenants.rls' settings) and the INSERT go as one query string, which
    PostgreSQL runs as one transaction: one round trip per tenant, where a scope's
    BEGIN, settings, INSERT and COMMIT took four (each a wait for the GIL on a busy
    web process)."""
    by_tenant: dict[str, list[UsageRow]] = {}
    for row in rows:
        by_tenant.setdefault(str(row.tenant_id), []).append(row)
    table = connection.ops.quote_name(UsageRecord._meta.db_table)
    columns = ", ".join(connection.ops.quote_name(name) for name in _COLUMNS)
    one = "(" + ", ".join(["%s"] * len(_COLUMNS)) + ")"
    per_statement = (connection.features.max_query_params or 65535) // len(_COLUMNS)
    one_trip = (
        rls_enforced()
        and not connection.in_atomic_block
        # A query string of two statements needs client-side binding (Django's default).
        and not connection.settings_dict["OPTIONS"].get("server_side_binding")
    )
    # The ids and the time as their fields store them on this database (a UUID as
    # SQLite's text...); the texts and counts are stored as `_values` gives them.
    fields = {field.attname: field for field in UsageRecord._meta.concrete_fields}
    ids = [fields[name].get_db_prep_save for name in _COLUMNS[:3]]
    now = fields["created_at"].get_db_prep_save(timezone.now(), connection)
    for tenant_id, group in by_tenant.items():
        for start in range(0, len(group), per_statement):
            chunk = group[start : start + per_statement]
            params: list[Any] = []
            for row in chunk:
                values = _values(row)
                params += [
                    prep(values[name], connection)
                    for prep, name in zip(ids, _COLUMNS[:3], strict=True)
                ]
                params += [values[name] for name in _COLUMNS[3:-1]]
                params.append(now)
            # Only the model's own names and placeholders go into the statement.
            sql = f"INSERT INTO {table} ({columns}) VALUES " + ", ".join([one] * len(chunk))  # noqa: S608
            if one_trip:
                scope = scope_params(tenant_only(tenant_id))
                with connection.cursor() as cursor:
                    cursor.execute(f"{SCOPE_SQL}; {sql}", [*scope, *params])
            else:
                with tenant_scope(tenant_id=tenant_id), connection.cursor() as cursor:
                    cursor.execute(sql, params)


def _record(row: UsageRow) -> UsageRecord:
    return UsageRecord(**_values(row))


def _values(row: UsageRow) -> dict[str, Any]:
    """A row's fields as the ledger stores them: the outcome checked, the texts cut to
    their columns, the counts clamped (`_count`)."""
    if row.outcome not in UsageRecord.Outcome.values:
        raise ValueError(
            f"outcome must be one of {UsageRecord.Outcome.values}, not {row.outcome!r}"
        )
    return {
        "tenant_id": row.tenant_id,
        "user_id": row.user_id,
        "api_key_id": row.api_key_id,
        "model": row.model[:200],
        "backend": row.backend[:500],
        "prompt_tokens": _count("prompt_tokens", row.prompt_tokens),
        "completion_tokens": _count("completion_tokens", row.completion_tokens),
        "reserved_tokens": _count("reserved_tokens", row.reserved_tokens),
        "outcome": row.outcome,
        "purpose": row.purpose[:32],
        "reference": row.reference[:64],
    }


def _count(name: str, value: Any) -> int:
    """A token count as the ledger stores it. The call happened: its row is written
    whatever the number, which is logged and clamped to [0, MAX_TOKEN_COUNT] when it is
    out of range (a bug, or a backend reporting nonsense), 0 when it is no number."""
    if type(value) is int and 0 <= value <= MAX_TOKEN_COUNT:
        return value
    try:
        count = int(value)
    except (TypeError, ValueError, OverflowError):
        count = 0
    clamped = min(max(0, count), MAX_TOKEN_COUNT)
    logger.warning("usage record: %s=%r stored as %d", name, value, clamped)
    return clamped


def usage_month_total(*, tenant_id: Any, start: datetime, end: datetime) -> int:
    """The tokens (prompt and completion) a tenant's calls used in [start, end)."""
    with tenant_scope(tenant_id=tenant_id):
        total = UsageRecord.objects.filter(
            tenant_id=tenant_id, created_at__gte=start, created_at__lt=end
        ).aggregate(total=Sum(F("prompt_tokens") + F("completion_tokens")))["total"]
    return int(total or 0)
