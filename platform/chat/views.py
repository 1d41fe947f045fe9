"""The chat page: server-rendered shell, the TypeScript client streams over /ws/v1/."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render

from chat.models import Conversation
from chat.selectors import conversation_get, conversation_list, message_thread
from tenants.access import Actor, NotFound


def _actor_or_404(request: HttpRequest) -> Actor:
    actor: Actor | None = getattr(request, "actor", None)
    if actor is None:
        raise Http404("You are not a member of any tenant.")
    return actor


def _chat_page(
    request: HttpRequest, actor: Actor, conversation: Conversation | None
) -> HttpResponse:
    thread = message_thread(conversation=conversation) if conversation else []
    return render(
        request,
        "chat/chat.html",
        {
            "actor": actor,
            "conversations": conversation_list(actor=actor)[:50],
            "conversation": conversation,
            "thread": [{"id": str(m.id), "role": m.role, "content": m.content} for m in thread],
        },
    )


@login_required
def chat_home(request: HttpRequest) -> HttpResponse:
    return _chat_page(request, _actor_or_404(request), None)


@login_required
def conversation_detail(request: HttpRequest, conversation_id: str) -> HttpResponse:
    actor = _actor_or_404(request)
    try:
        conversation = conversation_get(actor=actor, conversation_id=conversation_id)
    except NotFound:
        raise Http404("No such conversation.") from None
    return _chat_page(request, actor, conversation)
