"""Documents in a conversation: attaching them to a message, what a run reads of them
(documents.context chooses how), and the quotes of its answer checked against them.

A document attached to a user message (`Message.document_ids`) is in play for that
turn and every later turn of its branch. A run over documents tells the user how the
model reads them (a `progress` event, stage `documents`, with the strategy's reason);
when it ends, every quote in its answer is checked against the documents' text
(documents.citations): the answer's `documents` field records the strategy, the
documents and pages read, and each quote with its place (document, pages, offsets)
or marked unverified, and the counts.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError

from chat.models import Message, Run
from chat.selectors import message_thread
from documents.citations import QuoteCheck, SourceText, answer_mark, answer_quotes
from documents.context import DocumentContext, context_build
from documents.models import Document
from documents.retrieval import documents_in_scope
from inference.tokens import prompt_tokens_estimate
from tenants.access import Actor, member_actor
from tenants.rls import tenant_scope

# Documents whose text is all read: ready, or being embedded (for the first time, or
# again after the embedding model changed): full text finds their chunks meanwhile.
READABLE = (Document.State.READY, Document.State.EMBEDDING)


def attachments_check(*, actor: Actor, document_ids: Sequence[Any]) -> list[str]:
    """The ids to store on a user message: the actor's documents, each with its text
    read (READABLE).
    NotFound for one that is not the actor's; ValidationError for one still being read
    or that could not be read."""
    if not document_ids:
        return []
    if not actor.has_scope("documents"):
        raise ValidationError(
            "This API key has no `documents` scope: it cannot attach documents. Give it the "
            "scope, or send without document_ids."
        )
    if len(document_ids) > 20:
        raise ValidationError("A message can carry at most 20 documents.")
    documents = documents_in_scope(actor=actor, document_ids=document_ids)
    for document in documents:
        if document.state == Document.State.FAILED:
            raise ValidationError(
                f"“{document.title}” could not be read ({document.error_message}); "
                "upload it again or leave it out."
            )
        if document.state not in READABLE:
            done = (
                f" ({document.progress_done} of {document.progress_total})"
                if (document.progress_total)
                else ""
            )
            raise ValidationError(
                f"“{document.title}” is still being read{done}. Send the message when it is ready."
            )
    return [str(document.id) for document in documents]


def run_actor(run: Run) -> Actor:
    """The member a run answers, as an actor (documents are read as their owner)."""
    return member_actor(tenant=run.tenant, user=run.user)


def documents_in_play(*, run: Run) -> list[Document]:
    """The documents attached to the messages of the run's branch up to its question,
    first attached first; those deleted since are left out."""
    ids: list[uuid.UUID] = []
    for message in message_thread(conversation=run.conversation, leaf=run.user_message):
        if message.role == Message.Role.USER:
            ids += [uuid.UUID(str(value)) for value in message.document_ids or ()]
    ids = list(dict.fromkeys(ids))
    if not ids:
        return []
    found = Document.objects.filter(
        tenant_id=run.tenant_id, owner_id=run.user_id, id__in=ids, state__in=READABLE
    ).in_bulk()
    return [found[i] for i in ids if i in found]


def context_tokens_of(model: str) -> int:
    """The context length of `model` (the pool's default model when blank), as the pool
    reports it (vLLM's `max_model_len`); PARLEY_DOCUMENT_CONTEXT_TOKENS when unknown."""
    from inference.selectors import default_model, models_available
    from inference.types import InferenceError

    models = models_available()
    try:
        name = model or default_model()
    except InferenceError:
        return int(settings.PARLEY_DOCUMENT_CONTEXT_TOKENS)
    for info in models:
        if info.id == name and info.max_model_len:
            return int(info.max_model_len)
    return int(settings.PARLEY_DOCUMENT_CONTEXT_TOKENS)


def documents_apply(
    *,
    run: Run,
    messages: list[dict[str, Any]],
    max_tokens: int,
    documents: Sequence[Document] | None = None,
) -> DocumentContext | None:
    """Put the run's documents (`documents`, else `documents_in_play`) into its prompt
    `messages` (changed in place): whole, after the system message's text (a stable
    prefix; before the last user message where there is no system message), or the
    retrieved passages before the question. None when the run has no documents."""
    if documents is None:
        documents = documents_in_play(run=run)
    last_user = next(
        (i for i in range(len(messages) - 1, -1, -1) if messages[i]["role"] == "user"), None
    )
    if not documents or last_user is None:
        return None
    question = str(messages[last_user].get("content") or "")
    context = context_build(
        actor=run_actor(run),
        documents=documents,
        question=question,
        context_tokens=context_tokens_of(run.model),
        used_tokens=prompt_tokens_estimate(messages) + max_tokens,
    )
    if context.system:
        if messages and messages[0]["role"] == "system":
            messages[0] = {
                **messages[0],
                "content": f"{messages[0]['content']}\n\n{context.system}",
            }
        else:
            messages[last_user] = {
                **messages[last_user],
                "content": f"{context.system}\n\nQuestion: {question}",
            }
    else:
        messages[last_user] = {
            **messages[last_user],
            "content": f"{context.question_prefix}{question}",
        }
    return context


def documents_progress(context: DocumentContext) -> dict[str, Any]:
    """The `progress` event that tells the user how the model reads the documents."""
    return {
        "type": "progress",
        "stage": "documents",
        "message": context.reason,
        "strategy": context.strategy,
    }


def answer_documents(*, run: Run, context: DocumentContext, answer: str) -> dict[str, Any]:
    """What the answer's `documents` field records: how the documents were read, and
    each quotation of the answer checked against them (documents.citations): a verified
    one with its document, pages and offsets; an unverified one marked so. `marked` is
    the answer as it may be shown: verified quotations cite their page (a `#cite-N`
    link, N the citation's `number`), unverified ones are no longer quotations."""
    spans = answer_quotes(answer)
    sources: list[tuple[Document, SourceText]] = []
    if spans:
        with tenant_scope(tenant_id=run.tenant_id):
            documents = Document.objects.filter(
                tenant_id=run.tenant_id, id__in=[s.document_id for s in context.sources]
            ).in_bulk()
            for source in context.sources:
                document = documents.get(source.document_id)
                if document is not None:
                    pages = document.pages.order_by("number").values_list("text", flat=True)
                    sources.append((document, SourceText(list(pages))))
    checks: list[QuoteCheck] = []
    found_in: dict[str, Document] = {}
    for span in spans:
        check = QuoteCheck(quote=span.text, match=None)
        for document, text in sources:
            match = text.locate(span.text)
            if match is not None:
                check = QuoteCheck(quote=span.text, match=match)
                found_in[span.text] = document
                break
        checks.append(check)
    marked = answer_mark(answer, checks)
    citations = [
        {
            "number": c.number,
            "quote": c.quote,
            "document_id": str(found_in[c.quote].id),
            "title": found_in[c.quote].title,
            "page_start": c.page_start,
            "page_end": c.page_end,
            "char_start": c.char_start,
            "char_end": c.char_end,
        }
        for c in marked.citations
        if c.quote in found_in
    ]
    return {
        **context.as_dict(),
        "citations": citations,
        "unverified": marked.unverified_quotes,
        "quotes": {"verified": marked.verified, "unverified": marked.unverified},
        "marked": marked.text,
    }
