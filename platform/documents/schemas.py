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
        description="What the ingestion job is doing: `pages` or `chunks`; empty when idle."
    )
    progress_done: int = Field(description="Pages or chunks of the stage done so far.")
    progress_total: int | None = Field(
        description="Pages or chunks of the stage in all; null while not known."
    )
    created_at: datetime
    updated_at: datetime


class PageOut(Schema):
    document_id: uuid.UUID
    number: int = Field(description="From 1.")
    text: str = Field(description="Plain text; empty until the document is parsed.")
    parsed: bool = Field(description="False while the page's text is not read yet.")
