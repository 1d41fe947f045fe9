"""The chat part of the HTTP API: conversations, their messages, runs and run events.

A member (session) or an API key with the `chat` scope acting as the member who
created it. Conversations are private: another member's, or another tenant's,
answer 404 like missing ones. Sending, editing and regenerating answer 202 with the
queued run; follow it at /runs/{id}/events (JSON, or Server-Sent Events).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from channels.db import database_sync_to_async
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from ninja import Router, Status

from chat.eventlog import cursor_parse
from chat.models import Message, Run
from chat.relay import LogTrimmed, run_relay
from chat.schemas import (
    BranchIn,
    ConversationIn,
    ConversationOut,
    ConversationPage,
    EditIn,
    ErrorOut,
    MessageIn,
    MessageOut,
    MessageTreeOut,
    RegenerateIn,
    RenameIn,
    ReviewIn,
    RunEventsOut,
    RunOut,
    SearchOut,
)
from chat.selectors import (
    PAGE_SIZE_DEFAULT,
    conversation_get,
    conversation_page,
    conversation_search,
    message_get,
    message_tree,
    run_events,
    run_get,
    run_list,
)
from chat.services.conversations import (
    conversation_branch_switch,
    conversation_delete,
    conversation_export,
    conversation_rename,
)
from chat.services.runs import (
    RunNotQueued,
    chat_send,
    review_start,
    run_cancel,
    run_regenerate,
)
from documents.review import review_markdown
from tenants.access import Actor
from tenants.api.auth import actor_of
from tenants.rls import tenant_scope

conversations = Router(tags=["conversations"])
messages = Router(tags=["conversations"])
runs = Router(tags=["runs"])
reviews = Router(tags=["documents"])

NOT_QUEUED = (
    "Your message is saved, but no worker could take the run right now; try again in a moment."
)
RUN_ACCEPTED = {202: RunOut, 400: ErrorOut, 404: ErrorOut, 503: ErrorOut}


def chat_actor(request: HttpRequest) -> Actor:
    """The member this request acts as: keys need the `chat` scope and a creator."""
    actor = actor_of(request)
    if not actor.has_scope("chat"):
        raise PermissionDenied("This API key lacks the 'chat' scope.")
    if actor.user is None:
        raise PermissionDenied(
            "Chat needs a person: this API key was created by no member, so it has no "
            "conversations. Use a key created by a member."
        )
    return actor


def _queued(send: Any) -> Any:
    """Run a send-like service: the run (202), or 503 when no worker could take it."""
    try:
        return Status(202, send())
    except RunNotQueued as exc:  # embedded mode: the commit happens inside the view
        return Status(503, {"detail": str(exc)})


# --- conversations ----------------------------------------------------------------


@conversations.get("", response=ConversationPage, url_name="chat_conversations")
def conversations_list(
    request: HttpRequest, cursor: str | None = None, limit: int = PAGE_SIZE_DEFAULT
):
    """Your conversations, most recently active first. Page with `next_cursor`."""
    return conversation_page(actor=chat_actor(request), cursor=cursor, limit=limit)


@conversations.post("", response=RUN_ACCEPTED, url_name="chat_conversations")
def conversations_start(request: HttpRequest, payload: ConversationIn):
    """Start a conversation with its first message; answers the queued run."""
    actor = chat_actor(request)
    return _queued(
        lambda: chat_send(
            actor=actor,
            content=payload.content,
            model=payload.model,
            client_id=payload.client_id,
            document_ids=payload.document_ids,
        )
    )


@conversations.get("/search", response=SearchOut, url_name="chat_conversation_search")
def conversations_search(request: HttpRequest, q: str = "", limit: int = 20):
    """Full-text search over your messages and titles (web search syntax: `word`,
    `"a phrase"`, `or`, `-word`), best match first, one hit per conversation."""
    hits = conversation_search(actor=chat_actor(request), query=q, limit=limit)
    return {"query": q, "items": hits}


@conversations.get("/{conversation_id}", response=ConversationOut, url_name="chat_conversation")
def conversations_get(request: HttpRequest, conversation_id: str):
    return conversation_get(actor=chat_actor(request), conversation_id=conversation_id)


@conversations.patch("/{conversation_id}", response=ConversationOut, url_name="chat_conversation")
def conversations_rename(request: HttpRequest, conversation_id: str, payload: RenameIn):
    """Rename; automatic titles never replace a title set here."""
    return conversation_rename(
        actor=chat_actor(request), conversation_id=conversation_id, title=payload.title
    )


@conversations.delete("/{conversation_id}", response={204: None}, url_name="chat_conversation")
def conversations_delete(request: HttpRequest, conversation_id: str):
    """Delete with its messages and runs; live runs are cancelled."""
    conversation_delete(actor=chat_actor(request), conversation_id=conversation_id)
    return Status(204, None)


@conversations.get(
    "/{conversation_id}/messages", response=MessageTreeOut, url_name="chat_conversation_messages"
)
def conversations_messages(request: HttpRequest, conversation_id: str):
    """Every message with its parent (the tree), and the current branch with each
    message's siblings, to show and switch between edits and regenerated answers."""
    conversation = conversation_get(actor=chat_actor(request), conversation_id=conversation_id)
    return message_tree(conversation=conversation)


