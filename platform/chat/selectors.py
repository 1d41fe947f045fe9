"""Reads of chat data, always scoped by the acting tenant and user.

A conversation of another tenant, or of another user, raises `NotFound`, exactly
like one that does not exist.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.contrib.postgres.search import SearchHeadline, SearchQuery, SearchRank, SearchVector
from django.core.exceptions import ValidationError
from django.db import connection
from django.db.models import Q, QuerySet

from chat.eventlog import cursor_parse, event_log, run_log_key
from chat.models import Conversation, Message, Run
from config.inputs import json_loads
from tenants.access import Actor, NotFound, id_parse


def conversation_list(*, actor: Actor) -> QuerySet[Conversation]:
    return Conversation.objects.filter(tenant=actor.tenant, user=actor.user)


def conversation_get(*, actor: Actor, conversation_id: Any) -> Conversation:
    try:
        return conversation_list(actor=actor).get(id=id_parse(conversation_id))
    except Conversation.DoesNotExist:
        raise NotFound from None


def run_get(*, actor: Actor, run_id: Any) -> Run:
    try:
        return Run.objects.get(tenant=actor.tenant, user=actor.user, id=id_parse(run_id))
    except Run.DoesNotExist:
        raise NotFound from None


def message_thread(*, conversation: Conversation, leaf: Message | None = None) -> list[Message]:
    """The messages from the root to `leaf` (default: the newest message), oldest first."""
    messages = {m.id: m for m in conversation.messages.all()}
    if not messages:
        return []
    if leaf is None:
        leaf = max(messages.values(), key=lambda m: (m.created_at, str(m.id)))
    thread: list[Message] = []
    node: Message | None = messages.get(leaf.id, leaf)
    while node is not None and len(thread) <= len(messages):
        thread.append(node)
        node = messages.get(node.parent_id) if node.parent_id else None
    thread.reverse()
    return thread


def message_get(*, actor: Actor, message_id: Any) -> Message:
    """A message of one of the actor's own conversations."""
    message = (
        Message.objects.select_related("conversation")
        .filter(tenant=actor.tenant, conversation__user=actor.user, id=id_parse(message_id))
        .first()
    )
    if message is None:
        raise NotFound
    return message


# --- paging ---------------------------------------------------------------------

PAGE_SIZE_DEFAULT = 20
PAGE_SIZE_MAX = 100


