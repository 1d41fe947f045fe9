"""Writes to conversations, messages and runs."""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Sequence
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from chat.choices import model_check
from chat.documents import attachments_check
from chat.models import Conversation, Message, Run
from chat.notify import frame_send
from chat.protocol import run_started_frame
from chat.selectors import conversation_get, run_get
from chat.services.conversations import conversation_frame
from chat.services.run_state import run_cancel_request
from chat.titles import title_first_words
from tenants.access import Actor, NotFound, Unavailable, id_parse
from tenants.models import User
from tenants.rls import tenant_scope

logger = logging.getLogger(__name__)


class RunNotQueued(Unavailable):
    """The run was recorded but no worker could be handed it (the broker is down)."""

    def __init__(self, run_id: str) -> None:
        super().__init__(
            "Your message is saved, but no worker could take the run right now; "
            "try again in a moment."
        )
        self.run_id = run_id


# `chat.send` with this agent returns a conversation to plain chat. Agent ids are
# "<plugin>.<agent>", so no agent can be named this.
PLAIN_CHAT = "none"


def _agent_check(*, actor: Actor, agent: str) -> None:
    """NotFound unless `agent` ("<plugin>.<agent>") is available to the actor: its plugin
    is loaded and enabled in the actor's tenant and has that agent."""
    from agents.selectors import agents_available

    if agent not in {available.id for available in agents_available(actor=actor)}:
        raise NotFound


class _Current:
    """`parent_message_id` left out: answer the tip of the conversation's current branch."""


CURRENT = _Current()


def _message_get(*, conversation: Conversation, message_id: Any) -> Message:
    try:
        return conversation.messages.get(id=id_parse(message_id))
    except Message.DoesNotExist:
        raise NotFound from None


def _check_content(content: Any) -> None:
    if not isinstance(content, str) or not content.strip():
        raise ValidationError("The message is empty.")
    if len(content) > settings.PARLEY_MAX_MESSAGE_CHARS:
        raise ValidationError(
            f"The message is {len(content)} characters; the limit is "
            f"{settings.PARLEY_MAX_MESSAGE_CHARS}."
        )


def _chat_user(actor: Actor) -> User:
    if actor.user is None:
        raise ValidationError("Chat needs a person: this API key was created by no member.")
    return actor.user


def _run_by_client_id(*, actor: Actor, client_id: str) -> Run | None:
    if not client_id:
        return None
    return Run.objects.filter(tenant=actor.tenant, user=actor.user, client_id=client_id).first()


def _run_create(
    *,
    actor: Actor,
    conversation: Conversation,
    user_message: Message,
    model: str,
    client_id: str,
    new_conversation: bool = False,
) -> Run:
    """The run row (in the caller's transaction) and its hand-over to a worker on commit.
    The run gets the conversation's agent, if it has one and it is still available. A
    chosen `model` must be one the tenant may use (ModelNotFound) and becomes the
    conversation's, for the sends that name none; none chosen: the conversation's.

    The member's other sockets (another tab) are told on commit: a new conversation's
    `conversation.updated` (its message is stored, whatever becomes of the run), then,
    once a worker has the run, `run.started`, to attach to it. The socket that sent it
    has its own `run.started` and hears neither."""
    # A review's question carries its template: answering it again reviews again.
    task = "review" if (user_message.documents or {}).get("review") else ""
    if conversation.agent and not task:
        _agent_check(actor=actor, agent=conversation.agent)
    if model:
        model_check(actor=actor, model=model)
    run = Run.objects.create(
        tenant=actor.tenant,
        conversation=conversation,
        user=_chat_user(actor),
        user_message=user_message,
        model=model or conversation.model,
        agent="" if task else conversation.agent,
        task=task,
        client_id=client_id,
    )
    conversation.current_leaf = user_message
    conversation.model = model or conversation.model
    conversation.save(update_fields=["current_leaf", "model", "updated_at"])
    run_id, tenant_id = run.id, actor.tenant_id
    agent = run.agent
    started = run_started_frame(run)
    listed = conversation_frame(conversation) if new_conversation else None

    def hand_over() -> None:
        tell = functools.partial(
            frame_send, tenant_id=tenant_id, user_id=run.user_id, unless_run=started["run_id"]
        )
        if listed is not None:
            tell(frame=listed)
        run_enqueue(run_id=run_id, tenant_id=tenant_id, agent=agent, task=task)
        tell(frame=started)

    transaction.on_commit(hand_over)
    return run


