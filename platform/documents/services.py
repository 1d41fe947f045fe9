"""Writes of documents: upload (checked whole before anything is stored; once it
commits, the ingestion job is queued: documents.ingest) and delete (the row, its pages
and chunks, and its file)."""

from __future__ import annotations

import hashlib
import logging

from django.conf import settings
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction

from config.celery import enqueue
from documents.intake import Refused, intake_check
from documents.models import Document, Page
from documents.selectors import document_get, tenant_storage_used
from documents.storage import file_delete, file_name_for, file_save
from documents.tasks import document_ingest_task
from inference.tokens import CHARS_PER_TOKEN
from tenants.access import Actor, require_scope
from tenants.models import Tenant
from tenants.quotas import limits_for
from tenants.services.audit import audit_record

log = logging.getLogger(__name__)

TITLE_MAX_CHARS = Document._meta.get_field("title").max_length or 200
FILENAME_MAX_CHARS = Document._meta.get_field("filename").max_length or 255


def documents_actor_check(actor: Actor) -> None:
    """Documents belong to a person: keys need the `documents` scope and a creator."""
    require_scope(actor, "documents")
    if actor.user is None:
        raise PermissionDenied(
            "Documents belong to a person: this API key was created by no member. "
            "Use a key created by a member."
        )


def _size_text(size: int) -> str:
    return f"{size} bytes" if size < 2**20 else f"{size / 2**20:.1f} MiB ({size} bytes)"


def upload_size_check(*, actor: Actor, size: int) -> None:
    """The plan's `max_upload_bytes`, and the platform's PARLEY_DOCUMENT_MAX_BYTES
    (413), before the file is read."""
    limit = limits_for(actor.tenant).max_upload_bytes
    if limit is not None and size > limit:
        raise Refused(
            413,
            f"The file is {_size_text(size)}; your plan allows uploads of up to "
            f"{_size_text(limit)}.",
        )
    platform_limit = settings.PARLEY_DOCUMENT_MAX_BYTES
    if size > platform_limit:
        raise Refused(
            413,
            f"The file is {_size_text(size)}; documents may be up to {_size_text(platform_limit)}.",
        )


def document_upload(*, actor: Actor, data: bytes, filename: str = "", title: str = "") -> Document:
    """Check the file whole (size, type, safety), then store the row, its cheap pages
    and the file together; a refusal (`Refused`) stores nothing."""
    documents_actor_check(actor)
    title = title.strip()
    if len(title) > TITLE_MAX_CHARS:
        raise ValidationError(f"A title is at most {TITLE_MAX_CHARS} characters.")
    size = len(data)
    upload_size_check(actor=actor, size=size)
    intake = intake_check(data)
    filename = filename.replace("\\", "/").rsplit("/", 1)[-1][:FILENAME_MAX_CHARS]
    title = (title or filename or "Untitled")[:TITLE_MAX_CHARS]
    with transaction.atomic():
        # One upload at a time per tenant past this point: the quota holds.
        Tenant.objects.select_for_update().filter(id=actor.tenant_id).first()
        quota = settings.PARLEY_TENANT_STORAGE_BYTES
        used = tenant_storage_used(tenant_id=actor.tenant_id)
        if quota is not None and used + size > quota:
            raise Refused(
                413,
                f"Your organization's document storage is full: {_size_text(used)} of "
                f"{_size_text(quota)} used, and this file is {_size_text(size)}. "
                "Delete documents to make room.",
            )
        document = Document(
            tenant=actor.tenant,
            owner=actor.user,
            title=title,
            filename=filename,
            media_type=intake.media_type,
            size_bytes=size,
            sha256=hashlib.sha256(data).hexdigest(),
            page_count=intake.page_count,
            token_count=(
                sum(len(text) for text in intake.pages) // CHARS_PER_TOKEN if intake.pages else None
            ),
        )
        document.file_name = file_name_for(tenant_id=actor.tenant_id, document_id=document.id)
        document.save()
        Page.objects.bulk_create(
            Page(tenant=actor.tenant, document=document, number=number, text=text)
            for number, text in enumerate(intake.pages, start=1)
        )
        audit_record(
            actor=actor,
            action="document.uploaded",
            target=document,
            data={"media_type": document.media_type, "size_bytes": size},
        )
        # Last: a failure above stores no file, and a failure here rolls the rows back.
        file_save(name=document.file_name, data=data)
        document_id, tenant_id = str(document.id), str(actor.tenant_id)
        transaction.on_commit(lambda: enqueue(document_ingest_task, document_id, tenant_id))
    return document


def document_delete(*, actor: Actor, document_id: object) -> None:
    """Delete the document with its pages and chunks; its file once that is committed."""
    documents_actor_check(actor)
    document = document_get(actor=actor, document_id=document_id)
    name = document.file_name
    audit_record(actor=actor, action="document.deleted", target=document)
    document.delete()
    transaction.on_commit(lambda: _file_delete_quietly(name))


def _file_delete_quietly(name: str) -> None:
    try:
        file_delete(name)
    except Exception:  # the row is gone; a file left over is logged, not an error
        log.exception("documents: could not delete the file %s", name)