@conversations.post(
    "/{conversation_id}/messages", response=RUN_ACCEPTED, url_name="chat_conversation_messages"
)
def conversations_send(request: HttpRequest, conversation_id: str, payload: MessageIn):
    """Send a message (by default after the tip of the current branch); answers the
    queued run."""
    actor = chat_actor(request)
    extra: dict[str, Any] = {}
    if payload.parent_message_id is not None:
        extra["parent_message_id"] = payload.parent_message_id
    return _queued(
        lambda: chat_send(
            actor=actor,
            content=payload.content,
            conversation_id=conversation_id,
            model=payload.model,
            client_id=payload.client_id,
            document_ids=payload.document_ids,
            **extra,
        )
    )


@conversations.put(
    "/{conversation_id}/branch", response=MessageTreeOut, url_name="chat_conversation_branch"
)
def conversations_branch(request: HttpRequest, conversation_id: str, payload: BranchIn):
    """Switch to the branch through `message_id` (e.g. a sibling from the tree): the
    current leaf becomes the newest message under it."""
    conversation = conversation_branch_switch(
        actor=chat_actor(request), conversation_id=conversation_id, message_id=payload.message_id
    )
    return message_tree(conversation=conversation)


@conversations.get(
    "/{conversation_id}/runs", response=list[RunOut], url_name="chat_conversation_runs"
)
def conversations_runs(request: HttpRequest, conversation_id: str):
    """The conversation's runs, newest first (the latest 50)."""
    actor = chat_actor(request)
    conversation = conversation_get(actor=actor, conversation_id=conversation_id)
    return run_list(actor=actor, conversation=conversation)


@conversations.get(
    "/{conversation_id}/export",
    response={200: None},
    url_name="chat_conversation_export",
    openapi_extra={
        "responses": {
            200: {
                "description": "A download: the current branch as Markdown, or every "
                "message (with parent ids) and the runs' metadata as JSON.",
                "content": {"text/markdown": {}, "application/json": {}},
            }
        }
    },
)
def conversations_export(request: HttpRequest, conversation_id: str, format: str = "markdown"):
    export = conversation_export(
        actor=chat_actor(request), conversation_id=conversation_id, fmt=format
    )
    response = HttpResponse(export.body, content_type=export.content_type)
    response["Content-Disposition"] = f'attachment; filename="{export.filename}"'
    return response


# --- messages -----------------------------------------------------------------------


@messages.post("/{message_id}/edit", response=RUN_ACCEPTED, url_name="chat_message_edit")
def messages_edit(request: HttpRequest, message_id: str, payload: EditIn):
    """Edit a user message: the edited text becomes a new sibling (a new branch, now
    the current one) and is answered; the original stays in the tree."""
    actor = chat_actor(request)
    message = message_get(actor=actor, message_id=message_id)
    if message.role != Message.Role.USER:
        raise ValidationError("Only your own messages can be edited; regenerate an answer.")
    return _queued(
        lambda: chat_send(
            actor=actor,
            content=payload.content,
            conversation_id=message.conversation_id,
            parent_message_id=message.parent_id,
            model=payload.model,
            client_id=payload.client_id,
        )
    )


@messages.post(
    "/{message_id}/regenerate", response=RUN_ACCEPTED, url_name="chat_message_regenerate"
)
def messages_regenerate(request: HttpRequest, message_id: str, payload: RegenerateIn):
    """Answer a user message again (or the question an answer answered): the new
    answer is a sibling of the earlier ones."""
    actor = chat_actor(request)
    return _queued(
        lambda: run_regenerate(
            actor=actor, message_id=message_id, model=payload.model, client_id=payload.client_id
        )
    )


# --- runs ---------------------------------------------------------------------------


@runs.get("/{run_id}", response=RunOut, url_name="chat_run")
def runs_get(request: HttpRequest, run_id: str):
    return run_get(actor=chat_actor(request), run_id=run_id)


@runs.post("/{run_id}/cancel", response=RunOut, url_name="chat_run_cancel")
def runs_cancel(request: HttpRequest, run_id: str):
    """Stop the run; the partial answer is kept. A finished run is answered as it is."""
    return run_cancel(actor=chat_actor(request), run_id=run_id)


