"""What a tenant made of each plugin: enabled or not, the scopes granted to its tools,
and its settings (secrets sealed with `tenants.crypto`, agents.manifest.settings_seal).

A plugin is named, not referenced: plugins live in code (entry points), so a row may
outlive its plugin's installation; it then simply has no effect until it returns."""

from __future__ import annotations

import uuid

from django.conf import settings as django_settings
from django.db import models

from tenants.models import Tenant


class TenantPlugin(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    plugin = models.CharField(max_length=63)
    enabled = models.BooleanField(default=False)
    granted_scopes = models.JSONField(default=list, blank=True)
    # Sealed: secret values are "fernet:..." ciphertexts, never the clear text.
    settings = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    updated_by = models.ForeignKey(
        django_settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )

    class Meta:
        ordering = ["plugin"]
        constraints = [
            models.UniqueConstraint(fields=["tenant", "plugin"], name="tenant_plugin_unique")
        ]

    def __str__(self) -> str:
        return self.plugin