def _cursor_encode(conversation: Conversation) -> str:
    raw = json.dumps([conversation.updated_at.isoformat(), str(conversation.id)])
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _cursor_decode(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        # json_loads: a crafted cursor is client input (no NUL, bounded depth).
        stamp, conversation_id = json_loads(raw)
        when = datetime.fromisoformat(stamp)
        if when.tzinfo is None:
            raise ValueError("naive")
        when.astimezone(UTC)  # an offset past the year 9999 would overflow in the query
        return when, uuid.UUID(conversation_id)
    except (ValueError, TypeError, OverflowError, UnicodeDecodeError, binascii.Error):
        raise ValidationError(
            "Bad cursor: pass the next_cursor of a previous page unchanged."
        ) from None


@dataclass
class Page:
    items: list[Conversation]
    next_cursor: str | None


def conversation_page(
    *, actor: Actor, cursor: str | None = None, limit: int = PAGE_SIZE_DEFAULT
) -> Page:
    """The actor's conversations, most recently active first, `limit` at a time.

    The cursor is the position (updated_at, id) after the last item of the previous
    page, so a conversation that becomes active while the client pages is neither
    repeated nor skipped among the older ones."""
    if not 1 <= limit <= PAGE_SIZE_MAX:
        raise ValidationError(f"limit must be between 1 and {PAGE_SIZE_MAX}.")
    conversations = conversation_list(actor=actor).order_by("-updated_at", "-id")
    if cursor:
        when, last_id = _cursor_decode(cursor)
        conversations = conversations.filter(
            Q(updated_at__lt=when) | Q(updated_at=when, id__lt=last_id)
        )
    items = list(conversations[: limit + 1])
    more = len(items) > limit
    items = items[:limit]
    return Page(items=items, next_cursor=_cursor_encode(items[-1]) if more else None)


# --- search ---------------------------------------------------------------------

SEARCH_LIMIT_MAX = 50
SEARCH_QUERY_MAX_CHARS = 500
# ts_headline marks matched words like Markdown bold: the snippet is plain text that
# the client renders as (sanitized) Markdown, never as HTML.
SNIPPET_MARK = "**"


@dataclass
class SearchHit:
    conversation: Conversation
    rank: float
    message_id: uuid.UUID | None  # the best matching message; None for a title-only hit
    role: str | None
    snippet: str


def conversation_search(*, actor: Actor, query: str, limit: int = 20) -> list[SearchHit]:
    """The actor's conversations whose messages or title match `query` (web search
    syntax: words, "a phrase", or, -word), best first, one hit per conversation with a
    snippet of its best matching message."""
    query = (query or "").strip()
    if not query:
        raise ValidationError("Give a search query: ?q=words.")
    if len(query) > SEARCH_QUERY_MAX_CHARS:
        raise ValidationError(f"The search query is over {SEARCH_QUERY_MAX_CHARS} characters.")
    if not 1 <= limit <= SEARCH_LIMIT_MAX:
        raise ValidationError(f"limit must be between 1 and {SEARCH_LIMIT_MAX}.")
    if connection.vendor != "postgresql":
        return _search_plain(actor=actor, query=query, limit=limit)

    search_query = _search_query(query)
    best: dict[uuid.UUID, tuple[uuid.UUID | None, float]] = {
        conversation_id: (message_id, rank)
        for conversation_id, message_id, rank in message_search(actor=actor, query=query)
    }
    title_vector = SearchVector("title", config="english")
    titles = (
        conversation_list(actor=actor)
        .annotate(document=title_vector)
        .filter(document=search_query)
        .annotate(rank=SearchRank(title_vector, search_query))
        .values_list("id", "rank")
    )
    scores = {cid: rank for cid, (_, rank) in best.items()}
    for conversation_id, rank in titles:
        # A matching title counts like a second matching message.
        scores[conversation_id] = scores.get(conversation_id, 0.0) + rank
        best.setdefault(conversation_id, (None, 0.0))
    if not scores:
        return []
    conversations = conversation_list(actor=actor).in_bulk(list(scores))
    ranked = sorted(
        conversations.values(),
        key=lambda c: (scores[c.id], c.updated_at),
        reverse=True,
    )[:limit]
    message_ids = [m_id for c in ranked if (m_id := best[c.id][0]) is not None]
    snippets = {
        m_id: (role, snippet)
        for m_id, role, snippet in Message.objects.filter(id__in=message_ids)
        .annotate(
            snippet=SearchHeadline(
                "content",
                search_query,
                config="english",
                start_sel=SNIPPET_MARK,
                stop_sel=SNIPPET_MARK,
                max_words=30,
                min_words=10,
                max_fragments=2,
                fragment_delimiter=" … ",
            )
        )
        .values_list("id", "role", "snippet")
    }
    hits = []
    for conversation in ranked:
        message_id = best[conversation.id][0]
        role, snippet = snippets.get(message_id, (None, "")) if message_id else (None, "")
        hits.append(
            SearchHit(
                conversation=conversation,
                rank=float(scores[conversation.id]),
                message_id=message_id,
                role=role,
                snippet=snippet,
            )
        )
    return hits


def _search_query(query: str) -> SearchQuery:
    return SearchQuery(query, search_type="websearch", config="english")


def message_search(*, actor: Actor, query: str) -> list[tuple[uuid.UUID, uuid.UUID, float]]:
    """The actor's conversations with a message matching `query` (PostgreSQL): for each,
    (conversation id, its best matching message's id, that message's rank).

    The search runs in `parley_message_search` (chat migration 0007), which applies the
    tenant filter itself so that it can use the full-text index under row level
    security; the actor's own conversations only."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT conversation_id, message_id, rank FROM parley_message_search(%s, %s)",
            [actor.user.id if actor.user is not None else None, query],
        )
        return [(c, m, float(rank)) for c, m, rank in cursor.fetchall()]


def _search_plain(*, actor: Actor, query: str, limit: int) -> list[SearchHit]:
    """Embedded mode (SQLite, no full-text search): every word must occur, newest first."""
    words = [w.strip('"') for w in query.split() if w.lower() != "or" and not w.startswith("-")]
    words = [w for w in words if w]
    if not words:
        return []
    matching = Message.objects.filter(tenant=actor.tenant, conversation__user=actor.user)
    for word in words:
        matching = matching.filter(content__icontains=word)
    hits: dict[uuid.UUID, SearchHit] = {}
    for message in matching.select_related("conversation").order_by("-created_at")[:500]:
        if message.conversation_id in hits:
            continue
        at = message.content.lower().find(words[0].lower())
        start = max(0, at - 60)
        snippet = message.content[start : at + len(words[0]) + 100]
        hits[message.conversation_id] = SearchHit(
            conversation=message.conversation,
            rank=1.0,
            message_id=message.id,
            role=message.role,
            snippet=("… " if start else "") + snippet,
        )
        if len(hits) >= limit:
            break
    return list(hits.values())


# --- the message tree -----------------------------------------------------------


@dataclass
class BranchStep:
    """A message on the current branch, and where it stands among its siblings (the
    messages with the same parent, oldest first): the client shows `index + 1 / count`."""

    message: Message
    sibling_ids: list[uuid.UUID]

    @property
    def sibling_index(self) -> int:
        return self.sibling_ids.index(self.message.id)

    @property
    def sibling_count(self) -> int:
        return len(self.sibling_ids)


@dataclass
class MessageTree:
    conversation: Conversation
    messages: list[Message]  # all of them, oldest first
    branch: list[BranchStep]  # the current branch, root first

    @property
    def leaf_id(self) -> uuid.UUID | None:
        return self.branch[-1].message.id if self.branch else None


def _order(message: Message) -> tuple[Any, str]:
    return (message.created_at, str(message.id))


def message_tree(*, conversation: Conversation) -> MessageTree:
    """Every message with its parent, and the current branch: root to the conversation's
    current leaf, continued through the newest child where that leaf has answers."""
    messages = sorted(conversation.messages.all(), key=_order)
    children: dict[uuid.UUID | None, list[Message]] = {}
    for message in messages:
        children.setdefault(message.parent_id, []).append(message)
    by_id = {m.id: m for m in messages}
    leaf = by_id.get(conversation.current_leaf_id) if conversation.current_leaf_id else None
    if leaf is None and messages:
        leaf = messages[-1]
    path: list[Message] = []
    node = leaf
    while node is not None and len(path) <= len(messages):
        path.append(node)
        node = by_id.get(node.parent_id) if node.parent_id else None
    path.reverse()
    while path and children.get(path[-1].id) and len(path) <= len(messages):
        path.append(children[path[-1].id][-1])
    branch = [
        BranchStep(message=m, sibling_ids=[s.id for s in children[m.parent_id]]) for m in path
    ]
    return MessageTree(conversation=conversation, messages=messages, branch=branch)


def branch_leaf(*, conversation: Conversation, message: Message) -> Message:
    """The newest leaf under `message` (itself if it has no replies): where the client
    lands when it switches to the branch through `message`."""
    messages = list(conversation.messages.all())
    children: dict[uuid.UUID | None, list[Message]] = {}
    for m in messages:
        children.setdefault(m.parent_id, []).append(m)
    leaves: list[Message] = []
    stack = [message]
    seen: set[uuid.UUID] = set()
    while stack:
        node = stack.pop()
        if node.id in seen:
            continue
        seen.add(node.id)
        below = children.get(node.id, [])
        if not below:
            leaves.append(node)
        stack.extend(below)
    return max(leaves, key=_order)


# --- runs -----------------------------------------------------------------------


def run_list(*, actor: Actor, conversation: Conversation, limit: int = 50) -> QuerySet[Run]:
    return Run.objects.filter(
        tenant=actor.tenant, user=actor.user, conversation=conversation
    ).order_by("-created_at")[:limit]


def run_endings(
    *, actor: Actor, conversation: Conversation, message_ids: list[Any]
) -> dict[Any, dict[str, str]]:
    """Why each of these answers ended early (cancelled, failed), by message id."""
    return {
        run.assistant_message_id: {"code": run.error_code, "message": run.error_message}
        for run in Run.objects.filter(
            tenant=actor.tenant,
            user=actor.user,
            conversation=conversation,
            assistant_message_id__in=message_ids,
        ).exclude(state=Run.State.SUCCEEDED)
    }


@dataclass
class RunEvents:
    run: Run
    events: list[tuple[int, dict[str, Any]]]
    # The log is gone (it is trimmed a while after the run ended) though the client has
    # not seen all of it: the stored run and its message stand in for the events.
    trimmed: bool


def run_events(*, actor: Actor, run_id: Any, after: int = 0) -> RunEvents:
    """The run's events after sequence number `after`, without waiting (InvalidInput
    for a cursor out of range)."""
    after = cursor_parse(after)
    # The row first, then the log: the worker stores the ended run before it logs the
    # last event, so a row read first is never "more ended" than the log read after it.
    run = run_get(actor=actor, run_id=run_id)
    log, key = event_log(), run_log_key(tenant_id=run.tenant_id, run_id=run.id)
    events = log.read_sync(key, after)
    trimmed = not events and run_log_trimmed(run=run, after=after)
    if trimmed and after > 0 and log.read_sync(key, after - 1):
        trimmed = False  # the log is there; its last event is being written
    return RunEvents(run=run, events=events, trimmed=trimmed)


def run_log_trimmed(*, run: Run, after: int) -> bool:
    """Whether an empty read of the log after `after` means the log is gone: the run
    ended with events the client has not seen."""
    return run.is_terminal and run.last_seq > after
