"""The usage ledger: one UsageRecord per LLM call, written in its tenant's scope.

The ledger is the source of truth for billing and for the monthly budget: the budget
counters of inference.limits are seeded from `usage_month_total` and kept current by
each commit. Rows are written by `limits.CallGuard.commit`, which also settles the
call's limits and reservation; nothing else needs to call `usage_record_create`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.db.models import F, Sum

from inference.models import UsageRecord
from tenants.rls import tenant_scope


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
    mid-stream: the tokens it produced count) or failed (nothing produced)."""
    if outcome not in UsageRecord.Outcome.values:
        raise ValueError(f"outcome must be one of {UsageRecord.Outcome.values}, not {outcome!r}")
    if prompt_tokens < 0 or completion_tokens < 0:
        raise ValueError("token counts cannot be negative")
    with tenant_scope(tenant_id=tenant_id):
        return UsageRecord.objects.create(
            tenant_id=tenant_id,
            user_id=user_id,
            api_key_id=api_key_id,
            model=model[:200],
            backend=backend[:500],
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            reserved_tokens=max(0, reserved_tokens),
            outcome=outcome,
            purpose=purpose[:32],
            reference=reference[:64],
        )


def usage_month_total(*, tenant_id: Any, start: datetime, end: datetime) -> int:
    """The tokens (prompt and completion) a tenant's calls used in [start, end)."""
    with tenant_scope(tenant_id=tenant_id):
        total = UsageRecord.objects.filter(
            tenant_id=tenant_id, created_at__gte=start, created_at__lt=end
        ).aggregate(total=Sum(F("prompt_tokens") + F("completion_tokens")))["total"]
    return int(total or 0)
