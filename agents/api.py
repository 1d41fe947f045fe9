"""GET /api/v1/operator/plugins: the plugins this deployment loaded, what each adds,
and why any installed plugin was skipped. Operators only; others get 404."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest
from ninja import Router, Schema

from agents.manifest import settings_secret_fields, tool_parameters
from agents.registry import LoadedPlugin, plugin_failures, plugins_loaded, plugins_not_allowed
from tenants.api.operator import OperatorSession, operator_of

router = Router(tags=["operator"], auth=OperatorSession())


class ToolOut(Schema):
    name: str
    description: str
    scopes: list[str]
    parameters: dict[str, Any]


class AgentOut(Schema):
    name: str
    title: str
    description: str
    tools: list[str]


class PluginOut(Schema):
    name: str
    version: str
    description: str
    distribution: str
    entry_point: str
    tools: list[ToolOut]
    agents: list[AgentOut]
    settings_schema: dict[str, Any]
    secret_settings: list[str]


class FailureOut(Schema):
    name: str
    entry_point: str
    distribution: str
    reason: str


class PluginsOut(Schema):
    plugins: list[PluginOut]
    failures: list[FailureOut]
    not_allowed: list[str]


def _plugin_out(plugin: LoadedPlugin) -> dict[str, Any]:
    manifest = plugin.manifest
    return {
        "name": plugin.name,
        "version": manifest.version,
        "description": manifest.description,
        "distribution": plugin.distribution,
        "entry_point": plugin.entry_point,
        "tools": [
            {
                "name": tool.name,
                "description": tool.description,
                "scopes": sorted(manifest.tool_scopes(tool.name)),
                "parameters": tool_parameters(tool),
            }
            for tool in manifest.tools
        ],
        "agents": [
            {
                "name": agent.name,
                "title": agent.title,
                "description": agent.description,
                "tools": list(agent.tools),
            }
            for agent in manifest.agents
        ],
        "settings_schema": dict(manifest.settings_schema),
        "secret_settings": sorted(settings_secret_fields(manifest.settings_schema)),
    }


@router.get("", response=PluginsOut, url_name="operator_plugins")
def plugins_list(request: HttpRequest):
    operator_of(request)
    return {
        "plugins": [_plugin_out(plugin) for plugin in plugins_loaded()],
        "failures": [vars(failure) for failure in plugin_failures()],
        "not_allowed": plugins_not_allowed(),
    }
