"""A tenant's plugins: tenant admins enable them, grant scopes to their tools and fill
in their settings. Every change is audited; secret settings are sealed before they are
stored and never reach an audit event, a log line or a response.

A stored secret never follows a changed destination: changing a setting that says
where the plugin connects (a URL or host: `"format": "uri"` and the like in its
schema) needs every secret that is kept to be sent again, as single sign-on needs the
client secret again when its issuer changes (tenants.services.sso)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.core.exceptions import ValidationError
from django.db import transaction

from agents.manifest import (
    SettingsError,
    settings_seal,
    settings_secret_fields,
    settings_unseal,
)
from agents.models import TenantPlugin
from agents.registry import LoadedPlugin, PluginNotFound, plugin_get, registry
from tenants.access import Actor, NotFound, require_role
from tenants.models import Role
from tenants.services.audit import audit_record

# How a secret comes back in a PUT: as shown by GET (`true`: it is set) or omitted, it
# keeps its stored value; `null` (or `false`) clears it; a string replaces it.

# JSON Schema formats of a setting that names where the plugin sends requests.
DESTINATION_FORMATS = frozenset(
    {"uri", "uri-reference", "iri", "iri-reference", "uri-template", "hostname", "idn-hostname"}
    | {"ipv4", "ipv6"}
)


def _loaded(name: str) -> LoadedPlugin:
    try:
        return plugin_get(name)
    except PluginNotFound:
        raise NotFound from None


def _row_for_update(*, actor: Actor, name: str) -> TenantPlugin:
    row, _ = TenantPlugin.objects.select_for_update().get_or_create(
        tenant=actor.tenant, plugin=name
    )
    return row


def _save(row: TenantPlugin, actor: Actor, fields: list[str]) -> None:
    row.updated_by = actor.user
    row.save(update_fields=[*fields, "updated_by", "updated_at"])


def settings_destinations(schema: Mapping[str, Any]) -> frozenset[str]:
    """The top-level settings that name a destination (DESTINATION_FORMATS)."""
    properties = schema.get("properties", {})
    return frozenset(
        name
        for name, prop in properties.items()
        if isinstance(prop, Mapping) and prop.get("format") in DESTINATION_FORMATS
    )


def _settings_refused(name: str, problems: list[str], secrets: list[str]) -> ValidationError:
    # The schema's messages never quote values, and plugins are asked not to; a secret
    # that shows up in one anyway is blanked out before anyone sees it.
    text = "; ".join(problems)
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return ValidationError(f"Settings of plugin {name!r} are invalid: {text}")


def plugin_enable(*, actor: Actor, name: str) -> TenantPlugin:
    """Turn a loaded plugin on for the actor's tenant; its settings must be complete."""
    require_role(actor, Role.ADMIN)
    plugin = _loaded(name)
    with transaction.atomic():
        row = _row_for_update(actor=actor, name=name)
        if row.enabled:
            return row
        current = settings_unseal(plugin.manifest, row.settings)
        try:
            registry().settings_check(name, current)
        except SettingsError as exc:
            secrets = [
                str(current.get(k, ""))
                for k in settings_secret_fields(plugin.manifest.settings_schema)
            ]
            raise ValidationError(
                f"Fill in the settings of plugin {name!r} before enabling it. "
                + str(_settings_refused(name, exc.problems, secrets).messages[0])
            ) from None
        row.enabled = True
        _save(row, actor, ["enabled"])
        audit_record(actor=actor, action="plugin.enabled", target=row, target_label=name)
    return row


def plugin_disable(*, actor: Actor, name: str) -> TenantPlugin:
    """Turn a plugin off for the actor's tenant (also one no longer installed)."""
    require_role(actor, Role.ADMIN)
    with transaction.atomic():
        row = (
            TenantPlugin.objects.select_for_update()
            .filter(tenant=actor.tenant, plugin=name)
            .first()
        )
        if row is None:
            _loaded(name)  # a loaded plugin never enabled: nothing to do
            return _row_for_update(actor=actor, name=name)
        if row.enabled:
            row.enabled = False
            _save(row, actor, ["enabled"])
            audit_record(actor=actor, action="plugin.disabled", target=row, target_label=name)
    return row


