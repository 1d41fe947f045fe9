"""Documents' Celery tasks, each a few lines; on the `documents` queue
(CELERY_TASK_ROUTES). The tenant comes from the server that queued the job."""

from celery import shared_task

from documents.ingest import document_ingest


@shared_task(name="documents.tasks.document_ingest", acks_late=True)
def document_ingest_task(document_id: str, tenant_id: str) -> None:
    document_ingest(document_id=document_id, tenant_id=tenant_id)


@shared_task(name="documents.tasks.documents_reap", ignore_result=True)
def documents_reap_task() -> dict[str, int]:
    """The ingestion watchdog (Celery beat, every PARLEY_RUN_WATCHDOG_INTERVAL_S)."""
    from documents.watchdog import documents_reap

    return documents_reap()
