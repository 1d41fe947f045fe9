"""Writes to conversations: rename, delete, switch branches, automatic titles; and
the export. Each change tells the member's open sockets once it commits with a
`conversation.updated` frame (`"deleted": true` for a deletion)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone
from django.utils.text import slugify

from chat.models import Conversation, Message, Run
from chat.notify import frame_send
from chat.selectors import branch_leaf, conversation_get, message_tree
from chat.services.run_state import run_cancel_request
from sandbox.services import conversation_files_delete
from tenants.access import Actor, NotFound, id_parse
from tenants.rls import tenant_scope

TITLE_MAX_CHARS = 200  # Conversation.title's column


def conversation_frame(conversation: Conversation) -> dict[str, Any]:
    """The `conversation.updated` frame: small; a client that needs more reads the
    conversation over HTTP."""
    return {
        "type": "conversation.updated",
        "conversation_id": str(conversation.id),
        "title": conversation.title,
        "title_auto": conversation.title_auto,
        "current_leaf_id": str(conversation.current_leaf_id)
        if conversation.current_leaf_id
        else None,
        "updated_at": conversation.updated_at.isoformat(),
    }


def _notify(conversation: Conversation) -> None:
    frame_send(
        tenant_id=conversation.tenant_id,
        user_id=conversation.user_id,
        frame=conversation_frame(conversation),
    )


def _locked(*, actor: Actor, conversation_id: Any) -> Conversation:
    conversation = conversation_get(actor=actor, conversation_id=conversation_id)
    return Conversation.objects.select_for_update().get(pk=conversation.pk)


def conversation_rename(*, actor: Actor, conversation_id: Any, title: str) -> Conversation:
    """Set the title a person chose: automatic titles never overwrite it afterwards."""
    if not isinstance(title, str):
        raise ValidationError("The title must be text.")
    title = " ".join(title.split())
    if not title:
        raise ValidationError("The title is empty.")
    if len(title) > TITLE_MAX_CHARS:
        raise ValidationError(
            f"The title is {len(title)} characters; the limit is {TITLE_MAX_CHARS}."
        )
    with transaction.atomic():
        conversation = _locked(actor=actor, conversation_id=conversation_id)
        conversation.title = title
        conversation.title_auto = False
        # Not an activity: the conversation keeps its place in the list (updated_at).
        Conversation.objects.filter(pk=conversation.pk).update(title=title, title_auto=False)
        _notify(conversation)
    return conversation


def conversation_delete(*, actor: Actor, conversation_id: Any) -> None:
    """Delete the conversation with its messages and runs. Live runs are cancelled
    first, so their workers stop generating."""
    with transaction.atomic():
        conversation = _locked(actor=actor, conversation_id=conversation_id)
        live = Run.objects.filter(
            conversation=conversation, state__in=[Run.State.QUEUED, Run.State.RUNNING]
        )
        for run in list(live):
            run_cancel_request(run=run)
        frame_send(
            tenant_id=conversation.tenant_id,
            user_id=conversation.user_id,
            frame={
                "type": "conversation.updated",
                "conversation_id": str(conversation.id),
                "deleted": True,
            },
        )
        # Its sandbox workspace and the files its runs produced go with it (their
        # files once this commits).
        conversation_files_delete(tenant=conversation.tenant_id, conversation_id=conversation.id)
        conversation.delete()


def conversation_branch_switch(
    *, actor: Actor, conversation_id: Any, message_id: Any
) -> Conversation:
    """Move the client onto the branch through `message_id`: the current leaf becomes
    the newest message under it (the message itself when nothing answers it)."""
    with transaction.atomic():
        conversation = _locked(actor=actor, conversation_id=conversation_id)
        try:
            message = conversation.messages.get(id=id_parse(message_id))
        except Message.DoesNotExist:
            raise NotFound from None
        leaf = branch_leaf(conversation=conversation, message=message)
        if conversation.current_leaf_id != leaf.id:
            conversation.current_leaf = leaf
            Conversation.objects.filter(pk=conversation.pk).update(current_leaf=leaf)
            _notify(conversation)
    return conversation


def conversation_title_auto_set(*, tenant_id: Any, conversation_id: Any, title: str) -> bool:
    """Store an automatic title, unless a person renamed the conversation meanwhile (or
    it is gone). True when the title changed."""
    with tenant_scope(tenant_id=tenant_id), transaction.atomic():
        conversation = (
            Conversation.objects.select_for_update()
            .filter(id=conversation_id, tenant_id=tenant_id, title_auto=True)
            .first()
        )
        if conversation is None or conversation.title == title:
            return False
        conversation.title = title[:TITLE_MAX_CHARS]
        Conversation.objects.filter(pk=conversation.pk).update(title=conversation.title)
        _notify(conversation)
    return True


# --- export ---------------------------------------------------------------------

EXPORT_FORMATS = ("markdown", "json")


@dataclass
class Export:
    filename: str
    content_type: str
    body: bytes


def message_export(message: Message) -> dict[str, Any]:
    """A message as the JSON exports (a conversation's, a tenant's) write it."""
    return {
        "id": str(message.id),
        "parent_id": str(message.parent_id) if message.parent_id else None,
        "role": message.role,
        "content": message.content,
        "steps": message.steps,
        "created_at": message.created_at.isoformat(),
    }


def conversation_export(*, actor: Actor, conversation_id: Any, fmt: str) -> Export:
    """The conversation as a download: Markdown (the current branch, as read) or JSON
    (every message with its parent, and the runs' metadata)."""
    if fmt not in EXPORT_FORMATS:
        raise ValidationError(f"Unknown export format {fmt!r}: use markdown or json.")
    conversation = conversation_get(actor=actor, conversation_id=conversation_id)
    tree = message_tree(conversation=conversation)
    stem = f"{slugify(conversation.title)[:60] or 'conversation'}-{str(conversation.id)[:8]}"
    if fmt == "markdown":
        return Export(f"{stem}.md", "text/markdown; charset=utf-8", _markdown(tree).encode())
    runs = Run.objects.filter(conversation=conversation).order_by("created_at")
    document = {
        "format": "parley.conversation/1",
        "exported_at": timezone.now().isoformat(),
        "conversation": {
            "id": str(conversation.id),
            "title": conversation.title,
            "title_auto": conversation.title_auto,
            "model": conversation.model,
            "current_leaf_id": str(tree.leaf_id) if tree.leaf_id else None,
            "created_at": conversation.created_at.isoformat(),
            "updated_at": conversation.updated_at.isoformat(),
        },
        "messages": [message_export(m) for m in tree.messages],
        "runs": [
            {
                "id": str(r.id),
                "user_message_id": str(r.user_message_id),
                "assistant_message_id": str(r.assistant_message_id)
                if r.assistant_message_id
                else None,
                "state": r.state,
                "model": r.model,
                "finish_reason": r.finish_reason,
                "error_code": r.error_code,
                "prompt_tokens": r.prompt_tokens,
                "completion_tokens": r.completion_tokens,
                "created_at": r.created_at.isoformat(),
                "started_at": r.started_at.isoformat() if r.started_at else None,
                "finished_at": r.finished_at.isoformat() if r.finished_at else None,
            }
            for r in runs
        ],
    }
    body = json.dumps(document, ensure_ascii=False, indent=2).encode()
    return Export(f"{stem}.json", "application/json", body)


ROLE_HEADINGS = {"user": "User", "assistant": "Assistant", "system": "System"}


def _markdown(tree: Any) -> str:
    conversation = tree.conversation
    lines = [f"# {conversation.title or 'Conversation'}", ""]
    lines += [f"_Exported from Parley on {timezone.now():%Y-%m-%d %H:%M} UTC._", ""]
    for step in tree.branch:
        message = step.message
        lines += [f"## {ROLE_HEADINGS.get(message.role, message.role.title())}", ""]
        lines += _markdown_steps(message.steps)
        lines += [message.content.rstrip(), ""]
    return "\n".join(lines)


def _markdown_steps(steps: list[dict[str, Any]]) -> list[str]:
    """An agent's tool calls before its answer: name, arguments, result or error."""
    lines: list[str] = []
    for step in steps:
        lines += [f"**Tool call:** `{step.get('name', '')}`", ""]
        if step.get("arguments") is not None:
            lines += _fenced(json.dumps(step["arguments"], ensure_ascii=False, indent=2), "json")
        if step.get("error"):
            lines += ["Error:", "", *_fenced(str(step["error"]))]
        elif step.get("result") is not None:
            cut = " (cut short)" if step.get("truncated") else ""
            lines += [f"Result{cut}:", "", *_fenced(str(step["result"]))]
        for artifact in step.get("artifacts") or ():
            lines += [f"File: `{artifact.get('name', '')}` ({artifact.get('size', 0)} bytes)", ""]
    return lines


def _fenced(text: str, language: str = "") -> list[str]:
    """A fenced block whose fence is longer than any backtick run inside the text."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [f"{fence}{language}", text, fence, ""]
