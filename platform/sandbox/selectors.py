"""Reads of artifacts, always scoped by the acting tenant and member: artifacts are
their conversation's, and conversations are private, so another member's or another
tenant's artifact raises `NotFound`, like a missing one."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet, Sum

from sandbox.models import Artifact, Workspace
from tenants.access import Actor, NotFound, id_parse


def artifact_list(*, actor: Actor, conversation_id: Any) -> QuerySet[Artifact]:
    """The actor's artifacts of one conversation, oldest first. A conversation that is
    not theirs (or no conversation) has none."""
    try:
        conversation = id_parse(conversation_id)
    except NotFound:
        return Artifact.objects.none()
    return Artifact.objects.filter(
        tenant=actor.tenant, owner=actor.user, conversation_id=conversation
    )


def artifact_get(*, actor: Actor, artifact_id: Any) -> Artifact:
    try:
        return Artifact.objects.get(tenant=actor.tenant, owner=actor.user, id=id_parse(artifact_id))
    except Artifact.DoesNotExist:
        raise NotFound from None


def tenant_sandbox_used(*, tenant_id: Any, except_workspace_of: Any = None) -> int:
    """Bytes of the tenant's workspaces and artifacts, leaving out the workspace of
    conversation `except_workspace_of` (the one a save replaces)."""
    workspaces = Workspace.objects.filter(tenant_id=tenant_id)
    if except_workspace_of is not None:
        workspaces = workspaces.exclude(conversation_id=except_workspace_of)
    artifacts = Artifact.objects.filter(tenant_id=tenant_id)
    total = workspaces.aggregate(total=Sum("size_bytes"))["total"] or 0
    total += artifacts.aggregate(total=Sum("size_bytes"))["total"] or 0
    return int(total)
