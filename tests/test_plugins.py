"""The plugin mechanism: discovery by entry points, the allowlist, broken plugins
reported and skipped, documented hooks, scopes, and the operator's view."""

from __future__ import annotations

import inspect
import logging
import textwrap
from importlib import metadata
from io import StringIO

import pytest
from django.core.management import call_command
from langchain_core.tools import tool

from agents import hookspecs
from agents.checks import check_plugins
from agents.manifest import (
    AgentSpec,
    PluginManifest,
    SettingsError,
    manifest_problems,
    settings_redact,
    settings_seal,
    settings_unseal,
)
from agents.registry import (
    ENTRY_POINT_GROUP,
    PluginNotFound,
    PluginRegistry,
    plugin_failures,
    plugin_get,
    plugins_loaded,
    plugins_not_allowed,
    registry_reset,
)
from agents.scopes import ToolRefused, tool_guard, tool_invoke, tools_allowed
from tests.factories import UserFactory

BUILT_IN_AND_THIRD_PARTY = {"calculator", "example_lookup"}


@pytest.fixture(autouse=True)
def fresh_registry():
    registry_reset()
    yield
    registry_reset()


def installed() -> list[metadata.EntryPoint]:
    return list(metadata.entry_points(group=ENTRY_POINT_GROUP))


def fake(name: str, value: str) -> metadata.EntryPoint:
    return metadata.EntryPoint(name=name, value=value, group=ENTRY_POINT_GROUP)


GOOD_PLUGIN = '''
from langchain_core.tools import tool
from agents.hookspecs import hookimpl
from agents.manifest import PluginManifest

@tool
def echo(text: str) -> str:
    """Repeat the text back, unchanged."""
    return text

@hookimpl
def parley_manifest():
    return PluginManifest(name={name!r}, version="1", description="Echoes.",
                          tools=[echo], scopes={scopes})
'''

BROKEN_PLUGINS = {
    # module name -> (source, what the failure must say)
    "pp_import_error": ("import not_a_module_anywhere\n", "ModuleNotFoundError"),
    "pp_raises": ("raise RuntimeError('no config for you')\n", "no config for you"),
    "pp_no_manifest": ("X = 1\n", "implements no parley_manifest hook"),
    "pp_misspelt_hook": (
        "from agents.hookspecs import hookimpl\n@hookimpl\ndef parley_manifesto():\n    pass\n",
        "parley_manifesto",
    ),
    "pp_bad_arguments": (
        "from agents.hookspecs import hookimpl\n@hookimpl\ndef parley_manifest(tenant):\n"
        "    pass\n",
        "tenant",
    ),
    "pp_not_a_manifest": (
        "from agents.hookspecs import hookimpl\n@hookimpl\ndef parley_manifest():\n"
        "    return {'name': 'pp_not_a_manifest'}\n",
        "returned dict, not a PluginManifest",
    ),
    "pp_manifest_raises": (
        "from agents.hookspecs import hookimpl\n@hookimpl\ndef parley_manifest():\n"
        "    raise KeyError('endpoint')\n",
        "parley_manifest raised KeyError",
    ),
    "pp_unknown_scope": (
        GOOD_PLUGIN.format(name="pp_unknown_scope", scopes={"echo": ["root.everything"]}),
        "unknown scope 'root.everything'",
    ),
    "pp_undeclared_scopes": (
        GOOD_PLUGIN.format(name="pp_undeclared_scopes", scopes={}),
        "tool 'echo' declares no scopes",
    ),
    "pp_wrong_name": (
        GOOD_PLUGIN.format(name="someone_else", scopes={"echo": []}),
        "differs from its entry point name 'pp_wrong_name'",
    ),
}


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    for module, (source, _) in BROKEN_PLUGINS.items():
        (tmp_path / f"{module}.py").write_text(source)
    for module in ("pp_good", "pp_twin_a", "pp_twin_b"):
        (tmp_path / f"{module}.py").write_text(GOOD_PLUGIN.format(name="pp_good", scopes={}))
    (tmp_path / "pp_good.py").write_text(GOOD_PLUGIN.format(name="pp_good", scopes={"echo": []}))
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


# --- discovery ----------------------------------------------------------------------------


def test_built_in_and_third_party_plugins_are_found_by_entry_points(settings):
    settings.PARLEY_PLUGINS = None
    names = {plugin.name for plugin in plugins_loaded()}
    assert names >= BUILT_IN_AND_THIRD_PARTY
    assert plugin_failures() == []
    third_party = plugin_get("example_lookup")
    assert third_party.distribution == "parley-example-lookup 0.3.0"
    assert third_party.entry_point == "parley_example_lookup"
    assert plugin_get("calculator").distribution.startswith("parley ")
    assert plugin_get("calculator").manifest.agents[0].name == "calculator"


