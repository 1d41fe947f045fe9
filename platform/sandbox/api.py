"""/api/v1/artifacts: the files sandboxed runs produced in a member's conversations.
List a conversation's, read one's description, download its bytes.

A member (session) or an API key with the `chat` scope acting as the member who
created it: artifacts are part of their conversation, which is private, so they are
read with the conversation's scope and another member's, or another tenant's, answer
404 like missing ones. Downloads are served as what their content is (never what a
run named them), as attachments, except raster images (PNG, JPEG, GIF, WebP), which
the chat page shows inline; never sniffed, and under a policy that runs nothing.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.utils.http import content_disposition_header
from ninja import Field, Query, Router, Schema

from sandbox.media import INLINE
from sandbox.selectors import artifact_get, artifact_list
from sandbox.storage import file_read
from tenants.access import Actor, NotFound, require_scope
from tenants.api.auth import actor_of

router = Router(tags=["artifacts"])

# What a download may do in a browser: nothing (no script, no style, no frame, no
# form), even if opened directly.
DOWNLOAD_POLICY = "default-src 'none'; img-src 'self'; sandbox"


class ArtifactOut(Schema):
    id: uuid.UUID
    conversation_id: uuid.UUID
    run_id: uuid.UUID | None = Field(description="The run that produced it.")
    name: str = Field(description="Its path in the conversation's workspace.")
    media_type: str = Field(description="Detected from its content.")
    size_bytes: int
    sha256: str
    created_at: datetime


class ListQuery(Schema):
    conversation: uuid.UUID = Field(description="The conversation whose artifacts to list.")
    limit: int = Field(100, ge=1, le=500, description="How many, oldest first.")
    offset: int = Field(0, ge=0, le=2**31 - 1, description="How many to skip.")


def artifacts_actor(request: HttpRequest) -> Actor:
    """Artifacts are read as their conversation is: the `chat` scope, and a person."""
    actor = actor_of(request)
    require_scope(actor, "chat")
    if actor.user is None:
        raise PermissionDenied(
            "Artifacts belong to a person's conversations: this API key was created by no "
            "member. Use a key created by a member."
        )
    return actor


@router.get("", response=list[ArtifactOut], url_name="artifacts")
def artifacts_list(request: HttpRequest, query: Query[ListQuery]):
    """The files runs produced in one of your conversations, oldest first (none for a
    conversation that is not yours)."""
    artifacts = artifact_list(actor=artifacts_actor(request), conversation_id=query.conversation)
    return list(artifacts[query.offset : query.offset + query.limit])


@router.get("/{artifact_id}", response=ArtifactOut, url_name="artifact")
def artifacts_get(request: HttpRequest, artifact_id: str):
    return artifact_get(actor=artifacts_actor(request), artifact_id=artifact_id)


@router.get(
    "/{artifact_id}/content",
    url_name="artifact_content",
    openapi_extra={
        "responses": {
            "200": {
                "description": "The file's bytes, as its `media_type`.",
                "content": {"application/octet-stream": {"schema": {"type": "string"}}},
            }
        }
    },
)
def artifacts_content(request: HttpRequest, artifact_id: str):
    """The file: an attachment, except PNG, JPEG, GIF and WebP images (inline)."""
    artifact = artifact_get(actor=artifacts_actor(request), artifact_id=artifact_id)
    try:
        data = file_read(artifact.file_name)
    except FileNotFoundError:
        raise NotFound from None
    inline = artifact.media_type in INLINE
    response = HttpResponse(data, content_type=artifact.media_type)
    filename = artifact.name.rsplit("/", 1)[-1]
    response["Content-Disposition"] = content_disposition_header(not inline, filename) or "inline"
    response["X-Content-Type-Options"] = "nosniff"
    response["Content-Security-Policy"] = DOWNLOAD_POLICY
    # The bytes of an id never change; only its owner may read them.
    response["Cache-Control"] = "private, max-age=3600"
    return response
