"""Reads of documents, always scoped by the acting tenant and member: another
member's or another tenant's document raises `NotFound`, like a missing one."""

from __future__ import annotations

import re
from typing import Any

from django.db.models import QuerySet, Sum

from documents.models import Document, Page, ReviewStep, ReviewTemplate
from tenants.access import Actor, NotFound, id_parse


def document_list(*, actor: Actor) -> QuerySet[Document]:
    """The actor's documents, newest first."""
    return Document.objects.filter(tenant=actor.tenant, owner=actor.user)


def document_get(*, actor: Actor, document_id: Any) -> Document:
    try:
        return document_list(actor=actor).get(id=id_parse(document_id))
    except Document.DoesNotExist:
        raise NotFound from None


def page_get(*, document: Document, number: Any) -> Page:
    """Page `number` (from 1) of a document the caller already holds; a page the
    document has not got, or a number that is none, is `NotFound`. A page within the
    page count that is not parsed yet has no text."""
    if not re.fullmatch(r"[0-9]{1,9}", str(number)):
        raise NotFound
    wanted = int(str(number))
    page = document.pages.filter(number=wanted).first()
    if page is not None:
        return page
    if 1 <= wanted <= (document.page_count or 0):
        return Page(tenant_id=document.tenant_id, document=document, number=wanted, text="")
    raise NotFound


def tenant_storage_used(*, tenant_id: Any) -> int:
    """Bytes of the tenant's stored files."""
    used = Document.objects.filter(tenant_id=tenant_id).aggregate(total=Sum("size_bytes"))
    return int(used["total"] or 0)


def review_template_list(*, actor: Actor) -> QuerySet[ReviewTemplate]:
    """The tenant's review templates (every member may use them)."""
    return ReviewTemplate.objects.filter(tenant=actor.tenant)


def review_template_get(*, actor: Actor, template_id: Any) -> ReviewTemplate:
    try:
        return review_template_list(actor=actor).get(id=id_parse(template_id))
    except ReviewTemplate.DoesNotExist:
        raise NotFound from None


def review_step_output(
    *, tenant_id: Any, document_sha256: str, task: str, model: str, step: str
) -> dict | None:
    """A review step the tenant kept (documents.review), or None. The same file in
    another tenant is another tenant's work: never reused across tenants."""
    kept = ReviewStep.objects.filter(
        tenant_id=tenant_id, document_sha256=document_sha256, task=task, model=model, step=step
    ).first()
    return kept.output if kept is not None else None