def _idempotent(create: Any, *, actor: Actor, client_id: str) -> Run:
    """Create through `create()` unless a run with this client id exists: a retried
    frame (or two racing ones) yields the first run, never a second generation."""
    existing = _run_by_client_id(actor=actor, client_id=client_id)
    if existing is not None:
        return existing
    try:
        with transaction.atomic():
            run: Run = create()
            return run
    except IntegrityError:
        existing = _run_by_client_id(actor=actor, client_id=client_id)
        if existing is None:
            raise
        return existing


def chat_send(
    *,
    actor: Actor,
    content: str,
    conversation_id: Any = None,
    parent_message_id: Any = CURRENT,
    model: str = "",
    client_id: str = "",
    agent: str | None = None,
    document_ids: Sequence[Any] = (),
) -> Run:
    """Record the user's message and queue a run that answers it.

    `document_ids` attaches the actor's documents to the message (chat.documents): they
    are in play for this turn and the later ones of its branch. NotFound for one that is
    not the actor's, ValidationError for one that is not ready.

    `agent` ("<plugin>.<agent>") makes that agent answer, in this and later sends of the
    conversation; None keeps the conversation's agent (a new conversation: plain chat);
    PLAIN_CHAT or "" returns the conversation to plain chat. NotFound for an agent that
    is not available to the actor (its plugin is not enabled in the tenant).

    The message goes under `parent_message_id` (None: a new root, i.e. an edit of the
    first message), by default under the tip of the conversation's current branch;
    giving the parent of an existing user message makes an edited sibling. A
    `client_id` seen before returns that first run. Raises NotFound for a conversation
    or parent the actor cannot see, ValidationError for bad input."""
    user = _chat_user(actor)
    _check_content(content)
    if agent == PLAIN_CHAT:
        agent = ""

    def create() -> Run:
        if conversation_id:
            conversation = conversation_get(actor=actor, conversation_id=conversation_id)
            conversation = Conversation.objects.select_for_update().get(pk=conversation.pk)
            if parent_message_id is CURRENT:
                parent = conversation.current_leaf or (
                    conversation.messages.order_by("-created_at", "-id").first()
                )
            elif parent_message_id is None:
                parent = None
            else:
                parent = _message_get(conversation=conversation, message_id=parent_message_id)
        else:
            if parent_message_id not in (CURRENT, None):
                raise ValidationError("A parent message needs its conversation_id.")
            conversation = Conversation.objects.create(
                tenant=actor.tenant, user=user, title=title_first_words(content), model=model
            )
            parent = None
        attached = attachments_check(actor=actor, document_ids=document_ids)
        if agent is not None and agent != conversation.agent:
            conversation.agent = agent
            conversation.save(update_fields=["agent", "updated_at"])
        user_message = Message.objects.create(
            tenant=actor.tenant,
            conversation=conversation,
            parent=parent,
            role=Message.Role.USER,
            content=content,
            document_ids=attached,
        )
        return _run_create(
            actor=actor,
            conversation=conversation,
            user_message=user_message,
            model=model,
            client_id=client_id,
            new_conversation=not conversation_id,
        )

    return _idempotent(create, actor=actor, client_id=client_id)


def run_regenerate(*, actor: Actor, message_id: Any, model: str = "", client_id: str = "") -> Run:
    """Answer a user message again (given the message or an answer to it): the new
    answer is a sibling of the earlier ones and becomes the current branch."""
    _chat_user(actor)
    message_uuid = id_parse(message_id)

    def create() -> Run:
        message = (
            Message.objects.select_related("conversation")
            .filter(tenant=actor.tenant, conversation__user=actor.user, id=message_uuid)
            .first()
        )
        if message is None:
            raise NotFound
        if message.role == Message.Role.ASSISTANT:
            if message.parent is None or message.parent.role != Message.Role.USER:
                raise ValidationError("This answer has no question to regenerate.")
            message = message.parent
        elif message.role != Message.Role.USER:
            raise ValidationError("Only a user message or an answer can be regenerated.")
        conversation = Conversation.objects.select_for_update().get(pk=message.conversation_id)
        return _run_create(
            actor=actor,
            conversation=conversation,
            user_message=message,
            model=model,
            client_id=client_id,
        )

    return _idempotent(create, actor=actor, client_id=client_id)


