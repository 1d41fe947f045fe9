"""Automatic conversation titles.

When the first answer of a conversation succeeds, a task asks the pool for a short
title. The conversation already carries a first-line title (from the first message),
which stays whenever the model's answer is unusable or the call fails; a title a
person chose is never overwritten.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from celery import shared_task
from django.conf import settings
from django.db import transaction

from chat.models import Conversation, Message, Run
from chat.services.conversations import conversation_title_auto_set
from inference import pool
from inference.types import ChatRequest, TextDelta
from tenants.rls import tenant_scope

logger = logging.getLogger(__name__)

TITLE_MAX_CHARS = 80
TITLE_MAX_TOKENS = 24
EXCERPT_CHARS = 1500  # of the question and of the answer, in the title prompt
TITLE_INSTRUCTION = (
    "Write a title of at most six words for the conversation below. "
    "Answer with the title only: no quotes, no punctuation at the end."
)


def title_after_run(*, run: Run) -> None:
    """The run lifecycle's hook after a run succeeded: queue a title when this was the
    conversation's first answer and its title is still automatic. Never raises: a
    title is not worth failing a run for."""
    try:
        with tenant_scope(tenant_id=run.tenant_id):
            conversation = (
                Conversation.objects.filter(id=run.conversation_id, title_auto=True)
                .values_list("id", flat=True)
                .first()
            )
            if conversation is None:
                return
            answers = Message.objects.filter(
                conversation_id=run.conversation_id, role=Message.Role.ASSISTANT
            ).count()
            if answers != 1:
                return
            args = (str(run.conversation_id), str(run.tenant_id), run.model or "")
            transaction.on_commit(lambda: _enqueue(*args), robust=True)
    except Exception:
        logger.exception("could not queue a title for conversation %s", run.conversation_id)


def _enqueue(*args: Any) -> None:
    from config.celery import enqueue

    enqueue(conversation_title_task, *args)


@shared_task(name="chat.tasks.conversation_title", acks_late=True)
def conversation_title_task(conversation_id: str, tenant_id: str, model: str = "") -> None:
    conversation_title_generate(conversation_id=conversation_id, tenant_id=tenant_id, model=model)


def title_first_words(content: str) -> str:
    """The title a conversation starts with, and keeps when no better one comes: its
    first message on one line, cut at a word within 80 characters."""
    line = " ".join(content.split())
    if len(line) <= TITLE_MAX_CHARS:
        return line
    cut = line[: TITLE_MAX_CHARS - 1].rsplit(" ", 1)[0] or line[: TITLE_MAX_CHARS - 1]
    return cut.rstrip(" .:;,") + "…"


_WORD = re.compile(r"[^\W\d_]{4,}")


def title_fits(title: str, question: str) -> bool:
    """Whether a model's title names something the question is about: they share a word
    of four letters or more (by its first five). A small model's titles often do not
    (a chat about chat, a line of the answer): the first words are better then."""
    words = {w[:5] for w in _WORD.findall(question.lower())}
    return any(w[:5] in words for w in _WORD.findall(title.lower()))


_PREFIX = re.compile(r"^(?:#+\s*|\*\*|title\s*:\s*)+", re.IGNORECASE)
_QUOTES = "\"'`*_\u201c\u201d\u2018\u2019\u00ab\u00bb"  # straight, curly, guillemets


def title_clean(text: str) -> str:
    """One line, no quotes or Markdown, no trailing period, at most 80 characters;
    empty when nothing usable is left."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return ""
    title = _PREFIX.sub("", lines[0]).strip()
    title = title.strip(_QUOTES).strip()
    title = _PREFIX.sub("", title).strip().strip(_QUOTES).strip()
    title = " ".join(title.split()).rstrip(".:;,").strip()
    if len(title) > TITLE_MAX_CHARS:
        # At a word boundary, with an ellipsis, within the limit.
        cut = title[: TITLE_MAX_CHARS - 1].rsplit(" ", 1)[0] or title[: TITLE_MAX_CHARS - 1]
        title = cut.rstrip(" .:;,") + "…"
    return title if any(ch.isalnum() for ch in title) else ""


def _opening(conversation: Conversation) -> tuple[Message | None, Message | None]:
    """The first question and its first answer."""
    question = (
        conversation.messages.filter(role=Message.Role.USER, parent__isnull=True)
        .order_by("created_at", "id")
        .first()
    )
    if question is None:
        return None, None
    answer = (
        conversation.messages.filter(role=Message.Role.ASSISTANT, parent=question)
        .order_by("created_at", "id")
        .first()
    )
    return question, answer


def title_messages(*, question: str, answer: str) -> list[dict[str, str]]:
    """The title prompt: the instruction, then the opening exchange (excerpts)."""
    transcript = f"User: {question[:EXCERPT_CHARS]}\n\nAssistant: {answer[:EXCERPT_CHARS]}"
    return [
        {"role": "system", "content": TITLE_INSTRUCTION},
        {"role": "user", "content": transcript},
    ]


def title_request(
    *, conversation: Conversation, question: str, answer: str, model: str
) -> ChatRequest:
    return ChatRequest(
        messages=title_messages(question=question, answer=answer),
        model=model,
        max_tokens=TITLE_MAX_TOKENS,
        temperature=0.0,
        tenant_id=str(conversation.tenant_id),
        user_id=str(conversation.user_id),
        purpose="chat.title",
        reference=str(conversation.id),
    )


def conversation_title_generate(*, conversation_id: Any, tenant_id: Any, model: str = "") -> str:
    """Ask the pool for a title and store it while the title is still automatic.
    Returns the title stored or kept ("" when there was nothing to title)."""
    with tenant_scope(tenant_id=tenant_id):
        conversation = Conversation.objects.filter(
            id=conversation_id, tenant_id=tenant_id, title_auto=True
        ).first()
        if conversation is None:
            return ""
        question, answer = _opening(conversation)
    if question is None:
        return ""
    fallback = title_first_words(question.content)
    if settings.PARLEY_TITLES != "model":
        return fallback  # the conversation has it since its first message
    title = ""
    try:
        request = title_request(
            conversation=conversation,
            question=question.content,
            answer=answer.content if answer else "",
            model=model or conversation.model,
        )
        stream = pool.chat_stream(request)
        try:
            text = "".join(e.text for e in stream if isinstance(e, TextDelta))
        finally:
            stream.close()
        title = title_clean(text)
        if title and not title_fits(title, question.content):
            logger.info("title %r for conversation %s is off the subject", title, conversation_id)
            title = ""
    except Exception as exc:  # any failure keeps the first words
        logger.warning("title for conversation %s failed: %s", conversation_id, exc)
    title = title or fallback
    conversation_title_auto_set(tenant_id=tenant_id, conversation_id=conversation_id, title=title)
    return title
