"""Documents a member uploaded, their pages and their chunks.

The file itself lives in the `documents` storage (`documents.storage`) under
`<tenant id>/<document id>`; the rows hold what was learnt from it. A document moves
`uploaded → parsing → embedding → ready`, or ends `failed` with the reason. Pages
and chunks are written by the parsing and embedding jobs; text, Markdown and HTML get
their one page at upload.
"""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models

from documents.fields import FloatArrayField
from tenants.models import Tenant


class Document(models.Model):
    class State(models.TextChoices):
        UPLOADED = "uploaded"
        PARSING = "parsing"
        EMBEDDING = "embedding"
        READY = "ready"
        FAILED = "failed"

    class MediaType(models.TextChoices):
        PDF = "application/pdf"
        DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
        HTML = "text/html"
        MARKDOWN = "text/markdown"
        TEXT = "text/plain"
        # Repositories: archives of files (documents.archives), a text file a page.
        ZIP = "application/zip"
        TAR = "application/x-tar"
        TAR_GZ = "application/gzip"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="documents"
    )
    title = models.CharField(max_length=200)
    # The name the file was uploaded under (shown, never trusted for its type).
    filename = models.CharField(max_length=255, blank=True)
    # Detected from the content (documents.intake), not from the name or the client.
    media_type = models.CharField(max_length=100, choices=MediaType.choices)
    size_bytes = models.PositiveBigIntegerField()
    sha256 = models.CharField(max_length=64)
    # Null until known (a DOCX has no pages before it is parsed).
    page_count = models.PositiveIntegerField(null=True, blank=True)
    token_count = models.PositiveIntegerField(null=True, blank=True)
    state = models.CharField(max_length=16, choices=State.choices, default=State.UPLOADED)
    error_message = models.TextField(blank=True)
    # The ingestion job's progress (documents.ingest): its stage (`pages`, `chunks`;
    # empty when no job is at work) and how far it is (`progress_total` null while the
    # count is not known: a DOCX's pages before the last is read).
    stage = models.CharField(max_length=16, blank=True)
    progress_done = models.PositiveIntegerField(default=0)
    progress_total = models.PositiveIntegerField(null=True, blank=True)
    # Times the watchdog started the job again after it stalled (documents.watchdog).
    ingest_restarts = models.PositiveSmallIntegerField(default=0)
    # The model its chunks' vectors are from (documents.embeddings.embedding_model_name);
    # empty before the embedding stage. Another name than the configured model's means the
    # vectors are stale: the watchdog has them embedded again.
    embedding_model = models.CharField(max_length=200, blank=True)
    # The file's name in the `documents` storage.
    file_name = models.CharField(max_length=255)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["tenant", "owner", "-created_at"])]

    def __str__(self) -> str:
        return self.title


class Page(models.Model):
    """One page's text (1-based `number`); a text file is one page, and so is each text
    file of a repository, its path the page's `label`."""

    id = models.BigAutoField(primary_key=True)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    document = models.ForeignKey(Document, on_delete=models.CASCADE, related_name="pages")
    number = models.PositiveIntegerField()
    # What the page is called where pages have names: a repository's file path.
    label = models.CharField(max_length=500, blank=True)
    text = models.TextField(blank=True)

    class Meta:
        ordering = ["number"]
        constraints = [
            models.UniqueConstraint(fields=["document", "number"], name="document_page_unique")
        ]

    def __str__(self) -> str:
        return f"page {self.number}"


class Chunk(models.Model):
    """A span of a document's text for retrieval: from `char_start` in the text of page
    `page_start` to `char_end` (exclusive) in the text of page `page_end`."""

    id = models.BigAutoField(primary_key=True)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    document = models.ForeignKey(Document, on_delete=models.CASCADE, related_name="chunks")
    index = models.PositiveIntegerField()  # its place in the document, from 0
    text = models.TextField()
    page_start = models.PositiveIntegerField()
    page_end = models.PositiveIntegerField()
    char_start = models.PositiveIntegerField()
    char_end = models.PositiveIntegerField()
    token_count = models.PositiveIntegerField(default=0)
    embedding = FloatArrayField(null=True, blank=True)

    class Meta:
        ordering = ["index"]
        constraints = [
            models.UniqueConstraint(fields=["document", "index"], name="document_chunk_unique")
        ]

    def __str__(self) -> str:
        return f"chunk {self.index} (pages {self.page_start}-{self.page_end})"


class ReviewTemplate(models.Model):
    """A tenant's review template: a copy of a built-in one (documents.review.BUILT_IN)
    with its own name, instructions and, for `questions`, its list of questions."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    kind = models.CharField(max_length=16)  # documents.review.KINDS
    name = models.CharField(max_length=100)
    instructions = models.TextField()
    questions = models.JSONField(default=list, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(fields=["tenant", "name"], name="review_template_name_unique")
        ]

    def __str__(self) -> str:
        return self.name


class ReviewStep(models.Model):
    """The output of one step of a review (a section's map, a group's reduce), kept so
    that the review run again or resumed reuses it: keyed by the document's content
    (sha256), what was asked (`task`: documents.review.ReviewSpec.key) and the model."""

    id = models.BigAutoField(primary_key=True)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    document_sha256 = models.CharField(max_length=64)
    task = models.CharField(max_length=64)
    model = models.CharField(max_length=200)
    step = models.CharField(max_length=120)
    output = models.JSONField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "document_sha256", "task", "model", "step"],
                name="review_step_unique",
            )
        ]

    def __str__(self) -> str:
        return f"{self.step} of {self.document_sha256[:8]}"