def test_loading_is_cached(settings):
    settings.PARLEY_PLUGINS = None
    assert plugin_get("calculator") is plugin_get("calculator")


def test_allowlist_limits_what_loads_and_never_imports_the_rest(settings, plugin_dir):
    registry = PluginRegistry(
        allowlist=["calculator"],
        entry_points=lambda: [*installed(), fake("pp_raises", "pp_raises")],
    )
    assert [plugin.name for plugin in registry.plugins()] == ["calculator"]
    # pp_raises would fail on import: left out, it is never imported.
    assert registry.failures() == []
    assert set(registry.not_allowed()) == {"example_lookup", "pp_raises", "docreview", "coding"}
    with pytest.raises(PluginNotFound, match="No plugin 'example_lookup' is loaded"):
        registry.get("example_lookup")


def test_allowlist_comes_from_the_setting(settings):
    settings.PARLEY_PLUGINS = ["example_lookup", "not_installed_anywhere"]
    assert [plugin.name for plugin in plugins_loaded()] == ["example_lookup"]
    assert plugins_not_allowed() == ["calculator", "coding", "docreview"]
    (failure,) = plugin_failures()
    assert failure.name == "not_installed_anywhere"
    assert "named in PARLEY_PLUGINS but no installed distribution" in failure.reason


def test_allowlist_setting_is_read_from_the_environment(monkeypatch):
    import importlib

    from config import env

    monkeypatch.setenv("PARLEY_PLUGINS", " calculator , example_lookup ,")
    assert env.strings("PARLEY_PLUGINS") == ["calculator", "example_lookup"]
    base = importlib.import_module("config.settings.base")
    assert hasattr(base, "PARLEY_PLUGINS")


# --- broken plugins are reported and skipped ------------------------------------------


def test_broken_plugins_are_reported_and_skipped(plugin_dir, caplog):
    entry_points = [fake(module, module) for module in BROKEN_PLUGINS]
    entry_points += [fake("pp_good", "pp_good"), fake("calculator", "plugins.calculator")]
    registry = PluginRegistry(entry_points=lambda: entry_points)
    with caplog.at_level(logging.ERROR, logger="agents.registry"):
        loaded = registry.plugins()  # never raises
    assert [plugin.name for plugin in loaded] == ["calculator", "pp_good"]
    reasons = {failure.name: failure.reason for failure in registry.failures()}
    assert set(reasons) == set(BROKEN_PLUGINS)
    for module, (_, expected) in BROKEN_PLUGINS.items():
        assert expected in reasons[module], (module, reasons[module])
        assert f"Plugin {module} (" in caplog.text
    assert "import of pp_import_error failed: ModuleNotFoundError" in reasons["pp_import_error"]
    assert reasons["pp_unknown_scope"].startswith("invalid manifest: ")


def test_a_plugin_name_claimed_twice_loads_neither(plugin_dir):
    registry = PluginRegistry(
        entry_points=lambda: [
            fake("pp_good", "pp_twin_a"),
            fake("pp_good", "pp_twin_b"),
            fake("calculator", "plugins.calculator"),
        ]
    )
    assert [plugin.name for plugin in registry.plugins()] == ["calculator"]
    failures = registry.failures()
    assert len(failures) == 2
    assert all("duplicate plugin name 'pp_good'" in f.reason for f in failures)
    assert "pp_twin_a" in failures[0].reason and "pp_twin_b" in failures[0].reason


def test_the_same_registration_seen_twice_is_one(plugin_dir):
    registry = PluginRegistry(
        entry_points=lambda: [fake("pp_good", "pp_good"), fake("pp_good", "pp_good")]
    )
    assert [plugin.name for plugin in registry.plugins()] == ["pp_good"]
    assert registry.failures() == []


def test_a_failing_entry_point_listing_loads_nothing_and_does_not_raise():
    def broken_listing():
        raise OSError("unreadable site-packages")

    registry = PluginRegistry(entry_points=broken_listing)
    assert registry.plugins() == []


# --- the operator sees failures ---------------------------------------------------------


@pytest.fixture
def with_a_broken_plugin(plugin_dir, monkeypatch, settings):
    settings.PARLEY_PLUGINS = None
    monkeypatch.setattr(
        "agents.registry._installed_entry_points",
        lambda: [*installed(), fake("pp_raises", "pp_raises")],
    )
    registry_reset()