@runs.get(
    "/{run_id}/events",
    response=RunEventsOut,
    url_name="chat_run_events",
    openapi_extra={
        "responses": {
            200: {
                "description": "The events after `after`. With `Accept: text/event-stream`: "
                "Server-Sent Events, live until the run ends, each with `id: <seq>` "
                "(reconnects resume from `Last-Event-ID`); a trimmed log sends one "
                "`run.trimmed` event with the stored run and message. 204: nothing more "
                "will come (the run ended and you have its last event).",
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/RunEventsOut"}},
                    "text/event-stream": {"schema": {"type": "string"}},
                },
            }
        }
    },
)
def runs_events(request: HttpRequest, run_id: str, after: int = 0):
    """The run's event log after sequence number `after`. Logs are trimmed a while after
    the run ends: then `trimmed` is true and `run` and `message` hold the outcome."""
    actor = chat_actor(request)
    streaming = "text/event-stream" in request.headers.get("Accept", "")
    if streaming and request.headers.get("Last-Event-ID"):
        after = cursor_parse(request.headers["Last-Event-ID"], name="Last-Event-ID")
    after = cursor_parse(after)
    result = run_events(actor=actor, run_id=run_id, after=after)
    run = result.run
    message = _answer(run) if run.is_terminal else None
    if not streaming:
        return {
            "run": run,
            "events": [{**event, "seq": seq} for seq, event in result.events],
            "trimmed": result.trimmed,
            "message": message,
        }
    if not result.events and run.is_terminal and after >= run.last_seq:
        # EventSource reconnects whenever a stream ends; 204 tells it to stop.
        return HttpResponse(status=204)
    return _sse_response(_sse_relay(run, after, result.events))


def _trimmed(run: Run) -> dict[str, Any]:
    """The `run.trimmed` event: the stored run and its answer stand in for the log."""
    with tenant_scope(tenant_id=run.tenant_id):
        message = _answer(run)
    return {
        "type": "run.trimmed",
        "run_id": str(run.id),
        "run": RunOut.from_orm(run).model_dump(mode="json"),
        "message": MessageOut.from_orm(message).model_dump(mode="json") if message else None,
    }


def _answer(run: Run) -> Message | None:
    if run.assistant_message_id is None:
        return None
    return Message.objects.filter(id=run.assistant_message_id).first()


def _sse_response(stream: AsyncIterator[bytes]) -> StreamingHttpResponse:
    response = StreamingHttpResponse(stream, content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response


def _sse_frame(seq: int, event: dict[str, Any]) -> bytes:
    data = json.dumps(event, separators=(",", ":"))
    return f"id: {seq}\nevent: {event.get('type', 'message')}\ndata: {data}\n\n".encode()


async def _sse_relay(
    run: Run, after: int, first: list[tuple[int, dict[str, Any]]]
) -> AsyncIterator[bytes]:
    """The run's relay (chat.relay.run_relay) as Server-Sent Events; a trimmed log is
    one `run.trimmed` event. An async generator: the ASGI server sends each frame as it
    is yielded (a sync iterator would be buffered)."""
    async for item in run_relay(run, after=after, first=first):
        if item is None:
            yield b": keep-alive\n\n"
        elif isinstance(item, LogTrimmed):
            trimmed = await database_sync_to_async(_trimmed)(item.run)
            yield _sse_frame(item.run.last_seq, trimmed)
        else:
            yield _sse_frame(item["seq"], item)


# --- reviews --------------------------------------------------------------------------


@reviews.post("", response=RUN_ACCEPTED, url_name="chat_reviews")
def reviews_start(request: HttpRequest, payload: ReviewIn):
    """Review one of your documents with a template (`GET /api/v1/review-templates`), as
    a run of a new conversation: follow it like any run; its answer is the review in
    Markdown, and `GET /api/v1/reviews/{run_id}` exports it."""
    actor = chat_actor(request)
    return _queued(
        lambda: review_start(
            actor=actor,
            document_id=payload.document_id,
            template=payload.template,
            questions=payload.questions,
            model=payload.model,
            client_id=payload.client_id,
        )
    )


@reviews.get(
    "/{run_id}",
    response={200: dict[str, Any], 404: ErrorOut, 409: ErrorOut},
    url_name="chat_review",
    openapi_extra={
        "responses": {
            200: {
                "description": "The review: JSON (docs/review.schema.json), or Markdown with "
                "`format=markdown` (a file to download).",
                "content": {"text/markdown": {"schema": {"type": "string"}}},
            }
        }
    },
)
def reviews_export(request: HttpRequest, run_id: str, format: str = "json"):
    """A finished review, as JSON or as Markdown (`format=markdown`)."""
    run = run_get(actor=chat_actor(request), run_id=run_id)
    if run.task != "review":
        return Status(404, {"detail": "This run is no review."})
    message = run.assistant_message
    review = (message.documents or {}).get("review") if message is not None else None
    if review is None:
        return Status(409, {"detail": f"The review is not done (its run is {run.state})."})
    if format == "markdown":
        response = HttpResponse(
            review_markdown(review), content_type="text/markdown; charset=utf-8"
        )
        name = "".join(c if c.isalnum() else "-" for c in review["document"]["title"])[:60]
        response["Content-Disposition"] = f'attachment; filename="review-{name}.md"'
        return response
    if format != "json":
        raise ValidationError("format must be json or markdown.")
    return review
