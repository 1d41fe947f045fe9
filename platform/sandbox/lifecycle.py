"""The sandbox's part in a tenant's life: when a tenant is deleted, its workspace and
artifact files go too (the rows go with the tenant's by cascade); the tenant export
lists its artifacts."""

from __future__ import annotations

from typing import Any

from sandbox.models import Artifact
from sandbox.storage import tenant_files_delete
from tenants.lifecycle import tenant_files_delete_on_commit
from tenants.models import Tenant


def files_delete_for_tenant(*, tenant_id: Any, **kwargs: Any) -> None:
    """Receiver of `tenants.lifecycle.tenant_deleted`: delete the tenant's files once
    the deletion is committed (a deletion rolled back keeps them)."""

    tenant_files_delete_on_commit(
        app="sandbox", tenant_id=tenant_id, files_delete=tenant_files_delete
    )


def artifacts_export(tenant: Tenant) -> list[dict[str, Any]]:
    """Each artifact's metadata (not its bytes: the archive stays small)."""
    return [
        {
            "id": str(a.id),
            "owner_id": str(a.owner_id),
            "conversation_id": str(a.conversation_id),
            "run_id": str(a.run_id) if a.run_id else None,
            "name": a.name,
            "media_type": a.media_type,
            "size_bytes": a.size_bytes,
            "sha256": a.sha256,
            "created_at": a.created_at.isoformat(),
        }
        for a in Artifact.objects.filter(tenant=tenant).order_by("created_at")
    ]
