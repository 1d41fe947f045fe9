"""Per-tenant plugins: admins enable them, grant scopes and fill in settings; members
pick their agents; runs get only granted tools. Secrets never come back out."""

from __future__ import annotations

import json
import logging

import pytest
from django.forms.models import model_to_dict

from agents.models import TenantPlugin
from agents.selectors import agents_available, tools_for_run
from agents.services import plugin_disable, plugin_enable, plugin_settings_update
from tenants.access import NotFound
from tenants.models import AuditEvent
from tenants.rls import operator_scope, tenant_scope
from tests.conftest import plugin_install

pytestmark = pytest.mark.django_db

SECRET = "sk-directory-0d5e7c1b9a"
ALICE_ENDPOINT = "https://alice-directory.example.org/v1"
URL = "/api/v1/plugins/example_lookup"


@pytest.fixture(autouse=True)
def _all_plugins(all_plugins):
    """Every test here sees every installed plugin (conftest.all_plugins)."""


def put(client, person, body, url=URL):
    client.force_login(person.user)
    return client.put(url, json.dumps(body), content_type="application/json")


def get(client, person, url=URL):
    client.force_login(person.user)
    return client.get(url)


def configure(client, person, *, endpoint=ALICE_ENDPOINT, scopes=("network.fetch",)):
    response = put(
        client,
        person,
        {
            "settings": {"endpoint": endpoint, "api_key": SECRET, "max_results": 5},
            "granted_scopes": list(scopes),
            "enabled": True,
        },
    )
    assert response.status_code == 200, response.content
    return response


def stored_row(person) -> TenantPlugin:
    with operator_scope():
        return TenantPlugin.objects.get(tenant=person.tenant, plugin="example_lookup")


def test_enable_grant_and_settings_round_trip(client, alice):
    response = configure(client, alice)
    assert SECRET not in response.content.decode()
    body = response.json()
    assert body["enabled"] is True
    assert body["granted_scopes"] == ["network.fetch"]
    assert body["settings"] == {"endpoint": ALICE_ENDPOINT, "api_key": True, "max_results": 5}
    assert body["secret_settings"] == ["api_key"]
    assert body["scopes"] == ["network.fetch"]
    assert [agent["id"] for agent in body["agents"]] == ["example_lookup.geographer"]

    shown = get(client, alice)
    assert shown.status_code == 200
    assert shown.json() == body
    listed = get(client, alice, "/api/v1/plugins")
    assert SECRET not in listed.content.decode()
    by_name = {plugin["name"]: plugin for plugin in listed.json()}
    assert by_name["example_lookup"] == body
    assert by_name["calculator"]["enabled"] is False

    # Stored sealed; only the run sees it in the clear.
    row = stored_row(alice)
    assert SECRET not in json.dumps(row.settings)
    assert row.settings["api_key"].startswith("fernet:")
    assert row.updated_by == alice.user
    run = tools_for_run(tenant_id=alice.tenant.id, agent="example_lookup.geographer")
    assert run.settings == {"endpoint": ALICE_ENDPOINT, "api_key": SECRET, "max_results": 5}
    assert [tool.name for tool in run.tools] == ["country_lookup", "country_codes"]
    assert SECRET not in repr(run)


def test_an_omitted_secret_keeps_its_value_and_null_clears_it(client, alice):
    configure(client, alice)
    response = put(client, alice, {"settings": {"endpoint": ALICE_ENDPOINT, "max_results": 7}})
    assert response.status_code == 200, response.content
    assert response.json()["settings"]["api_key"] is True
    # Sent back as GET shows it: kept too.
    shown = response.json()["settings"]
    assert put(client, alice, {"settings": shown}).status_code == 200
    run = tools_for_run(tenant_id=alice.tenant.id, agent="example_lookup.geographer")
    assert run.settings == {"endpoint": ALICE_ENDPOINT, "api_key": SECRET, "max_results": 7}

    # The key is required by the plugin's schema: clearing it is refused...
    refused = put(client, alice, {"settings": {"api_key": None}})
    assert refused.status_code == 400
    assert "'api_key' is a required property" in refused.json()["detail"]
    assert stored_row(alice).settings["api_key"].startswith("fernet:")