def plugin_scopes_grant(*, actor: Actor, name: str, scopes: list[str]) -> TenantPlugin:
    """Set the scopes the plugin's tools may use in this tenant (replacing the last
    grant); only scopes its tools declare can be granted."""
    require_role(actor, Role.ADMIN)
    plugin = _loaded(name)
    manifest = plugin.manifest
    declared = set().union(*(manifest.tool_scopes(tool.name) for tool in manifest.tools))
    if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
        raise ValidationError("granted_scopes must be a list of scope names.")
    wanted = sorted(set(scopes))
    unknown = [scope for scope in wanted if scope not in declared]
    if unknown:
        raise ValidationError(
            f"Plugin {name!r} does not use the scopes {', '.join(unknown)}; its tools declare "
            f"{', '.join(sorted(declared)) or 'none'}."
        )
    with transaction.atomic():
        row = _row_for_update(actor=actor, name=name)
        before = sorted(row.granted_scopes)
        if before != wanted:
            row.granted_scopes = wanted
            _save(row, actor, ["granted_scopes"])
            audit_record(
                actor=actor,
                action="plugin.scopes_granted",
                target=row,
                target_label=name,
                data={"before": before, "after": wanted},
            )
    return row


def plugin_settings_update(*, actor: Actor, name: str, settings: Mapping[str, Any]) -> TenantPlugin:
    """Replace the plugin's settings for the tenant, validated against its schema and its
    own check. A secret omitted (or sent back as `true`, as GET shows it) keeps its
    stored value; `null` clears it. A changed destination setting (a URL, a host) keeps
    no stored secret: they must be sent again (else ValidationError)."""
    require_role(actor, Role.ADMIN)
    plugin = _loaded(name)
    manifest = plugin.manifest
    if not isinstance(settings, Mapping):
        raise ValidationError("settings must be a JSON object.")
    secrets = settings_secret_fields(manifest.settings_schema)
    with transaction.atomic():
        row = _row_for_update(actor=actor, name=name)
        stored = settings_unseal(manifest, row.settings)
        wanted = dict(settings)
        kept: list[str] = []  # secrets taken over from the stored settings
        for key in secrets:
            if key not in wanted or wanted[key] is True:
                if key in stored:
                    wanted[key] = stored[key]
                    kept.append(key)
                else:
                    wanted.pop(key, None)
            elif wanted[key] is None or wanted[key] is False:
                del wanted[key]
        try:
            clean = registry().settings_check(name, wanted)
        except SettingsError as exc:
            values = [str(wanted[k]) for k in secrets if k in wanted]
            raise _settings_refused(name, exc.problems, values) from None
        moved = sorted(
            key
            for key in settings_destinations(manifest.settings_schema)
            if clean.get(key) != stored.get(key)
        )
        if moved and kept:
            raise ValidationError(
                f"Changing {', '.join(moved)} of plugin {name!r} needs "
                f"{', '.join(sorted(kept))} again: a stored secret is never sent to a new "
                "destination. Send the secret with the new setting (or null to clear it)."
            )
        if clean != stored:
            changed = sorted(
                key for key in set(clean) | set(stored) if clean.get(key) != stored.get(key)
            )
            row.settings = settings_seal(manifest, clean)
            _save(row, actor, ["settings"])
            # Names only: a value could be a secret typed into the wrong field.
            audit_record(
                actor=actor,
                action="plugin.settings_changed",
                target=row,
                target_label=name,
                data={"changed": changed},
            )
    return row


def plugin_update(
    *,
    actor: Actor,
    name: str,
    enabled: bool | None = None,
    granted_scopes: list[str] | None = None,
    settings: Mapping[str, Any] | None = None,
) -> TenantPlugin:
    """What a PUT asks for, all or nothing: settings, then scopes, then on or off."""
    require_role(actor, Role.ADMIN)
    with transaction.atomic():
        row: TenantPlugin | None = None
        if settings is not None:
            row = plugin_settings_update(actor=actor, name=name, settings=settings)
        if granted_scopes is not None:
            row = plugin_scopes_grant(actor=actor, name=name, scopes=granted_scopes)
        if enabled is True:
            row = plugin_enable(actor=actor, name=name)
        elif enabled is False:
            row = plugin_disable(actor=actor, name=name)
        if row is None:
            _loaded(name)
            row = _row_for_update(actor=actor, name=name)
    return row