def test_system_check_warns_about_each_failure(with_a_broken_plugin):
    (warning,) = check_plugins()
    assert warning.id == "agents.W001"
    assert "Plugin 'pp_raises' is not loaded" in warning.msg
    assert "no config for you" in warning.msg


def test_management_command_lists_plugins_and_failures(with_a_broken_plugin):
    out, err = StringIO(), StringIO()
    call_command("plugins", stdout=out, stderr=err)
    assert "calculator 1.0.0" in out.getvalue()
    assert "tool country_lookup [network.fetch]" in out.getvalue()
    assert "agent geographer: Geographer" in out.getvalue()
    assert "pp_raises: FAILED: import of pp_raises failed: RuntimeError" in err.getvalue()


@pytest.mark.django_db
def test_operator_api_lists_plugins_and_failures(client, with_a_broken_plugin):
    client.force_login(UserFactory(username="olga", is_operator=True))
    response = client.get("/api/v1/operator/plugins")
    assert response.status_code == 200
    body = response.json()
    plugins = {plugin["name"]: plugin for plugin in body["plugins"]}
    assert set(plugins) >= BUILT_IN_AND_THIRD_PARTY
    lookup = plugins["example_lookup"]
    assert lookup["secret_settings"] == ["api_key"]
    tools = {t["name"]: t for t in lookup["tools"]}
    assert tools["country_lookup"]["scopes"] == ["network.fetch"]
    assert tools["country_codes"]["scopes"] == []
    assert tools["country_lookup"]["parameters"]["required"] == ["code"]
    assert [f["name"] for f in body["failures"]] == ["pp_raises"]


@pytest.mark.django_db
def test_operator_api_is_hidden_from_everyone_else(client, alice):
    assert client.get("/api/v1/operator/plugins").status_code == 401
    client.force_login(alice.user)
    assert client.get("/api/v1/operator/plugins").status_code == 404


# --- hooks are documented ------------------------------------------------------------------


def undocumented_hooks(module) -> list[str]:
    specs = [
        name
        for name, function in inspect.getmembers(module, inspect.isfunction)
        if hasattr(function, f"{hookspecs.PROJECT}_spec")
    ]
    assert specs, f"{module.__name__} declares no hooks"
    return [name for name in specs if len(inspect.getdoc(getattr(module, name)) or "") < 40]


def test_every_hook_is_documented():
    assert undocumented_hooks(hookspecs) == []


