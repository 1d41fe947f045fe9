"""The hooks a Parley plugin implements, each declared once here with its contract.

A plugin is a module (or any object) named by an entry point in the group
`parley.plugins`; the entry point's name is the plugin's name. Its functions marked
`@hookimpl` with the names below are its hooks:

    from agents.hookspecs import hookimpl
    from agents.manifest import PluginManifest

    @hookimpl
    def parley_manifest() -> PluginManifest:
        return PluginManifest(name="weather", version="1.0", description="...", ...)

Every hook is called for one plugin at a time (agents.registry): one plugin's answer
never mixes with another's. A function named like a hook but not declared here, or
taking arguments its spec does not offer, makes the plugin fail to load.
tests/test_plugins.py fails when a hook here has no docstring.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from agents.manifest import PluginManifest

PROJECT = "parley"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec(firstresult=True)
def parley_manifest() -> PluginManifest:  # type: ignore[empty-body]
    """Describe the plugin: required, called once when the plugin loads.

    Return an `agents.manifest.PluginManifest`: the plugin's name (equal to its entry
    point's name), version, description; the LangChain tools it adds and, for each tool,
    the scopes it needs (`agents.manifest.SCOPES`; `()` for none); the agents it
    provides (`AgentSpec`: instructions and a choice of the plugin's tools); and the
    JSON Schema of its per-tenant settings (secrets marked `"writeOnly": true`).

    Build the manifest without side effects: no network, no files, no database. A
    manifest that breaks the rules (agents.manifest.manifest_problems) is reported to
    the operator and the plugin is skipped.

    A tool learns whose call it serves from its `RunnableConfig`:
    `agents.context.tool_context(config)` is the run's `ToolContext` (tenant, member,
    run, the documents in play; `scope()` for database access through the access
    functions from the tool's thread; `progress(...)` for a long tool's `progress`
    events); never trust ids in the model's arguments for these. A tool whose scopes
    act on the world outside the run (`network.fetch`, `documents.write`) is never
    offered to, nor run by, a run that reads document text (`ToolContext.untrusted`):
    design such tools so that a document cannot be their reason to act. Code
    (`code.execute`) runs in the sandbox with no network and only the conversation's
    workspace, so it stays available. A tool may return `agents.context.ToolAnswer`
    (text and the artifacts it stored) to have files shown with its step. A result
    longer than 4,000 characters is passed by reference: the model gets its start and a
    `ref`, and reads on with the runtime's `tool_result_read` (agents.runtime); a tool
    over large data (a long document) had better take paging arguments anyway.
    """


@hookspec(firstresult=True)
def parley_settings_check(settings: dict[str, Any]) -> list[str] | None:
    """Check a tenant's settings beyond what the JSON Schema can say: optional.

    Called with settings that already satisfy the plugin's settings schema, secrets in
    the clear, whenever a tenant admin saves them. Return a list of problems, each a
    sentence naming the setting (never echoing a secret), or an empty list / None when
    the settings are fine. Must not do I/O: reaching an outside service to test a key
    belongs in a tool, run under its scopes.
    """
