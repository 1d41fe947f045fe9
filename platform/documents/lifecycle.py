"""Documents' part in a tenant's life: when a tenant is deleted, its files go too
(the rows go with the tenant's by cascade); the tenant export lists its documents."""

from __future__ import annotations

import logging
from typing import Any

from django.db import transaction

from documents.models import Document
from documents.storage import tenant_files_delete
from tenants.models import Tenant

log = logging.getLogger(__name__)


def files_delete_for_tenant(*, tenant_id: Any, **kwargs: Any) -> None:
    """Receiver of `tenants.lifecycle.tenant_deleted`: delete the tenant's files once
    the deletion is committed (a deletion rolled back keeps them)."""

    def delete() -> None:
        try:
            count = tenant_files_delete(tenant_id)
        except Exception:
            log.exception("documents: could not delete the files of tenant %s", tenant_id)
            return
        log.info("documents: deleted %d files of tenant %s", count, tenant_id)

    transaction.on_commit(delete)


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
