"""Documents' part in a tenant's life: when a tenant is deleted, its files go too
(the rows go with the tenant's by cascade)."""

from __future__ import annotations

import logging
from typing import Any

from django.db import transaction

from documents.storage import tenant_files_delete

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
