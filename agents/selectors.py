"""Reading a tenant's plugins: what admins see (settings redacted), which agents a
member may pick, and what an agent run of the tenant gets (server side only)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from langchain_core.tools import BaseTool

from agents.manifest import AgentSpec, PluginManifest, settings_redact, settings_unseal
from agents.models import TenantPlugin
from agents.registry import LoadedPlugin, PluginNotFound, plugin_get, plugins_loaded
from agents.scopes import tools_allowed
from tenants.access import Actor, NotFound
from tenants.rls import tenant_scope

AGENT_SEPARATOR = "."  # an agent's id: "<plugin>.<agent>", both names [a-z0-9_]


@dataclass(frozen=True)
class PluginState:
    """One loaded plugin as a tenant admin sees it."""

    plugin: LoadedPlugin
    enabled: bool
    granted_scopes: list[str]
    settings: dict[str, Any]  # redacted: each secret only says whether it is set


@dataclass(frozen=True)
class AvailableAgent:
    plugin: LoadedPlugin
    agent: AgentSpec

    @property
    def id(self) -> str:
        return f"{self.plugin.name}{AGENT_SEPARATOR}{self.agent.name}"


@dataclass(frozen=True)
class RunTools:
    """What an agent run of a tenant may use. Holds secrets in the clear: never log,
    store or send it."""

    manifest: PluginManifest
    agent: AgentSpec
    granted_scopes: frozenset[str]
    tools: list[BaseTool]
    settings: dict[str, Any]

    def __repr__(self) -> str:  # keeps the settings out of tracebacks and logs
        return (
            f"RunTools(plugin={self.manifest.name!r}, agent={self.agent.name!r}, "
            f"tools={[tool.name for tool in self.tools]!r})"
        )


def _rows(tenant_id: Any) -> dict[str, TenantPlugin]:
    return {row.plugin: row for row in TenantPlugin.objects.filter(tenant_id=tenant_id)}


def _state(plugin: LoadedPlugin, row: TenantPlugin | None) -> PluginState:
    if row is None:
        return PluginState(plugin=plugin, enabled=False, granted_scopes=[], settings={})
    return PluginState(
        plugin=plugin,
        enabled=row.enabled,
        granted_scopes=sorted(row.granted_scopes),
        settings=settings_redact(plugin.manifest, row.settings),
    )


def plugin_states(*, actor: Actor) -> list[PluginState]:
    """Every loaded plugin with this tenant's state of it (callers check the role)."""
    rows = _rows(actor.tenant_id)
    return [_state(plugin, rows.get(plugin.name)) for plugin in plugins_loaded()]


def plugin_state(*, actor: Actor, name: str) -> PluginState:
    try:
        plugin = plugin_get(name)
    except PluginNotFound:
        raise NotFound from None
    return _state(plugin, TenantPlugin.objects.filter(tenant=actor.tenant, plugin=name).first())


def plugins_enabled(*, actor: Actor) -> list[LoadedPlugin]:
    """The loaded plugins the actor's tenant enabled."""
    names = set(
        TenantPlugin.objects.filter(tenant=actor.tenant, enabled=True).values_list(
            "plugin", flat=True
        )
    )
    return [plugin for plugin in plugins_loaded() if plugin.name in names]


def agents_available(*, actor: Actor) -> list[AvailableAgent]:
    """The agents a member of the tenant may pick for a conversation."""
    return [
        AvailableAgent(plugin=plugin, agent=agent)
        for plugin in plugins_enabled(actor=actor)
        for agent in plugin.manifest.agents
    ]


def tools_for_run(*, tenant_id: uuid.UUID | str, agent: str) -> RunTools:
    """The agent `agent` ("<plugin>.<agent>") as a run of the tenant may use it: the
    agent's tools whose scopes the tenant granted, and the plugin's settings unsealed.
    NotFound unless the plugin is loaded and enabled in the tenant and has that agent."""
    plugin_name, _, agent_name = agent.partition(AGENT_SEPARATOR)
    try:
        plugin = plugin_get(plugin_name)
    except PluginNotFound:
        raise NotFound from None
    spec = next((a for a in plugin.manifest.agents if a.name == agent_name), None)
    if spec is None:
        raise NotFound
    with tenant_scope(tenant_id=tenant_id):
        row = TenantPlugin.objects.filter(
            tenant_id=tenant_id, plugin=plugin_name, enabled=True
        ).first()
    if row is None:
        raise NotFound
    granted = frozenset(row.granted_scopes)
    allowed = tools_allowed(plugin.manifest, granted_scopes=granted)
    return RunTools(
        manifest=plugin.manifest,
        agent=spec,
        granted_scopes=granted,
        tools=[tool for tool in allowed if tool.name in spec.tools],
        settings=settings_unseal(plugin.manifest, row.settings),
    )