OPTIONAL_KEY_PLUGIN = """
from agents.hookspecs import hookimpl
from agents.manifest import PluginManifest

@hookimpl
def parley_manifest():
    return PluginManifest(
        name="optional_key", version="1", description="A plugin whose key may be left out.",
        settings_schema={"type": "object", "additionalProperties": False,
                         "properties": {"token": {"type": "string", "writeOnly": True}}},
    )
"""


def test_null_clears_a_secret(alice, tmp_path, monkeypatch):
    plugin_install(tmp_path, monkeypatch, name="optional_key", source=OPTIONAL_KEY_PLUGIN)
    with tenant_scope(tenant_id=alice.tenant.id):
        plugin_settings_update(actor=alice.actor, name="optional_key", settings={"token": SECRET})
        row = TenantPlugin.objects.get(tenant=alice.tenant, plugin="optional_key")
        assert row.settings["token"].startswith("fernet:")
        plugin_settings_update(actor=alice.actor, name="optional_key", settings={})
        row.refresh_from_db()
        assert row.settings["token"].startswith("fernet:")  # left out: kept
        plugin_settings_update(actor=alice.actor, name="optional_key", settings={"token": None})
        row.refresh_from_db()
        assert row.settings == {}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"settings": {"api_key": "sk-1"}}, "api_key: breaks the schema rule minLength 8"),
        ({"settings": {"api_key": SECRET, "colour": "red"}}, "Additional properties"),
        (
            {"settings": {"api_key": SECRET, "endpoint": "http://plain.example.org"}},
            "endpoint must be an https:// URL",
        ),
        ({"settings": {"api_key": SECRET, "max_results": 500}}, "max_results"),
        ({"granted_scopes": ["code.execute"]}, "does not use the scopes code.execute"),
        ({"enabled": True}, "Fill in the settings of plugin 'example_lookup'"),
    ],
)
def test_bad_input_is_refused_without_echoing_secrets(client, alice, body, message):
    response = put(client, alice, body)
    assert response.status_code == 400, response.content
    detail = response.json()["detail"]
    assert message in detail
    assert SECRET not in response.content.decode()
    assert "sk-1" not in detail
    # All or nothing: nothing was enabled or stored.
    with operator_scope():
        row = TenantPlugin.objects.filter(tenant=alice.tenant, plugin="example_lookup").first()
    assert row is None or (not row.enabled and row.settings == {} and row.granted_scopes == [])


def test_a_failed_put_changes_nothing(client, alice):
    configure(client, alice)
    before = model_to_dict(stored_row(alice))
    response = put(
        client,
        alice,
        {"settings": {"api_key": "sk-new-key-123"}, "granted_scopes": ["code.execute"]},
    )
    assert response.status_code == 400
    assert model_to_dict(stored_row(alice)) == before


def test_plugins_that_are_not_loaded_cannot_be_enabled(client, alice, settings):
    response = put(client, alice, {"enabled": True}, "/api/v1/plugins/not_installed_anywhere")
    assert response.status_code == 404
    settings.PARLEY_PLUGINS = ["calculator"]  # installed but not allowed
    assert put(client, alice, {"enabled": True}).status_code == 404
    assert get(client, alice).status_code == 404
    assert put(client, alice, {"enabled": True}, "/api/v1/plugins/calculator").status_code == 200
    with tenant_scope(tenant_id=alice.tenant.id), pytest.raises(NotFound):
        plugin_enable(actor=alice.actor, name="example_lookup")


def test_members_cannot_change_plugins_and_see_only_enabled_agents(client, alice, bob):
    assert put(client, bob, {"enabled": True}, "/api/v1/plugins/calculator").status_code == 403
    assert get(client, bob, "/api/v1/plugins").json() == []
    assert get(client, bob).status_code == 404  # not enabled: not there for members

    configure(client, alice)
    refused = put(client, bob, {"enabled": False, "settings": {"api_key": "sk-bob-123456"}})
    assert refused.status_code == 403
    assert stored_row(alice).enabled is True

    listed = get(client, bob, "/api/v1/plugins")
    assert listed.status_code == 200
    assert SECRET not in listed.content.decode()
    assert ALICE_ENDPOINT not in listed.content.decode()  # settings are for admins
    [plugin] = listed.json()
    assert plugin["name"] == "example_lookup"
    assert set(plugin) == {"name", "version", "description", "enabled", "agents"}
    assert plugin["agents"][0]["id"] == "example_lookup.geographer"
    assert get(client, bob).json() == plugin


