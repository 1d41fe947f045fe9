"""What may answer a member's messages: the pool's models their tenant may use (the
tenant's default marked) and the agents their tenant enabled. The chat page's pickers
and GET /api/v1/models read them here, and a chosen model is checked here before a
run is queued."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError

from inference.selectors import models_allowed, tenant_default_model
from tenants.access import Actor


class ModelNotFound(ValidationError):
    """A chosen model the pool does not serve to the actor's tenant (the websocket's
    `model_not_found`; the REST API's 400, as any ValidationError)."""


def model_choices(*, actor: Actor) -> dict[str, Any]:
    """The models the actor may choose, by name (the pool's order is its rows', which
    nothing fixes): `id`, `context_length` (None when the backend does not tell) and
    `default` (the one preselected); and `default_model` ("" when the pool serves the
    tenant none)."""
    allowed = models_allowed(tenant_id=actor.tenant_id)
    default = tenant_default_model(tenant_id=actor.tenant_id, allowed=allowed)
    return {
        "default_model": default,
        "models": [
            {"id": m.id, "context_length": m.max_model_len, "default": m.id == default}
            for m in sorted(allowed, key=lambda m: m.id)
        ],
    }


def agent_choices(*, actor: Actor) -> list[dict[str, str]]:
    """The agents the member may pick for a conversation (besides plain chat): those of
    the plugins the tenant enabled."""
    from agents.selectors import agents_available  # (LangChain loads with the plugins)

    return [
        {
            "id": available.id,
            "title": available.agent.title,
            "description": available.agent.description,
        }
        for available in agents_available(actor=actor)
    ]


def answer_choices(*, actor: Actor) -> dict[str, Any]:
    """The models (`model_choices`) and the agents (`agent_choices`) together."""
    return {**model_choices(actor=actor), "agents": agent_choices(actor=actor)}


def model_check(*, actor: Actor, model: str) -> None:
    """Refuse a chosen model that the actor's tenant may not use now, before a run is
    queued for it: the member learns at once, and what to choose, instead of reading
    a failed run. (A model that leaves the pool later still fails its run.)"""
    ids = sorted(m.id for m in models_allowed(tenant_id=actor.tenant_id))
    if model in ids:
        return
    choose = f"choose one of: {', '.join(ids)}." if ids else "the pool serves none right now."
    raise ModelNotFound(f"The model {model!r} is not one you may use; {choose}")
