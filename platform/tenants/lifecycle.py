"""What the rest of the platform hears about a tenant's life, without `tenants`
importing anything above it: signals for suspension and deletion, and a registry of
the sections a tenant export gathers from other apps (chat adds conversations)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from django.db import transaction
from django.dispatch import Signal

from tenants.models import Tenant

# sender=Tenant, tenant=..., reason=...: inside the suspending transaction.
tenant_suspended = Signal()
# sender=Tenant, tenant_id=...: inside the deleting transaction, after the tenant's rows
# are gone. For what lives outside the database (document files): remove it on commit.
tenant_deleted = Signal()

ExportSection = Callable[[Tenant], Any]
_export_sections: dict[str, ExportSection] = {}


def register_export_section(name: str, section: ExportSection) -> None:
    """`section(tenant)` returns JSON-ready data; it runs inside the tenant's scope."""
    _export_sections[name] = section


def export_sections() -> dict[str, ExportSection]:
    return dict(_export_sections)


def tenant_files_delete_on_commit(
    *, app: str, tenant_id: Any, files_delete: Callable[[Any], int]
) -> None:
    """For an app's receiver of `tenant_deleted`: delete the tenant's files with
    `files_delete(tenant_id)` once the deletion is committed (a deletion rolled back
    keeps them); a failure is logged, never raised into the deletion."""
    log = logging.getLogger(f"{app}.lifecycle")

    def delete() -> None:
        try:
            count = files_delete(tenant_id)
        except Exception:
            log.exception("%s: could not delete the files of tenant %s", app, tenant_id)
            return
        log.info("%s: deleted %d files of tenant %s", app, count, tenant_id)

    transaction.on_commit(delete)