def test_outsiders_see_only_their_own_tenant(client, alice, charlie):
    configure(client, alice)
    before = model_to_dict(stored_row(alice))
    for url in (URL, "/api/v1/plugins"):
        response = get(client, charlie, url)
        assert response.status_code == 200
        assert ALICE_ENDPOINT not in response.content.decode()
        assert SECRET not in response.content.decode()
    shown = get(client, charlie).json()
    assert shown["enabled"] is False and shown["settings"] == {}
    assert shown["granted_scopes"] == []

    # Charlie's changes are his tenant's, never alice's.
    other = "https://charlie-directory.example.org/v1"
    configure(client, charlie, endpoint=other, scopes=())
    assert model_to_dict(stored_row(alice)) == before
    assert get(client, charlie).json()["settings"]["endpoint"] == other
    assert get(client, alice).json()["settings"]["endpoint"] == ALICE_ENDPOINT
    with tenant_scope(tenant_id=charlie.tenant.id):
        # Row level security: alice's row does not exist in charlie's scope.
        assert list(TenantPlugin.objects.values_list("tenant_id", flat=True)) == [charlie.tenant.id]
    charlie_run = tools_for_run(tenant_id=charlie.tenant.id, agent="example_lookup.geographer")
    assert charlie_run.settings["endpoint"] == other
    assert [tool.name for tool in charlie_run.tools] == ["country_codes"]


def test_a_disabled_plugin_offers_no_agents(client, alice, bob):
    configure(client, alice)
    with tenant_scope(tenant_id=alice.tenant.id):
        assert [agent.id for agent in agents_available(actor=bob.actor)] == [
            "example_lookup.geographer"
        ]
        plugin_disable(actor=alice.actor, name="example_lookup")
        assert agents_available(actor=bob.actor) == []
    with pytest.raises(NotFound):
        tools_for_run(tenant_id=alice.tenant.id, agent="example_lookup.geographer")
    assert get(client, bob, "/api/v1/plugins").json() == []
    # Settings and grants survive; enabling again restores the agent.
    assert put(client, alice, {"enabled": True}).json()["settings"]["api_key"] is True
    assert tools_for_run(tenant_id=alice.tenant.id, agent="example_lookup.geographer")


def test_an_ungranted_scope_keeps_its_tool_from_the_run(client, alice):
    configure(client, alice, scopes=())
    run = tools_for_run(tenant_id=alice.tenant.id, agent="example_lookup.geographer")
    assert [tool.name for tool in run.tools] == ["country_codes"]
    assert run.granted_scopes == frozenset()
    put(client, alice, {"granted_scopes": ["network.fetch"]})
    run = tools_for_run(tenant_id=alice.tenant.id, agent="example_lookup.geographer")
    assert [tool.name for tool in run.tools] == ["country_lookup", "country_codes"]
    for unknown in ("example_lookup.nobody", "calculator.calculator", "nothing"):
        with pytest.raises(NotFound):
            tools_for_run(tenant_id=alice.tenant.id, agent=unknown)


def test_secrets_never_reach_the_audit_log_or_logs(client, alice, caplog):
    caplog.set_level(logging.DEBUG)
    configure(client, alice)
    put(client, alice, {"settings": {"api_key": "sk-too"}})  # refused, logged as a 400
    changed = {"endpoint": ALICE_ENDPOINT, "max_results": 5, "api_key": SECRET + "-2"}
    put(client, alice, {"settings": changed, "enabled": False})
    assert get(client, alice).status_code == 200
    with operator_scope():
        events = list(AuditEvent.objects.filter(tenant=alice.tenant).order_by("id"))
    actions = [event.action for event in events]
    assert actions == [
        "plugin.settings_changed",
        "plugin.scopes_granted",
        "plugin.enabled",
        "plugin.settings_changed",
        "plugin.disabled",
    ]
    assert events[0].data == {"changed": ["api_key", "endpoint", "max_results"]}
    assert events[3].data == {"changed": ["api_key"]}
    dumped = json.dumps([model_to_dict(event) for event in events], default=str)
    assert SECRET not in dumped and "sk-too" not in dumped
    assert "fernet:" not in dumped
    logged = "\n".join(record.getMessage() for record in caplog.records) + caplog.text
    assert SECRET not in logged and "sk-too" not in logged
