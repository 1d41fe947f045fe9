"""Output schemas of the documents HTTP API (documents.api)."""

from __future__ import annotations

import uuid
from datetime import datetime

from ninja import Field, Schema


class DocumentOut(Schema):
    id: uuid.UUID
    title: str
    filename: str = Field(description="The name it was uploaded under (not used for its type).")
    media_type: str = Field(description="Detected from the content.")
    size_bytes: int
    sha256: str
    page_count: int | None = Field(description="Null until known (DOCX: once parsed).")
    token_count: int | None = Field(description="Estimated; null until the text is read.")
    state: str = Field(description="uploaded, parsing, embedding, ready or failed.")
    error_message: str = Field(description="Why it failed (state `failed`), else empty.")
    stage: str = Field(
        description="What the ingestion job is doing: `pages`, `chunks` or `embeddings`; "
        "empty when idle."
    )
    progress_done: int = Field(description="Pages or chunks of the stage done so far.")
    embedding_model: str = Field(
        description="The model (and form) its chunks' vectors are from; empty before any."
    )
    progress_total: int | None = Field(
        description="Pages or chunks of the stage in all; null while not known."
    )
    created_at: datetime
    updated_at: datetime


class PageOut(Schema):
    document_id: uuid.UUID
    number: int = Field(description="From 1.")
    label: str = Field(
        description="The page's name where pages have one: a repository's file path; else empty."
    )
    text: str = Field(description="Plain text; empty until the document is parsed.")
    parsed: bool = Field(description="False while the page's text is not read yet.")


class ReviewTemplateOut(Schema):
    id: str = Field(description="A built-in kind (`summary`, ...) or a tenant template's id.")
    built_in: bool
    kind: str = Field(description="summary, key_terms, risks or questions.")
    name: str
    instructions: str
    questions: list[str]


class ReviewTemplateIn(Schema):
    kind: str = Field(
        description="The built-in template copied: summary, key_terms, risks or questions."
    )
    name: str = Field(max_length=100)
    instructions: str = Field("", description="Left out: the built-in template's.")
    questions: list[str] = Field([], max_length=30)


class ReviewTemplatePatch(Schema):
    name: str | None = Field(None, max_length=100)
    instructions: str | None = None
    questions: list[str] | None = Field(None, max_length=30)


class SearchIn(Schema):
    query: str = Field(description="A question or words.")
    document_ids: list[uuid.UUID] = Field(min_length=1, max_length=20)
    limit: int = Field(8, ge=1, le=50)
    mode: str = Field("hybrid", description="hybrid, text or vector.")


class PassageOut(Schema):
    chunk_id: int
    document_id: uuid.UUID
    text: str
    page_start: int
    page_end: int
    char_start: int = Field(description="Offset into page `page_start`'s text.")
    char_end: int = Field(description="Offset (exclusive) into page `page_end`'s text.")
    score: float = Field(description="Reciprocal rank fusion of the two rankings.")
    text_rank: int | None = Field(description="Its place in the full-text ranking (from 1).")
    vector_rank: int | None = Field(description="Its place in the vector ranking (from 1).")
