"""Ingestion: a document's file becomes its pages, chunks and the chunks' vectors, on a
worker (`documents.tasks`, the `documents` queue), queued when the upload commits.

`document_ingest` sets the document `parsing`, reads the file from the `documents`
storage page by page and stores the pages (`pages` stage), then cuts the stored pages'
text into chunks (`chunks_of`, PARLEY_DOCUMENT_CHUNK_TOKENS with
PARLEY_DOCUMENT_CHUNK_OVERLAP_TOKENS of overlap) and stores them (`chunks` stage), and
records the document's `page_count` and `token_count`. Then the document is `embedding`
(`embeddings` stage): the chunks with no vector yet are embedded
(`documents.embeddings.texts_embed`) and their vectors stored, and the document records
the model they are from (`embedding_model`); then it is `ready`.

Pages, chunks and vectors are stored PARLEY_DOCUMENT_INGEST_BATCH at a time, each batch
in its own transaction (a batch is embedded before its transaction opens: no lock is
held while the model works), and after each the owner's sockets get a
`document.updated` frame (`documents.notify`). A worker killed mid-job leaves whole
batches: the job run again (a redelivered message, or the watchdog) skips the pages and
chunks already stored and embeds only the chunks still without a vector, and the unique
constraints on (document, number) and (document, index) keep a second writer from
duplicating any. A document found `embedding` has its pages and chunks: the job goes
straight to the `embeddings` stage (a resumed job, or `ready` vectors of another model
that the watchdog has embedded again). Running it on a `ready` or `failed` document
changes nothing.

A file that cannot be read (`ParseError`) ends `failed` with the reason; an embedding
backend that fails (`EmbeddingError`) ends `failed` with its reason; any other error ends
`failed` with a generic reason, and the traceback is logged.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from itertools import islice
from typing import Any, TypeVar

from django.conf import settings
from django.db import transaction

from documents.archives import is_archive
from documents.chunking import PAGE_BREAK, chunks_of, chunks_of_each_page, estimated_tokens
from documents.embeddings import (
    EmbeddingError,
    chunk_for_embedding,
    texts_embed,
    vectors_version,
)
from documents.models import Chunk, Document, Page
from documents.notify import document_updated_send
from documents.parsing import ParseError, iter_labelled_pages
from documents.storage import file_read
from tenants.rls import tenant_scope

log = logging.getLogger(__name__)

STAGE_PAGES = "pages"
STAGE_CHUNKS = "chunks"
STAGE_EMBEDDINGS = "embeddings"
FAILED_GENERIC = "The document could not be processed. Try uploading it again."
FAILED_EMBEDDING = "The document could not be indexed for search ({reason}). Try again later."

T = TypeVar("T")


@contextmanager
def _transaction(tenant_id: Any) -> Iterator[None]:
    """A transaction under the tenant's scope (tenant_scope opens none where row level
    security is not enforced, as on SQLite)."""
    with tenant_scope(tenant_id=tenant_id), transaction.atomic():
        yield


def _batches(items: Iterable[T], size: int) -> Iterator[list[T]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def document_progress(
    document: Document, *, state: str | None = None, stage: str, done: int, total: int | None
) -> None:
    """Record how far the job is and tell the owner (in the caller's transaction)."""
    if state is not None:
        document.state = state
    document.stage = stage
    document.progress_done = done
    document.progress_total = total
    document.save(update_fields=["state", "stage", "progress_done", "progress_total", "updated_at"])
    document_updated_send(document)


def _document(document_id: Any) -> Document | None:
    return Document.objects.select_for_update().filter(id=document_id).first()


def document_ingest(*, document_id: Any, tenant_id: Any) -> None:
    """Ingest the document (see the module's docstring); a document that is gone (deleted
    before its job ran) is skipped."""
    with _transaction(tenant_id):
        document = _document(document_id)
        if document is None or document.state in (Document.State.READY, Document.State.FAILED):
            return
        # Its pages and chunks are all stored once a document is `embedding`.
        parsed = document.state == Document.State.EMBEDDING
        if not parsed:
            document_progress(
                document,
                state=Document.State.PARSING,
                stage=STAGE_PAGES,
                done=document.pages.count(),
                total=document.page_count,
            )
    try:
        if not parsed:
            pages_store(document_id=document_id, tenant_id=tenant_id)
            chunks_store(document_id=document_id, tenant_id=tenant_id)
        chunk_count = embeddings_store(document_id=document_id, tenant_id=tenant_id)
    except ParseError as exc:
        document_fail(document_id=document_id, tenant_id=tenant_id, reason=exc.message)
    except EmbeddingError as exc:
        log.warning("documents: embedding document %s failed: %s", document_id, exc)
        reason = FAILED_EMBEDDING.format(reason=exc.reason)
        document_fail(document_id=document_id, tenant_id=tenant_id, reason=reason)
    except Exception:
        log.exception("documents: ingesting document %s failed", document_id)
        document_fail(document_id=document_id, tenant_id=tenant_id, reason=FAILED_GENERIC)
    else:
        with _transaction(tenant_id):
            document = _document(document_id)
            if document is not None:
                document_progress(
                    document,
                    state=Document.State.READY,
                    stage="",
                    done=chunk_count,
                    total=chunk_count,
                )


def document_fail(*, document_id: Any, tenant_id: Any, reason: str) -> None:
    with _transaction(tenant_id):
        document = _document(document_id)
        if document is None:
            return
        document.error_message = reason
        document.save(update_fields=["error_message"])
        document_progress(
            document,
            state=Document.State.FAILED,
            stage="",
            done=document.progress_done,
            total=document.progress_total,
        )


def pages_store(*, document_id: Any, tenant_id: Any) -> None:
    """Parse the file and store its pages, skipping those already stored; then the
    document's `page_count`. Raises `ParseError` for a file that cannot be read."""
    with _transaction(tenant_id):
        document = Document.objects.get(id=document_id)
        stored = set(document.pages.values_list("number", flat=True))
    data = file_read(document.file_name)
    count = 0
    for batch in _batches(
        enumerate(iter_labelled_pages(data, document.media_type), start=1),
        settings.PARLEY_DOCUMENT_INGEST_BATCH,
    ):
        count = batch[-1][0]
        new = [(number, page) for number, page in batch if number not in stored]
        if not new:
            continue
        with _transaction(tenant_id):
            Page.objects.bulk_create(
                [
                    Page(
                        tenant_id=tenant_id,
                        document_id=document_id,
                        number=number,
                        label=label,
                        text=text,
                    )
                    for number, (label, text) in new
                ],
                ignore_conflicts=True,
            )
            locked = _document(document_id)
            if locked is not None:
                document_progress(locked, stage=STAGE_PAGES, done=count, total=locked.page_count)
    with _transaction(tenant_id):
        Document.objects.filter(id=document_id).update(page_count=count)


def chunks_store(*, document_id: Any, tenant_id: Any) -> int:
    """Cut the stored pages into chunks and store those not stored yet; then the
    document's `token_count`. The number of chunks."""
    with _transaction(tenant_id):
        document = Document.objects.get(id=document_id)
        pages = list(document.pages.order_by("number").values_list("text", flat=True))
        stored = set(document.chunks.values_list("index", flat=True))
    # A repository's chunks stay within a file: a passage is never the end of one file
    # and the start of the next.
    cut = chunks_of_each_page if is_archive(document.media_type) else chunks_of
    spans = cut(
        pages,
        target_tokens=settings.PARLEY_DOCUMENT_CHUNK_TOKENS,
        overlap_tokens=settings.PARLEY_DOCUMENT_CHUNK_OVERLAP_TOKENS,
    )
    total = len(spans)
    for batch in _batches(enumerate(spans), settings.PARLEY_DOCUMENT_INGEST_BATCH):
        done = batch[-1][0] + 1
        new = [(index, span) for index, span in batch if index not in stored]
        if not new:
            continue
        with _transaction(tenant_id):
            Chunk.objects.bulk_create(
                [
                    Chunk(
                        tenant_id=tenant_id,
                        document_id=document_id,
                        index=index,
                        text=span.text,
                        page_start=span.page_start,
                        page_end=span.page_end,
                        char_start=span.char_start,
                        char_end=span.char_end,
                        token_count=span.token_count,
                    )
                    for index, span in new
                ],
                ignore_conflicts=True,
            )
            locked = _document(document_id)
            if locked is not None:
                document_progress(locked, stage=STAGE_CHUNKS, done=done, total=total)
    with _transaction(tenant_id):
        Document.objects.filter(id=document_id).update(
            token_count=estimated_tokens(PAGE_BREAK.join(pages))
        )
    return total


def embeddings_store(*, document_id: Any, tenant_id: Any) -> int:
    """Set the document `embedding`, embed its chunks that have no vector yet and store
    their vectors, a batch at a time; vectors of another model than the configured one
    are dropped first (they cannot be compared with its queries). The number of chunks."""
    model = vectors_version()
    with _transaction(tenant_id):
        document = _document(document_id)
        if document is None:
            return 0
        title = document.title
        if document.embedding_model != model:
            document.chunks.exclude(embedding=None).update(embedding=None)
            document.embedding_model = model
            document.save(update_fields=["embedding_model"])
        pending = list(
            document.chunks.filter(embedding=None).order_by("index").values_list("id", "text")
        )
        total = document.chunks.count()
        done = total - len(pending)
        document_progress(
            document, state=Document.State.EMBEDDING, stage=STAGE_EMBEDDINGS, done=done, total=total
        )
    for batch in _batches(pending, settings.PARLEY_DOCUMENT_INGEST_BATCH):
        vectors = texts_embed([chunk_for_embedding(title=title, text=text) for _, text in batch])
        with _transaction(tenant_id):
            Chunk.objects.bulk_update(
                [
                    Chunk(id=chunk_id, embedding=vector.tolist())
                    for (chunk_id, _), vector in zip(batch, vectors, strict=True)
                ],
                ["embedding"],
            )
            done += len(batch)
            locked = _document(document_id)
            if locked is not None:
                document_progress(locked, stage=STAGE_EMBEDDINGS, done=done, total=total)
    return total
