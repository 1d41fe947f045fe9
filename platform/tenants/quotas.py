"""A tenant's limits, from its plan. The inference pool enforces them through
`limits_for`; uploads check `max_upload_bytes`; invitations check `max_members`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from tenants.models import Plan, Tenant


@dataclass(frozen=True)
class Limits:
    """None means unlimited."""

    plan: str = ""
    max_members: int | None = None
    monthly_token_budget: int | None = None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    concurrent_runs: int | None = None
    max_upload_bytes: int | None = None
    enabled_models: tuple[str, ...] = field(default_factory=tuple)  # empty: every model
    fairness_weight: float = 1.0

    def as_dict(self) -> dict[str, object]:
        """JSON-ready: the API and the tenant export show limits this way."""
        return {**asdict(self), "enabled_models": list(self.enabled_models)}

    def allows_model(self, model: str) -> bool:
        return not self.enabled_models or model in self.enabled_models


def limits_for(tenant: Tenant) -> Limits:
    """The one function through which the platform reads a tenant's limits."""
    plan: Plan | None = tenant.plan
    if plan is None:
        return Limits()
    return Limits(
        plan=plan.name,
        max_members=plan.max_members,
        monthly_token_budget=plan.monthly_token_budget,
        requests_per_minute=plan.requests_per_minute,
        tokens_per_minute=plan.tokens_per_minute,
        concurrent_runs=plan.concurrent_runs,
        max_upload_bytes=plan.max_upload_bytes,
        enabled_models=tuple(plan.enabled_models or ()),
        fairness_weight=plan.fairness_weight,
    )