def run_cancel(*, actor: Actor, run_id: Any) -> Run:
    """Stop one of the actor's runs (chat.services.run_state.run_cancel_request): a
    queued run ends `cancelled` at once; a running one stops at its worker's next check
    (within a fraction of a second while tokens flow), keeping the partial answer. A
    finished run is returned as it is."""
    run = run_get(actor=actor, run_id=run_id)
    run_cancel_request(run=run)
    run.refresh_from_db()
    return run


def run_enqueue(
    *, run_id: uuid.UUID, tenant_id: uuid.UUID, agent: str = "", task: str = ""
) -> None:
    """Hand the run to a worker: a plain chat run to the `runs` queue, an agent's run or
    a review to the `agents` queue (CELERY_TASK_ROUTES). If that fails, the run is
    failed with a reason (the user's message stays stored) and RunNotQueued tells the
    caller."""
    from chat.tasks import agent_execute_task, review_execute_task, run_execute_task
    from config.celery import enqueue

    chosen = (
        review_execute_task
        if task == "review"
        else (agent_execute_task if agent else run_execute_task)
    )
    try:
        enqueue(chosen, str(run_id), str(tenant_id))
    except Exception as exc:
        logger.exception("could not enqueue run %s", run_id)
        with tenant_scope(tenant_id=tenant_id):
            Run.objects.filter(id=run_id, state=Run.State.QUEUED).update(
                state=Run.State.FAILED,
                error_code="queue_unavailable",
                error_message=f"The run could not be handed to a worker: {type(exc).__name__}",
                finished_at=timezone.now(),
            )
        raise RunNotQueued(str(run_id)) from exc


def review_start(
    *,
    actor: Actor,
    document_id: Any,
    template: str,
    questions: Sequence[str] = (),
    model: str = "",
    client_id: str = "",
) -> Run:
    """Start a review of one of the actor's documents as a run of a new conversation
    (chat.review_turn). `template` is a built-in kind (documents.review.BUILT_IN:
    `summary`, `key_terms`, `risks`, `questions`) or the id of one of the tenant's
    templates; `questions` are asked by a `questions` review (the built-in one needs
    them; they replace a tenant template's). NotFound for a document or template the
    actor cannot see; ValidationError for one not ready, or no questions."""
    from documents.review import BUILT_IN, ReviewSpec, spec_check
    from documents.selectors import review_template_get

    user = _chat_user(actor)
    questions = [q.strip() for q in questions if q.strip()]
    if template in BUILT_IN:
        base = BUILT_IN[template]
    else:
        row = review_template_get(actor=actor, template_id=template)
        base = ReviewSpec(row.kind, row.name, row.instructions, tuple(row.questions))
    spec = ReviewSpec(base.kind, base.name, base.instructions, tuple(questions or base.questions))
    try:
        spec_check(
            kind=spec.kind, name=spec.name, instructions=spec.instructions, questions=spec.questions
        )
    except ValueError as exc:
        raise ValidationError(str(exc)) from None

    def create() -> Run:
        [attached] = attachments_check(actor=actor, document_ids=[document_id])
        from documents.models import Document

        title = Document.objects.get(id=attached).title
        conversation = Conversation.objects.create(
            tenant=actor.tenant,
            user=user,
            title=f"{spec.name}: {title}"[:200],
            title_auto=False,
            model=model,
        )
        asked = f"Review “{title}”: {spec.name}."
        if spec.questions:
            asked += "\n" + "\n".join(f"- {q}" for q in spec.questions)
        user_message = Message.objects.create(
            tenant=actor.tenant,
            conversation=conversation,
            role=Message.Role.USER,
            content=asked,
            document_ids=[attached],
            documents={"review": spec.as_dict()},
        )
        return _run_create(
            actor=actor,
            conversation=conversation,
            user_message=user_message,
            model=model,
            client_id=client_id,
            new_conversation=True,
        )

    return _idempotent(create, actor=actor, client_id=client_id)
