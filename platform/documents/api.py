"""/api/v1/documents: a member's documents. Upload (multipart, field `file`, optional
`title`), list, get, delete, and a page's text.

A member (session) or an API key with the `documents` scope acting as the member who
created it. Documents are private: another member's, or another tenant's, answer 404
like missing ones. The type is detected from the content; a refused file (413 over
the plan's upload size or the tenant's storage, 415 not a supported type, 400 unsafe
or unreadable) stores nothing. HTML is kept and read as text, never served as HTML.
"""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse
from ninja import Field, File, Form, Query, Router, Schema, Status
from ninja.files import UploadedFile

from documents.intake import ACCEPTED, Refused
from documents.models import ReviewTemplate
from documents.retrieval import passages_search
from documents.review import BUILT_IN
from documents.schemas import (
    DocumentOut,
    PageOut,
    PassageOut,
    ReviewTemplateIn,
    ReviewTemplateOut,
    ReviewTemplatePatch,
    SearchIn,
)
from documents.selectors import document_get, document_list, page_get, review_template_list
from documents.services import (
    document_delete,
    document_upload,
    documents_actor_check,
    review_template_create,
    review_template_delete,
    review_template_update,
    upload_size_check,
)
from tenants.access import Actor
from tenants.api.auth import actor_of

router = Router(tags=["documents"])
templates = Router(tags=["documents"])

_ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}
UPLOAD_ERRORS = {
    "400": {"description": "Unsafe or unreadable: the detail says why.", "content": _ERROR},
    "413": {
        "description": "Over the plan's upload size, or the tenant's document storage.",
        "content": _ERROR,
    },
    "415": {"description": f"Not a supported type: {ACCEPTED}.", "content": _ERROR},
}


def documents_actor(request: HttpRequest) -> Actor:
    actor = actor_of(request)
    documents_actor_check(actor)
    return actor


class ListQuery(Schema):
    limit: int = Field(50, ge=1, le=200, description="How many, newest first.")
    offset: int = Field(0, ge=0, le=2**31 - 1, description="How many to skip.")


@router.post(
    "",
    response={201: DocumentOut},
    url_name="documents",
    openapi_extra={"responses": UPLOAD_ERRORS},
)
def documents_upload(request: HttpRequest, file: File[UploadedFile], title: Form[str] = ""):
    """Upload a document (PDF, DOCX, HTML, Markdown or plain text), or a repository (a
    zip, tar or tar.gz archive: each text file a page, labelled with its path)."""
    actor = documents_actor(request)
    try:
        upload_size_check(actor=actor, size=file.size or 0)
        document = document_upload(
            actor=actor, data=file.read(), filename=file.name or "", title=title
        )
    except Refused as exc:
        return JsonResponse({"detail": exc.message}, status=exc.status)
    return Status(201, document)


@router.get("", response=list[DocumentOut], url_name="documents")
def documents_list(request: HttpRequest, query: Query[ListQuery]):
    """Your documents, newest first."""
    documents = document_list(actor=documents_actor(request))
    return list(documents[query.offset : query.offset + query.limit])


@router.post("/search", response=list[PassageOut], url_name="documents_search")
def documents_search(request: HttpRequest, payload: SearchIn):
    """The passages of your documents that best answer a query: full text and vectors,
    fused (`mode` picks one alone), best first, each with its place."""
    return passages_search(
        actor=documents_actor(request),
        query=payload.query,
        document_ids=payload.document_ids,
        limit=payload.limit,
        mode=payload.mode,  # type: ignore[arg-type]  # checked by passages_search
    )


@router.get("/{document_id}", response=DocumentOut, url_name="document")
def documents_get(request: HttpRequest, document_id: str):
    return document_get(actor=documents_actor(request), document_id=document_id)


@router.delete("/{document_id}", response={204: None}, url_name="document")
def documents_delete(request: HttpRequest, document_id: str):
    """Delete the document with its pages, chunks and file."""
    document_delete(actor=documents_actor(request), document_id=document_id)
    return Status(204, None)


@router.get("/{document_id}/pages/{number}", response=PageOut, url_name="document_page")
def documents_page(request: HttpRequest, document_id: str, number: str):
    """A page's text (pages from 1). Text, Markdown and HTML have one page, read at
    upload, and a repository a page for each text file (its path the page's label);
    PDF and DOCX pages have text once the document is parsed."""
    document = document_get(actor=documents_actor(request), document_id=document_id)
    page = page_get(document=document, number=number)
    return {
        "document_id": document.id,
        "number": page.number,
        "label": page.label,
        "text": page.text,
        "parsed": page.pk is not None,
    }


# --- /api/v1/review-templates -------------------------------------------------------------


def _template_out(template: ReviewTemplate) -> dict:
    return {
        "id": str(template.id),
        "built_in": False,
        "kind": template.kind,
        "name": template.name,
        "instructions": template.instructions,
        "questions": template.questions,
    }


@templates.get("", response=list[ReviewTemplateOut], url_name="review_templates")
def review_templates_list(request: HttpRequest):
    """The built-in templates, then your organization's (copies of them, edited)."""
    actor = documents_actor(request)
    built_in = [{"id": key, "built_in": True, **spec.as_dict()} for key, spec in BUILT_IN.items()]
    return built_in + [_template_out(t) for t in review_template_list(actor=actor)]


@templates.post("", response={201: ReviewTemplateOut}, url_name="review_templates")
def review_templates_create(request: HttpRequest, payload: ReviewTemplateIn):
    """Copy a built-in template under a name of your own (owners and admins)."""
    template = review_template_create(actor=documents_actor(request), **payload.dict())
    return Status(201, _template_out(template))


@templates.patch("/{template_id}", response=ReviewTemplateOut, url_name="review_template")
def review_templates_update(request: HttpRequest, template_id: str, payload: ReviewTemplatePatch):
    template = review_template_update(
        actor=documents_actor(request), template_id=template_id, **payload.dict()
    )
    return _template_out(template)


@templates.delete("/{template_id}", response={204: None}, url_name="review_template")
def review_templates_delete(request: HttpRequest, template_id: str):
    review_template_delete(actor=documents_actor(request), template_id=template_id)
    return Status(204, None)
