"""Conversations, their messages (a tree: each message points at its parent) and runs.

A Run is one generation: queued by the web process, executed once by a worker,
streamed through its event log, persisted as the assistant Message when it ends.
"""

from __future__ import annotations

import uuid

from django.conf import settings
from django.contrib.postgres.indexes import GinIndex
from django.contrib.postgres.search import SearchVector
from django.db import models

from tenants.models import Tenant


class Conversation(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="conversations"
    )
    title = models.CharField(max_length=200, blank=True)
    # False once a person renamed the conversation: automatic titles never overwrite theirs.
    title_auto = models.BooleanField(default=True)
    model = models.CharField(max_length=200, blank=True)
    # The agent ("<plugin>.<agent>") that answers this conversation; blank: plain chat.
    # Sticky: a send without an agent keeps it (see chat.services.runs.chat_send).
    agent = models.CharField(max_length=200, blank=True)
    # The tip of the branch the client is on: a new message without an explicit parent
    # answers it. Null for an empty conversation (or when that message was deleted).
    current_leaf = models.ForeignKey(
        "Message", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-updated_at"]
        indexes = [models.Index(fields=["tenant", "user", "-updated_at"])]

    def __str__(self) -> str:
        return self.title or str(self.id)


class Message(models.Model):
    class Role(models.TextChoices):
        SYSTEM = "system"
        USER = "user"
        ASSISTANT = "assistant"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    conversation = models.ForeignKey(
        Conversation, on_delete=models.CASCADE, related_name="messages"
    )
    parent = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.CASCADE, related_name="children"
    )
    role = models.CharField(max_length=16, choices=Role.choices)
    content = models.TextField(blank=True)
    # An agent's answer: its tool calls in order, as its run logged them
    # (chat.steps.tool_steps): [{call_id, name, arguments, result, error, truncated}],
    # with `artifacts` [{id, name, media_type, size}] when the call produced files.
    steps = models.JSONField(default=list, blank=True)
    # A user message: the ids of the documents attached to it (documents.Document),
    # in play for this turn and the turns after it on its branch.
    document_ids = models.JSONField(default=list, blank=True)
    # An answer over documents: how the model read them and what it quoted
    # (chat.documents): {strategy, reason, documents: [{id, title, pages}],
    # citations: [...], quotes: {verified, unverified}}; empty otherwise.
    documents = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at"]
        indexes = [
            models.Index(fields=["conversation", "created_at"]),
            # Full-text search over messages (`chat.selectors.conversation_search` must
            # build the same expression for PostgreSQL to use this index).
            GinIndex(SearchVector("content", config="english"), name="chat_message_content_fts"),
        ]

    def __str__(self) -> str:
        return f"{self.role}: {self.content[:40]}"


class Run(models.Model):
    class State(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"
        CANCELLED = "cancelled"

    TERMINAL_STATES = (State.SUCCEEDED, State.FAILED, State.CANCELLED)

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="runs")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    user_message = models.ForeignKey(Message, on_delete=models.CASCADE, related_name="runs")
    assistant_message = models.OneToOneField(
        Message, null=True, blank=True, on_delete=models.SET_NULL, related_name="produced_by"
    )
    state = models.CharField(max_length=16, choices=State.choices, default=State.QUEUED)
    model = models.CharField(max_length=200, blank=True)
    # The agent that answers this run ("<plugin>.<agent>"); blank: a plain chat run.
    agent = models.CharField(max_length=200, blank=True)
    # What the run does other than answer: `review`, a document review (chat.review_turn;
    # its template is on the user message's `documents`). Blank: a chat or agent turn.
    task = models.CharField(max_length=16, blank=True)
    backend = models.CharField(max_length=500, blank=True)
    client_id = models.CharField(max_length=100, blank=True)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    finish_reason = models.CharField(max_length=32, blank=True)
    error_code = models.CharField(max_length=64, blank=True)
    error_message = models.TextField(blank=True)
    last_seq = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    # Set by `run.cancel`; the worker stops at its next check and ends the run `cancelled`.
    cancel_requested_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["state", "heartbeat_at"])]
        constraints = [
            # A retried `chat.send` with the same client id finds the first run.
            models.UniqueConstraint(
                fields=["tenant", "user", "client_id"],
                condition=~models.Q(client_id=""),
                name="chat_run_unique_client_id",
            )
        ]

    def __str__(self) -> str:
        return f"run {self.id} ({self.state})"

    @property
    def is_terminal(self) -> bool:
        return self.state in self.TERMINAL_STATES
