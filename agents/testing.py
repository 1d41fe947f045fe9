"""The conformance suite every plugin runs, built-in or third-party.

A plugin's tests subclass `PluginConformance`, name its entry point and give example
settings; pytest then runs every check below against the installed plugin, as
LangChain's partner packages share their standard tests:

    from agents.testing import PluginConformance

    class TestWeatherConformance(PluginConformance):
        entry_point = "weather"
        settings_examples = [{"api_key": "k-123456789"}]
        invalid_settings_examples = [{"api_key": 42}]

The plugin is loaded from its installed entry point (importlib.metadata), exactly as
Parley loads it, so the suite also proves the distribution is registered.
"""

from __future__ import annotations

import json
from importlib import metadata
from typing import Any, ClassVar

import pytest

from agents.manifest import (
    SCOPES,
    SettingsError,
    manifest_problems,
    settings_redact,
    settings_schema_problems,
    settings_seal,
    settings_secret_fields,
    settings_unseal,
    tool_parameters,
)
from agents.registry import ENTRY_POINT_GROUP, LoadedPlugin, PluginRegistry, plugin_load
from agents.runtime import agent_tools
from agents.scopes import ToolRefused, side_effects, tool_guard, tools_allowed


class PluginConformance:
    # The plugin's entry point name in `parley.plugins` (equal to its manifest name).
    entry_point: ClassVar[str] = ""
    # Settings a tenant admin could save; each must validate and round-trip.
    settings_examples: ClassVar[list[dict[str, Any]]] = [{}]
    # Settings the plugin must refuse (by its schema or its parley_settings_check hook).
    invalid_settings_examples: ClassVar[list[dict[str, Any]]] = []

    @pytest.fixture
    def entry_point_object(self) -> metadata.EntryPoint:
        assert self.entry_point, f"{type(self).__name__} must set entry_point"
        found = [
            ep
            for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)
            if ep.name == self.entry_point
        ]
        assert found, (
            f"No installed distribution registers {self.entry_point!r} in {ENTRY_POINT_GROUP} "
            "(is the plugin installed, with its entry point in pyproject.toml?)"
        )
        return found[0]

    @pytest.fixture
    def plugin(self, entry_point_object: metadata.EntryPoint) -> LoadedPlugin:
        return plugin_load(entry_point_object)  # PluginLoadError says what is wrong

    @pytest.fixture
    def registry(self, entry_point_object: metadata.EntryPoint) -> PluginRegistry:
        return PluginRegistry(
            allowlist=[self.entry_point], entry_points=lambda: [entry_point_object]
        )

    def test_loads_through_the_registry(self, registry: PluginRegistry) -> None:
        assert registry.failures() == []
        assert [plugin.name for plugin in registry.plugins()] == [self.entry_point]

    def test_manifest_is_valid(self, plugin: LoadedPlugin) -> None:
        assert manifest_problems(plugin.manifest) == []
        assert plugin.manifest.name == self.entry_point

    def test_tools_have_descriptions_and_schemas(self, plugin: LoadedPlugin) -> None:
        assert plugin.manifest.tools or plugin.manifest.agents, "the plugin adds nothing"
        for tool in plugin.manifest.tools:
            assert len(tool.description.strip()) >= 20, f"{tool.name}: description too short"
            parameters = tool_parameters(tool)
            assert parameters["type"] == "object", tool.name
            for argument, schema in parameters.get("properties", {}).items():
                # The model sees only this: an argument without a description is a guess.
                assert schema.get("description"), f"{tool.name}({argument}) has no description"
            json.dumps(parameters)  # plain JSON, as sent to the model server

    def test_scopes_declared(self, plugin: LoadedPlugin) -> None:
        manifest = plugin.manifest
        assert set(manifest.scopes) == {tool.name for tool in manifest.tools}
        for tool in manifest.tools:
            assert manifest.tool_scopes(tool.name) <= set(SCOPES), tool.name

    def test_tools_need_their_scopes(self, plugin: LoadedPlugin) -> None:
        manifest = plugin.manifest
        everything = tools_allowed(manifest, granted_scopes=SCOPES)
        assert [tool.name for tool in everything] == [tool.name for tool in manifest.tools]
        offered = {tool.name for tool in tools_allowed(manifest, granted_scopes=())}
        for tool in manifest.tools:
            if manifest.tool_scopes(tool.name):
                assert tool.name not in offered
                with pytest.raises(ToolRefused):
                    tool_guard(manifest, tool_name=tool.name, granted_scopes=())
            else:
                assert tool.name in offered

    def test_untrusted_runs_get_no_tool_with_side_effects(self, plugin: LoadedPlugin) -> None:
        # A run reading document text (agents.context.ToolContext.untrusted) is never
        # offered a tool that acts on the world, whatever the tenant granted.
        manifest = plugin.manifest
        for agent in manifest.agents:
            offered = agent_tools(
                spec=agent, manifest=manifest, granted_scopes=SCOPES, untrusted=True
            )
            for tool in offered:
                assert not side_effects(manifest.tool_scopes(tool.name)), (agent.name, tool.name)
            trusted = agent_tools(spec=agent, manifest=manifest, granted_scopes=SCOPES)
            assert {t.name for t in trusted} - {t.name for t in offered} == {
                t.name for t in trusted if side_effects(manifest.tool_scopes(t.name))
            }

    def test_agents_use_own_tools(self, plugin: LoadedPlugin) -> None:
        names = {tool.name for tool in plugin.manifest.tools}
        for agent in plugin.manifest.agents:
            assert agent.instructions.strip(), agent.name
            assert set(agent.tools) <= names, agent.name

    def test_settings_schema_valid(self, plugin: LoadedPlugin) -> None:
        assert settings_schema_problems(plugin.manifest.settings_schema) == []

    def test_settings_round_trip(self, plugin: LoadedPlugin, registry: PluginRegistry) -> None:
        # Stored as Parley stores them: secrets sealed with tenants.crypto, then JSON.
        manifest = plugin.manifest
        secrets = settings_secret_fields(manifest.settings_schema)
        assert self.settings_examples, "give at least one example of valid settings"
        for example in self.settings_examples:
            clean = registry.settings_check(self.entry_point, example)
            assert json.loads(json.dumps(clean)) == clean
            stored = settings_seal(manifest, clean)
            for name in secrets & set(clean):
                assert clean[name] not in json.dumps(stored), f"secret {name} stored in clear"
            assert settings_unseal(manifest, json.loads(json.dumps(stored))) == clean
            shown = settings_redact(manifest, clean)
            for name in secrets & set(clean):
                assert shown[name] is True and clean[name] not in json.dumps(shown)

    def test_invalid_settings_refused(self, plugin: LoadedPlugin, registry: PluginRegistry) -> None:
        for example in self.invalid_settings_examples:
            with pytest.raises(SettingsError) as refused:
                registry.settings_check(self.entry_point, example)
            assert refused.value.problems
