"""/api/v1/plugins: a tenant's plugins. Members list the agents of the plugins their
tenant enabled; admins see every loaded plugin with the tenant's grants and settings
(secrets redacted) and change them with PUT."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest
from ninja import Router

from agents.manifest import settings_secret_fields
from agents.registry import LoadedPlugin
from agents.schemas import PluginIn, PluginOut
from agents.selectors import AvailableAgent, PluginState, plugin_state, plugin_states
from agents.services import plugin_update
from tenants.access import Actor, NotFound
from tenants.api.auth import actor_of

router = Router(tags=["plugins"])


def _agents(plugin: LoadedPlugin) -> list[dict[str, Any]]:
    return [
        {
            "id": AvailableAgent(plugin=plugin, agent=agent).id,
            "name": agent.name,
            "title": agent.title,
            "description": agent.description,
        }
        for agent in plugin.manifest.agents
    ]


def _out(state: PluginState, *, admin: bool) -> dict[str, Any]:
    plugin = state.plugin
    manifest = plugin.manifest
    out: dict[str, Any] = {
        "name": plugin.name,
        "version": manifest.version,
        "description": manifest.description,
        "enabled": state.enabled,
        "agents": _agents(plugin),
    }
    if admin:
        out.update(
            tools=[
                {
                    "name": tool.name,
                    "description": tool.description,
                    "scopes": sorted(manifest.tool_scopes(tool.name)),
                }
                for tool in manifest.tools
            ],
            scopes=sorted(set().union(*(manifest.tool_scopes(t.name) for t in manifest.tools))),
            granted_scopes=state.granted_scopes,
            settings=state.settings,
            settings_schema=dict(manifest.settings_schema),
            secret_settings=sorted(settings_secret_fields(manifest.settings_schema)),
        )
    return out


def _is_admin(actor: Actor) -> bool:
    return actor.is_admin and actor.has_scope("admin")


@router.get("", response=list[PluginOut], exclude_none=True, url_name="plugins")
def plugins_list(request: HttpRequest):
    actor = actor_of(request)
    admin = _is_admin(actor)
    return [
        _out(state, admin=admin) for state in plugin_states(actor=actor) if admin or state.enabled
    ]


@router.get("/{name}", response=PluginOut, exclude_none=True, url_name="plugin")
def plugins_get(request: HttpRequest, name: str):
    actor = actor_of(request)
    admin = _is_admin(actor)
    state = plugin_state(actor=actor, name=name)
    if not (admin or state.enabled):
        raise NotFound
    return _out(state, admin=admin)


@router.put("/{name}", response=PluginOut, exclude_none=True, url_name="plugin")
def plugins_update(request: HttpRequest, name: str, payload: PluginIn):
    actor = actor_of(request)
    plugin_update(
        actor=actor,
        name=name,
        enabled=payload.enabled,
        granted_scopes=payload.granted_scopes,
        settings=payload.settings,
    )
    return _out(plugin_state(actor=actor, name=name), admin=True)
