"""Documents' part in a tenant's life: when a tenant is deleted, its files go too
(the rows go with the tenant's by cascade); the tenant export lists its documents."""

from __future__ import annotations

from typing import Any

from documents.models import Document
from documents.storage import tenant_files_delete
from tenants.lifecycle import tenant_files_delete_on_commit
from tenants.models import Tenant


def files_delete_for_tenant(*, tenant_id: Any, **kwargs: Any) -> None:
    """Receiver of `tenants.lifecycle.tenant_deleted`: delete the tenant's files once
    the deletion is committed (a deletion rolled back keeps them)."""

    tenant_files_delete_on_commit(
        app="documents", tenant_id=tenant_id, files_delete=tenant_files_delete
    )


def documents_export(tenant: Tenant) -> list[dict[str, Any]]:
    """Each document's metadata (not its file, nor its text: the archive stays small)."""
    return [
        {
            "id": str(d.id),
            "owner_id": str(d.owner_id),
            "title": d.title,
            "filename": d.filename,
            "media_type": d.media_type,
            "size_bytes": d.size_bytes,
            "sha256": d.sha256,
            "page_count": d.page_count,
            "state": d.state,
            "created_at": d.created_at.isoformat(),
        }
        for d in Document.objects.filter(tenant=tenant).order_by("created_at")
    ]
