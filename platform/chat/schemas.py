"""Input and output schemas of the chat HTTP API (chat.api)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from ninja import Field, Schema

from chat.models import Run
from chat.selectors import BranchStep, MessageTree

# A model's name as a run stores it (longer ones could not be stored).
MODEL_MAX_CHARS = Run._meta.get_field("model").max_length


class ErrorOut(Schema):
    """Every error of the REST API but schema validation (config.api documents it for
    every operation)."""

    detail: str = Field(description="What was wrong, for a person to read.")


class ValidationErrorItem(Schema):
    type: str = Field(description="The kind of error, e.g. missing, uuid_parsing.")
    loc: list[str | int] = Field(
        description='Where: ["body", "payload", "title"], ["query", "limit"].'
    )
    msg: str
    ctx: dict[str, Any] | None = None


class ValidationErrorOut(Schema):
    """422: a body or parameter that does not fit the operation's schema."""

    detail: list[ValidationErrorItem]


class ConversationOut(Schema):
    id: uuid.UUID
    title: str
    title_auto: bool = Field(description="False once a person renamed the conversation.")
    model: str
    agent: str = Field(description='The answering agent, "<plugin>.<agent>"; "" for plain chat.')
    current_leaf_id: uuid.UUID | None = Field(description="The tip of the branch the client is on.")
    created_at: datetime
    updated_at: datetime


class ConversationPage(Schema):
    items: list[ConversationOut]
    next_cursor: str | None = Field(
        description="Pass as ?cursor= for the next page; null on the last page."
    )


class ConversationIn(Schema):
    content: str = Field(description="The first message.")
    model: str = Field("", max_length=MODEL_MAX_CHARS)
    client_id: str = Field("", max_length=100, description="Retries with it return the first run.")
    document_ids: list[uuid.UUID] = Field(
        [],
        max_length=20,
        description="Your documents to read with this message (ready ones); they stay in "
        "play for the later messages of its branch.",
    )


class RenameIn(Schema):
    title: str


class MessageIn(Schema):
    content: str
    parent_message_id: uuid.UUID | None = Field(
        None,
        description="The message this one answers; left out: the tip of the current branch.",
    )
    model: str = Field("", max_length=MODEL_MAX_CHARS)
    client_id: str = Field("", max_length=100)
    document_ids: list[uuid.UUID] = Field(
        [],
        max_length=20,
        description="Your documents to read with this message (ready ones); they stay in "
        "play for the later messages of its branch.",
    )


class EditIn(Schema):
    content: str = Field(description="The edited text: a new sibling of the message.")
    model: str = Field("", max_length=MODEL_MAX_CHARS)
    client_id: str = Field("", max_length=100)


class RegenerateIn(Schema):
    model: str = Field("", max_length=MODEL_MAX_CHARS)
    client_id: str = Field("", max_length=100)


class BranchIn(Schema):
    message_id: uuid.UUID = Field(description="Any message of the branch to switch to.")


class StepArtifactOut(Schema):
    id: uuid.UUID = Field(description="Its bytes: GET /api/v1/artifacts/{id}/content.")
    name: str = Field(description="Its path in the conversation's workspace.")
    media_type: str = Field(description="Detected from its content.")
    size: int = Field(description="In bytes.")


class ToolStepOut(Schema):
    call_id: str
    name: str
    arguments: Any = Field(None, description="The arguments the model gave the tool.")
    result: str | None = Field(None, description="What the tool returned (bounded).")
    error: str | None = Field(
        None, description="Why the call failed or was refused, or that it did not finish."
    )
    truncated: bool = False
    artifacts: list[StepArtifactOut] = Field(
        default_factory=list, description="The files the call produced (a sandboxed run's)."
    )


class MessageOut(Schema):
    id: uuid.UUID
    parent_id: uuid.UUID | None
    role: str
    content: str
    steps: list[ToolStepOut] = Field(
        description="An agent's answer: its tool calls, in order (else empty)."
    )
    document_ids: list[uuid.UUID] = Field(
        description="A user message: the documents attached to it (else empty)."
    )
    documents: dict[str, Any] = Field(
        description="An answer over documents: how the model read them (`strategy`, "
        "`reason`, `documents` with the pages read) and its quotes checked against them "
        "(`citations`, `quotes`); else empty."
    )
    created_at: datetime


class BranchStepOut(Schema):
    message_id: uuid.UUID
    role: str
    sibling_ids: list[uuid.UUID] = Field(description="Messages with the same parent, oldest first.")
    sibling_index: int = Field(description="This message's place among them, from 0.")
    sibling_count: int

    @staticmethod
    def resolve_message_id(step: BranchStep) -> uuid.UUID:
        return step.message.id

    @staticmethod
    def resolve_role(step: BranchStep) -> str:
        return step.message.role


class MessageTreeOut(Schema):
    conversation_id: uuid.UUID
    current_leaf_id: uuid.UUID | None = Field(description="The last message of `branch`.")
    messages: list[MessageOut] = Field(description="Every message, oldest first.")
    branch: list[BranchStepOut] = Field(description="The current branch, root first.")

    @staticmethod
    def resolve_conversation_id(tree: MessageTree) -> uuid.UUID:
        return tree.conversation.id

    @staticmethod
    def resolve_current_leaf_id(tree: MessageTree) -> uuid.UUID | None:
        return tree.leaf_id


class SearchHitOut(Schema):
    conversation: ConversationOut
    rank: float
    message_id: uuid.UUID | None = Field(description="The best matching message; null: the title.")
    role: str | None
    snippet: str = Field(description="Text around the matches, each marked **like this**.")


class SearchOut(Schema):
    query: str
    items: list[SearchHitOut]


class RunOut(Schema):
    id: uuid.UUID
    conversation_id: uuid.UUID
    user_message_id: uuid.UUID
    assistant_message_id: uuid.UUID | None
    state: str
    model: str
    # Not the backend that served it: members never see the pool's internal addresses
    # (operators see backends in /api/v1/operator/pool).
    client_id: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    error_code: str
    error_message: str
    last_seq: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    cancel_requested_at: datetime | None


class RunEventsOut(Schema):
    run: RunOut
    events: list[dict[str, Any]] = Field(
        description="Events after `after`, each with its `seq` and `type`."
    )
    trimmed: bool = Field(
        description="The run's log has been trimmed: `run` and `message` stand in for "
        "the events not seen."
    )
    message: MessageOut | None = Field(
        description="The run's stored answer, once the run has ended."
    )


class ReviewIn(Schema):
    document_id: uuid.UUID = Field(description="One of your documents, ready.")
    template: str = Field(
        description="A built-in template (`summary`, `key_terms`, `risks`, `questions`) or "
        "the id of one of your organization's (`GET /api/v1/review-templates`)."
    )
    questions: list[str] = Field(
        [], max_length=30, description="The questions of a `questions` review."
    )
    model: str = Field("", max_length=MODEL_MAX_CHARS)
    client_id: str = Field("", max_length=100, description="Retries with it return the first run.")
