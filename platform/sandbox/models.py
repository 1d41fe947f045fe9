"""What sandboxed runs keep: a conversation's workspace and the files runs produced.

Both live as files in the `sandbox` storage (sandbox.storage), under the tenant's id;
the rows say whose they are and how large. A conversation is named by its id only:
chat sits above this app (chat calls sandbox.services.conversation_files_delete when a
conversation goes), so there is no foreign key to it.
"""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models
from django.utils import timezone

from tenants.models import Tenant


class Workspace(models.Model):
    """A conversation's files between sandboxed runs, kept as one tar archive; deleted
    once no run used it for PARLEY_SANDBOX_WORKSPACE_TTL_S (sandbox.services)."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    conversation_id = models.UUIDField()
    size_bytes = models.PositiveBigIntegerField(default=0)
    # The archive's name in the `sandbox` storage: a new name at each save, so a save
    # rolled back leaves the archive before it whole.
    file_name = models.CharField(max_length=255)
    last_used_at = models.DateTimeField(default=timezone.now)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "conversation_id"], name="workspace_conversation_unique"
            )
        ]
        indexes = [models.Index(fields=["last_used_at"])]

    def __str__(self) -> str:
        return f"workspace of {self.conversation_id}"


class Artifact(models.Model):
    """A file a run produced (a figure, a CSV), shown with the answer and downloadable
    by the conversation's owner."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    conversation_id = models.UUIDField()
    run_id = models.UUIDField(null=True, blank=True)
    # Its path relative to the workspace ("plot.png", "out/table.csv"): shown, and the
    # download's file name; never a path on any machine.
    name = models.CharField(max_length=255)
    # Detected from the content (sandbox.media), never from the name alone.
    media_type = models.CharField(max_length=100)
    size_bytes = models.PositiveBigIntegerField()
    sha256 = models.CharField(max_length=64)
    file_name = models.CharField(max_length=255)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at", "name"]
        indexes = [models.Index(fields=["tenant", "owner", "conversation_id", "created_at"])]

    def __str__(self) -> str:
        return self.name
