"""`/v1/models`: the models the caller's tenant may use, then its agents."""

from __future__ import annotations

from typing import Any

from gateway import formats
from gateway.agents import AGENT_MODEL_PREFIX
from gateway.errors import from_inference_error
from gateway.services.callers import caller_authenticate
from inference.selectors import models_allowed
from inference.types import InferenceError
from tenants.access import Actor
from tenants.rls import tenant_scope


def models_list(*, actor: Actor) -> list[dict[str, Any]]:
    """Every model a routable backend serves that the tenant's plan allows, once each,
    then the agents the tenant enabled (`agent_models`)."""
    try:
        allowed = models_allowed(tenant_id=actor.tenant_id)
    except InferenceError as exc:  # the tenant is gone: 401
        raise from_inference_error(exc) from None
    found = [
        formats.model_object(
            model_id=model.id, created=model.created, max_model_len=model.max_model_len
        )
        for model in allowed
    ]
    return [*found, *agent_models(actor=actor)]


def agent_models(*, actor: Actor) -> list[dict[str, Any]]:
    """The agents of the plugins the caller's tenant enabled, as model objects
    `agent:<plugin>.<agent>` owned by their plugin."""
    from agents.selectors import agents_available

    with tenant_scope(tenant_id=actor.tenant_id):
        available = agents_available(actor=actor)
    return [
        {"id": f"{AGENT_MODEL_PREFIX}{agent.id}", "object": "model", "owned_by": agent.plugin.name}
        for agent in available
    ]


def models_answer(*, authorization: str | None) -> dict[str, Any]:
    actor = caller_authenticate(authorization=authorization)
    return {"object": "list", "data": models_list(actor=actor)}
