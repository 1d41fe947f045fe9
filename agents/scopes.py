"""Scopes decide which of a plugin's tools a run may use (DESIGN section 4).

A tenant grants a plugin some scopes when enabling it. A tool whose scopes are not all
granted is not offered to the model (`tools_allowed`), and a call the model makes to
it anyway, or to a tool the plugin does not have, is refused before anything runs
(`tool_guard`, `tool_invoke`): model output is untrusted.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from langchain_core.runnables import RunnableConfig
from langchain_core.tools import BaseTool

from agents.manifest import PluginManifest


class ToolRefused(PermissionError):
    """A tool call that must not run; the message is safe to show the model and user."""

    def __init__(self, message: str, *, plugin: str, tool: str, missing: frozenset[str]) -> None:
        self.plugin = plugin
        self.tool = tool
        self.missing = missing
        super().__init__(message)


def missing_scopes(
    manifest: PluginManifest, tool_name: str, granted: Iterable[str]
) -> frozenset[str]:
    return manifest.tool_scopes(tool_name) - frozenset(granted)


def tools_allowed(manifest: PluginManifest, *, granted_scopes: Iterable[str]) -> list[BaseTool]:
    """The plugin's tools whose every scope is granted, in the manifest's order."""
    granted = frozenset(granted_scopes)
    return [tool for tool in manifest.tools if manifest.tool_scopes(tool.name) <= granted]


def tool_guard(
    manifest: PluginManifest, *, tool_name: str, granted_scopes: Iterable[str]
) -> BaseTool:
    """The tool the model named, if this run may call it; ToolRefused otherwise."""
    tool = manifest.tool(tool_name)
    if tool is None:
        raise ToolRefused(
            f"Plugin {manifest.name!r} has no tool {tool_name!r}.",
            plugin=manifest.name,
            tool=tool_name,
            missing=frozenset(),
        )
    missing = missing_scopes(manifest, tool_name, granted_scopes)
    if missing:
        raise ToolRefused(
            f"Tool {tool_name!r} of plugin {manifest.name!r} needs scopes not granted to "
            f"it: {', '.join(sorted(missing))}.",
            plugin=manifest.name,
            tool=tool_name,
            missing=missing,
        )
    return tool


def tool_invoke(
    manifest: PluginManifest,
    *,
    tool_name: str,
    arguments: dict[str, Any],
    granted_scopes: Iterable[str],
    config: RunnableConfig | None = None,
) -> Any:
    """Run a tool call after `tool_guard`; the tool never starts when it refuses."""
    tool = tool_guard(manifest, tool_name=tool_name, granted_scopes=granted_scopes)
    return tool.invoke(arguments, config=config)


# Tools with side effects run on workers of their own (DESIGN section 4), never in the
# agent worker: code on isolated sandbox hosts, outside requests and document writes on
# the `tools` workers. A tool without any of these scopes runs in the agent worker.
SCOPE_QUEUES: dict[str, str] = {
    "code.execute": "sandbox",
    "network.fetch": "tools",
    "documents.write": "tools",
}
# When a tool needs scopes of several queues, the most isolated one runs it.
QUEUE_ORDER = ("sandbox", "tools")


# Of those, the scopes that act outside the run: never on a document's say-so
# (agents.runtime: a run reading document text is offered no such tool). Running code
# is not among them: it runs in the sandbox (sandbox.jail), with no network, and
# changes only the conversation's own workspace, so a coding agent may run the tests of
# a repository it has read.
OUTWARD_SCOPES = frozenset({"network.fetch", "documents.write"})


def side_effects(scopes: Iterable[str]) -> frozenset[str]:
    """Those of `scopes` that act on the world outside the run (OUTWARD_SCOPES)."""
    return frozenset(scope for scope in scopes if scope in OUTWARD_SCOPES)


def tool_queue(scopes: Iterable[str]) -> str | None:
    """The queue that runs a tool needing `scopes`; None when it runs in-process."""
    queues = {SCOPE_QUEUES[scope] for scope in scopes if scope in SCOPE_QUEUES}
    return next((queue for queue in QUEUE_ORDER if queue in queues), None)