def test_an_undocumented_hook_is_caught(tmp_path, monkeypatch):
    (tmp_path / "pp_specs.py").write_text(
        textwrap.dedent(
            '''
            from agents.hookspecs import hookspec

            @hookspec
            def parley_documented():
                """Called for a good reason, with these arguments, returning that."""

            @hookspec
            def parley_silent():
                pass
            '''
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import pp_specs

    assert undocumented_hooks(pp_specs) == ["parley_silent"]


# --- scopes ------------------------------------------------------------------------------


def test_tools_are_offered_only_with_their_scopes(settings):
    settings.PARLEY_PLUGINS = None
    manifest = plugin_get("example_lookup").manifest
    names = lambda tools: [t.name for t in tools]  # noqa: E731
    assert names(tools_allowed(manifest, granted_scopes=[])) == ["country_codes"]
    assert names(tools_allowed(manifest, granted_scopes=["documents.read"])) == ["country_codes"]
    assert names(tools_allowed(manifest, granted_scopes={"network.fetch"})) == [
        "country_lookup",
        "country_codes",
    ]


def test_a_tool_call_of_the_third_party_plugin(settings):
    settings.PARLEY_PLUGINS = None
    manifest = plugin_get("example_lookup").manifest
    answer = tool_invoke(
        manifest,
        tool_name="country_lookup",
        arguments={"code": "ke"},
        granted_scopes={"network.fetch"},
    )
    assert answer == "Kenya: capital Nairobi, currency KES"
    assert tool_invoke(
        manifest, tool_name="country_codes", arguments={"prefix": "c"}, granted_scopes=()
    ) == ("CA")


def test_an_ungranted_tool_is_refused_and_never_runs():
    calls = []

    @tool
    def wipe(target: str) -> str:
        """Delete the target document for good."""
        calls.append(target)
        return "deleted"

    manifest = PluginManifest(
        name="wiper", version="1", description="Wipes.", tools=[wipe],
        scopes={"wipe": ["documents.write"]},
    )  # fmt: skip
    assert manifest_problems(manifest) == []
    assert tools_allowed(manifest, granted_scopes={"documents.read"}) == []
    with pytest.raises(ToolRefused, match=r"needs scopes not granted to it: documents\.write"):
        tool_invoke(
            manifest,
            tool_name="wipe",
            arguments={"target": "contract.pdf"},
            granted_scopes={"documents.read"},
        )
    with pytest.raises(ToolRefused, match="has no tool 'rm_rf'") as refused:
        tool_guard(manifest, tool_name="rm_rf", granted_scopes={"documents.write"})
    assert refused.value.plugin == "wiper"
    assert calls == []
    assert tool_invoke(
        manifest,
        tool_name="wipe",
        arguments={"target": "draft.txt"},
        granted_scopes={"documents.write"},
    ) == ("deleted")
    assert calls == ["draft.txt"]


# --- manifests and settings ------------------------------------------------------------------


def test_manifest_problems_are_clear():
    @tool
    def shout(text: str) -> str:
        """Say it loud."""
        return text.upper()

    manifest = PluginManifest(
        name="Bad Name",
        version="",
        description="Shouts.",
        tools=[shout, shout],
        scopes={"shout": [], "whisper": []},
        agents=[AgentSpec(name="loud", title="Loud", description="", instructions="",
                          tools=("shout", "sing"))],
        settings_schema={"type": "object", "properties": {"token": {"type": "integer",
                                                                     "writeOnly": True}}},
    )  # fmt: skip
    problems = manifest_problems(manifest)
    expected = [
        "name 'Bad Name' must be lowercase",
        "version must be a non-empty string",
        "tool names repeat: shout",
        "scopes name 'whisper', which is not one of the plugin's tools",
        "agent 'loud' has no instructions",
        "agent 'loud' uses tools the plugin does not add: sing",
        "secret setting 'token' (writeOnly) must be a string",
    ]
    for sentence in expected:
        assert any(problem.startswith(sentence) for problem in problems), (sentence, problems)
    assert manifest_problems(
        PluginManifest(name="x", version="1", description="d", settings_schema={"type": 5})
    ) == [
        "settings_schema is not a valid JSON Schema: 5 is not valid under any of the given schemas"
    ]


@pytest.mark.parametrize(
    ("settings_in", "problem"),
    [
        ({}, "settings: 'api_key' is a required property"),
        ({"api_key": ["sekrit-sekrit"]}, "api_key: breaks the schema rule type 'string'"),
        ({"api_key": "sekrit"}, "api_key: breaks the schema rule minLength 8"),
        ({"api_key": "sekrit-sekrit", "max_results": 99}, "max_results: breaks the schema rule"),
        ({"api_key": "sekrit-sekrit", "endpoint": "ftp://x"}, "endpoint must be an https:// URL"),
    ],
)
def test_settings_are_checked_without_echoing_secrets(settings, settings_in, problem):
    settings.PARLEY_PLUGINS = None
    from agents.registry import registry

    with pytest.raises(SettingsError) as refused:
        registry().settings_check("example_lookup", settings_in)
    assert any(p.startswith(problem) for p in refused.value.problems), refused.value.problems
    assert "sekrit" not in str(refused.value)


def test_settings_round_trip_keeps_secrets_sealed(settings):
    settings.PARLEY_PLUGINS = None
    manifest = plugin_get("example_lookup").manifest
    clean = {"api_key": "k-0123456789", "max_results": 3}
    stored = settings_seal(manifest, clean)
    assert stored["max_results"] == 3
    assert stored["api_key"].startswith("fernet:") and "k-0123456789" not in stored["api_key"]
    assert settings_unseal(manifest, stored) == clean
    assert settings_redact(manifest, clean) == {"api_key": True, "max_results": 3}


# --- the conformance suite bites ----------------------------------------------------------


def test_conformance_suite_fails_a_sloppy_plugin(plugin_dir):
    from agents.registry import plugin_load
    from agents.testing import PluginConformance

    # pp_good is a valid manifest, but its tool's argument has no description and its
    # settings cannot hold a secret the suite is told to expect.
    plugin = plugin_load(fake("pp_good", "pp_good"))
    suite = PluginConformance()
    with pytest.raises(AssertionError, match=r"echo\(text\) has no description"):
        suite.test_tools_have_descriptions_and_schemas(plugin)
    registry = PluginRegistry(entry_points=lambda: [fake("pp_good", "pp_good")])
    suite.entry_point = "pp_good"
    suite.invalid_settings_examples = [{}]
    with pytest.raises(pytest.fail.Exception, match="DID NOT RAISE"):
        suite.test_invalid_settings_refused(plugin, registry)
    suite.settings_examples = [{"colour": "blue"}]
    with pytest.raises(SettingsError, match="colour"):
        suite.test_settings_round_trip(plugin, registry)
