"""The sandbox's part in a tenant's life: when a tenant is deleted, its workspace and
artifact files go too (the rows go with the tenant's by cascade); the tenant export
lists its artifacts."""

from __future__ import annotations

import logging
from typing import Any

from django.db import transaction

from sandbox.models import Artifact
from sandbox.storage import tenant_files_delete
from tenants.models import Tenant

log = logging.getLogger(__name__)


def files_delete_for_tenant(*, tenant_id: Any, **kwargs: Any) -> None:
    """Receiver of `tenants.lifecycle.tenant_deleted`: delete the tenant's files once
    the deletion is committed (a deletion rolled back keeps them)."""

    def delete() -> None:
        try:
            count = tenant_files_delete(tenant_id)
        except Exception:
            log.exception("sandbox: could not delete the files of tenant %s", tenant_id)
            return
        log.info("sandbox: deleted %d files of tenant %s", count, tenant_id)

    transaction.on_commit(delete)


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
