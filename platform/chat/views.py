"""The chat page: a server-rendered shell with the open conversation's current branch
and its live runs as JSON data; the TypeScript client renders them, streams answers
over /ws/v1/ and changes conversations through the REST API."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render

from chat.choices import answer_choices
from chat.models import Conversation
from chat.selectors import (
    conversation_get,
    conversation_list,
    message_tree,
    run_endings,
    run_list,
)
from tenants.access import Actor, NotFound

SIDEBAR_CONVERSATIONS = 50


def _actor_or_404(request: HttpRequest) -> Actor:
    actor: Actor | None = getattr(request, "actor", None)
    if actor is None:
        raise Http404("You are not a member of any tenant.")
    return actor


def _id(value: Any) -> str | None:
    return str(value) if value is not None else None


def chat_page_data(*, actor: Actor, conversation: Conversation) -> dict[str, Any]:
    """What the client needs to show a conversation: its current branch (as the REST
    messages endpoint gives it), each message's place among its siblings, why an answer
    ended early, the runs still queued or running (to attach to and stream), and the
    models and agents the member may pick (`answer_choices`), with the model the
    conversation last chose (`model`, "" for none) and the agent that answers it
    (`agent`, null: plain chat).

    `current_leaf_id` is the conversation's own current leaf: while an answer is being
    regenerated it is the question, though the branch still runs on through the
    previous answer."""
    tree = message_tree(conversation=conversation)
    # The latest runs suffice: a live run is always among the newest.
    runs = list(run_list(actor=actor, conversation=conversation))
    branch_ids = [step.message.id for step in tree.branch]
    endings = run_endings(actor=actor, conversation=conversation, message_ids=branch_ids)
    return {
        "conversation": {
            "id": str(conversation.id),
            "title": conversation.title,
            "current_leaf_id": _id(conversation.current_leaf_id),
            "agent": conversation.agent or None,
            "model": conversation.model,
        },
        "branch": [
            {
                "id": str(step.message.id),
                "parent_id": _id(step.message.parent_id),
                "role": step.message.role,
                "content": step.message.content,
                "steps": step.message.steps,
                "document_ids": step.message.document_ids,
                "documents": step.message.documents,
                "sibling_ids": [str(s) for s in step.sibling_ids],
                "sibling_index": step.sibling_index,
                "sibling_count": step.sibling_count,
                "error": endings.get(step.message.id),
            }
            for step in tree.branch
        ],
        "runs": [
            {
                "id": str(run.id),
                "user_message_id": str(run.user_message_id),
                "state": run.state,
            }
            for run in reversed(runs)  # oldest first, as they appear in the thread
            if not run.is_terminal
        ],
        **answer_choices(actor=actor),
    }


def _chat_page(
    request: HttpRequest, actor: Actor, conversation: Conversation | None
) -> HttpResponse:
    data = (
        chat_page_data(actor=actor, conversation=conversation)
        if conversation
        else {
            "conversation": None,
            "branch": [],
            "runs": [],
            **answer_choices(actor=actor),
        }
    )
    # The model picker shows the conversation's model while the tenant may still use
    # it, else the tenant's default.
    chosen = conversation.model if conversation else ""
    offered = [choice["id"] for choice in data["models"]]
    data["model"] = chosen if chosen in offered else data["default_model"]
    return render(
        request,
        "chat/chat.html",
        {
            "actor": actor,
            "conversations": conversation_list(actor=actor)[:SIDEBAR_CONVERSATIONS],
            "conversation": conversation,
            "chat": data,
        },
    )


@login_required
def chat_home(request: HttpRequest) -> HttpResponse:
    """The chat; a platform operator who is no tenant's member gets the operator's page."""
    if getattr(request, "actor", None) is None and getattr(request.user, "is_operator", False):
        return redirect("tenants:operator_home")
    return _chat_page(request, _actor_or_404(request), None)


@login_required
def conversation_detail(request: HttpRequest, conversation_id: str) -> HttpResponse:
    actor = _actor_or_404(request)
    try:
        conversation = conversation_get(actor=actor, conversation_id=conversation_id)
    except NotFound:
        raise Http404("No such conversation.") from None
    return _chat_page(request, actor, conversation)
