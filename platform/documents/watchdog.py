"""The ingestion watchdog: a job whose worker was lost (killed, out of memory, a
machine gone) leaves its document in `parsing` with no progress recorded; one no worker
took leaves it `uploaded`. Such a document is queued again, and the job resumes where
it stopped (documents.ingest never redoes a stored batch), at most
PARLEY_DOCUMENT_INGEST_RESTARTS times; then it fails with the reason.

Run by Celery beat with the run watchdog's interval (documents.tasks.documents_reap),
and by a thread of `serve` in the embedded mode.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from config.celery import enqueue
from documents.ingest import document_fail
from documents.models import Document
from tenants.rls import operator_scope, tenant_scope

log = logging.getLogger(__name__)

RESTARTS_SPENT = (
    "Reading the document stopped {times} times without finishing (its worker was "
    "lost); upload it again, or ask an operator to look at the worker logs."
)


def documents_reap(*, now: datetime | None = None) -> dict[str, int]:
    """Queue again the ingestions that stalled, fail those that used their restarts.
    Returns how many of each."""
    now = now or timezone.now()
    stalled = now - timedelta(seconds=settings.PARLEY_DOCUMENT_STALL_S)
    unqueued = now - timedelta(seconds=settings.PARLEY_RUN_QUEUE_TIMEOUT_S)
    with operator_scope():
        found = list(
            Document.objects.filter(_stalled(stalled, unqueued)).values_list("id", "tenant_id")
        )
    counts = {"restarted": 0, "failed": 0, "moved_on": 0}
    for document_id, tenant_id in found:
        counts[_reap(document_id, tenant_id, stalled=stalled, unqueued=unqueued)] += 1
    return counts


def _stalled(stalled: datetime, unqueued: datetime) -> Q:
    """A job that recorded no progress since `stalled`, or no worker took since `unqueued`."""
    return Q(state=Document.State.PARSING, updated_at__lt=stalled) | Q(
        state=Document.State.UPLOADED, updated_at__lt=unqueued
    )


def _reap(
    document_id: uuid.UUID, tenant_id: uuid.UUID, *, stalled: datetime, unqueued: datetime
) -> str:
    from documents.tasks import document_ingest_task

    with tenant_scope(tenant_id=tenant_id), transaction.atomic():
        # (Looked at again under the lock: the job may have moved on meanwhile.)
        document = (
            Document.objects.select_for_update()
            .filter(_stalled(stalled, unqueued), id=document_id)
            .first()
        )
        if document is None:
            return "moved_on"
        restarts = document.ingest_restarts
        spent = restarts >= settings.PARLEY_DOCUMENT_INGEST_RESTARTS
        if not spent:
            document.ingest_restarts += 1
            document.save(update_fields=["ingest_restarts", "updated_at"])
            ids = (str(document.id), str(tenant_id))
            transaction.on_commit(lambda: enqueue(document_ingest_task, *ids))
    if spent:
        reason = RESTARTS_SPENT.format(times=restarts + 1)
        document_fail(document_id=document_id, tenant_id=tenant_id, reason=reason)
        log.warning("documents: ingestion of %s failed after %d restarts", document_id, restarts)
        return "failed"
    log.warning("documents: ingestion of %s stalled; queued again", document_id)
    return "restarted"
