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
from documents.models import Document, Page, ReviewTemplate
from documents.selectors import document_get, review_template_get, tenant_storage_used
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
        labels = intake.labels or [""] * len(intake.pages)
        Page.objects.bulk_create(
            Page(tenant=actor.tenant, document=document, number=number, label=label, text=text)
            for number, (label, text) in enumerate(zip(labels, intake.pages, strict=True), start=1)
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


# --- review templates -------------------------------------------------------------------


def _templates_admin_check(actor: Actor) -> None:
    documents_actor_check(actor)
    if not actor.is_admin:
        raise PermissionDenied("Only the organization's owners and admins manage review templates.")


def _template_fields(*, kind: str, name: str, instructions: str, questions: list[str]) -> dict:
    from documents.review import spec_check

    name, questions = name.strip(), [q.strip() for q in questions if q.strip()]
    try:
        spec_check(kind=kind, name=name, instructions=instructions, questions=questions)
    except ValueError as exc:
        raise ValidationError(str(exc)) from None
    return {"kind": kind, "name": name[:100], "instructions": instructions, "questions": questions}


def review_template_create(
    *,
    actor: Actor,
    kind: str,
    name: str,
    instructions: str = "",
    questions: list[str] | None = None,
) -> ReviewTemplate:
    """A tenant template: a copy of the built-in one of `kind`, with the instructions
    and questions given (the built-in's when left out)."""
    from documents.review import BUILT_IN

    _templates_admin_check(actor)
    if kind not in BUILT_IN:
        raise ValidationError(f"kind must be one of {', '.join(BUILT_IN)}.")
    fields = _template_fields(
        kind=kind,
        name=name,
        instructions=instructions or BUILT_IN[kind].instructions,
        questions=list(questions or ()),
    )
    if ReviewTemplate.objects.filter(tenant=actor.tenant, name=fields["name"]).exists():
        raise ValidationError(f"A template named “{fields['name']}” exists already.")
    template = ReviewTemplate.objects.create(tenant=actor.tenant, created_by=actor.user, **fields)
    audit_record(actor=actor, action="review_template.created", target=template)
    return template


def review_template_update(
    *,
    actor: Actor,
    template_id: object,
    name: str | None = None,
    instructions: str | None = None,
    questions: list[str] | None = None,
) -> ReviewTemplate:
    _templates_admin_check(actor)
    template = review_template_get(actor=actor, template_id=template_id)
    fields = _template_fields(
        kind=template.kind,
        name=template.name if name is None else name,
        instructions=template.instructions if instructions is None else instructions,
        questions=template.questions if questions is None else questions,
    )
    clash = ReviewTemplate.objects.filter(tenant=actor.tenant, name=fields["name"]).exclude(
        id=template.id
    )
    if clash.exists():
        raise ValidationError(f"A template named “{fields['name']}” exists already.")
    for key, value in fields.items():
        setattr(template, key, value)
    template.save()
    audit_record(actor=actor, action="review_template.updated", target=template)
    return template


def review_template_delete(*, actor: Actor, template_id: object) -> None:
    _templates_admin_check(actor)
    template = review_template_get(actor=actor, template_id=template_id)
    audit_record(actor=actor, action="review_template.deleted", target=template)
    template.delete()
