"""Input and output of the tenant plugin API (agents.api_tenant)."""

from __future__ import annotations

from typing import Any

from ninja import Schema


class AgentOut(Schema):
    id: str  # "<plugin>.<agent>": what a conversation stores as its agent
    name: str
    title: str
    description: str


class ToolOut(Schema):
    name: str
    description: str
    scopes: list[str]


class PluginOut(Schema):
    """A plugin as the tenant sees it. Members see enabled plugins and their agents;
    the fields marked admin are left out for them."""

    name: str
    version: str
    description: str
    enabled: bool
    agents: list[AgentOut]
    # Admin only:
    tools: list[ToolOut] | None = None
    scopes: list[str] | None = None  # every scope its tools declare, grantable
    granted_scopes: list[str] | None = None
    settings: dict[str, Any] | None = None  # secrets redacted: true when set
    settings_schema: dict[str, Any] | None = None
    secret_settings: list[str] | None = None


class PluginIn(Schema):
    """Any of the three; what is left out stays as it is. In `settings`, a secret left
    out (or sent back as `true`) keeps its value, `null` clears it."""

    enabled: bool | None = None
    granted_scopes: list[str] | None = None
    settings: dict[str, Any] | None = None
