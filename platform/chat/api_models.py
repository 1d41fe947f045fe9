"""`GET /api/v1/models`: what may answer the caller's messages, for a model and agent
picker: the pool's models their tenant may use (the default marked) and the agents it
enabled. A session, or an API key with the `chat` scope. (`/v1/models`, the OpenAI
API, lists the same models and agents for API keys, in OpenAI's shape.)"""

from __future__ import annotations

from django.core.exceptions import PermissionDenied
from django.http import HttpRequest
from ninja import Field, Router, Schema

from chat.choices import answer_choices
from tenants.api.auth import actor_of

router = Router(tags=["conversations"])


class ModelChoiceOut(Schema):
    id: str = Field(description="The model's name: `model` of `chat.send` and of the REST sends.")
    context_length: int | None = Field(
        description="Its context length in tokens, as the backend reports it; null when unknown."
    )
    default: bool = Field(description="The one preselected for the tenant's members.")


class AgentChoiceOut(Schema):
    id: str = Field(description='`agent` of `chat.send`: "<plugin>.<agent>".')
    title: str
    description: str


class ChoicesOut(Schema):
    default_model: str = Field(
        description='The model used when a send names none; "" when the pool serves none.'
    )
    models: list[ModelChoiceOut]
    agents: list[AgentChoiceOut] = Field(
        description="The agents of the plugins the tenant enabled (besides plain chat)."
    )


@router.get("", response=ChoicesOut, url_name="chat_models")
def models_list(request: HttpRequest):
    """The models and agents you may choose to answer your messages, the tenant's
    default model marked: the pool's healthy backends' models that the tenant's plan
    allows, by name."""
    actor = actor_of(request)
    if not actor.has_scope("chat"):
        raise PermissionDenied("This API key lacks the 'chat' scope.")
    return answer_choices(actor=actor)
