"""The pool's rows: its backends, and the ledger of what each call used."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models

from tenants.models import ApiKey, Tenant


class Backend(models.Model):
    """One vLLM (OpenAI-compatible) server. Rows come from PARLEY_BACKENDS at start-up
    and from operators; health and models are discovered, state can be set by hand."""

    class State(models.TextChoices):
        HEALTHY = "healthy"
        DEGRADED = "degraded"  # answering, but slowly or with errors: used less
        DOWN = "down"  # failing health checks: not used
        DRAINING = "draining"  # set by an operator: no new calls, running ones finish

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=100, blank=True)
    base_url = models.URLField(max_length=500, unique=True)
    weight = models.FloatField(default=1.0)
    state = models.CharField(max_length=16, choices=State.choices, default=State.HEALTHY)
    # True when an operator set the state (draining, down): health checks leave it.
    state_pinned = models.BooleanField(default=False)
    # Rows from PARLEY_BACKENDS follow the configuration (removed when dropped from it);
    # rows an operator added stay until removed.
    from_config = models.BooleanField(default=False)
    served_models = models.JSONField(default=list, blank=True)  # model ids
    max_model_len = models.PositiveIntegerField(null=True, blank=True)
    last_checked_at = models.DateTimeField(null=True, blank=True)
    last_error = models.CharField(max_length=500, blank=True)
    consecutive_failures = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["base_url"]

    def __str__(self) -> str:
        return self.name or self.base_url


class UsageRecord(models.Model):
    """One LLM call's usage, committed after the call (a partial stream counts what it
    produced). The source of truth for budgets and billing."""

    class Outcome(models.TextChoices):
        COMPLETED = "completed"
        PARTIAL = "partial"  # failed or cancelled mid-stream
        FAILED = "failed"  # nothing produced

    id = models.BigAutoField(primary_key=True)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    api_key = models.ForeignKey(
        ApiKey, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    # What the call served (a chat run, an agent step...), by id: the pool knows no chat.
    purpose = models.CharField(max_length=32, blank=True)
    reference = models.CharField(max_length=64, blank=True)
    model = models.CharField(max_length=200)
    backend = models.CharField(max_length=500, blank=True)
    # Each at most inference.types.MAX_TOKEN_COUNT (the ledger clamps); 64 bits so that
    # a row's total and any sum over rows computed in SQL cannot overflow.
    prompt_tokens = models.PositiveBigIntegerField(default=0)
    completion_tokens = models.PositiveBigIntegerField(default=0)
    reserved_tokens = models.PositiveBigIntegerField(default=0)
    outcome = models.CharField(max_length=16, choices=Outcome.choices)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["tenant", "created_at"])]

    def __str__(self) -> str:
        return f"{self.tenant_id} {self.model} {self.prompt_tokens}+{self.completion_tokens}"

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens
