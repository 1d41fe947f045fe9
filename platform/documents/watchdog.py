"""The ingestion watchdog: a job whose worker was lost (killed, out of memory, a
machine gone) leaves its document in `parsing` or `embedding` with no progress
recorded; one no worker took leaves it `uploaded`. Such a document is queued again, and
the job resumes where it stopped (documents.ingest never redoes a stored batch), at most
PARLEY_DOCUMENT_INGEST_RESTARTS times; then it fails with the reason.

It also keeps `ready` documents' vectors current: a document whose vectors are from
another model than the configured one (`embedding_model`; empty for one ingested before
the embedding stage existed, whose chunks have none) is set `embedding` and queued: the
job embeds its chunks again and it is `ready` once more. REEMBED_PER_SWEEP at a time, so
a changed model does not flood the queue at once; one restarted so counts no restart.

Run by Celery beat with the run watchdog's interval (documents.tasks.documents_reap),
and by a thread of `serve` in the embedded mode.
"""

from __future__ import annotations

import functools
import logging
import uuid
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from config.celery import enqueue
from documents.embeddings import vectors_version
from documents.ingest import STAGE_EMBEDDINGS, document_fail, document_progress
from documents.models import Document
from tenants.rls import operator_scope, tenant_scope

log = logging.getLogger(__name__)

REEMBED_PER_SWEEP = 50
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
    counts = {"restarted": 0, "failed": 0, "moved_on": 0, "reembedding": 0}
    for document_id, tenant_id in found:
        counts[_reap(document_id, tenant_id, stalled=stalled, unqueued=unqueued)] += 1
    counts["reembedding"] = documents_reembed(limit=REEMBED_PER_SWEEP)
    return counts


def _stale(model: str) -> Q:
    """Ready, with vectors of another model, or none (an empty `embedding_model`)."""
    return Q(state=Document.State.READY) & ~Q(embedding_model=model)


def documents_reembed(*, limit: int) -> int:
    """Queue the embedding stage for up to `limit` ready documents whose vectors are not
    the configured model's. How many were queued."""
    from documents.tasks import document_ingest_task

    model = vectors_version()
    with operator_scope():
        found = list(
            Document.objects.filter(_stale(model))
            .order_by("updated_at")
            .values_list("id", "tenant_id")[:limit]
        )
    queued = 0
    for document_id, tenant_id in found:
        with tenant_scope(tenant_id=tenant_id), transaction.atomic():
            document = (
                Document.objects.select_for_update().filter(_stale(model), id=document_id).first()
            )
            if document is None:
                continue
            document_progress(
                document,
                state=Document.State.EMBEDDING,
                stage=STAGE_EMBEDDINGS,
                done=0,
                total=document.chunks.count(),
            )
            transaction.on_commit(
                functools.partial(enqueue, document_ingest_task, str(document.id), str(tenant_id))
            )
            queued += 1
    if queued:
        log.info("documents: %d ready documents queued to be embedded with %s", queued, model)
    return queued


def _stalled(stalled: datetime, unqueued: datetime) -> Q:
    """A job that recorded no progress since `stalled`, or no worker took since `unqueued`."""
    return Q(
        state__in=(Document.State.PARSING, Document.State.EMBEDDING), updated_at__lt=stalled
    ) | Q(state=Document.State.UPLOADED, updated_at__lt=unqueued)


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
